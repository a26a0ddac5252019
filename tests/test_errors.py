"""Errors keep their message and fields across a process hop."""

from __future__ import annotations

import pickle

import pytest

from orchestrator.errors import (
    ModelTimeout,
    ModelUnavailable,
    RunError,
    SpecError,
    StepFailed,
    TierflowError,
    UserError,
)


@pytest.mark.parametrize(
    "error",
    [
        SpecError("a.yaml:3: name: bad", "a.yaml:9: steps[0].tier: unknown tier"),
        ModelUnavailable("Ollama unreachable at 127.0.0.1:11434"),
        ModelTimeout("no answer within 3s"),
        StepFailed("step 'x' failed"),
    ],
)
def test_errors_round_trip(error: TierflowError) -> None:
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error)
    assert str(copy) == str(error)
    assert getattr(copy, "problems", None) == getattr(error, "problems", None)
    assert getattr(copy, "reason", None) == getattr(error, "reason", None)


def test_user_errors_and_run_errors_are_apart() -> None:
    assert issubclass(SpecError, UserError) and not issubclass(SpecError, RunError)
    assert issubclass(ModelTimeout, RunError) and not issubclass(ModelTimeout, UserError)
    assert ModelUnavailable("x").outcome == "unavailable"
