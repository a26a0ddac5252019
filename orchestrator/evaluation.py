"""``tierflow eval``: what tiering does to cost and quality on a team's own labelled cases.

A cases file is JSON lines: ``{"inputs": {...}, "expect": {"STEP_ID": VALUE}}``,
with an optional ``meta`` that eval ignores (where the case came from).
VALUE is compared with the step's output (parsed JSON for a schema step,
stripped text otherwise): equal, or ``{"contains": "text"}``, or ``{"one_of":
[...]}`` (a mapping whose only key is one of those two is a matcher, never a
literal). A case is right when every step it checks matches.

Each policy runs every case, in order, through the same engine and ledger as
any run; its runs and rows are marked eval, so spend leaves them out unless
asked (``--include-eval``), while budgets count them like any spend:

- ``as-written``: the workflow as it is, escalation and all.
- ``auto``: every step ``tier: auto``. Its router learns from this policy's own
  cases only (a history of its own, ``StepPlan.route_scope``), starting cold, so
  the figure shows what the router learns from these cases and no earlier run.
- ``tier:NAME``: every step pinned to tier NAME, no escalation (models of the
  tier are still tried in order on errors). A step that must stay local fails
  closed on a hosted tier, as in any run.

After each case, every checked step that answered gets the case's verdict as
feedback (``note`` "eval"): labels the router counts, as people's are.

For each policy: quality with a 95% Wilson interval; cost, cost per case, cost
as a share of the strongest tier's policy (when it ran) and savings against the
all-frontier counterfactual, as spend defines them; calls per tier (judges'
included); escalated calls per case; false accepts (a wrong answer a step
took) by the tier that gave it; wasted calls (answers rejected: invalid or
below confidence and not taken) by tier; p50/p95 latency per case. PGR is the
share of the quality gap between the cheapest and the strongest tier's policies
that a policy recovers (RouteLLM's), when both ran. Each confidence signal a
step uses gets the AUROC of its raw score for telling right from wrong answers
of the cheapest tier, read from the ``tier:CHEAPEST`` policy's runs.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.encoding import money
from orchestrator.errors import UserError
from orchestrator.hooks import Hooks
from orchestrator.ledger import ACCEPTED
from orchestrator.loading import suggest
from orchestrator.settings import Settings
from orchestrator.spec import AUTO_TIER, LoadedWorkflow, StepPlan
from orchestrator.store import Store

if TYPE_CHECKING:
    from orchestrator.runner import Runner

MAX_CASES_BYTES = 64 * 1024 * 1024
MATCHERS = ("contains", "one_of")
Z_95 = 1.959964
NO_REQUEST = ("unavailable", "budget_blocked")
CASE_KEYS = ("inputs", "expect", "meta")  # meta: anything (where the case came from); ignored


@dataclass(frozen=True)
class Case:
    line: int  # where it is in its file, for messages
    inputs: dict[str, Any]
    expect: dict[str, Any]


def load_cases(path: Path, workflow: LoadedWorkflow, *, limit: int | None = None) -> list[Case]:
    """The cases of ``path`` (the first ``limit``), checked against ``workflow``
    before anything runs: a ``UserError`` names FILE:LINE and what is wrong."""
    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: expected a number of cases, 1 or more")
    try:
        if path.stat().st_size > MAX_CASES_BYTES:
            raise UserError(f"{path}: larger than {MAX_CASES_BYTES // 2**20} MiB")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read cases: {exc}") from None
    steps = [plan.id for plan in workflow.steps]
    cases: list[Case] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        cases.append(_case(f"{path}:{number}", number, line, steps, workflow))
        if limit is not None and len(cases) == limit:
            break
    if not cases:
        raise UserError(f"{path}: no cases (one JSON object per line)")
    return cases


def _case(where: str, number: int, line: str, steps: list[str], workflow: LoadedWorkflow) -> Case:
    try:
        doc = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{where}: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise UserError(f"{where}: a case is a JSON object with inputs and expect")
    unknown = sorted(set(doc) - set(CASE_KEYS))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'{suggest(unknown[0], CASE_KEYS)}")
    inputs, expect = doc.get("inputs", {}), doc.get("expect")
    if not isinstance(inputs, dict):
        raise UserError(f"{where}: inputs must be a JSON object")
    if not isinstance(expect, dict) or not expect:
        raise UserError(f"{where}: expect must map step ids to the answers expected")
    for step_id, value in expect.items():
        if step_id not in steps:
            raise UserError(
                f"{where}: expect: the workflow has no step '{step_id}'{suggest(step_id, steps)}"
            )
        _check_matcher(f"{where}: expect.{step_id}", value)
    try:
        values = workflow.resolve_inputs(inputs)
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None
    return Case(line=number, inputs=values, expect=expect)


def _check_matcher(where: str, value: Any) -> None:
    if not (isinstance(value, dict) and len(value) == 1 and next(iter(value)) in MATCHERS):
        return
    if "contains" in value and not isinstance(value["contains"], str):
        raise UserError(f"{where}: contains takes a string")
    if "one_of" in value and not isinstance(value["one_of"], list):
        raise UserError(f"{where}: one_of takes a list of answers")


def matches(expected: Any, output: Any) -> bool:
    """Whether a step's ``output`` is the ``expected`` answer (see the module docstring)."""
    if isinstance(expected, dict) and len(expected) == 1:
        if "contains" in expected:
            text = output if isinstance(output, str) else json.dumps(output)
            return str(expected["contains"]) in text
        if "one_of" in expected:
            return any(_equal(choice, output) for choice in expected["one_of"])
    return _equal(expected, output)


