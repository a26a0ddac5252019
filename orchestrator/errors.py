"""Every exception tierflow raises on purpose.

    TierflowError                 root; catch this to catch ours
    ├── UserError                 you configured it wrong: exit code 2, no run starts
    │   └── SpecError             a file or input failed validation (FILE:LINE: field: message)
    ├── RunError                  a run started and failed: exit code 1
    │   ├── RunCancelled          someone cancelled the run; its work stopped
    │   ├── StepFailed            a step exhausted its tier ladder
    │   └── ModelError            one model call failed; the scheduler escalates on it
    │       ├── ModelUnavailable  no credentials, or the server is unreachable (tier skipped)
    │       ├── ModelTimeout      the call took longer than its timeout
    │       └── ModelCallError    the backend answered with an error
    └── LeaseLost                 another executor holds the run now: this one stops and
                                  writes nothing more (not a run failure: the run goes on)

Each class rebuilds from its arguments (``__reduce__``), so it survives a hop
between processes, such as a Celery worker reporting back.
"""

from __future__ import annotations

import os
import re


class TierflowError(Exception):
    """Root of all tierflow errors. ``str(err)`` is a complete one-line message."""

    def __reduce__(self) -> tuple[object, ...]:
        return (self.__class__, self.args)


class UserError(TierflowError):
    """Configuration, workflow or input is wrong. The CLI exits with code 2."""


class SpecError(UserError):
    """A file failed validation; ``problems`` holds each ``FILE:LINE: field: message``."""

    def __init__(self, *problems: str) -> None:
        # One line each, whatever a file or a library put in the message.
        problems = tuple(_LINE_BREAKS.sub(" ", problem) for problem in problems)
        super().__init__(*problems)
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


_LINE_BREAKS = re.compile("[\n\r\v\f\x1c-\x1e\x85\u2028\u2029]+")


class RunError(TierflowError):
    """A run started and failed. The CLI exits with code 1."""


class RunCancelled(RunError):
    """The run was cancelled (``tierflow cancel``); its executor stopped its work."""


class LeaseLost(TierflowError):
    """This executor's lease on a run is stale: another executor took the run over.

    Raised by every fenced write; the executor stops, makes no further
    provider call and writes nothing more. The run itself carries on elsewhere.
    """


class StepFailed(RunError):
    """A step found no tier that could give a valid answer."""


def redact(text: str) -> str:
    """``text`` with every secret of this process's environment masked.

    A provider's error can quote the key it was sent; model errors pass
    through here before they reach the ledger, a log or a report. A secret is
    the value (8 characters or more) of a variable named like a key or token.
    """
    for name, value in os.environ.items():
        if len(value) >= 8 and _SECRET_NAME.search(name) and value in text:
            text = text.replace(value, f"[{name} redacted]")
    return text


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", re.IGNORECASE)


class ModelError(RunError):
    """One model call failed. ``reason`` is short, has no secrets, and is safe to store."""

    outcome = "error"

    def __init__(self, reason: str, *, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        reason = redact(reason)
        super().__init__(reason)
        self.reason = reason
        # What the call used before it failed: a stream cut midway was still billed.
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = completion_tokens


class ModelUnavailable(ModelError):
    """The model cannot be asked at all: missing credentials or an unreachable server."""

    outcome = "unavailable"


class ModelTimeout(ModelError):
    outcome = "timeout"


class ModelCallError(ModelError):
    outcome = "error"
