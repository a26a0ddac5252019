"""Which client serves a model entry, built once per endpoint and reused."""

from __future__ import annotations

from orchestrator.models.base import ModelClient
from orchestrator.settings import ModelEntry


class Clients:
    """Builds clients lazily, so a run pays only for the backends it reaches."""

    def __init__(self) -> None:
        self._clients: dict[tuple[str, str | None, str | None, str | None], ModelClient] = {}

    def for_entry(self, entry: ModelEntry) -> ModelClient:
        provider = entry.provider
        key = (
            provider if provider in ("ollama", "llamacpp") else entry.model,
            entry.api_base,
            entry.api_key_env,
            entry.mock_response,
        )
        client = self._clients.get(key)
        if client is None:
            client = self._clients[key] = _build(entry)
        return client

    async def aclose(self) -> None:
        """Close every client built so far; the registry can build fresh ones afterwards."""
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            await client.aclose()


def _build(entry: ModelEntry) -> ModelClient:
    if entry.provider == "ollama":
        from orchestrator.models.ollama import OllamaClient

        return OllamaClient(host=entry.api_base)
    if entry.provider == "llamacpp":
        from orchestrator.models.llamacpp import LlamaCppClient

        return LlamaCppClient()
    from orchestrator.models.litellm import LiteLLMClient

    return LiteLLMClient(
        model=entry.model,
        api_base=entry.api_base,
        api_key_env=entry.api_key_env,
        mock_response=entry.mock_response,
    )
