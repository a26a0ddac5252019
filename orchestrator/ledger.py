"""What one model call cost, and the records a step leaves in the ledger.

``Call`` is one provider request (one ledger row); ``StepRecord`` is a step's
result with every call it made, written together in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from orchestrator.settings import Settings

# Outcomes of a call whose answer a step may take (a cache hit's was kept from an earlier one).
ACCEPTED = ("ok", "low_confidence", "cache_hit")


@dataclass(frozen=True)
class Call:
    """One model call: what was asked where, what it used, and what it cost."""

    attempt: int
    item_index: int | None
    tier_asked: str
    tier_used: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost_usd: Decimal
    reference_cost_usd: Decimal | None
    latency_ms: float
    outcome: str
    error: str | None
    escalation_reason: str | None
    created_at: datetime
    reserved_usd: Decimal | None = None  # held against budgets before the request
    local: bool = False  # served by a local tier
    simulated: bool = False  # served by a stand-in for a real model (a tier marked simulated)
    # Where the tokens come from: "reported" by the provider; "counted" here, as
    # the provider reported none; "worst_case", the reservation's estimate, kept
    # for a call that may have been billed and reported nothing; None, nothing
    # was sent or the provider refused the request (4xx): no tokens.
    usage_source: str | None = None
    # The confidence signal that scored an answer, and its score: None with a
    # signal means the backend gave nothing to score (no logprobs, say).
    signal: str | None = None
    confidence: float | None = None
    # The score before calibration, when the step's labels calibrated it (see
    # ``orchestrator.calibration``); None: ``confidence`` is the raw score.
    raw_confidence: float | None = None
    judged: int | None = None  # a judge's call: the attempt number of the answer it graded
    personal: str | None = None  # kinds of personal data its prompt held ("email,phone"), if any
    # How the step's start tier was chosen (written, auto, explore, downgrade); for
    # ``tier: auto``, the start tier's expected pass rate and the step's route key.
    routed: str | None = None
    expected_pass: float | None = None
    route_key: str | None = None


@dataclass(frozen=True)
class ToolRun:
    """One tool call of a step's tool loop: what ran, how it went, how big it was
    (sizes in bytes of the arguments and the result; never the values)."""

    attempt: int  # the model turn that asked for it
    item_index: int | None
    name: str
    # ok, truncated, error, timeout; refused: unknown tool or bad arguments;
    # running: written before the tool runs; interrupted: its process died then
    outcome: str
    duration_ms: float
    arguments_bytes: int
    result_bytes: int
    error: str | None
    created_at: datetime
    id: int | None = None  # its row, once written before the tool ran


@dataclass(frozen=True)
class Trace:
    """What one call was sent and what came back (``trace:``), secrets masked."""

    attempt: int
    item_index: int | None
    messages: list[dict[str, Any]]
    answer: str | None  # None: no answer came (an error, a timeout)
    created_at: datetime


@dataclass
class StepRecord:
    """A finished step (succeeded, failed or skipped) and every call it made."""

    step_id: str
    agent: str
    status: str
    output: Any
    error: str | None
    tier_asked: str | None  # None for an approval step: a person answers it
    started_at: datetime
    finished_at: datetime
    calls: list[Call] = field(default_factory=list)
    tools: list[ToolRun] = field(default_factory=list)  # the tool calls its model asked for
    traces: list[Trace] = field(default_factory=list)  # with trace: on, each call's messages
    # A handed_off step's tier, attempts used and escalation reason, for the next worker.
    handoff: dict[str, Any] | None = None

    @property
    def answer(self) -> Call | None:
        """The call whose answer the step took, if any: the last that succeeded, or
        one below its confidence minimum when nothing stronger answered (a judge's
        call grades an answer and is none)."""
        return next(
            (c for c in reversed(self.calls) if c.outcome in ACCEPTED and c.judged is None), None
        )

    @property
    def cost_usd(self) -> Decimal:
        return sum((call.cost_usd for call in self.calls), Decimal(0))


class Pricer:
    """Cost of a call on its own model and on the reference (all-frontier) model."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._reference = settings.reference_price()
        self._cache: dict[str, Any] = {}

    def cost(
        self, model: str, prompt_tokens: int, completion_tokens: int, seconds: float = 0.0
    ) -> tuple[Decimal, Decimal | None]:
        """The call's cost (tokens, plus machine time for a local model priced per
        hour), and what its tokens would have cost on the reference model."""
        price = self._cache.get(model)
        if price is None:
            price = self._cache[model] = self._settings.price_of(model)
        reference = (
            self._reference.cost(prompt_tokens, completion_tokens) if self._reference else None
        )
        return price.cost(prompt_tokens, completion_tokens, seconds), reference
