"""``GET /metrics`` on ``tierflow serve``: the ledger as Prometheus counters.

The figures are read from the database at each scrape, so they count every
worker's calls, on any machine, and survive restarts; each is a running total
(a counter) by workflow, tier and model:

    tierflow_calls_total                  requests made (skipped models and cache hits are not)
    tierflow_escalated_calls_total        calls made above the first tier a step tried
    tierflow_tokens_total{direction=}     prompt and completion tokens
    tierflow_cost_usd_total               what was recorded as spent (simulated included)
    tierflow_reference_cost_usd_total     the all-frontier counterfactual
    tierflow_call_latency_seconds         a summary: _sum and _count of calls' latency

Rows are counted as ``tierflow spend`` counts them: runs of ``tierflow eval``
left out, a call still in flight at its worst case (what it may be billed).
A scrape costs one grouped query over the ledger (about what ``tierflow
spend --by tier,model`` costs): scrape every 15 s or more on a long ledger.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sqlalchemy import BigInteger, Engine, and_, case, func, select, type_coerce

from orchestrator.store.tables import PICO_PER_USD, model_calls

LABELS = ("workflow", "tier", "model")
_IS_CALL = model_calls.c.outcome.not_in(("unavailable", "cache_hit"))
_KEYS = (model_calls.c.workflow, model_calls.c.tier_used, model_calls.c.model)
_QUERY = (
    select(
        *_KEYS,
        func.sum(case((_IS_CALL, 1), else_=0)),
        func.sum(case((and_(_IS_CALL, model_calls.c.escalation_reason.is_not(None)), 1), else_=0)),
        func.sum(model_calls.c.prompt_tokens),
        func.sum(model_calls.c.completion_tokens),
        func.sum(type_coerce(model_calls.c.cost_usd, BigInteger)),  # integer pico-dollars
        func.coalesce(func.sum(type_coerce(model_calls.c.reference_cost_usd, BigInteger)), 0),
        func.sum(case((_IS_CALL, model_calls.c.latency_ms), else_=0)),
    )
    .where(model_calls.c.eval.is_(None))
    .group_by(*_KEYS)
)


class LedgerCollector:
    """A prometheus_client collector over the ledger in ``engine``."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily

        calls = CounterMetricFamily("tierflow_calls", "Model calls made.", labels=LABELS)
        escalated = CounterMetricFamily(
            "tierflow_escalated_calls",
            "Calls made above the first tier their step tried.",
            labels=LABELS,
        )
        tokens = CounterMetricFamily(
            "tierflow_tokens", "Tokens billed or counted.", labels=(*LABELS, "direction")
        )
        cost = CounterMetricFamily(
            "tierflow_cost_usd", "Recorded cost in USD (simulated included).", labels=LABELS
        )
        reference = CounterMetricFamily(
            "tierflow_reference_cost_usd",
            "What the accepted answers would have cost on the reference model, in USD.",
            labels=LABELS,
        )
        latency = SummaryMetricFamily(
            "tierflow_call_latency_seconds", "Latency of model calls.", labels=LABELS
        )
        with self._engine.connect() as connection:
            rows = connection.execute(_QUERY).all()
        for workflow, tier, model, n, up, prompt, completion, pico, ref, ms in rows:
            labels = [workflow, tier or "", model]
            calls.add_metric(labels, int(n))
            escalated.add_metric(labels, int(up))
            tokens.add_metric([*labels, "prompt"], int(prompt))
            tokens.add_metric([*labels, "completion"], int(completion))
            cost.add_metric(labels, int(pico) / PICO_PER_USD)
            reference.add_metric(labels, int(ref) / PICO_PER_USD)
            latency.add_metric(labels, count_value=int(n), sum_value=float(ms) / 1000)
        yield from (calls, escalated, tokens, cost, reference, latency)


def exposition(engine: Engine) -> bytes:
    """The Prometheus text format of the ledger's counters, as one scrape reads it."""
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(LedgerCollector(engine))
    return bytes(generate_latest(registry))
