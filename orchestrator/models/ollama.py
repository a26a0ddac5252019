"""Ollama through the official ``ollama`` AsyncClient (``OLLAMA_HOST`` as Ollama reads it)."""

from __future__ import annotations

import functools
import json
import os
from dataclasses import replace
from typing import Any

from orchestrator.errors import (
    ModelBusy,
    ModelCallError,
    ModelError,
    ModelRefused,
    ModelTimeout,
    ModelUnavailable,
)
from orchestrator.models.base import (
    TOP_LOGPROBS,
    Forms,
    ModelClient,
    ModelReply,
    ModelRequest,
    TokenChoice,
    ToolCall,
    instructed,
    parse_retry_after,
    token_choices,
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
        self._forms = Forms()

    async def complete(self, request: ModelRequest) -> ModelReply:
        await self._check_pulled(request.model)
        form = self._forms.of(request) if request.json_schema is not None else "none"
        messages = request.messages
        if request.json_schema is not None and form != "json_schema":
            messages = instructed(messages, request.json_schema)
        chat: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            # A schema (Ollama 0.5 and later), any JSON ("json"), or free text.
            "format": {"json_schema": request.json_schema, "json_object": "json"}.get(form),
            "options": {"num_predict": request.max_tokens, "temperature": request.temperature},
        }
        if request.logprobs:  # Ollama 0.12.11 and later; older servers ignore them
            chat.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        if request.tools:
            chat["tools"] = list(request.tools)
            chat["messages"] = [_ollama_message(m) for m in messages]
        client = self._timed.get(request.timeout_s)
        if client is None:
            # ollama's chat() takes no per-call timeout, so keep one client per timeout.
            client = self._timed[request.timeout_s] = self._ollama.AsyncClient(
                host=self._host_arg, timeout=request.timeout_s, verify=_tls()
            )
        try:
            if request.stream and not request.tools:  # a tool loop's turns are not streamed
                return await self._stream(client, chat)
            response = await client.chat(**chat, stream=False)
            text = response.message.content or ""
        except ModelError:
            raise
        except Exception as exc:
            raise self._error(exc, request, form) from None
        reply = _reply(
            chat,
            text,
            response.prompt_eval_count,
            response.eval_count,
            token_choices(response.logprobs),
            cut=response.done_reason == "length",
        )
        calls = tuple(
            ToolCall(f"call_{index}", call.function.name, dict(call.function.arguments or {}))
            for index, call in enumerate(response.message.tool_calls or ())
        )
        return replace(reply, tool_calls=calls) if calls else reply

    async def _stream(self, client: Any, chat: dict[str, Any]) -> ModelReply:
        """Assemble a streamed answer. Ollama sends one token a chunk and its counts in
        the last; a stream that breaks or ends before its last chunk may still have
        been billed, and reported nothing: an error with no usage."""
        parts: list[str] = []
        tokens: list[TokenChoice] | None = [] if chat.get("logprobs") else None
        try:
            chunks = await client.chat(**chat, stream=True)
            async for chunk in chunks:
                parts.append(chunk.message.content or "")
                if tokens is not None:
                    tokens.extend(token_choices(chunk.logprobs) or ())
                if chunk.done:
                    return _reply(
                        chat,
                        "".join(parts),
                        chunk.prompt_eval_count,
                        chunk.eval_count,
                        tuple(tokens) if tokens else None,
                        cut=chunk.done_reason == "length",
                    )
            why = "it ended before its last chunk"
        except Exception as exc:
            if not parts:
                raise
            why = f"{type(exc).__name__}: {exc}"
        raise ModelCallError(f"Ollama: the stream broke after {len(parts)} chunks: {why}")

    def _error(self, exc: Exception, request: ModelRequest, form: str) -> ModelError:
        """Ours for a failure of the ``ollama`` client. The client turns httpx's
        ConnectError (raised before the request is written) into ConnectionError."""
        if isinstance(exc, ConnectionError | self._httpx.ConnectTimeout):
            return ModelUnavailable(f"Ollama unreachable at {self._host}")
        if isinstance(exc, self._ollama.ResponseError):
            status, said = exc.status_code, f"Ollama {exc.status_code}: {exc.error}"
            if status == 404 and "not found" in exc.error:
                self._pulled = None  # read the model list again next time
                return ModelUnavailable(
                    f"{request.model} is not pulled on {self._host} (run: ollama pull {request.model})"
                )
            if (
                status in (400, 500)
                and form != "none"
                and "format" in exc.error.lower()
                and self._forms.refused(request, form)
            ):
                return ModelBusy(
                    f"{said} (next: {self._forms.of(request)})",
                    billed=status >= 500,
                    retry_after_s=0.0,
                )
            if status == 429 or status >= 500:
                return ModelBusy(said, billed=status != 429, retry_after_s=_retry_after(exc))
            if 400 <= status < 500:
                return ModelRefused(said)
            return ModelCallError(said)  # an error line inside a stream
        if isinstance(exc, self._httpx.TimeoutException):
            return ModelTimeout(f"Ollama gave no answer within {request.timeout_s:g}s")
        return ModelCallError(f"Ollama: {type(exc).__name__}: {exc}")

    async def aclose(self) -> None:
        for client in [self._client, *self._timed.values()]:
            await client.close()

    async def _check_pulled(self, model: str) -> None:
        if self._pulled is None or _tagged(model) not in self._pulled:
            try:
                listing = await self._client.list()
            except ConnectionError:
                raise ModelUnavailable(f"Ollama unreachable at {self._host}") from None
            except Exception as exc:
                # No chat request was sent: the model could not be asked.
                why = exc.error if isinstance(exc, self._ollama.ResponseError) else exc
                raise ModelUnavailable(
                    f"Ollama at {self._host} could not list its models: {type(exc).__name__}: {why}"
                ) from None
            self._pulled = {_tagged(entry.model or "") for entry in listing.models}
        if _tagged(model) not in self._pulled:
            raise ModelUnavailable(
                f"{model} is not pulled on {self._host} (run: ollama pull {model})"
            )


