"""Answers kept for steps that say ``cache:``, and the key that finds them.

The key is a SHA-256 of everything that shapes an answer: the model and its
endpoint (and a simulated model's ``mock_response``), the rendered messages,
``max_tokens``, the temperature, the output schema, the structured-output
form and the tools offered. Checks are not in it: a hit is checked again, and taken only if it
passes the step's schema and checks as they are now.

A hit makes no request. Its ledger row has outcome ``cache_hit``, no tokens
and $0, and keeps what the all-frontier counterfactual would have paid for
the answer's tokens, so savings count it. Sensitive and tainted steps, and
prompts holding personal data, are not cached unless the step's
``cache: {sensitive: true}`` says so: the answer is stored in the database.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from orchestrator.errors import redact
from orchestrator.settings import ModelEntry
from orchestrator.spec import Cache, StepPlan
from orchestrator.storeio import off_loop

if TYPE_CHECKING:
    from orchestrator.store import Store

log = logging.getLogger("tierflow.cache")


@dataclass(frozen=True)
class Cached:
    """An answer found for a key, with the tokens of the call that made it."""

    answer: str
    prompt_tokens: int
    completion_tokens: int


def answer_key(plan: StepPlan, entry: ModelEntry, messages: list[dict[str, str]]) -> str:
    """The key of what ``entry`` would answer to ``messages`` for ``plan``."""
    shaped: dict[str, Any] = {
        "model": entry.model,
        "api_base": entry.api_base,
        "mock_response": entry.mock_response,
        "structured": entry.structured,
        "messages": messages,
        "max_tokens": plan.max_tokens,
        "temperature": plan.agent.temperature,
        "schema": plan.step.output,
        "tools": [tool.schema() for tool in plan.tools],
        # A step that now asks for confidence takes no answer kept without it.
        "confidence": plan.confidence.model_dump(mode="json") if plan.confidence else None,
    }
    text = json.dumps(shaped, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def caching(plan: StepPlan, personal: list[str]) -> Cache | None:
    """The step's cache settings, or None when its answers are not to be kept."""
    cache = plan.cache
    if cache is None:
        return None
    if (plan.local_only or personal) and not cache.sensitive:
        return None
    return cache


def expiry(cache: Cache, now: datetime) -> datetime | None:
    return None if cache.ttl_s is None else now + timedelta(seconds=cache.ttl_s)


def stored_text(value: Any) -> str:
    """An accepted output as text the step's ``verify`` reads back to the same value."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


class Answers:
    """The kept answers of one workflow's runs. The cache only saves calls: a
    database that cannot be read or written makes a miss, logged, never a
    failed step."""

    def __init__(self, store: Store, workflow: str, *, secrets: tuple[str, ...] = ()) -> None:
        self._store = store
        self._workflow = workflow
        self._secrets = secrets

    async def find(self, keys: list[str]) -> dict[str, Cached]:
        """The answers kept under any of ``keys``, by key."""
        try:
            found = await off_loop(lambda: self._store.cached_answers(keys, datetime.now(UTC)))
        except Exception as exc:
            self._warn("read", exc)
            return {}
        return {key: Cached(*row) for key, row in found.items()}

    async def keep(
        self,
        plan: StepPlan,
        cache: Cache,
        key: str,
        *,
        model: str,
        value: Any,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        now = datetime.now(UTC)
        try:
            await off_loop(
                lambda: self._store.keep_answer(
                    key=key,
                    workflow=self._workflow,
                    step_id=plan.id,
                    model=model,
                    answer=stored_text(value),
                    prompt_tokens=prompt_tokens,
                    completion_tokens=completion_tokens,
                    created_at=now,
                    expires_at=expiry(cache, now),
                )
            )
        except Exception as exc:
            self._warn("kept", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        message = redact(f"{type(exc).__name__}: {exc}", self._secrets)
        log.warning("the answer cache could not be %s, the step goes on: %s", what, message)
