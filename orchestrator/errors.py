"""Every exception tierflow raises on purpose.

    TierflowError                 root; catch this to catch ours
    ├── UserError                 you configured it wrong: exit code 2, no run starts
    │   └── SpecError             a file or input failed validation (FILE:LINE: field: message)
    ├── RunError                  a run started and failed: exit code 1
    │   ├── RunCancelled          someone cancelled the run; its work stopped
    │   ├── StepFailed            a step exhausted its tier ladder
    │   └── ModelError            one model call failed; the scheduler escalates on it
    │       ├── ModelUnavailable  the request never left: no key, unreachable, not pulled
    │       ├── ModelTimeout      the call took longer than its timeout
    │       └── ModelCallError    the backend answered with an error, or broke off
    │           ├── ModelRefused  it answered 4xx: it took the request and generated nothing
    │           └── ModelBusy     429 or 5xx, or a refused output form: ask it again
    └── LeaseLost                 another executor holds the run now: this one stops and
                                  writes nothing more (not a run failure: the run goes on)

``ModelError.billed`` says whether the provider may bill the request: true
unless the request provably never left, or the provider refused it. A billed
failure without reported usage is recorded at its worst case.

Each class rebuilds from its arguments (``__reduce__``), so it survives a hop
between processes, such as a Celery worker reporting back.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable


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


def redact(text: str, names: Iterable[str | None] = ()) -> str:
    """``text`` with every secret of this process's environment masked.

    A provider's error can quote the key it was sent; model errors pass
    through here before they reach the ledger, a log or a report. A secret is
    the value (8 characters or more) of a variable named like a key or token,
    of a provider's usual key variable, or of one of ``names`` (the variables
    tierflow.yaml names with ``api_key_env``). Longer values are masked first,
    so a secret that holds another is masked whole.
    """
    wanted = {name for name in names if name}
    secrets = sorted(
        (
            (value, name)
            for name, value in os.environ.items()
            if len(value) >= 8
            and (name in wanted or name in PROVIDER_KEYS or _SECRET_NAME.search(name))
        ),
        key=lambda pair: -len(pair[0]),
    )
    for value, name in secrets:
        if value in text:
            text = text.replace(value, f"[{name} redacted]")
    return text


def clip(text: str, limit: int = 500) -> str:
    """``text`` on one line, at most ``limit`` characters. Mask before clipping:
    a secret cut in two is no longer found whole."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|JWT", re.IGNORECASE)
# What litellm reads for each provider, whether or not the name looks like a key.
PROVIDER_KEYS = frozenset(
    {
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "ANTHROPIC_AUTH_TOKEN",
        "AZURE_API_KEY",
        "AZURE_OPENAI_API_KEY",
        "AZURE_AD_TOKEN",
        "GEMINI_API_KEY",
        "GOOGLE_API_KEY",
        "GOOGLE_APPLICATION_CREDENTIALS",
        "VERTEXAI_CREDENTIALS",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_BEARER_TOKEN_BEDROCK",
        "MISTRAL_API_KEY",
        "GROQ_API_KEY",
        "COHERE_API_KEY",
        "CO_API_KEY",
        "DEEPSEEK_API_KEY",
        "XAI_API_KEY",
        "OPENROUTER_API_KEY",
        "TOGETHERAI_API_KEY",
        "TOGETHER_API_KEY",
        "FIREWORKS_AI_API_KEY",
        "FIREWORKS_API_KEY",
        "PERPLEXITYAI_API_KEY",
        "HUGGINGFACE_API_KEY",
        "HF_TOKEN",
        "REPLICATE_API_KEY",
        "REPLICATE_API_TOKEN",
        "DATABRICKS_TOKEN",
        "WATSONX_APIKEY",
        "WATSONX_TOKEN",
        "SNOWFLAKE_JWT",
        "NVIDIA_NIM_API_KEY",
        "CEREBRAS_API_KEY",
        "DEEPINFRA_API_KEY",
        "VOYAGE_API_KEY",
        "OLLAMA_API_KEY",
    }
)


class ModelError(RunError):
    """One model call failed. ``reason`` is masked, one line and bounded: safe to store.

    ``usage`` is (prompt, completion) tokens when the provider reported them
    before failing, else None. ``mask`` names more variables whose values are
    secrets (the client's ``api_key_env``).
    """

    outcome = "error"
    billed = True  # the provider may bill it: the request may have reached the model

    def __init__(
        self,
        reason: str,
        *,
        usage: tuple[int, int] | None = None,
        mask: Iterable[str | None] = (),
    ) -> None:
        reason = clip(redact(reason, mask))
        super().__init__(reason)
        self.reason = reason
        self.usage = usage


class ModelUnavailable(ModelError):
    """The model cannot be asked: missing credentials, an unreachable server or a
    model that is not there. The request provably never reached a model."""

    outcome = "unavailable"
    billed = False


class ModelTimeout(ModelError):
    outcome = "timeout"


class ModelCallError(ModelError):
    outcome = "error"


class ModelRefused(ModelCallError):
    """The provider answered 4xx: it received the request and generated nothing."""

    billed = False


class ModelBusy(ModelCallError):
    """The same model may answer if asked again: after a rate limit (429), a server
    error (5xx), or in another output form when it refused this one. ``retry_after_s``
    is how long the provider asked us to wait (None: back off)."""

    def __init__(
        self,
        reason: str,
        *,
        billed: bool = True,
        retry_after_s: float | None = None,
        usage: tuple[int, int] | None = None,
        mask: Iterable[str | None] = (),
    ) -> None:
        super().__init__(reason, usage=usage, mask=mask)
        self.billed = billed
        self.retry_after_s = retry_after_s
