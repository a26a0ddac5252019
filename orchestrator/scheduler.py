"""One step: render → choose tier → call → verify → escalate → record.

The ladder is the configured tiers from the step's tier upwards (only tiers
marked ``local`` for a sensitive step, or one that reads confidential data).
Within a tier, models are tried in order on error or timeout; output that fails
the step's schema or checks moves the step straight to the next tier. A model
that is unavailable (no key, server down, not pulled) is recorded and skipped
without using up an attempt. A model that answered 429 or 5xx is asked again
first, within ``retries``' bounds; its tries use one attempt between them, and
each is a ledger row.

A failed call whose request may have reached the provider is recorded at its
worst case (the reservation's usage) unless the provider reported usage; only
a call that provably never left, or that the provider refused (4xx), costs $0.

A queue worker serves only some tiers. A step that starts on, or escalates to,
a tier it does not serve raises ``NeedsTier``: the run is handed to that tier's
queue, and the step continues there where it stopped. Items of a ``for_each``
step escalate in place, on the worker that holds the step.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from orchestrator import privacy, retries, router, schemas
from orchestrator.cache import Answers, answer_key, caching
from orchestrator.calibration import Calibration
from orchestrator.confidence import logprob_score
from orchestrator.errors import (
    LeaseLost,
    ModelBusy,
    ModelError,
    ModelTimeout,
    RunError,
    StepFailed,
    clip,
    redact,
)
from orchestrator.hooks import CallRefused, Hooks
from orchestrator.ledger import Call, Pricer, StepRecord, ToolRun, Trace
from orchestrator.models import Clients, ModelRequest
from orchestrator.models.base import ModelReply, prompt_tokens_upper_bound
from orchestrator.settings import ModelEntry, Settings, Tier
from orchestrator.spec import AUTO_TIER, Confidence, StepPlan, TraceSetting
from orchestrator.store import Checkpoint
from orchestrator.templates import TemplateProblem
from orchestrator.toolloop import ToolRequest, converse

log = logging.getLogger("tierflow.scheduler")
FAN_OUT_CONCURRENCY = 8
# Samples of a ``consistency`` signal are drawn at this temperature: enough to
# let an unsure model disagree with itself (self-consistency's usual 0.5-0.7).
CONSISTENCY_TEMPERATURE = 0.7
BACKSTOP_S = 2.0
_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class InvalidOutput(Exception):
    pass


class _CheckRaised(Exception):
    """A check raised on a model's answer: the workflow's error, not the model's.

    It carries the call, which was made and is recorded as it went; the step
    then fails without asking another model.
    """

    def __init__(self, call: Call, problem: TemplateProblem, answer: str | None = None) -> None:
        super().__init__(str(problem))
        self.answer = answer
        self.call, self.problem = call, problem


class NeedsApproval(Exception):
    """The step waits for a person's decision (``timeout_s``: how long it may wait)."""

    def __init__(self, step_id: str, timeout_s: float | None) -> None:
        super().__init__(f"step '{step_id}' waits for an approval")
        self.timeout_s = timeout_s


# A person's decision on an approval step of the run, or None while there is none.
Decisions = Callable[[StepPlan], Awaitable[dict[str, Any] | None]]


class NeedsTier(Exception):
    """The step continues on ``tier``, which this worker does not serve."""

    def __init__(self, tier: str, *, used: int = 0, reason: str | None = None) -> None:
        super().__init__(f"continues on tier '{tier}'")
        self.tier, self.used, self.reason = tier, used, reason

    def as_record(self) -> dict[str, Any]:
        """What the step's record keeps, so the next worker carries on from here."""
        return {"tier": self.tier, "used": self.used, "reason": self.reason}


def ladder(
    settings: Settings, plan: StepPlan, start: str | None = None, *, cap: str | None = None
) -> list[tuple[str, Tier]]:
    """The tiers ``plan`` may use, in order, from ``start`` (default: the step's own
    tier) up to ``cap`` (default: the strongest). A start above the cap starts at it."""
    tiers = list(settings.config.tiers.items())
    names = [name for name, _ in tiers]
    first = names.index(start or (names[0] if plan.tier == AUTO_TIER else plan.tier))
    last = len(tiers) if cap is None else names.index(cap) + 1
    climb = tiers[min(first, last - 1) : last]
    if plan.local_only:
        # Fail closed: a sensitive or tainted prompt only ever reaches tiers marked local.
        climb = [(name, tier) for name, tier in climb if tier.local]
    return climb


# Where a ``tier: auto`` step starts: given the step, its route key and its
# ladder's tier names (cheapest first), a ``router.Route``.
Router = Callable[[StepPlan, str, list[str]], Awaitable[router.Route]]
# A step's calibration on a model for a signal, or None until its labels allow one.
Calibrations = Callable[[StepPlan, str, str], Awaitable[Calibration | None]]