def _equal(expected: Any, output: Any) -> bool:
    if isinstance(expected, str) and isinstance(output, str):
        return expected.strip() == output.strip()
    # 3 and 3.0 are one answer; true and 1 are not.
    return bool(expected == output) and isinstance(expected, bool) == isinstance(output, bool)


def policies_of(asked: Sequence[str], settings: Settings) -> list[str]:
    """The policies asked for, checked, in order and once each (default: as-written)."""
    known = ["as-written", "auto", *(f"tier:{name}" for name in settings.tier_names)]
    found: list[str] = []
    for policy in asked or ["as-written"]:
        if policy not in known:
            raise UserError(
                f"--policy {policy!r}: choose as-written, auto or tier:NAME with NAME one of"
                f" {', '.join(settings.tier_names)}{suggest(policy, known)}"
            )
        if policy not in found:
            found.append(policy)
    return found


class _Pinned(Hooks):
    """Holds every step at one tier: with the step's tier set there, no escalation."""

    def __init__(self, tier: str) -> None:
        self.tier = tier

    async def before_step(self, plan: StepPlan) -> str | None:
        return self.tier


def under_policy(
    workflow: LoadedWorkflow, policy: str, *, scope: str
) -> tuple[LoadedWorkflow, tuple[Hooks, ...]]:
    """``workflow`` as ``policy`` runs it, and the hooks that hold it there."""
    if policy == "as-written":
        return workflow, ()
    if policy == "auto":
        steps = tuple(replace(plan, tier=AUTO_TIER, route_scope=scope) for plan in workflow.steps)
        return replace(workflow, steps=steps), ()
    tier = policy.removeprefix("tier:")
    steps = tuple(replace(plan, tier=tier) for plan in workflow.steps)
    return replace(workflow, steps=steps), (_Pinned(tier),)


@dataclass
class CaseResult:
    """One case under one policy: its run as the ledger holds it, and the verdict."""

    case: Case
    run: dict[str, Any]
    latency_ms: float
    right: bool
    verdicts: dict[str, bool]  # step id: did its output match


@dataclass
class PolicyResult:
    policy: str
    cases: list[CaseResult] = field(default_factory=list)

    @property
    def calls(self) -> list[dict[str, Any]]:
        return [call for result in self.cases for call in result.run["calls"]]

    @property
    def quality(self) -> float:
        return sum(r.right for r in self.cases) / len(self.cases) if self.cases else 0.0

    @property
    def cost_usd(self) -> Decimal:
        return sum((call["cost_usd"] for call in self.calls), Decimal(0))

    @property
    def reference_usd(self) -> Decimal:
        return sum((call["reference_cost_usd"] or Decimal(0) for call in self.calls), Decimal(0))

    def calls_by_tier(self) -> dict[str, int]:
        return dict(
            Counter(call["tier_used"] for call in self.calls if call["outcome"] not in NO_REQUEST)
        )

    def false_accepts(self) -> dict[str, int]:
        """Wrong answers a step took, by the tier that gave them."""
        found: Counter[str] = Counter()
        for result in self.cases:
            steps = {step["step_id"]: step for step in result.run["steps"]}
            for step_id, right in result.verdicts.items():
                step = steps.get(step_id)
                if not right and step and step["status"] == "succeeded" and step["tier_used"]:
                    found[step["tier_used"]] += 1
        return dict(found)

    def wasted_by_tier(self) -> dict[str, int]:
        """Answers rejected (invalid, or below confidence and not taken), by tier."""
        found: Counter[str] = Counter()
        for result in self.cases:
            for call in wasted(result.run):
                found[call["tier_used"]] += 1
        return dict(found)

    def latency_ms(self, share: float) -> float:
        return percentile([r.latency_ms for r in self.cases], share)


