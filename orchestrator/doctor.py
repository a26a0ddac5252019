"""Can each tier serve? ``tierflow doctor`` prints it; ``tierflow validate`` warns.

For each model of each tier: where it runs, whether it can be reached (an
Ollama server answers and has the model pulled; an embedded model is
installed; an ``api_base`` accepts a connection), whether its key is in the
environment, and its price. Nothing is sent to a provider: a hosted model
without an ``api_base`` is "not checked" for reachability, only for its key.
A tier can serve when one of its models can.
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from orchestrator.settings import ModelEntry, Settings, Tier

CONNECT_S = 2.0  # how long a reachability check waits for an answer
# The key variable litellm reads for common providers, so that validate and doctor
# need not import litellm (2.7 s) to say a key is missing; a test holds it to
# litellm's own validate_environment. Other providers ask litellm.
KEY_VARIABLES = {
    "openai": "OPENAI_API_KEY",
    "anthropic": "ANTHROPIC_API_KEY",
    "groq": "GROQ_API_KEY",
    "mistral": "MISTRAL_API_KEY",
    "deepseek": "DEEPSEEK_API_KEY",
    "cohere": "COHERE_API_KEY",
    "openrouter": "OPENROUTER_API_KEY",
    "xai": "XAI_API_KEY",
    "together_ai": "TOGETHERAI_API_KEY",
}
MILLION = 1_000_000


@dataclass(frozen=True)
class Readiness:
    """One model of a tier, as ``tierflow doctor`` shows it."""

    tier: str
    model: str
    where: str
    reachable: str  # yes, no, not checked
    key: str  # set, missing (NAME), not needed
    price: str  # per million tokens in / out, or $0 (local)
    problem: str | None  # why it cannot serve, or None

    @property
    def ready(self) -> bool:
        return self.problem is None


def readiness(settings: Settings) -> list[Readiness]:
    """Every model of every tier, in ladder order."""
    return [
        _check(settings, name, tier, entry)
        for name, tier in settings.config.tiers.items()
        for entry in tier.models
    ]


def tiers_that_cannot_serve(found: list[Readiness]) -> dict[str, list[str]]:
    """Each tier none of whose models can serve, with each model's reason."""
    by_tier: dict[str, list[Readiness]] = {}
    for row in found:
        by_tier.setdefault(row.tier, []).append(row)
    return {
        tier: [f"{row.model}: {row.problem}" for row in rows]
        for tier, rows in by_tier.items()
        if not any(row.ready for row in rows)
    }


def _check(settings: Settings, tier_name: str, tier: Tier, entry: ModelEntry) -> Readiness:
    price = _price(settings, entry.model)
    if entry.mock_response is not None:
        where, reachable, key, problem = (
            "simulated (mock_response)",
            "not checked",
            "not needed",
            None,
        )
    elif entry.provider == "llamacpp":
        where, key = "embedded (in-process)", "not needed"
        problem = _embedded_problem(entry.model)
        reachable = "yes" if problem is None else "no"
    elif entry.provider == "ollama":
        host = entry.api_base or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
        where, key = f"ollama {host}", "not needed"
        problem = _ollama_problem(host, entry.model.split("/", 1)[1])
        reachable = "no" if problem and "unreachable" in problem else "yes"
    else:
        where = entry.api_base or f"{entry.provider} (its usual endpoint)"
        key, problem = _key(entry)
        reachable = "not checked"
        if entry.api_base:
            unreachable = _connect_problem(entry.api_base)
            reachable = "no" if unreachable else "yes"
            problem = problem or unreachable
    return Readiness(tier_name, entry.model, where, reachable, key, price, problem)


def _price(settings: Settings, model: str) -> str:
    try:
        price = settings.price_of(model)
    except Exception:
        return "unpriced"
    if not price.input and not price.output:
        hourly = price.per_second * 3600
        return f"${hourly:g}/hour" if hourly else "$0"
    per_million = [
        format((value * MILLION).normalize(), "f") for value in (price.input, price.output)
    ]
    return f"${per_million[0]} / ${per_million[1]} per 1M tokens"


def _embedded_problem(model: str) -> str | None:
    from orchestrator.errors import ModelUnavailable
    from orchestrator.models.llamacpp import KNOWN_MODELS

    name = model.split("/", 1)[1]
    finder = KNOWN_MODELS.get(name)
    if finder is None:
        return f"unknown embedded model; known: {', '.join(KNOWN_MODELS)}"
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed: pip install 'tierflow[embedded]'"
    try:
        finder()
    except ModelUnavailable as exc:
        return exc.reason
    return None


def _ollama_problem(host: str, model: str) -> str | None:
    """None when the server at ``host`` lists ``model``; else why not."""
    import ollama

    try:
        listing = ollama.Client(host=host, timeout=CONNECT_S).list()
    except Exception as exc:
        return f"Ollama unreachable at {host}: {type(exc).__name__}"
    pulled = {entry.model or "" for entry in listing.models}
    tagged = model if ":" in model else f"{model}:latest"
    if tagged not in pulled and model not in pulled:
        return f"{model} is not pulled on {host} (run: ollama pull {model})"
    return None


def _key(entry: ModelEntry) -> tuple[str, str | None]:
    """The key column, and the problem if the key is missing."""
    if entry.api_key_env:
        if os.environ.get(entry.api_key_env):
            return f"set ({entry.api_key_env})", None
        return f"missing ({entry.api_key_env})", f"{entry.api_key_env} is not set"
    missing = missing_keys(entry.model)
    if not missing:
        return "set", None
    if entry.api_base:
        return "not needed", None  # a self-hosted endpoint may want no key
    names = ", ".join(missing)
    return f"missing ({names})", f"{names} not set"


def missing_keys(model: str) -> list[str]:
    """The variables ``model``'s provider needs that this environment lacks."""
    known = KEY_VARIABLES.get(model.split("/", 1)[0])
    if known is not None:
        return [] if os.environ.get(known) else [known]
    from orchestrator.models.litellm import import_litellm

    return list(import_litellm().validate_environment(model=model).get("missing_keys") or [])


def _connect_problem(url: str) -> str | None:
    """None when ``url``'s host accepts a TCP connection within CONNECT_S."""
    parts = urlsplit(url if "://" in url else f"http://{url}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=CONNECT_S).close()
    except OSError as exc:
        return f"{parts.hostname}:{port} unreachable: {exc.strerror or type(exc).__name__}"
    return None
