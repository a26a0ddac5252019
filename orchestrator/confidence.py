"""How sure a model was of its answer: one score in [0, 1] per answer.

``logprob`` reads the answer tokens' log-probabilities from the backend:

- an answer of at most ``SHORT_ANSWER_TOKENS`` tokens (a label, a number) scores
  the margin of its first token, p(chosen) − p(best other), which is where a
  label is decided; without the alternative, its probability;
- a longer answer scores the geometric mean of two per-token probabilities:
  the mean one, exp(mean log p), and a low one, exp of the ``LOW_QUANTILE``
  log p. A sum would favour short answers; the low quantile keeps one unsure
  token in a long answer from being averaged away.

For a step with an output schema, only the tokens of the answer's values
count: the braces, quotes, commas and keys of the JSON around them are forced
by the schema (the embedded model writes under a grammar), so the model's
doubt about them says nothing about the answer. A token counts when any of
its characters lies in a value (a string that is not a key, a number, true,
false or null). When the tokens' text does not spell the answer (a backend
that gives no token text), every token counts.

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


def logprob_score(
    tokens: Sequence[TokenChoice] | None, *, structured: bool = False
) -> float | None:
    """The answer's score from its tokens (see the module's docstring); None without
    any. ``structured``: the answer is JSON, and only its values' tokens count."""
    if not tokens:
        return None
    if structured:
        tokens = value_tokens(tokens)
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


def value_tokens(tokens: Sequence[TokenChoice]) -> Sequence[TokenChoice]:
    """The tokens that spell a JSON answer's values; all of them if none do."""
    text = "".join(token.text for token in tokens)
    inside = _value_characters(text)
    found = []
    position = 0
    for token in tokens:
        end = position + len(token.text)
        if any(inside[position:end]):
            found.append(token)
        position = end
    return found or tokens


def _value_characters(text: str) -> list[bool]:
    """For each character of a JSON ``text``, whether it belongs to a value (not a
    key, not punctuation or space). A scan, not a parser: it needs no valid JSON."""
    marks = [False] * len(text)
    containers: list[str] = []  # "{" or "["
    expect_key = False  # the next string in an object is a key
    index = 0
    while index < len(text):
        char = text[index]
        if char == '"':
            end = index + 1
            while end < len(text) and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if not expect_key:
                for at in range(index + 1, min(end, len(text))):
                    marks[at] = True
            index = end + 1
            continue
        if char in "{[":
            containers.append(char)
            expect_key = char == "{"
        elif char in "}]":
            if containers:
                containers.pop()
        elif char == ",":
            expect_key = bool(containers) and containers[-1] == "{"
        elif char == ":":
            expect_key = False
        elif not char.isspace():
            marks[index] = True  # a number, true, false or null
        index += 1
    return marks