def answers(run: dict[str, Any]) -> dict[tuple[str, int | None], list[dict[str, Any]]]:
    """The answering calls of ``run`` (judges' left out) by step and item, in order."""
    groups: dict[tuple[str, int | None], list[dict[str, Any]]] = {}
    for call in run["calls"]:
        if call["judged"] is None:
            groups.setdefault((call["step_id"], call["item_index"]), []).append(call)
    return groups


def taken(run: dict[str, Any]) -> dict[tuple[str, int | None], dict[str, Any]]:
    """The call whose answer each succeeded step (or item) took: its last accepted one."""
    succeeded = {step["step_id"] for step in run["steps"] if step["status"] == "succeeded"}
    found = {}
    for key, calls in answers(run).items():
        accepted = [call for call in calls if call["outcome"] in ACCEPTED]
        if key[0] in succeeded and accepted:
            found[key] = accepted[-1]
    return found


def wasted(run: dict[str, Any]) -> list[dict[str, Any]]:
    """The calls of ``run`` whose answers were rejected: every answer (valid or
    not, a consistency sample too) at a tier below the one whose answer its step
    (or item) took, or at any tier when it took none."""
    took = taken(run)
    found = []
    for key, calls in answers(run).items():
        kept = took.get(key)
        found += [
            call
            for call in calls
            if call["outcome"] in (*ACCEPTED, "invalid_output")
            and (kept is None or call["tier_used"] != kept["tier_used"])
        ]
    return found


@dataclass
class Evaluation:
    workflow: str
    tiers: list[str]  # cheapest first
    signals: list[str]  # the confidence signals its steps use
    policies: list[PolicyResult]

    def policy(self, name: str) -> PolicyResult | None:
        return next((p for p in self.policies if p.policy == name), None)

    def pgr(self) -> dict[str, float | None] | None:
        """Each policy's share of the quality gap between the cheapest and the
        strongest tier's policies that it recovers; None unless both ran."""
        low, high = self.policy(f"tier:{self.tiers[0]}"), self.policy(f"tier:{self.tiers[-1]}")
        if low is None or high is None or low is high:
            return None
        gap = high.quality - low.quality
        return {
            p.policy: None if gap == 0 else round((p.quality - low.quality) / gap, 4)
            for p in self.policies
        }

    def aurocs(self) -> dict[str, dict[str, Any]]:
        """Each signal's AUROC on the cheapest tier's answers, from its pinned policy."""
        cheapest = self.tiers[0]
        pinned = self.policy(f"tier:{cheapest}")
        found: dict[str, dict[str, Any]] = {}
        for signal in self.signals:
            scored: list[tuple[float, bool]] = []
            for result in pinned.cases if pinned else []:
                for (step_id, item), call in taken(result.run).items():
                    right = result.verdicts.get(step_id)
                    raw = call["raw_confidence"]
                    score = call["confidence"] if raw is None else raw
                    if (
                        right is not None
                        and item is None
                        and call["signal"] == signal
                        and score is not None
                        and call["tier_used"] == cheapest
                    ):
                        scored.append((score, right))
            found[signal] = {
                "auroc": auroc(scored),
                "tier": cheapest,
                "answers": len(scored),
                "right": sum(right for _, right in scored),
            }
        return found

    def as_dict(self) -> dict[str, Any]:
        """The figures as ``tierflow eval --json`` prints them: money as decimal strings."""
        strongest = self.policy(f"tier:{self.tiers[-1]}")
        pgr = self.pgr()
        return {
            "workflow": self.workflow,
            "cases": max((len(p.cases) for p in self.policies), default=0),
            "policies": [
                _policy_dict(p, strongest, None if pgr is None else pgr[p.policy])
                for p in self.policies
            ],
            "pgr": pgr,
            "signals": self.aurocs(),
        }