def _reply(
    chat: dict[str, Any],
    text: str,
    prompt: int | None,
    completion: int | None,
    logprobs: tuple[TokenChoice, ...] | None,
    *,
    cut: bool,
) -> ModelReply:
    """The reply, with Ollama's counts. Ollama leaves a count out (the prompt's, when
    its cache held the prompt), so a missing one is estimated at its upper bound:
    a byte-level token holds at least one byte. ``cut``: it stopped at ``num_predict``."""
    if prompt and completion is not None:
        return ModelReply(text, prompt, completion, logprobs=logprobs, truncated=cut)
    if not prompt:
        sent = [m["content"] for m in chat["messages"]]
        if isinstance(chat["format"], dict):
            sent.append(json.dumps(chat["format"]))
        prompt = sum(len(part.encode()) + 16 for part in sent)
    if completion is None:
        completion = len(text.encode())
    return ModelReply(text, prompt, completion, counted=True, logprobs=logprobs, truncated=cut)


def _ollama_message(message: dict[str, Any]) -> dict[str, Any]:
    """A tool loop's message in Ollama's shape: a tool call's arguments are an
    object, not a string, and a tool's answer names its tool."""
    if message["role"] == "tool":
        return {"role": "tool", "content": message["content"], "tool_name": message.get("name")}
    if not message.get("tool_calls"):
        return message
    calls = []
    for call in message["tool_calls"]:
        arguments = call["function"]["arguments"]
        try:
            arguments = json.loads(arguments) if isinstance(arguments, str) else arguments
        except ValueError:
            arguments = {}
        calls.append({"function": {"name": call["function"]["name"], "arguments": arguments}})
    return {"role": "assistant", "content": message.get("content") or "", "tool_calls": calls}


def _retry_after(exc: BaseException) -> float | None:
    """The ``Retry-After`` of the HTTP answer the ollama client raised ``exc`` for."""
    response = getattr(exc.__context__, "response", None)
    return parse_retry_after(getattr(response, "headers", {}).get("retry-after"))


def _tagged(name: str) -> str:
    return name if ":" in name else f"{name}:latest"
