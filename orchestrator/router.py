"""``tier: auto``: where a step starts, learnt from its own history in the ledger.

For each step of a workflow, keyed by everything that shapes its answers (the
step, its agent, the models of the tiers it can climb: a change to any of
them starts afresh), each tier has a pass-rate estimate: a Beta(1, 1) prior
updated by the step's labelled answers, newest first, each older label
weighing ``DECAY`` times the one after it. An answer that passed its schema,
checks and confidence at tier k counts as a pass for k and every tier above
it; one that failed them (``invalid_output``, ``low_confidence``) counts as a
failure for k alone. People's feedback (``tierflow feedback``) on an answer
given at tier k, and ``tierflow eval``'s verdict on it, count the same way,
in its place in time, instead of that answer's own pass (the call's cost
still counts). Errors, timeouts and judges' calls say nothing of quality.

The step starts at the tier with the lowest expected cost of reaching an
accepted answer, climbing from there: E(k) = c(k) + (1 − p(k)) · E(k+1), and
the strongest tier accepts whatever it answers, E(top) = c(top). c(k) is the
mean cost of the step's calls at tier k in the ledger; a tier priced at $0 (a
local model) costs its mean latency at ``latency_usd_per_s``, so a slow local
model is not free. With no call at a tier yet, its cost is taken as that of
the cheapest tier below it with calls, times ten for each step up the ladder
(and 1e-6 USD for the cheapest if none has any). A share ``explore`` of
starts go to a random tier below the chosen one, so a tier that got better is
found again.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from orchestrator.settings import Settings
from orchestrator.spec import StepPlan

DECAY = 0.97  # per label, newest first: a label 23 answers old weighs half
# The newest rows read per step: at DECAY 0.97 a label 150 rows old weighs 1%,
# and all those past 200 together weigh less than a tenth of one new label.
HISTORY = 200
PASSES = ("ok", "good")  # "good" and "bad": people's feedback on an answer
FAILS = ("invalid_output", "low_confidence", "bad")
UNKNOWN_COST_USD = 1e-6
STEP_UP = 10.0


@dataclass(frozen=True)
class Route:
    start: int  # index in the ladder given to ``choose``
    routed: str  # "auto" or "explore"
    expected_pass: float  # the pass-rate estimate of the tier it starts at


@dataclass(frozen=True)
class Outcome:
    """One row of a step's history: where it ran, what became of it, what it cost."""

    tier: str
    outcome: str
    cost_usd: float
    latency_ms: float


def route_key(settings: Settings, plan: StepPlan) -> str:
    """What a step's history is kept under: it changes when its answers may."""
    tiers = {
        name: [entry.model for entry in tier.models] for name, tier in settings.config.tiers.items()
    }
    shaped = {
        "step": plan.step.model_dump(mode="json"),
        "agent": plan.agent.model_dump(mode="json"),
        "tiers": tiers,
        **({"scope": plan.route_scope} if plan.route_scope else {}),
    }
    return hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]


def pass_rates(history: Sequence[Outcome], ladder: Sequence[str]) -> list[float]:
    """Each ladder tier's pass-rate estimate from ``history`` (newest first)."""
    position = {name: index for index, name in enumerate(ladder)}
    passes = [1.0] * len(ladder)
    fails = [1.0] * len(ladder)
    weight = 1.0
    for row in history:
        index = position.get(row.tier)
        if index is None or row.outcome not in PASSES + FAILS:
            continue
        if row.outcome in PASSES:
            for above in range(index, len(ladder)):
                passes[above] += weight
        else:
            fails[index] += weight
        weight *= DECAY
    return [p / (p + f) for p, f in zip(passes, fails, strict=True)]


def costs(
    history: Sequence[Outcome], ladder: Sequence[str], latency_usd_per_s: float
) -> list[float]:
    """Each ladder tier's expected cost per call (see the module's docstring)."""
    seen: dict[str, list[float]] = {}
    for row in history:
        if row.outcome in ("unavailable", "cache_hit", "good", "bad"):
            continue  # no request, or a label with no call
        cost = row.cost_usd or row.latency_ms / 1000 * latency_usd_per_s
        seen.setdefault(row.tier, []).append(cost)
    found: list[float] = []
    for name in ladder:
        if name in seen:
            found.append(sum(seen[name]) / len(seen[name]))
        else:
            found.append(found[-1] * STEP_UP if found else UNKNOWN_COST_USD)
    return found


def choose(rates: Sequence[float], prices: Sequence[float]) -> int:
    """The start with the lowest expected cost of an accepted answer; the lowest on a tie."""
    expected = [0.0] * len(rates)
    expected[-1] = prices[-1]
    for index in range(len(rates) - 2, -1, -1):
        expected[index] = prices[index] + (1 - rates[index]) * expected[index + 1]
    return min(range(len(rates)), key=lambda index: (expected[index], index))


def route(
    history: Sequence[Outcome],
    ladder: Sequence[str],
    *,
    explore: float,
    latency_usd_per_s: float,
    rng: random.Random | Any = random,
) -> Route:
    """Where to start on ``ladder`` (tier names, cheapest first)."""
    rates = pass_rates(history, ladder)
    start = choose(rates, costs(history, ladder, latency_usd_per_s))
    if start > 0 and rng.random() < explore:
        lower = rng.randrange(start)
        return Route(lower, "explore", rates[lower])
    return Route(start, "auto", rates[start])
