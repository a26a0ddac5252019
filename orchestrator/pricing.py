"""Exact prices and costs, in Decimal USD.

Prices come from litellm's bundled cost map (the file litellm itself loads when
LITELLM_LOCAL_MODEL_COST_MAP=True), read straight from disk so that pricing a
model never pays litellm's 4-second import. Overrides in tierflow.yaml are USD
per 1M tokens. Every per-token price is held to 1e-12 USD (a pico-dollar), the
resolution the ledger stores, so a row's cost is exactly tokens × price.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

PICO = Decimal("1e-12")
MILLION = Decimal(1_000_000)
LOCAL_PROVIDERS = frozenset({"ollama", "llamacpp"})


@dataclass(frozen=True)
class Price:
    """USD per prompt token and per completion token, and for a local model, per
    second of the machine it holds (its hourly price spread over its calls' time)."""

    input: Decimal
    output: Decimal
    per_second: Decimal = Decimal(0)

    def cost(self, prompt_tokens: int, completion_tokens: int, seconds: float = 0.0) -> Decimal:
        tokens = self.input * prompt_tokens + self.output * completion_tokens
        if not self.per_second:
            return tokens
        return tokens + _quantize(self.per_second * Decimal(str(round(seconds, 6))))

    @classmethod
    def per_token(cls, input: Any, output: Any) -> Price:
        return cls(_quantize(Decimal(str(input))), _quantize(Decimal(str(output))))

    @classmethod
    def per_million(cls, input: Decimal, output: Decimal, per_hour: Decimal = Decimal(0)) -> Price:
        return cls(
            _quantize(input / MILLION), _quantize(output / MILLION), _quantize(per_hour / 3600)
        )


FREE = Price(Decimal(0), Decimal(0))


def _quantize(value: Decimal) -> Decimal:
    return value.quantize(PICO).normalize() if value else Decimal(0)


def provider_of(model: str) -> str:
    return model.split("/", 1)[0] if "/" in model else "openai"


def is_local_provider(model: str) -> bool:
    return provider_of(model) in LOCAL_PROVIDERS


@functools.cache
def litellm_cost_map() -> dict[str, Any]:
    """litellm's bundled price table, read from its package without importing it."""
    spec = importlib.util.find_spec("litellm")
    if spec is None or not spec.submodule_search_locations:
        return {}
    folder = Path(next(iter(spec.submodule_search_locations)))
    with (folder / "model_prices_and_context_window_backup.json").open("rb") as handle:
        table: dict[str, Any] = json.load(handle)
    table.pop("sample_spec", None)
    return table


def litellm_price(model: str) -> Price | None:
    """The price litellm would charge for ``model`` (``provider/name``), or None."""
    table = litellm_cost_map()
    provider = provider_of(model)
    bare = model.split("/", 1)[1] if "/" in model else model
    for key in (model, bare):
        entry = table.get(key)
        if not isinstance(entry, dict) or "input_cost_per_token" not in entry:
            continue
        if key == bare and entry.get("litellm_provider", provider) != provider:
            continue
        return Price.per_token(entry["input_cost_per_token"], entry.get("output_cost_per_token", 0))
    return None


def known_models() -> list[str]:
    """Model names in litellm's table as ``provider/name``, for "did you mean" hints."""
    names = []
    for key, entry in litellm_cost_map().items():
        if isinstance(entry, dict) and "litellm_provider" in entry:
            provider = entry["litellm_provider"]
            names.append(key if key.startswith(f"{provider}/") else f"{provider}/{key}")
    return names
