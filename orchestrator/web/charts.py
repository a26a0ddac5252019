"""Charts as SVG geometry: the server works out every bar, the template draws it.

The dashboard needs no JavaScript and nothing from the internet. Each bar
carries its figures as ``data-*`` attributes and a ``<title>`` tooltip; the
template writes them autoescaped, so names from the ledger stay data.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal

from orchestrator.encoding import usd
from orchestrator.reports import SpendRow

PALETTE = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#9c755f")
OTHER = "other"
OTHER_COLOR = "#bab0ac"
WIDTH, HEIGHT = 760, 240
LEFT, BOTTOM, TOP = 80, 24, 8
ROW_HEIGHT = 26


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    width: float
    height: float
    color: str
    title: str
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Label:
    x: float
    y: float
    text: str
    anchor: str = "start"


@dataclass(frozen=True)
class Chart:
    width: int
    height: int
    bars: list[Bar]
    labels: list[Label]
    legend: list[tuple[str, str]] = field(default_factory=list)  # (colour, name)


def spend_over_time(rows: Iterable[SpendRow], days: list[date]) -> Chart:
    """Stacked bars of cost per day, one colour per workflow; rows are keyed (day, workflow).

    The dearest workflows get a colour each; the rest share one bar segment, "other".
    """
    cost: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    by_workflow: dict[str, Decimal] = defaultdict(Decimal)
    for row in rows:
        day_key, workflow = str(row.key[0]), str(row.key[1])
        cost[day_key, workflow] += row.cost_usd
        by_workflow[workflow] += row.cost_usd
    ranked = sorted(by_workflow, key=lambda name: (-by_workflow[name], name))
    colours = dict(zip(ranked, PALETTE, strict=False))
    series = {name: (name if name in colours else OTHER) for name in ranked}
    stacks: dict[str, dict[str, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    for (day_key, workflow), value in cost.items():
        stacks[day_key][series[workflow]] += value
    peak = max((sum(stack.values(), Decimal(0)) for stack in stacks.values()), default=Decimal(0))
    plot_height = HEIGHT - BOTTOM - TOP
    step = (WIDTH - LEFT) / max(len(days), 1)
    bars = []
    for index, day in enumerate(days):
        base = float(HEIGHT - BOTTOM)
        for name, value in sorted(stacks[day.isoformat()].items(), key=lambda item: item[0]):
            if value <= 0:
                continue
            height = max(float(value / peak) * plot_height, 1.0)  # spend is never invisible
            base -= height
            bars.append(
                Bar(
                    x=LEFT + index * step + 1,
                    y=base,
                    width=max(step - 2, 1),
                    height=height,
                    color=colours.get(name, OTHER_COLOR),
                    title=f"{day.isoformat()} · {name}: {usd(value)}",
                    data={"day": day.isoformat(), "workflow": name, "cost": str(value)},
                )
            )
    labels = [
        Label(LEFT - 6, TOP + 10, usd(peak), "end"),
        Label(LEFT - 6, HEIGHT - BOTTOM, "$0", "end"),
    ]
    if days:
        labels.append(Label(LEFT, HEIGHT - 6, days[0].isoformat()))
        labels.append(Label(WIDTH, HEIGHT - 6, days[-1].isoformat(), "end"))
    legend = [(colours[name], name) for name in ranked if name in colours]
    if len(ranked) > len(colours):
        legend.append((OTHER_COLOR, OTHER))
    return Chart(WIDTH, HEIGHT, bars, labels, legend)


def tier_mix(rows: Iterable[SpendRow], ladder: list[str]) -> Chart:
    """One bar per tier, cheapest first, as long as its share of the money (of the
    calls, when nothing was spent), labelled with both."""
    rows = sorted(rows, key=lambda row: _ladder_place(ladder, str(row.key[0])))
    calls = sum(row.calls for row in rows)
    cost = sum((row.cost_usd for row in rows), Decimal(0))
    bars, labels = [], []
    for index, row in enumerate(rows):
        tier = str(row.key[0])
        share = row.calls / calls if calls else 0.0
        size = float(row.cost_usd / cost) if cost else share
        y = TOP + index * ROW_HEIGHT
        bars.append(
            Bar(
                x=LEFT,
                y=y,
                width=max(size * (WIDTH - LEFT - 260), 1),
                height=ROW_HEIGHT - 6,
                color=PALETTE[index % len(PALETTE)],
                title=f"{tier}: {row.calls} calls, {usd(row.cost_usd)}",
                data={"tier": tier, "calls": str(row.calls), "cost": str(row.cost_usd)},
            )
        )
        labels.append(Label(LEFT - 6, y + 15, tier, "end"))
        money = f"{size:.0%} of cost · " if cost else ""
        labels.append(
            Label(WIDTH, y + 15, f"{money}{usd(row.cost_usd)} · {share:.0%} of calls", "end")
        )
    return Chart(WIDTH, TOP + len(rows) * ROW_HEIGHT + 4, bars, labels)


def savings(total: SpendRow) -> Chart:
    """Two bars: what the calls cost, and what the same tokens cost on the reference model."""
    values = [
        ("tiered", total.cost_usd, PALETTE[2]),
        ("all-frontier", total.reference_cost_usd, PALETTE[3]),
    ]
    peak = max((value for _, value, _ in values), default=Decimal(0))
    bars, labels = [], []
    for index, (name, value, colour) in enumerate(values):
        y = TOP + index * ROW_HEIGHT
        width = float(value / peak) * (WIDTH - LEFT - 220) if peak > 0 else 0.0
        bars.append(
            Bar(
                LEFT,
                y,
                max(width, 1),
                ROW_HEIGHT - 6,
                colour,
                f"{name}: {usd(value)}",
                {"series": name, "cost": str(value)},
            )
        )
        labels.append(Label(LEFT - 6, y + 15, name, "end"))
        labels.append(Label(WIDTH, y + 15, usd(value), "end"))
    return Chart(WIDTH, TOP + len(values) * ROW_HEIGHT + 4, bars, labels)


def _ladder_place(ladder: list[str], tier: str) -> tuple[int, str]:
    return (ladder.index(tier) if tier in ladder else len(ladder), tier)
