"""OpenTelemetry spans for runs, steps and model calls, through the OpenTelemetry API.

tierflow only uses the API (``opentelemetry-api``, which the MCP SDK already
brings): spans go wherever the process's tracer provider sends them. With no
SDK configured they cost next to nothing. To export them, install the extra
(``pip install 'tierflow[otel]'``: the SDK) and an exporter (for OTLP,
``opentelemetry-exporter-otlp``), and configure a provider in your own code;
or install ``opentelemetry-distro`` too and run ``opentelemetry-instrument
tierflow worker`` with the usual ``OTEL_*`` variables.

    tierflow.run WORKFLOW     the run, as one executor holds it (a run resumed
                              elsewhere is another span with the same run id)
    tierflow.step STEP        each step, a child of its run
    chat MODEL                each model call, a child of its step, with the GenAI
                              semantic conventions' attributes (gen_ai.*) and its
                              cost as tierflow.cost_usd

Calls are recorded when they end, with their own start time and latency, so a
span's times are the ledger row's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from orchestrator.hooks import Hooks

if TYPE_CHECKING:
    from orchestrator.ledger import Call, StepRecord
    from orchestrator.spec import StepPlan

SCOPE = "tierflow"


def _tracer() -> Any:
    from opentelemetry import trace

    return trace.get_tracer(SCOPE)


@contextlib.contextmanager
def run_span(workflow: str, run_id: str) -> Iterator[Any]:
    """The run's span, current while the run executes here."""
    with _tracer().start_as_current_span(
        f"tierflow.run {workflow}",
        attributes={"tierflow.workflow": workflow, "tierflow.run_id": run_id},
    ) as span:
        yield span


def _ns(moment: datetime) -> int:
    return int(moment.timestamp() * 1_000_000_000)


class SpanHooks(Hooks):
    """Step and call spans of one run, children of the span current when it starts."""

    def __init__(self) -> None:
        from opentelemetry import context

        self._parent = context.get_current()
        self._steps: dict[str, Any] = {}

    def _step(self, plan: StepPlan) -> Any:
        """The step's span, started when first needed (its items share it)."""
        span = self._steps.get(plan.id)
        if span is None:
            span = self._steps[plan.id] = self._start(plan)
        return span

    def _start(self, plan: StepPlan) -> Any:
        return _tracer().start_span(
            f"tierflow.step {plan.id}",
            context=self._parent,
            attributes={"tierflow.step": plan.id, "tierflow.tier_asked": plan.tier},
        )

    async def before_step(self, plan: StepPlan) -> str | None:
        self._step(plan)
        return None

    async def after_call(self, plan: StepPlan, call: Call) -> None:
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        provider, _, model = call.model.partition("/")
        start = _ns(call.created_at)
        span = _tracer().start_span(
            f"chat {model}",
            context=trace.set_span_in_context(self._step(plan), self._parent),
            kind=SpanKind.INTERNAL if provider == "llamacpp" else SpanKind.CLIENT,
            start_time=start,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.provider.name": provider,
                "gen_ai.request.model": model,
                "gen_ai.request.max_tokens": plan.max_tokens,
                "gen_ai.request.temperature": plan.agent.temperature,
                "gen_ai.usage.input_tokens": call.prompt_tokens,
                "gen_ai.usage.output_tokens": call.completion_tokens,
                "tierflow.tier": call.tier_used,
                "tierflow.attempt": call.attempt,
                "tierflow.outcome": call.outcome,
                "tierflow.cost_usd": float(call.cost_usd),
                **(
                    {"tierflow.reference_cost_usd": float(call.reference_cost_usd)}
                    if call.reference_cost_usd is not None
                    else {}
                ),
            },
        )
        if call.outcome not in ("ok", "tool_calls", "cache_hit"):
            span.set_attribute("error.type", call.outcome)
            span.set_status(Status(StatusCode.ERROR, call.error or call.outcome))
        span.end(end_time=start + int(call.latency_ms * 1_000_000))

    async def after_step(self, plan: StepPlan, record: StepRecord) -> None:
        from opentelemetry.trace import Status, StatusCode

        span = self._steps.pop(plan.id, None)
        if span is None:  # it ended before it asked anything: skipped, or an approval
            span = self._start(plan)
        span.set_attribute("tierflow.status", record.status)
        span.set_attribute("tierflow.cost_usd", float(record.cost_usd))
        if record.answer is not None:
            span.set_attribute("tierflow.tier_used", record.answer.tier_used)
        if record.status == "failed":
            span.set_status(Status(StatusCode.ERROR, record.error or "failed"))
        span.end()
