"""How sure a model was of its answer: one score in [0, 1] per answer.

``logprob`` reads the answer tokens' log-probabilities from the backend:

- an answer of at most ``SHORT_ANSWER_TOKENS`` tokens (a label, a number) scores
  the margin of its first token, p(chosen) − p(best other), which is where a
  label is decided; without the alternative, its probability;
- a longer answer scores the geometric mean of two per-token probabilities:
  the mean one, exp(mean log p), and a low one, exp of the ``LOW_QUANTILE``
  log p. A sum would favour short answers; the low quantile keeps one unsure
  token in a long answer from being averaged away.

A backend that gives no log-probabilities gives no score: the call's row says
the signal was unavailable, and no value is made up.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from orchestrator.models.base import TokenChoice

SHORT_ANSWER_TOKENS = 3
LOW_QUANTILE = 0.1
FLOOR_LOGPROB = -100.0  # a -inf from a backend counts as this, so the mean stays finite


def logprob_score(tokens: Sequence[TokenChoice] | None) -> float | None:
    """The answer's score from its tokens (see the module's docstring); None without any."""
    if not tokens:
        return None
    logprobs = sorted(max(token.logprob, FLOOR_LOGPROB) for token in tokens)
    if len(logprobs) <= SHORT_ANSWER_TOKENS:
        first = tokens[0]
        chosen = math.exp(max(first.logprob, FLOOR_LOGPROB))
        if first.runner_up is None:
            return chosen
        return max(0.0, chosen - math.exp(max(first.runner_up, FLOOR_LOGPROB)))
    mean = sum(logprobs) / len(logprobs)
    low = logprobs[int(LOW_QUANTILE * (len(logprobs) - 1))]
    return math.exp((mean + low) / 2)