def _policy_dict(
    result: PolicyResult, strongest: PolicyResult | None, pgr: float | None
) -> dict[str, Any]:
    cases = len(result.cases)
    right = sum(r.right for r in result.cases)
    cost = result.cost_usd
    share = None
    if strongest is not None and strongest.cost_usd > 0:
        share = round(float(cost / strongest.cost_usd), 4)
    wasted_by_tier = result.wasted_by_tier()
    escalated = sum(1 for call in result.calls if call["escalation_reason"] is not None)
    return {
        "policy": result.policy,
        "cases": cases,
        "right": right,
        "quality": round(right / cases, 4) if cases else None,
        "quality_ci": [round(bound, 4) for bound in wilson(right, cases)],
        "cost_usd": money(cost),
        "cost_per_case_usd": money(cost / cases) if cases else "0",
        "cost_share": share,
        "reference_cost_usd": money(result.reference_usd),
        "savings_usd": money(result.reference_usd - cost),
        "calls_by_tier": result.calls_by_tier(),
        "escalations_per_case": round(escalated / cases, 4) if cases else 0.0,
        "false_accepts": result.false_accepts(),
        "wasted_calls": sum(wasted_by_tier.values()),
        "wasted_by_tier": wasted_by_tier,
        "latency_ms_p50": round(result.latency_ms(0.5), 1),
        "latency_ms_p95": round(result.latency_ms(0.95), 1),
        "pgr": pgr,
    }


def wilson(right: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval for ``right`` out of ``total``."""
    if total == 0:
        return (0.0, 1.0)
    share = right / total
    centre = share + z * z / (2 * total)
    spread = z * math.sqrt(share * (1 - share) / total + z * z / (4 * total * total))
    scale = 1 + z * z / total
    return (max(0.0, (centre - spread) / scale), min(1.0, (centre + spread) / scale))


def auroc(scored: Sequence[tuple[float, bool]]) -> float | None:
    """The chance that a right answer scores above a wrong one (ties count half);
    None without both kinds."""
    rights = [score for score, right in scored if right]
    wrongs = [score for score, right in scored if not right]
    if not rights or not wrongs:
        return None
    wins = sum(1.0 if r > w else 0.5 if r == w else 0.0 for r in rights for w in wrongs)
    return round(wins / (len(rights) * len(wrongs)), 4)


def percentile(values: Sequence[float], share: float) -> float:
    """The nearest-rank percentile of ``values`` (0 for none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def signals_of(workflow: LoadedWorkflow) -> list[str]:
    found: list[str] = []
    for plan in workflow.steps:
        if plan.confidence is not None and plan.confidence.signal not in found:
            found.append(plan.confidence.signal)
    return found


async def evaluate(
    settings: Settings,
    store: Store,
    workflow: LoadedWorkflow,
    cases: Sequence[Case],
    policies: Sequence[str],
    *,
    on_case: Callable[[str, int], None] | None = None,
) -> Evaluation:
    """Run every case under every policy, in order; ``on_case(policy, done)`` after each."""
    from orchestrator.models import Clients
    from orchestrator.runner import Runner

    clients = Clients()
    scope = f"eval:{time.time_ns()}"
    # Calibration reads the labels given before the eval: its own verdicts
    # would grade the cases with what it learnt from them.
    started = datetime.now(UTC)
    results = []
    try:
        for policy in policies:
            shaped, hooks = under_policy(workflow, policy, scope=scope)
            runner = Runner(
                settings=settings,
                store=store,
                clients=clients,
                hooks=hooks,
                eval=True,
                labels_before=started,
            )
            result = PolicyResult(policy)
            for done, case in enumerate(cases, 1):
                result.cases.append(await _run_case(runner, store, shaped, case))
                if on_case is not None:
                    on_case(policy, done)
            results.append(result)
    finally:
        await clients.aclose()
    return Evaluation(
        workflow=workflow.name,
        tiers=list(settings.tier_names),
        signals=signals_of(workflow),
        policies=results,
    )


async def _run_case(
    runner: Runner, store: Store, workflow: LoadedWorkflow, case: Case
) -> CaseResult:
    started = time.perf_counter()
    ran = await runner.run(workflow, case.inputs)
    latency_ms = (time.perf_counter() - started) * 1000
    run = store.run(ran.run_id)
    assert run is not None
    steps = {step["step_id"]: step for step in run["steps"]}
    verdicts = {}
    for step_id, expected in case.expect.items():
        step = steps.get(step_id)
        if step is None or step["status"] != "succeeded":
            verdicts[step_id] = False  # no answer, or the run failed before the step
            continue
        verdicts[step_id] = matches(expected, step["output"])
        store.add_feedback(ran.run_id, step_id, good=verdicts[step_id], note="eval")
    return CaseResult(
        case=case, run=run, latency_ms=latency_ms, right=all(verdicts.values()), verdicts=verdicts
    )