class StepRunner:
    """Runs steps of one run. ``max_calls`` caps model-calling units (steps and items).

    ``hooks`` (see ``orchestrator.hooks``) are told of each step and call: the
    ledger and budgets are one. ``checkpoint`` is where a resumed run carries
    on: attempt numbers already used never repeat, and a step another worker
    handed here continues at its tier. ``tiers`` are the tiers this process
    serves (None: all of them). ``router`` chooses where ``tier: auto`` steps
    start (None: at the cheapest tier). ``calibrations`` map a step's raw
    confidence scores to probabilities of being right (None: scores stay raw).
    ``answers`` keeps and gives back the answers of ``cache:`` steps (None: no caching).
    ``decisions`` reads a person's decision on an approval step (None: none is ever made).
    """

    def __init__(
        self,
        *,
        settings: Settings,
        clients: Clients,
        pricer: Pricer,
        max_calls: int,
        hooks: Sequence[Hooks] = (),
        checkpoint: Checkpoint | None = None,
        tiers: Collection[str] | None = None,
        router: Router | None = None,
        calibrations: Calibrations | None = None,
        answers: Answers | None = None,
        decisions: Decisions | None = None,
    ) -> None:
        self._settings = settings
        self._answers = answers
        self._decisions = decisions
        self._clients = clients
        self._pricer = pricer
        self._units_left = max_calls
        self._hooks = tuple(hooks)
        checkpoint = checkpoint or Checkpoint()
        self._last_attempts = checkpoint.last_attempts
        self._handed_on = checkpoint.handed_on
        self._tiers = tiers
        self._router = router
        self._calibrations = calibrations
        self._fits: dict[tuple[str, str, str], Calibration | None] = {}
        self._caps: dict[str, str | None] = {}

    @staticmethod
    def start(plan: StepPlan) -> StepRecord:
        """A record for ``plan`` as it starts; ``run`` fills it in."""
        return StepRecord(
            step_id=plan.id,
            agent=plan.agent.name,
            status="running",
            output=None,
            error=None,
            tier_asked=None if plan.step.approval or plan.child else plan.tier,
            started_at=_now(),
            finished_at=_now(),
        )

    async def run(self, plan: StepPlan, context: dict[str, Any], record: StepRecord) -> None:
        """Run ``plan`` into ``record``: succeeded, skipped or failed, with every call made.

        If the task is cancelled (a parallel step failed), the record says
        cancelled and still holds the calls already made, for the ledger. If
        the step needs a tier this process does not serve, the record says
        handed_off, its output says where to carry on, and ``NeedsTier`` is raised.
        Either way the hooks' ``after_step`` is told of the record.
        """
        try:
            await self._run(plan, context, record)
        finally:
            if record.status == "running":  # an error we did not foresee: never left running
                record.status, record.error = "failed", "stopped by an internal error"
            record.finished_at = _now()
            for hook in self._hooks:
                await hook.after_step(plan, record)

    async def _run(self, plan: StepPlan, context: dict[str, Any], record: StepRecord) -> None:
        attempts = itertools.count(self._last_attempts.get(plan.id, 0) + 1)
        try:
            if plan.when is not None and not plan.when.evaluate(context):
                record.status = "skipped"
                return
            if plan.step.approval is not None:
                await self._approval(plan, context, record)
                return
            if self._hooks:
                self._caps[plan.id] = await self._cap(plan)
            climb = self._ladder(plan)
            if climb and not self._serves(climb[0][0]):
                resumed = self._handed_on.get(plan.id, {})
                raise NeedsTier(
                    climb[0][0], used=resumed.get("used", 0), reason=resumed.get("reason")
                )
            if plan.for_each is not None:
                record.output = await self._fan_out(plan, context, record, attempts)
                record.status = "succeeded"
            else:
                record.output = await self._answer(plan, context, record, attempts, item_index=None)
                record.status = "succeeded"
        except TemplateProblem as exc:
            record.status, record.error = "failed", f"template error: {exc}"
        except RunError as exc:
            record.status, record.error = "failed", str(exc)
        except NeedsTier as need:
            record.status, record.handoff, record.error = "handed_off", need.as_record(), str(need)
            raise
        except NeedsApproval:
            record.status = "waiting"
            raise
        except asyncio.CancelledError:
            record.status, record.error = (
                "cancelled",
                "cancelled mid-step (a parallel step failed, or the lease was lost)",
            )
            raise

    async def _approval(self, plan: StepPlan, context: dict[str, Any], record: StepRecord) -> None:
        """A person's decision is the step's output; with none yet, the step
        shows its message and the run waits (``NeedsApproval``)."""
        assert plan.step.approval is not None
        decision = None if self._decisions is None else await self._decisions(plan)
        if decision is None:
            record.output = {"message": plan.prompt.render(context)}
            raise NeedsApproval(plan.id, plan.step.approval.timeout_s)
        if not decision["approved"]:
            record.status = "failed"
            note = f": {decision['note']}" if decision["note"] else ""
            record.error = f"rejected by {decision['by']}{note}"
            return
        record.output, record.status = decision, "succeeded"

    async def _cap(self, plan: StepPlan) -> str | None:
        """The lowest of the hooks' caps on the step's tier, or None."""
        names = self._settings.tier_names
        caps = [cap for hook in self._hooks if (cap := await hook.before_step(plan)) is not None]
        return min(caps, key=names.index, default=None)

    async def _fan_out(
        self, plan: StepPlan, context: dict[str, Any], record: StepRecord, attempts: Iterator[int]
    ) -> list[Any]:
        assert plan.for_each is not None
        items = plan.for_each.evaluate(context)
        if not isinstance(items, list | tuple):
            raise StepFailed(
                f"for_each gave {type(items).__name__}, not a list: {plan.for_each.source}"
            )
        gate = asyncio.Semaphore(FAN_OUT_CONCURRENCY)

        async def one(index: int, item: Any) -> Any:
            async with gate:
                return await self._answer(
                    plan, {**context, "item": item}, record, attempts, item_index=index
                )

        tasks = [asyncio.ensure_future(one(i, item)) for i, item in enumerate(items)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            # One item failed (or the step was cancelled): stop the others rather
            # than leave them running past the end of the step.
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def _ladder(self, plan: StepPlan) -> list[tuple[str, Tier]]:
        start = self._handed_on.get(plan.id, {}).get("tier")
        return ladder(self._settings, plan, start, cap=self._caps.get(plan.id))

    async def _route(
        self,
        plan: StepPlan,
        climb: list[tuple[str, Tier]],
        tags: dict[str, Any],
        *,
        resumed: bool,
    ) -> tuple[str, list[tuple[str, Tier]]]:
        """How the step's start was chosen, and the ladder from there. A ``tier:
        auto`` step starts where the router says (its choice and expected pass
        rate go into ``tags``); a step held below its tier by a budget was
        downgraded; any other starts where it was written."""
        if plan.tier != AUTO_TIER:
            cap = self._caps.get(plan.id)
            names = self._settings.tier_names
            lowered = cap is not None and names.index(cap) < names.index(plan.tier)
            return ("downgrade" if lowered else "written"), climb
        if self._router is None or resumed or len(climb) < 2:
            return "auto", climb
        key = router.route_key(self._settings, plan)
        try:
            chosen = await self._router(plan, key, [name for name, _ in climb])
        except Exception as exc:  # no history to read: start at the cheapest tier
            log.warning(
                "step %s: its history is unreadable, it starts at the cheapest tier: %s",
                plan.id,
                redact(f"{type(exc).__name__}: {exc}", self._settings.key_names),
            )
            return "auto", climb
        tags["route_key"], tags["expected_pass"] = key, round(chosen.expected_pass, 4)
        return chosen.routed, climb[chosen.start :]

    async def _fit(self, plan: StepPlan, model: str, signal: str) -> Calibration | None:
        """The step's calibration on ``model`` for ``signal``, read once per run; a
        ledger that cannot be read leaves the scores raw, and says so in the log."""
        key = (plan.id, model, signal)
        if key not in self._fits:
            fitted = None
            if self._calibrations is not None:
                try:
                    fitted = await self._calibrations(plan, model, signal)
                except Exception as exc:
                    log.warning(
                        "step %s: calibration labels unreadable, scores stay raw: %s",
                        plan.id,
                        redact(f"{type(exc).__name__}: {exc}", self._settings.key_names),
                    )
            self._fits[key] = fitted
        return self._fits[key]

    async def _calibrated(
        self, plan: StepPlan, model: str, signal: str, raw: float
    ) -> tuple[float, float | None]:
        """The score to compare with the step's minimum, and the raw one when the
        step's labels calibrated it."""
        fitted = await self._fit(plan, model, signal)
        return (raw, None) if fitted is None else (fitted(raw), raw)

    def _personal(self, messages: list[dict[str, str]]) -> list[str]:
        """The kinds of personal data in ``messages`` (none when detection is off)."""
        config = self._settings.config.privacy
        if not config.on:
            return []
        return privacy.find(
            (m["content"] for m in messages), config.detect, config.compiled(), config.region
        )

    def _serves(self, tier: str) -> bool:
        return self._tiers is None or tier in self._tiers

    async def _answer(
        self,
        plan: StepPlan,
        context: dict[str, Any],
        record: StepRecord,
        attempts: Iterator[int],
        *,
        item_index: int | None,
    ) -> Any:
        self._units_left -= 1
        if self._units_left < 0:
            raise StepFailed("the run reached its max_steps limit")
        messages = []
        if plan.system is not None:
            messages.append({"role": "system", "content": plan.system.render(context)})
        messages.append({"role": "user", "content": plan.prompt.render(context)})
        personal = self._personal(messages)
        escalation = self._settings.config.escalation
        resumed = self._handed_on.get(plan.id, {}) if item_index is None else {}
        used: int = resumed.get("used", 0)
        escalation_reason: str | None = resumed.get("reason")
        failures: list[str] = []
        # The latest answer that was valid but not confident enough: the step's
        # answer if no tier above gives a confident one.
        unsure: tuple[Any] | None = None
        consistency = (
            plan.confidence if plan.confidence and plan.confidence.signal == "consistency" else None
        )
        climb = self._ladder(plan)
        if personal:
            # Fail closed: a prompt holding personal data only reaches local tiers.
            climb = [(name, tier) for name, tier in climb if tier.local]
            if not climb:
                raise StepFailed(
                    f"the prompt holds personal data ({', '.join(personal)}) and no tier"
                    " marked local: true is on this step's ladder (privacy.detect in"
                    " tierflow.yaml sets what is looked for)"
                )
        tags: dict[str, Any] = {"personal": ",".join(personal) or None}
        tags["routed"], climb = await self._route(plan, climb, tags, resumed=bool(resumed))
        cache = caching(plan, personal) if self._answers is not None else None
        keys = {}
        if cache is not None:
            keys = {
                (tier_name, entry.model): answer_key(plan, entry, messages)
                for tier_name, tier in climb
                for entry in tier.models
            }
            hit = await self._cached(plan, climb, keys, context, record, attempts, item_index, tags)
            if hit is not None:
                return hit[0]
        for tier_name, tier in climb:
            if used >= escalation.max_attempts:
                break
            if item_index is None and not self._serves(tier_name):
                raise NeedsTier(tier_name, used=used, reason=escalation_reason)
            for entry in tier.models:
                if used >= escalation.max_attempts:
                    break
                ask = functools.partial(
                    self._ask,
                    plan,
                    entry,
                    messages,
                    context,
                    record,
                    attempts=attempts,
                    item_index=item_index,
                    tier_used=tier_name,
                    escalation_reason=escalation_reason,
                    tags=tags,
                )
                if plan.tools:
                    turn = functools.partial(
                        self._ask,
                        plan,
                        entry,
                        context=context,
                        record=record,
                        attempts=attempts,
                        item_index=item_index,
                        tier_used=tier_name,
                        escalation_reason=escalation_reason,
                        tags=tags,
                    )
                    call, value = await converse(
                        plan,
                        tier,
                        messages,
                        record,
                        turn,
                        personal=self._personal,
                        admit=functools.partial(self._admit_tool, plan),
                    )
                else:
                    call, value = await ask()
                if call.outcome == "ok" and consistency is not None:
                    call, value = await self._consistent(
                        plan, consistency, record, call, value, ask
                    )
                if call.outcome == "ok" and plan.judge is not None:
                    call = await self._judged(
                        plan, record, call, value, messages, context, attempts, item_index
                    )
                if call.outcome == "ok":
                    if (
                        cache is not None
                        and self._answers is not None
                        and (cache.sensitive or not self._personal([{"content": str(value)}]))
                    ):
                        await self._answers.keep(
                            plan,
                            cache,
                            keys[(tier_name, entry.model)],
                            model=entry.model,
                            value=value,
                            prompt_tokens=call.prompt_tokens,
                            completion_tokens=call.completion_tokens,
                        )
                    return value
                if call.outcome == "budget_blocked":
                    raise StepFailed(f"budget_blocked: {call.error}")
                if call.outcome == "low_confidence":
                    if call.outcome not in escalation.on:
                        return value  # the score is recorded; nothing asks for better
                    unsure = (value,)
                failures.append(f"{tier_name}/{entry.model}: {call.outcome}: {call.error}")
                if call.outcome == "unavailable":
                    continue
                used += 1
                if call.outcome not in escalation.on:
                    raise StepFailed(f"{call.outcome} and escalation.on excludes it: {call.error}")
                if call.outcome in ("invalid_output", "low_confidence", "truncated"):
                    break  # a weak answer: the next model of the same tier is no stronger
            escalation_reason = failures[-1] if failures else None
        if unsure is not None:
            return unsure[0]  # no tier above answered with more confidence
        if not failures:
            raise StepFailed("no tier can serve this step")
        limit = (
            f" (max_attempts {escalation.max_attempts})" if used >= escalation.max_attempts else ""
        )
        # A project with one tier (as tierflow init makes it) has nowhere to escalate to.
        names = self._settings.tier_names
        alone = (
            f" ({names[0]} is the only tier: add one above it in tierflow.yaml)"
            if len(names) == 1
            else ""
        )
        raise StepFailed(f"no tier gave a valid answer{limit}{alone}: " + "; ".join(failures))

    async def _cached(
        self,
        plan: StepPlan,
        climb: list[tuple[str, Tier]],
        keys: dict[tuple[str, str], str],
        context: dict[str, Any],
        record: StepRecord,
        attempts: Iterator[int],
        item_index: int | None,
        tags: Mapping[str, Any],
    ) -> tuple[Any] | None:
        """The kept answer of the cheapest model on the ladder that has one and
        still passes the step's schema and checks, recorded as a ``cache_hit``
        row: no request, no tokens, $0, and the reference cost of its tokens."""
        assert self._answers is not None
        found = await self._answers.find(list(keys.values()))
        for tier_name, tier in climb:
            for entry in tier.models:
                kept = found.get(keys[(tier_name, entry.model)])
                if kept is None:
                    continue
                try:
                    value = verify(plan, kept.answer, context)
                except (InvalidOutput, TemplateProblem):
                    continue  # the checks changed since: ask again
                call = self._call(
                    plan,
                    entry,
                    attempt=next(attempts),
                    item_index=item_index,
                    tier_used=tier_name,
                    escalation_reason=None,
                    started=_now(),
                    local=tier.local,
                    simulated=tier.simulated,
                    prompt_tokens=kept.prompt_tokens,
                    completion_tokens=kept.completion_tokens,
                    latency_ms=0.0,
                    outcome="cache_hit",
                    error=None,
                    **tags,
                )
                record.calls.append(
                    replace(call, prompt_tokens=0, completion_tokens=0, cost_usd=Decimal(0))
                )
                return (value,)
        return None

    async def _consistent(
        self,
        plan: StepPlan,
        confidence: Confidence,
        record: StepRecord,
        first: Call,
        value: Any,
        ask: Callable[[], Awaitable[tuple[Call, Any]]],
    ) -> tuple[Call, Any]:
        """Ask the same model for ``confidence.samples`` answers in all (``first`` is
        the first) and take the most common; the share that agree is the score.

        A sample that fails counts as one that disagrees; a budget that refuses
        one ends the sampling. Every valid sample's row carries the score; the
        last is ``low_confidence`` when the score is below the minimum.
        """
        answers = [(first, value)]
        for _ in range(confidence.samples - 1):
            call, sampled = await ask()
            if call.outcome == "budget_blocked":
                break
            if call.outcome == "ok":
                answers.append((call, sampled))
        keys = [agreement_key(sampled) for _, sampled in answers]
        top, agreeing = Counter(keys).most_common(1)[0]
        last = answers[-1][0]
        score, raw = await self._calibrated(
            plan, last.model, "consistency", agreeing / confidence.samples
        )
        chosen = answers[keys.index(top)][1]
        verdict = "ok"
        error = None
        if score < confidence.min:
            verdict = "low_confidence"
            error = (
                f"consistency {_score(score, raw)} is below min {confidence.min:g}"
                f" ({agreeing} of {confidence.samples} samples agree)"
            )
        scored = {call.attempt for call, _ in answers}
        for index, call in enumerate(record.calls):
            if call.attempt in scored:
                call = replace(call, signal="consistency", confidence=score, raw_confidence=raw)
                if call.attempt == last.attempt:
                    call = last = replace(call, outcome=verdict, error=error)
                record.calls[index] = call
        return last, chosen

    async def _judged(
        self,
        plan: StepPlan,
        record: StepRecord,
        answered: Call,
        value: Any,
        messages: list[dict[str, str]],
        context: dict[str, Any],
        attempts: Iterator[int],
        item_index: int | None,
    ) -> Call:
        """``answered`` graded by the step's judge: its row gets the score, and the
        ``low_confidence`` outcome below the minimum. The judge's calls are rows of
        the step (``judged`` names the answer), tried in its tier's model order; a
        judge that gives no grade leaves the answer unscored."""
        judge, confidence = plan.judge, plan.confidence
        assert judge is not None and confidence is not None
        if plan.local_only and not self._settings.config.tiers[judge.tier].local:
            # Refused at load too: fail closed rather than show a hosted judge the data.
            raise StepFailed(
                f"judge tier '{judge.tier}' is not local, and this step must stay local"
            )
        seen = {
            **context,
            "question": messages[-1]["content"],
            "answer": value if isinstance(value, str) else json.dumps(value),
        }
        asked = []
        if judge.system is not None:
            asked.append({"role": "system", "content": judge.system.render(seen)})
        asked.append({"role": "user", "content": judge.prompt.render(seen)})
        personal = self._personal(asked)
        if personal and not self._settings.config.tiers[judge.tier].local:
            raise StepFailed(
                f"the judge's prompt holds personal data ({', '.join(personal)}) and judge"
                f" tier '{judge.tier}' is not marked local: true"
            )
        score: float | None = None
        for entry in self._settings.config.tiers[judge.tier].models:
            call, grade = await self._ask(
                judge,
                entry,
                asked,
                seen,
                record,
                attempts=attempts,
                item_index=item_index,
                tier_used=judge.tier,
                escalation_reason=None,
                judged=answered.attempt,
                tags={"personal": ",".join(personal) or None},
            )
            if call.outcome == "ok":
                score = float(grade["score"])
                break
            if call.outcome == "budget_blocked":
                break
        outcome, error, raw = "ok", None, None
        if score is not None:
            score, raw = await self._calibrated(plan, answered.model, "judge", score)
            if score < confidence.min:
                outcome = "low_confidence"
                error = (
                    f"judge {judge.agent.name} scored {_score(score, raw)},"
                    f" below min {confidence.min:g}"
                )
        index = next(i for i, call in enumerate(record.calls) if call is answered)
        record.calls[index] = replace(
            answered,
            signal="judge",
            confidence=score,
            raw_confidence=raw,
            outcome=outcome,
            error=error,
        )
        return record.calls[index]

    async def _ask(
        self,
        plan: StepPlan,
        entry: ModelEntry,
        messages: list[dict[str, str]],
        context: dict[str, Any],
        record: StepRecord,
        *,
        attempts: Iterator[int],
        item_index: int | None,
        tier_used: str,
        escalation_reason: str | None,
        judged: int | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> tuple[Call, Any]:
        """Ask one model, and again after a 429 or 5xx within ``retries``' bounds.
        Each try goes into ``record``; returns the last call and its value."""
        asked, waited = 0, 0.0
        while True:
            try:
                call, value, busy, answer = await self._try(
                    plan,
                    entry,
                    messages,
                    context,
                    attempt=next(attempts),
                    item_index=item_index,
                    tier_used=tier_used,
                    escalation_reason=escalation_reason,
                    judged=judged,
                    tags=tags,
                )
            except _CheckRaised as raised:
                self._trace(plan, record, raised.call, messages, raised.answer, tags)
                await self._ended(plan, record, raised.call)
                raise raised.problem from None
            self._trace(plan, record, call, messages, answer, tags)
            await self._ended(plan, record, call)
            wait = retries.pause(busy, retries=asked, waited_s=waited)
            if wait is None:
                return call, value
            await asyncio.sleep(wait)
            asked, waited = asked + 1, waited + wait

    def _trace(
        self,
        plan: StepPlan,
        record: StepRecord,
        call: Call,
        messages: list[dict[str, Any]],
        answer: str | None,
        tags: Mapping[str, Any] | None,
    ) -> None:
        """With ``trace:`` on for the step, keep what ``call`` sent and got, secrets
        masked; a sensitive or tainted step, or a prompt holding personal data, only
        when its trace says ``sensitive: true``."""
        chosen = plan.step.trace
        if chosen is None:
            chosen = TraceSetting() if self._settings.config.trace else False
        if chosen is False or call.outcome == "unavailable":
            return
        if (plan.local_only or (tags or {}).get("personal")) and not chosen.sensitive:
            return
        names = self._settings.key_names
        record.traces.append(
            Trace(
                attempt=call.attempt,
                item_index=call.item_index,
                messages=[
                    {**m, "content": redact(str(m.get("content") or ""), names)} for m in messages
                ],
                answer=None if answer is None else redact(answer, names),
                created_at=call.created_at,
            )
        )

    async def _admit_tool(self, plan: StepPlan, run: ToolRun) -> ToolRun:
        for hook in self._hooks:
            run = await hook.before_tool(plan, run)
        return run

    async def _ended(self, plan: StepPlan, record: StepRecord, call: Call) -> None:
        record.calls.append(call)
        for hook in self._hooks:
            await hook.after_call(plan, call)

    async def _try(
        self,
        plan: StepPlan,
        entry: ModelEntry,
        messages: list[dict[str, str]],
        context: dict[str, Any],
        *,
        attempt: int,
        item_index: int | None,
        tier_used: str,
        escalation_reason: str | None,
        judged: int | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> tuple[Call, Any, ModelBusy | None, str | None]:
        """One request: its ledger row, its value if it succeeded, the provider's
        answer if it is worth asking again, and the model's answer as it came."""
        timeout = plan.step.timeout_s or entry.timeout_s
        confidence = plan.confidence
        signal = confidence.signal if confidence is not None else None
        request = ModelRequest(
            model=entry.model.split("/", 1)[1],
            messages=messages,
            max_tokens=plan.max_tokens,
            temperature=(
                CONSISTENCY_TEMPERATURE
                if confidence is not None and signal == "consistency"
                else plan.agent.temperature
            ),
            timeout_s=timeout,
            json_schema=plan.step.output,
            stream=entry.stream,
            structured=entry.structured,
            logprobs=signal == "logprob",
            tools=tuple(tool.schema() for tool in plan.tools),
        )
        if signal == "logprob":
            # Read before the request, so nothing waits between its answer and its row.
            await self._fit(plan, entry.model, signal)
        # What the provider may bill at most: kept as spend when a request that
        # may have reached it fails without reporting usage.
        worst = (prompt_tokens_upper_bound(request), plan.max_tokens)
        make_call = functools.partial(
            self._call,
            plan,
            entry,
            attempt=attempt,
            item_index=item_index,
            tier_used=tier_used,
            escalation_reason=escalation_reason,
            started=_now(),
            local=self._settings.config.tiers[tier_used].local,
            simulated=self._settings.config.tiers[tier_used].simulated,
            signal=signal,
            judged=judged,
            **(tags or {}),
        )
        if self._hooks:
            admitted = make_call(
                prompt_tokens=worst[0],
                completion_tokens=worst[1],
                latency_ms=(timeout + BACKSTOP_S) * 1000,
                outcome="pending",
                error=None,
                usage_source="worst_case",
            )
            refusal = None
            try:
                for hook in self._hooks:
                    admitted = await hook.before_call(plan, admitted)
            except LeaseLost:
                raise  # another executor holds the run: no request from here
            except CallRefused as refused:
                refusal = refused.reason
            except Exception as exc:  # the ledger is unreachable: no record, no request
                refusal = clip(
                    redact(
                        f"the call could not be reserved in the ledger: {type(exc).__name__}: {exc}",
                        self._settings.key_names,
                    )
                )
            if refusal is not None:
                blocked = make_call(
                    prompt_tokens=0,
                    completion_tokens=0,
                    latency_ms=0.0,
                    outcome="budget_blocked",
                    error=refusal,
                    # What an earlier hook reserved is released when this row settles.
                    reserved_usd=admitted.reserved_usd,
                )
                return blocked, None, None, None
            make_call = functools.partial(make_call, reserved_usd=admitted.reserved_usd)
        clock = time.perf_counter()
        # Until an answer or the provider says otherwise, the call may have been billed.
        (prompt_tokens, completion_tokens) = worst
        source: str | None = "worst_case"
        value: Any = None
        error: str | None = None
        check_raised: TemplateProblem | None = None
        busy: ModelBusy | None = None
        score: float | None = None
        answer: str | None = None
        try:
            client = self._clients.for_entry(entry)
            # Each client enforces the timeout itself and ends its request cleanly;
            # this outer limit is only a backstop for a client that does not.
            async with asyncio.timeout(timeout + BACKSTOP_S):
                reply = await client.complete(request)
            answer = _as_text(reply)
            prompt_tokens, completion_tokens = reply.prompt_tokens, reply.completion_tokens
            source = "counted" if reply.counted else "reported"
            if reply.tool_calls and plan.tools:
                value, outcome = ToolRequest(reply.text, reply.tool_calls), "tool_calls"
            elif reply.truncated:
                outcome = "truncated"
                error = (
                    f"the answer was cut at max_tokens {plan.max_tokens} (finish reason length):"
                    " raise max_tokens on the step or its agent, or list truncated in"
                    " escalation.on to climb instead"
                )
            else:
                value = verify(plan, reply.text, context)
                outcome = "ok"
            if outcome == "ok" and confidence is not None and signal == "logprob":
                score = logprob_score(reply.logprobs, structured=plan.step.output is not None)
        except TimeoutError:
            outcome, error = ModelTimeout.outcome, f"no answer within {timeout:g}s"
        except ModelError as exc:
            outcome, error = exc.outcome, exc.reason
            busy = exc if isinstance(exc, ModelBusy) else None
            if exc.usage is not None:
                (prompt_tokens, completion_tokens), source = exc.usage, "reported"
            elif not exc.billed:
                (prompt_tokens, completion_tokens), source = (0, 0), None
        except InvalidOutput as exc:
            outcome, error = "invalid_output", str(exc)
        except TemplateProblem as exc:
            # A check that raises is the workflow's error: the answer came, the
            # call is recorded as made, and the step fails without escalating.
            outcome, check_raised = "ok", exc
        except Exception as exc:
            # A client library failing in a way it does not document (a garbled
            # response, say) is still a failed call, maybe billed: record it and escalate.
            outcome = "error"
            error = clip(redact(f"{type(exc).__name__}: {exc}", self._settings.key_names))
        latency_ms = (time.perf_counter() - clock) * 1000
        raw: float | None = None
        if score is not None and outcome == "ok" and confidence is not None:
            score, raw = await self._calibrated(plan, entry.model, "logprob", score)
            if score < confidence.min:
                outcome = "low_confidence"
                error = f"logprob confidence {_score(score, raw)} is below min {confidence.min:g}"
        call = make_call(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            latency_ms=round(latency_ms, 3),
            outcome=outcome,
            error=error,
            usage_source=source,
            confidence=score,
            raw_confidence=raw,
        )
        if check_raised is not None:
            raise _CheckRaised(call, check_raised, answer)
        return call, value, busy, answer

    def _call(
        self,
        plan: StepPlan,
        entry: ModelEntry,
        *,
        attempt: int,
        item_index: int | None,
        tier_used: str,
        escalation_reason: str | None,
        started: datetime,
        local: bool,
        simulated: bool,
        prompt_tokens: int,
        completion_tokens: int,
        latency_ms: float,
        outcome: str,
        error: str | None,
        reserved_usd: Decimal | None = None,
        usage_source: str | None = None,
        signal: str | None = None,
        confidence: float | None = None,
        raw_confidence: float | None = None,
        judged: int | None = None,
        personal: str | None = None,
        routed: str | None = None,
        expected_pass: float | None = None,
        route_key: str | None = None,
    ) -> Call:
        # A call refused before its request, or never delivered, used no machine time.
        seconds = 0.0 if outcome in ("unavailable", "budget_blocked") else latency_ms / 1000
        cost, reference = self._pricer.cost(entry.model, prompt_tokens, completion_tokens, seconds)
        return Call(
            attempt=attempt,
            item_index=item_index,
            tier_asked=plan.tier,
            tier_used=tier_used,
            model=entry.model,
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            reference_cost_usd=reference,
            latency_ms=latency_ms,
            outcome=outcome,
            error=error,
            escalation_reason=escalation_reason,
            created_at=started,
            reserved_usd=reserved_usd,
            local=local,
            simulated=simulated,
            usage_source=usage_source,
            signal=signal if outcome in ("ok", "low_confidence") else None,
            confidence=confidence,
            raw_confidence=raw_confidence,
            judged=judged,
            personal=personal,
            routed=routed,
            expected_pass=expected_pass,
            route_key=route_key,
        )


def _as_text(reply: ModelReply) -> str:
    """A reply as a trace keeps it: its text, and the tools it asked for."""
    if not reply.tool_calls:
        return reply.text
    asked = [{"name": c.name, "arguments": c.arguments} for c in reply.tool_calls]
    return f"{reply.text}\n[tool calls] {json.dumps(asked, default=str)}".lstrip()


def verify(plan: StepPlan, text: str, context: dict[str, Any]) -> Any:
    """The step's output value from a model's text, or ``InvalidOutput``."""
    value: Any = text.strip()
    if plan.step.output is not None:
        value = parse_json(value)
        errors = sorted(
            schemas.validator(plan.step.output).iter_errors(value),
            key=lambda e: e.path,
        )
        if errors:
            where = "/".join(str(part) for part in errors[0].absolute_path) or "(top)"
            raise InvalidOutput(f"schema: {where}: {errors[0].message[:200]}")
    for check in plan.checks:
        # A check that raises (TemplateProblem) is the workflow's error, not an invalid answer.
        passed = check.evaluate({**context, "output": value})
        if not passed:
            raise InvalidOutput(f"check '{check.source}' failed")
    return value


def agreement_key(value: Any) -> str:
    """What two answers must share to agree: the parsed value for a schema step
    (key order aside); otherwise the text, case, spacing and end punctuation aside."""
    if not isinstance(value, str):
        return json.dumps(value, sort_keys=True)
    return " ".join(value.casefold().split()).rstrip(".!?;:,")


def parse_json(text: str) -> Any:
    """JSON from a model's answer, tolerating a Markdown fence or prose around it."""
    fenced = _FENCE.match(text)
    if fenced:
        text = fenced.group(1)
    try:
        return json.loads(text)
    except ValueError:
        pass
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if starts:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[min(starts) :])
            return value
        except ValueError:
            pass
    raise InvalidOutput(f"not JSON: {text[:80]!r}")


def _score(score: float, raw: float | None) -> str:
    """A score for a message: calibrated ones say so, with their raw value."""
    return f"{score:.3f}" if raw is None else f"{score:.3f} (calibrated; raw {raw:.3f})"


def _now() -> datetime:
    return datetime.now(UTC)
