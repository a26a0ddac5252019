"""``tierflow run --dry-run``: each step's prompt and worst case, before any call.

A step's prompt is rendered with the run's inputs; what it reads of earlier
steps, and a ``for_each`` step's item, show as ``«steps.NAME.output»`` and
``«item»``. Its worst case is the dearest path up its ladder: each of the
``escalation.max_attempts`` models it may ask, dearest first, at the largest
prompt the provider can bill for (``prompt_tokens_upper_bound``) and
``max_tokens`` out; times the samples of a consistency signal and the turns of
a tool loop; times the items of a ``for_each`` list when the inputs give it
(else "per item"). A judge's calls and a sub-workflow's steps are counted too.
Tool results and earlier outputs make real prompts longer than these; the
figures are the floor of the worst case, not a bill.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Any

from orchestrator.models.base import ModelRequest, prompt_tokens_upper_bound
from orchestrator.scheduler import ladder
from orchestrator.settings import Settings
from orchestrator.spec import LoadedWorkflow, StepPlan
from orchestrator.templates import TemplateProblem


class Stand:
    """What a step will have read when it runs: prints as ``«path»``, and any
    field or item of it is a stand-in too."""

    def __init__(self, path: str) -> None:
        self._path = path

    def __getattr__(self, name: str) -> Stand:
        if name.startswith("_"):
            raise AttributeError(name)
        return Stand(f"{self._path}.{name}")

    def __getitem__(self, key: Any) -> Stand:
        return Stand(f"{self._path}[{key!r}]")

    def __str__(self) -> str:
        return f"«{self._path}»"

    def __iter__(self) -> Any:
        return iter([Stand(f"{self._path}[0]")])


class _Steps(dict[str, Any]):
    def __missing__(self, key: str) -> dict[str, Stand]:
        return {"output": Stand(f"steps.{key}.output")}


@dataclass(frozen=True)
class StepCost:
    """One step before the run: its prompt, the tiers it may reach, its worst case."""

    step_id: str
    tiers: list[str]
    calls: int  # the most model calls it can make (per item, if per_item)
    worst_usd: Decimal
    per_item: bool  # its list is known only when it runs: the figures are per item
    prompt: str | None  # rendered, with stand-ins for what earlier steps give
    note: str | None = None  # why the prompt did not render, or what the step is
    when: str | None = None  # the condition it runs on, as written
    checks: tuple[str, ...] = ()  # what its answer must pass, as written


def estimate(
    settings: Settings, workflow: LoadedWorkflow, inputs: dict[str, Any]
) -> list[StepCost]:
    """Each step of ``workflow`` (a sub-workflow's as ``STEP.CHILD``), in order."""
    found: list[StepCost] = []
    for plan in workflow.steps:
        if plan.child is not None:
            child = estimate(settings, plan.child, {})
            found.extend(replace(c, step_id=f"{plan.id}.{c.step_id}") for c in child)
            continue
        found.append(_step(settings, plan, inputs))
    return found


def _step(settings: Settings, plan: StepPlan, inputs: dict[str, Any]) -> StepCost:
    if plan.step.approval is not None:
        return StepCost(plan.id, [], 0, Decimal(0), False, None, "waits for a person's approval")
    context = {"inputs": inputs, "steps": _Steps(), "run": Stand("run")}
    items: int | None = 1
    if plan.for_each is not None:
        try:
            value = plan.for_each.evaluate(context)
            items = len(value) if isinstance(value, list) else None
        except TemplateProblem:
            items = None
        context["item"] = Stand("item")
    messages, note = _messages(plan, context)
    climb = ladder(settings, plan)
    request = ModelRequest(
        model="",
        messages=messages,
        max_tokens=plan.max_tokens,
        temperature=0,
        timeout_s=1,
        json_schema=plan.step.output,
        tools=tuple(tool.schema() for tool in plan.tools),
    )
    prompt_tokens = prompt_tokens_upper_bound(request)
    each = sorted(
        (
            settings.price_of(entry.model).cost(prompt_tokens, plan.max_tokens)
            for _, tier in climb
            for entry in tier.models
        ),
        reverse=True,
    )
    confidence = plan.confidence
    samples = confidence.samples if confidence and confidence.signal == "consistency" else 1
    turns = plan.max_turns if plan.tools else 1
    asked = each[: settings.config.escalation.max_attempts]
    worst = sum(asked, Decimal(0)) * samples * turns
    calls = len(asked) * samples * turns
    if plan.judge is not None:
        judged = _step(settings, plan.judge, inputs)
        worst += judged.worst_usd * len(asked)
        calls += judged.calls * len(asked)
    return StepCost(
        plan.id,
        [name for name, _ in climb],
        calls * (items or 1),
        worst * (items or 1),
        items is None,
        "\n".join(f"[{m['role']}] {m['content']}" for m in messages) if messages else None,
        note,
        plan.when.source if plan.when else None,
        tuple(check.source for check in plan.checks),
    )


def _messages(plan: StepPlan, context: dict[str, Any]) -> tuple[list[dict[str, Any]], str | None]:
    """The step's messages, rendered; if they render only when it runs, their
    templates as written (for the size of the prompt), and why."""
    texts = [("system", plan.system), ("user", plan.prompt)]
    try:
        return [{"role": role, "content": t.render(context)} for role, t in texts if t], None
    except TemplateProblem as exc:
        written = [{"role": role, "content": t.source} for role, t in texts if t]
        return written, f"its prompt renders only when it runs ({exc}); shown as written"
