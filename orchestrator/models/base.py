"""The model seam: one async method, ``complete``, for every backend.

A client knows its protocol (Ollama, llama.cpp, litellm). Where it runs and with
which key is the tier configuration's business, handed to the constructor.
Clients translate their library's errors into ``ModelError``s at this
boundary, and say whether the request may have reached the model: a call that
provably never left is ``ModelUnavailable``; anything else may have been billed.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any


@dataclass(frozen=True)
class ToolCall:
    """A model's request to run a tool: OpenAI's shape, which every client maps to."""

    id: str
    name: str
    arguments: Any  # a dict, or the text the model gave when it is not JSON


@dataclass(frozen=True)
class ModelRequest:
    model: str  # the name after the provider prefix: ``llama3.2:1b`` for ``ollama/llama3.2:1b``
    # Chat messages in OpenAI's shape: role and content, and in a tool loop an
    # assistant's ``tool_calls`` and ``tool`` answers (``tool_call_id``, ``name``).
    messages: list[dict[str, Any]]
    max_tokens: int
    temperature: float
    timeout_s: float
    json_schema: dict[str, Any] | None = None
    stream: bool = False  # ask for the answer as a stream, and assemble it
    # How to ask for ``json_schema``: the first of FORMS to try (ModelEntry.structured).
    structured: str = "json_schema"
    # Ask for each answer token's log-probability and its best alternative's
    # (a ``logprob`` confidence signal reads them).
    logprobs: bool = False
    tools: tuple[dict[str, Any], ...] = ()  # tools the model may ask for (OpenAI's shape)


@dataclass(frozen=True)
class TokenChoice:
    """One answer token: its log-probability, and the best other token's if the backend said."""

    logprob: float
    runner_up: float | None = None
    text: str = ""  # the token as text, where the backend gives it


@dataclass(frozen=True)
class ModelReply:
    text: str
    prompt_tokens: int
    completion_tokens: int
    counted: bool = False  # the backend reported no usage: the tokens were counted here
    # The answer's tokens, when logprobs were asked for and the backend gave them.
    logprobs: tuple[TokenChoice, ...] | None = None
    tool_calls: tuple[ToolCall, ...] = ()  # the tools the model asks to run, instead of answering
    truncated: bool = False  # it stopped at max_tokens (finish reason "length"), mid-answer


# Ways to ask for structured output, strongest first: the schema itself, any
# JSON object, or nothing (the answer is checked against the schema here either way).
FORMS = ("json_schema", "json_object", "none")
# A schema may travel as a tool, for which a provider adds its own system prompt
# (Anthropic's tool-use prompt is about 350 tokens), besides the schema's own tokens.
STRUCTURED_OVERHEAD_TOKENS = 512


def prompt_tokens_upper_bound(request: ModelRequest) -> int:
    """At least the prompt tokens a provider can bill for ``request``.

    A byte-level BPE token holds at least one byte, and a chat template adds
    tokens around each message. A JSON schema is billed too: counted twice, as
    the response format and as the instructions that name it for servers that
    take only JSON objects, plus what a provider wraps around it.
    """
    tokens = sum(
        len((m.get("content") or "").encode())
        + 16
        + (len(json.dumps(m["tool_calls"]).encode()) if m.get("tool_calls") else 0)
        for m in request.messages
    )
    tokens += sum(len(json.dumps(tool).encode()) for tool in request.tools)
    if request.json_schema is not None:
        schema = len(json.dumps(request.json_schema).encode())
        tokens += 2 * schema + STRUCTURED_OVERHEAD_TOKENS
    return tokens


TOP_LOGPROBS = 2  # alternatives asked for per token: the chosen one and at least one other


def token_choices(entries: Any) -> tuple[TokenChoice, ...] | None:
    """Tokens from an OpenAI- or Ollama-shaped logprobs list (each entry with
    ``logprob`` and ``top_logprobs`` of ``{token, logprob}``), objects or dicts; None
    when there are none."""
    if not entries:
        return None
    found = []
    for entry in entries:
        logprob = _field(entry, "logprob")
        if logprob is None:
            return None
        token = _field(entry, "token")
        others = [
            float(_field(alt, "logprob"))
            for alt in _field(entry, "top_logprobs") or ()
            if _field(alt, "token") != token and _field(alt, "logprob") is not None
        ]
        found.append(TokenChoice(float(logprob), max(others, default=None), str(token or "")))
    return tuple(found)


def _field(entry: Any, name: str) -> Any:
    return entry.get(name) if isinstance(entry, dict) else getattr(entry, name, None)


def instructed(messages: list[dict[str, Any]], schema: dict[str, Any]) -> list[dict[str, Any]]:
    """``messages`` with the schema stated in the system message, for a server that
    is asked for any JSON object, or for nothing: the answer's shape in words."""
    note = f"Answer with JSON only, matching this JSON Schema: {json.dumps(schema)}"
    if messages and messages[0]["role"] == "system":
        first = messages[0]
        return [{**first, "content": f"{first['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


class Forms:
    """The structured-output form each model takes, learnt from its refusals and
    kept for the life of the client that owns this."""

    def __init__(self) -> None:
        self._fallen: dict[str, int] = {}  # model -> index in FORMS of the first form it took

    def of(self, request: ModelRequest) -> str:
        start = FORMS.index(request.structured)
        return FORMS[max(start, self._fallen.get(request.model, 0))]

    def refused(self, request: ModelRequest, form: str) -> bool:
        """Remember that the model refused ``form``; False if no weaker form is left."""
        after = FORMS.index(form) + 1
        if after >= len(FORMS):
            return False
        self._fallen[request.model] = max(self._fallen.get(request.model, 0), after)
        return True


class ModelClient(ABC):
    @abstractmethod
    async def complete(self, request: ModelRequest) -> ModelReply:
        """Answer one chat request, or raise a ``ModelError``. Usage is what the backend reported."""

    async def aclose(self) -> None:  # noqa: B027 - most clients hold nothing to close
        """Release connections. Called once, inside the event loop that used the client."""


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from an HTTP ``Retry-After`` value: delay-seconds or an
    HTTP date (RFC 9110 §10.2.3). None when absent or unreadable; a date in the
    past is 0."""
    text = (value or "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        try:
            when = parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return seconds if math.isfinite(seconds) and seconds >= 0 else None
