"""Ollama through the official ``ollama`` AsyncClient (``OLLAMA_HOST`` as Ollama reads it)."""

from __future__ import annotations

import functools
import os
from typing import Any

from orchestrator.errors import ModelCallError, ModelTimeout, ModelUnavailable
from orchestrator.models.base import (
    ModelClient,
    ModelReply,
    ModelRequest,
    prompt_tokens_upper_bound,
)


@functools.cache
def _tls() -> Any:
    """One TLS context for every client in the process: building one reads the CA
    bundle, about 30 ms, which httpx would otherwise do for each client."""
    import httpx

    return httpx.create_ssl_context()


class OllamaClient(ModelClient):
    """One Ollama server. Its model list (``/api/tags``) is read on the first call and
    again when a model is missing from it, so a model that was never pulled is
    reported as unavailable rather than as an error, and one pulled later is found."""

    def __init__(self, *, host: str | None = None) -> None:
        import httpx
        import ollama  # 0.3 s; only runs that reach an Ollama tier pay for it

        self._ollama = ollama
        self._httpx = httpx
        self._host_arg = host
        # For /api/tags; no read timeout needed.
        self._client = ollama.AsyncClient(host=host, verify=_tls())
        self._timed: dict[float, Any] = {}
        self._host = host or os.environ.get("OLLAMA_HOST") or "127.0.0.1:11434"
        self._pulled: set[str] | None = None

    async def complete(self, request: ModelRequest) -> ModelReply:
        await self._check_pulled(request.model)
        chat: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "format": request.json_schema,
            "options": {"num_predict": request.max_tokens, "temperature": request.temperature},
        }
        client = self._timed.get(request.timeout_s)
        if client is None:
            # ollama's chat() takes no per-call timeout, so keep one client per timeout.
            client = self._timed[request.timeout_s] = self._ollama.AsyncClient(
                host=self._host_arg, timeout=request.timeout_s, verify=_tls()
            )
        if request.stream:
            return await self._stream(client, request, chat)
        try:
            response = await client.chat(**chat, stream=False)
        except Exception as exc:
            raise self._error(exc, request) from None
        return ModelReply(
            text=response.message.content or "",
            prompt_tokens=response.prompt_eval_count or 0,
            completion_tokens=response.eval_count or 0,
        )

    async def _stream(self, client: Any, request: ModelRequest, chat: dict[str, Any]) -> ModelReply:
        """Assemble a streamed answer. Ollama sends one token a chunk and its counts in
        the last; a stream cut short is billed as the chunks received, after a prompt
        counted at its upper bound (Ollama reports prompt tokens only at the end)."""
        parts: list[str] = []
        try:
            chunks = await client.chat(**chat, stream=True)
            async for chunk in chunks:
                parts.append(chunk.message.content or "")
                if chunk.done:
                    return ModelReply(
                        text="".join(parts),
                        prompt_tokens=chunk.prompt_eval_count or 0,
                        completion_tokens=chunk.eval_count or len(parts),
                    )
            why = "it ended before its last chunk"
        except Exception as exc:
            if not parts:
                raise self._error(exc, request) from None
            why = f"{type(exc).__name__}: {str(exc)[:200]}"
        raise ModelCallError(
            f"Ollama: the stream broke after {len(parts)} chunks: {why}",
            prompt_tokens=prompt_tokens_upper_bound(request.messages),
            completion_tokens=len(parts),
        )

    def _error(self, exc: Exception, request: ModelRequest) -> Exception:
        """Ours for a failure of the ``ollama`` client; anything else as it is."""
        if isinstance(exc, ConnectionError):
            return ModelUnavailable(f"Ollama unreachable at {self._host}")
        if isinstance(exc, self._ollama.ResponseError):
            return ModelCallError(f"Ollama {exc.status_code}: {exc.error}")
        if isinstance(exc, self._httpx.TimeoutException):
            return ModelTimeout(f"Ollama gave no answer within {request.timeout_s:g}s")
        if isinstance(exc, self._httpx.HTTPError):
            return ModelCallError(f"Ollama: {type(exc).__name__}: {exc}")
        return exc

    async def aclose(self) -> None:
        for client in [self._client, *self._timed.values()]:
            await client.close()

    async def _check_pulled(self, model: str) -> None:
        if self._pulled is None or _tagged(model) not in self._pulled:
            try:
                listing = await self._client.list()
            except ConnectionError:
                raise ModelUnavailable(f"Ollama unreachable at {self._host}") from None
            except self._ollama.ResponseError as exc:
                raise ModelCallError(f"Ollama {exc.status_code}: {exc.error}") from None
            self._pulled = {_tagged(entry.model or "") for entry in listing.models}
        if _tagged(model) not in self._pulled:
            raise ModelUnavailable(
                f"{model} is not pulled on {self._host} (run: ollama pull {model})"
            )


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"
