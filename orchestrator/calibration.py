"""A raw confidence score made a probability of being right, per step and model.

A step's labelled answers (``tierflow feedback``, and ``tierflow eval``'s
verdicts) pair each answer's raw score with whether it was right. Once a step
has ``MIN_LABELS`` of them on one model, ``MIN_EACH`` right and as many wrong,
its raw scores on that model are mapped through an isotonic fit: the pool
adjacent violators algorithm over the pairs sorted by score, each block's
share right shrunk towards one half by one right and one wrong pseudo-label
(so 3 of 3 reads 0.8, not 1), and the blocks pooled again wherever shrinking
broke the order. A raw score maps to the block it falls in; below the first
block, to the first.

Why isotonic, not logistic: the only thing assumed of a signal is that a
higher score is not less likely right. Logprob margins, agreement shares and
judges' grades are not shaped like a sigmoid of anything, and a small model
can be surest where it is most often wrong: a logistic fit would force a
monotone S-curve through that; isotonic keeps the steps it finds and, with
ties pooled, goes flat where the score tells nothing.

The newest ``HISTORY`` labels are read, so a model that changes is followed.
Until a step has enough labels, its raw score is compared with ``min`` and the
ledger row says so (no ``raw_confidence``).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass

MIN_LABELS = 30
MIN_EACH = 5
HISTORY = 400


@dataclass(frozen=True)
class Calibration:
    """An isotonic map: ``starts[i]`` is the lowest raw score of block i."""

    starts: tuple[float, ...]
    values: tuple[float, ...]
    labels: int

    def __call__(self, raw: float) -> float:
        index = max(0, bisect_right(self.starts, raw) - 1)
        return self.values[index]


def fit(labelled: Sequence[tuple[float, bool]]) -> Calibration | None:
    """The calibration of ``labelled`` (raw score, right), or None with too few."""
    rights = sum(right for _, right in labelled)
    if len(labelled) < MIN_LABELS or min(rights, len(labelled) - rights) < MIN_EACH:
        return None
    ordered = sorted(labelled)
    # Ties share one block: equal scores cannot be told apart.
    blocks: list[list[float]] = []  # [start, rights, count]
    for score, right in ordered:
        if blocks and blocks[-1][0] == score:
            blocks[-1][1] += right
            blocks[-1][2] += 1
        else:
            blocks.append([score, float(right), 1.0])
    pooled = _pool([(start, r, n) for start, r, n in blocks], shrink=0)
    shrunk = _pool(pooled, shrink=1)
    return Calibration(
        starts=tuple(start for start, _, _ in shrunk),
        values=tuple(round(_share(r, n, 1), 6) for _, r, n in shrunk),
        labels=len(labelled),
    )


def _share(rights: float, count: float, shrink: int) -> float:
    return (rights + shrink) / (count + 2 * shrink)


def _pool(
    blocks: list[tuple[float, float, float]], *, shrink: int
) -> list[tuple[float, float, float]]:
    """Pool adjacent violators: merge neighbours (start, rights, count) until
    their shares right, with ``shrink`` pseudo-labels of each kind, never fall."""
    stack: list[tuple[float, float, float]] = []
    for block in blocks:
        stack.append(block)
        while len(stack) > 1 and _share(*stack[-2][1:], shrink) >= _share(*stack[-1][1:], shrink):
            (start, r1, n1), (_, r2, n2) = stack[-2], stack[-1]
            stack[-2:] = [(start, r1 + r2, n1 + n2)]
    return stack
