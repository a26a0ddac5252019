"""OpenTelemetry spans for a run, its steps and its model calls, caught by the
SDK's own in-memory exporter."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal

import pytest
from conftest import PRICES, Project, tiers_for
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from orchestrator.testing import OllamaServer, OpenAIServer, Reply

_EXPORTER = InMemorySpanExporter()


class _WhileRecording(SimpleSpanProcessor):
    """Exports only while a test of this file asks: the provider outlives it."""

    recording = False

    def on_end(self, span: ReadableSpan) -> None:
        if self.recording:
            super().on_end(span)


_PROCESSOR = _WhileRecording(_EXPORTER)


@pytest.fixture(scope="session")
def _provider() -> None:
    """The process's tracer provider, set once (OpenTelemetry allows only one)."""
    provider = TracerProvider()
    provider.add_span_processor(_PROCESSOR)
    trace.set_tracer_provider(provider)


@pytest.fixture
def spans(_provider: None) -> Iterator[InMemorySpanExporter]:
    _EXPORTER.clear()
    _PROCESSOR.recording = True
    yield _EXPORTER
    _PROCESSOR.recording = False
    _EXPORTER.clear()


def test_a_run_its_steps_and_calls_are_spans_with_genai_attributes(
    tmp_path: object, ollama: OllamaServer, frontier: OpenAIServer, spans: InMemorySpanExporter
) -> None:
    from pathlib import Path

    project = Project(
        Path(str(tmp_path)) / "p", {"tiers": tiers_for(ollama, frontier), "prices": PRICES}
    )
    project.workflow(
        {
            "name": "pair",
            "steps": [
                {"id": "draft", "agent": "helper", "tier": "light"},
                {"id": "polish", "agent": "helper", "tier": "frontier", "needs": ["draft"]},
            ],
        }
    )
    ollama.reply(Reply(status=400, text="boom"))  # refused: the draft climbs to the frontier
    frontier.reply(
        Reply(text="drafted", prompt_tokens=9, completion_tokens=1),
        Reply(text="polished", prompt_tokens=30, completion_tokens=4),
    )
    result = project.run("pair")
    assert result.status == "succeeded", result.error

    found = spans.get_finished_spans()
    [run] = [s for s in found if s.name == "tierflow.run pair"]
    assert run.attributes["tierflow.run_id"] == result.run_id
    assert run.attributes["tierflow.status"] == "succeeded"
    steps = {s.name: s for s in found if s.name.startswith("tierflow.step ")}
    assert set(steps) == {"tierflow.step draft", "tierflow.step polish"}
    assert all(
        s.parent is not None and s.parent.span_id == run.context.span_id for s in steps.values()
    )
    assert steps["tierflow.step draft"].attributes["tierflow.tier_used"] == "frontier"

    calls = [s for s in found if s.name.startswith("chat ")]
    assert [s.name for s in calls] == ["chat llama3.2:1b", "chat gpt-4o-mini", "chat gpt-4o-mini"]
    failed, drafted, polished = calls
    assert failed.parent.span_id == steps["tierflow.step draft"].context.span_id
    assert drafted.parent.span_id == steps["tierflow.step draft"].context.span_id
    assert (
        failed.status.status_code == StatusCode.ERROR and failed.attributes["error.type"] == "error"
    )
    assert polished.kind == SpanKind.CLIENT
    assert polished.parent.span_id == steps["tierflow.step polish"].context.span_id
    attributes = polished.attributes
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "gpt-4o-mini"
    assert (attributes["gen_ai.usage.input_tokens"], attributes["gen_ai.usage.output_tokens"]) == (
        30,
        4,
    )
    # Its cost is the ledger row's; its times are the row's start and latency.
    [row] = [c for c in project.calls(result.run_id) if c["step_id"] == "polish"]
    assert Decimal(str(attributes["tierflow.cost_usd"])) == row["cost_usd"]
    assert (polished.end_time - polished.start_time) / 1e6 == pytest.approx(
        row["latency_ms"], abs=0.01
    )
    assert run.start_time <= failed.start_time and polished.end_time <= run.end_time
