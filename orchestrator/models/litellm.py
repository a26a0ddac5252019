"""Every hosted provider, through litellm's ``acompletion``.

This is the only module that imports litellm. It sets
LITELLM_LOCAL_MODEL_COST_MAP first, so importing litellm never reaches for the
internet, and turns litellm's exceptions into ours here, at the boundary.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import weakref
from typing import Any

from orchestrator.errors import ModelCallError, ModelTimeout, ModelUnavailable
from orchestrator.models.base import ModelClient, ModelReply, ModelRequest

# A loopback or self-hosted OpenAI-compatible server often wants no key, but the
# OpenAI SDK refuses to send a request without one.
NO_KEY = "no-key"

# litellm keeps its HTTP clients in one process-wide cache, one set per event loop,
# so every LiteLLMClient on a loop shares its connections. Only the last one open
# on a loop may close them: closing them under another cuts off that one's calls
# in flight (two runs on one loop, each with its own client: the first to end
# broke the other's call).
_open_on: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, weakref.WeakSet[LiteLLMClient]] = (
    weakref.WeakKeyDictionary()
)


def import_litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    return litellm


class LiteLLMClient(ModelClient):
    """One hosted model endpoint: the provider's own, or ``api_base`` when given.

    The key is read from ``api_key_env`` when the tier names one, else litellm
    finds the provider's usual variable. Keys are never stored or logged.
    """

    def __init__(self, *, model: str, api_base: str | None, api_key_env: str | None) -> None:
        self._litellm = import_litellm()
        import openai  # already imported by litellm; its APIError is litellm's base class

        self._openai = openai
        self._model = model
        self._api_base = api_base
        self._api_key_env = api_key_env
        self._checked_key: tuple[str | None] | None = None

    def _api_key(self) -> str | None:
        """The key to send; checked once per client, since a process's environment is fixed."""
        if self._checked_key is None:
            self._checked_key = (self._find_key(),)
        return self._checked_key[0]

    def _find_key(self) -> str | None:
        if self._api_key_env:
            key = os.environ.get(self._api_key_env)
            if not key:
                raise ModelUnavailable(f"{self._model}: {self._api_key_env} is not set")
            return key
        missing = self._litellm.validate_environment(model=self._model).get("missing_keys") or []
        if not missing:
            return None  # litellm reads the provider's usual variable
        if self._api_base:
            return NO_KEY  # a self-hosted endpoint; it may want no key at all
        raise ModelUnavailable(f"{self._model}: {', '.join(missing)} not set")

    async def complete(self, request: ModelRequest) -> ModelReply:
        api_key = self._api_key()
        _open_on.setdefault(asyncio.get_running_loop(), weakref.WeakSet()).add(self)
        litellm = self._litellm
        response_format = None
        if request.json_schema is not None:
            response_format = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema},
            }
        options = {
            "model": self._model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "timeout": request.timeout_s,
            "api_base": self._api_base,
            "api_key": api_key,
            "response_format": response_format,
            "drop_params": True,
            "num_retries": 0,  # the tier ladder is the retry policy
            "max_retries": 0,
        }
        if request.stream:
            return await self._stream(request, options)
        try:
            response = await litellm.acompletion(**options)
        except Exception as exc:
            raise self._error(exc, request) from None
        usage = getattr(response, "usage", None)
        return ModelReply(
            text=response.choices[0].message.content or "",
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    async def _stream(self, request: ModelRequest, options: dict[str, Any]) -> ModelReply:
        """Assemble a streamed answer, with the usage the provider sends at its end.

        A stream cut short (or one whose provider sends no usage) is counted
        with litellm's tokenizer for the model: the prompt, and the text received.
        """
        parts: list[str] = []
        usage = None
        try:
            chunks = await self._litellm.acompletion(
                **options, stream=True, stream_options={"include_usage": True}
            )
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                usage = getattr(chunk, "usage", None) or usage
        except Exception as exc:
            if not parts:
                raise self._error(exc, request) from None
            prompt, completion = self._count(request, parts)
            raise ModelCallError(
                f"{self._model}: the stream broke after {len(parts)} chunks: {_first_line(exc)}",
                prompt_tokens=prompt,
                completion_tokens=completion,
            ) from None
        text = "".join(parts)
        if usage is None or not getattr(usage, "prompt_tokens", 0):
            prompt, completion = self._count(request, parts)
            return ModelReply(text=text, prompt_tokens=prompt, completion_tokens=completion)
        return ModelReply(
            text=text,
            prompt_tokens=int(usage.prompt_tokens),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
        )

    def _count(self, request: ModelRequest, parts: list[str]) -> tuple[int, int]:
        count = self._litellm.token_counter
        prompt = count(model=self._model, messages=request.messages)
        return int(prompt), int(count(model=self._model, text="".join(parts))) if parts else 0

    def _error(self, exc: Exception, request: ModelRequest) -> Exception:
        """Ours for a litellm failure; anything else as it is."""
        litellm = self._litellm
        if isinstance(exc, litellm.Timeout):
            return ModelTimeout(f"{self._model} timed out after {request.timeout_s:g}s")
        if isinstance(exc, litellm.APIConnectionError):
            return ModelUnavailable(f"{self._model} unreachable: {_first_line(exc)}")
        if isinstance(exc, litellm.AuthenticationError | litellm.PermissionDeniedError):
            return ModelUnavailable(f"{self._model}: credentials refused")
        if isinstance(exc, self._openai.APIError):  # the base of every other provider error
            return ModelCallError(f"{self._model}: {_first_line(exc)}")
        return exc

    async def aclose(self) -> None:
        users = _open_on.get(asyncio.get_running_loop(), weakref.WeakSet())
        users.discard(self)
        if users:
            return  # other clients on this loop still use the connections
        # The cached HTTP clients belong to an event loop that may be ending, and a
        # later loop can get its id, hence its cache entries: close and drop them.
        cache = self._litellm.in_memory_llm_clients_cache
        for cached in list(getattr(cache, "cache_dict", {}).values()):
            close = getattr(cached, "close", None)  # AsyncOpenAI and friends
            if inspect.iscoroutinefunction(close):
                await close()
        await self._litellm.close_litellm_async_clients()
        cache.flush_cache()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
