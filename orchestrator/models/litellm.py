"""Every hosted provider, through litellm's ``acompletion``.

This is the only module that imports litellm. It sets
LITELLM_LOCAL_MODEL_COST_MAP first, so importing litellm never reaches for the
internet, keeps litellm's banner, debug hints and log handlers off the user's
terminal, and turns litellm's exceptions into ours here, at the boundary.

litellm raises one class for many failures (``InternalServerError`` for a
real 500, a refused connection and a dropped one alike), so a failure is read
from its cause chain: an HTTP status the server sent, a connection that was
never made (the request never left), or anything else (it may have been billed).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import re
import socket
import weakref
from collections.abc import Iterator
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
# Words of a refusal of the output form we asked for (llama-cpp-python's server:
# "'loc': ('body', 'response_format', 'type'), 'msg': \"Input should be 'text' or 'json_object'\"").
FORM_WORDS = ("response_format", "json_schema", "json_object")


def import_litellm() -> Any:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm

    # Otherwise every provider error prints "Give Feedback / Get Help" and a
    # debug hint to stdout, which breaks `--json` output.
    litellm.suppress_debug_info = True
    _quiet_loggers()
    return litellm


def _quiet_loggers() -> None:
    """litellm's loggers write to stdout and stderr through a handler of their own.
    Replace it with a NullHandler, keeping its secret filters on the logger: the
    records still reach whatever logging the host application configured, and
    nothing reaches the terminal of a CLI that configured none."""
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if isinstance(handler, logging.NullHandler):
                continue
            for kept in handler.filters:
                if kept not in logger.filters:
                    logger.addFilter(kept)
            logger.removeHandler(handler)
        if not logger.handlers:
            logger.addHandler(logging.NullHandler())


class LiteLLMClient(ModelClient):
    """One hosted model endpoint: the provider's own, or ``api_base`` when given.

    The key is read from ``api_key_env`` when the tier names one, else litellm
    finds the provider's usual variable. Keys are never stored or logged.

    With ``mock_response``, litellm answers every request with that text itself
    (its ``mock_response`` option): no key is needed and nothing is sent. Its
    made-up usage is not a provider's, so the tokens are counted here.
    """

    def __init__(
        self,
        *,
        model: str,
        api_base: str | None,
        api_key_env: str | None,
        mock_response: str | None = None,
    ) -> None:
        self._litellm = import_litellm()
        import aiohttp  # litellm's transport; both already imported by litellm
        import httpx

        self._httpx = httpx
        # Failures to connect: the request never left this machine.
        self._never_sent: tuple[type[BaseException], ...] = (
            ConnectionRefusedError,
            socket.gaierror,  # the host name did not resolve
            httpx.ConnectTimeout,
            aiohttp.ClientConnectorError,  # refused, DNS, TLS, connect timeout
        )
        self._model = model
        self._api_base = api_base
        self._api_key_env = api_key_env
        self._mock_response = mock_response
        self._checked_key: tuple[str | None] | None = None
        self._forms = Forms()

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
        api_key = None if self._mock_response is not None else self._api_key()
        _open_on.setdefault(asyncio.get_running_loop(), weakref.WeakSet()).add(self)
        form = self._forms.of(request) if request.json_schema is not None else "none"
        options: dict[str, Any] = {
            "model": self._model,
            "messages": request.messages,
            "max_tokens": request.max_tokens,
            "temperature": request.temperature,
            "timeout": request.timeout_s,
            "api_base": self._api_base,
            "api_key": api_key,
            "response_format": None,
            "drop_params": True,
            "num_retries": 0,  # the scheduler decides what to ask again
            "max_retries": 0,
        }
        if self._mock_response is not None:
            options["mock_response"] = self._mock_response
        if request.tools:
            options["tools"] = list(request.tools)
            # A tool's answer is role, tool_call_id and content in OpenAI's API.
            options["messages"] = [
                {k: v for k, v in m.items() if k != "name"} if m["role"] == "tool" else m
                for m in request.messages
            ]
        if request.logprobs:  # dropped for a provider that takes none: then none come back
            options.update(logprobs=True, top_logprobs=TOP_LOGPROBS)
        if request.json_schema is not None:
            if form == "json_schema":
                options["response_format"] = {
                    "type": "json_schema",
                    "json_schema": {"name": "output", "schema": request.json_schema},
                }
            else:
                options["messages"] = instructed(request.messages, request.json_schema)
            if form == "json_object":
                # "schema" is llama-cpp-python's: its server makes a grammar of it.
                options["response_format"] = {"type": "json_object", "schema": request.json_schema}
        try:
            if request.stream and not request.tools:  # a tool loop's turns are not streamed
                return await self._stream(request, options)
            response = await self._litellm.acompletion(**options)
        except ModelError:
            raise
        except Exception as exc:
            raise self._error(exc, request, form) from None
        usage = None if self._mock_response else _reported(getattr(response, "usage", None))
        if not response.choices:
            raise ModelCallError(f"{self._model}: the answer held no choices", usage=usage)
        text = response.choices[0].message.content or ""
        logprobs = _choices(response.choices[0])
        calls = _tool_calls(response.choices[0].message)
        cut = response.choices[0].finish_reason == "length"
        if usage is None:
            prompt, completion = self._count(request, options["messages"], text)
            return ModelReply(
                text,
                prompt,
                completion,
                counted=True,
                logprobs=logprobs,
                tool_calls=calls,
                truncated=cut,
            )
        return ModelReply(text, *usage, logprobs=logprobs, tool_calls=calls, truncated=cut)

    async def _stream(self, request: ModelRequest, options: dict[str, Any]) -> ModelReply:
        """Assemble a streamed answer, with the usage at its end.

        litellm counts a stream's tokens itself when the provider sends no usage,
        and says not which it did; usage that equals litellm's own count is taken
        as counted. A stream that breaks, or ends with neither text nor usage (what
        litellm makes of a body that is not a stream), may still have been billed:
        it is an error with no usage.
        """
        parts: list[str] = []
        tokens: list[TokenChoice] = []
        usage = None
        cut = False
        chunks = await self._litellm.acompletion(
            **options, stream=True, stream_options={"include_usage": True}
        )
        try:
            async for chunk in chunks:
                if chunk.choices and chunk.choices[0].delta.content:
                    parts.append(chunk.choices[0].delta.content)
                if chunk.choices:
                    tokens.extend(_choices(chunk.choices[0]) or ())
                    cut = cut or chunk.choices[0].finish_reason == "length"
                usage = getattr(chunk, "usage", None) or usage
        except Exception as exc:
            if not parts:
                raise
            raise ModelCallError(
                f"{self._model}: the stream broke after {len(parts)} chunks: {_message(exc)}",
                mask=[self._api_key_env],
            ) from None
        text = "".join(parts)
        if not parts and usage is None:
            raise ModelCallError(f"{self._model}: the stream ended with no answer")
        reported = _reported(usage)
        litellms = (self._count_messages(options["messages"]), self._count_text(text))
        logprobs = tuple(tokens) or None
        if reported is None or reported == litellms or self._mock_response is not None:
            prompt, completion = self._count(request, options["messages"], text)
            return ModelReply(
                text, prompt, completion, counted=True, logprobs=logprobs, truncated=cut
            )
        return ModelReply(text, *reported, logprobs=logprobs, truncated=cut)

    def _count(
        self, request: ModelRequest, messages: list[dict[str, str]], text: str
    ) -> tuple[int, int]:
        """Tokens of what was sent (``messages`` and the schema) and of ``text``, by
        litellm's tokenizer for the model: for an answer whose provider reported no usage."""
        prompt = self._count_messages(messages)
        if request.json_schema is not None:
            prompt += int(
                self._litellm.token_counter(model=self._model, text=json.dumps(request.json_schema))
            )
        return prompt, self._count_text(text)

    def _count_messages(self, messages: list[dict[str, str]]) -> int:
        return int(self._litellm.token_counter(model=self._model, messages=messages))

    def _count_text(self, text: str) -> int:
        if not text:
            return 0
        count = self._litellm.token_counter
        return int(count(model=self._model, text=text, count_response_tokens=True))

    def _error(self, exc: Exception, request: ModelRequest, form: str) -> ModelError:
        """Ours for a litellm failure, read from its cause chain (see the module's docstring)."""
        mask = [self._api_key_env]
        name = self._model
        answer = self._http_answer(exc)
        if answer is not None:
            status, headers, body = answer
            said = f"{name}: HTTP {status}: {body or _message(exc)}"
            if status in (401, 403):
                return ModelUnavailable(f"{name}: credentials refused ({status})", mask=mask)
            if (
                status in (400, 422, 500)
                and form != "none"
                and any(word in (body or _message(exc)) for word in FORM_WORDS)
                and self._forms.refused(request, form)
            ):
                return ModelBusy(
                    f"{said} (next: {self._forms.of(request)})",
                    billed=status >= 500,
                    retry_after_s=0.0,
                    mask=mask,
                )
            if status == 429 or status >= 500:
                wait = parse_retry_after(headers.get("retry-after"))
                if headers.get("retry-after-ms"):
                    wait = (parse_retry_after(headers.get("retry-after-ms")) or 0) / 1000
                return ModelBusy(said, billed=status != 429, retry_after_s=wait, mask=mask)
            if status == 408:  # a proxy gave up waiting: the model may have run
                return ModelTimeout(said, mask=mask)
            return ModelRefused(said, mask=mask)
        sent = not any(isinstance(cause, self._never_sent) for cause in _chain(exc))
        if not sent:
            return ModelUnavailable(f"{name} unreachable: {_root_cause(exc)}", mask=mask)
        if isinstance(exc, self._litellm.Timeout):
            return ModelTimeout(f"{name} gave no answer within {request.timeout_s:g}s", mask=mask)
        return ModelCallError(f"{name}: {_message(exc)} ({_root_cause(exc)})", mask=mask)

    def _http_answer(self, exc: BaseException) -> tuple[int, Any, str] | None:
        """(status, headers, body) of the HTTP error answer behind ``exc``, if the
        server sent one; None for a failure with no answer (litellm gives those a
        made-up status)."""
        for cause in _chain(exc):
            if isinstance(cause, self._httpx.HTTPStatusError):
                response = cause.response
                try:
                    body = response.text
                except Exception:  # a streamed body that was never read
                    body = ""
                return response.status_code, response.headers, _error_text(body)
        if isinstance(exc, self._litellm.RateLimitError):
            return 429, getattr(exc, "litellm_response_headers", None) or {}, ""
        return None

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


def _choices(choice: Any) -> tuple[TokenChoice, ...] | None:
    """The answer's tokens from an OpenAI-shaped choice's ``logprobs.content``, if any."""
    logprobs = getattr(choice, "logprobs", None)
    content = (
        logprobs.get("content")
        if isinstance(logprobs, dict)
        else getattr(logprobs, "content", None)
    )
    return token_choices(content)


def _tool_calls(message: Any) -> tuple[ToolCall, ...]:
    """The tool calls of an OpenAI-shaped answer; arguments parsed when they are JSON."""
    found = []
    for index, call in enumerate(getattr(message, "tool_calls", None) or ()):
        function = getattr(call, "function", None)
        raw = getattr(function, "arguments", None)
        try:
            arguments = json.loads(raw) if isinstance(raw, str) else raw
        except ValueError:
            arguments = raw
        name = str(getattr(function, "name", "") or "")
        found.append(ToolCall(str(getattr(call, "id", None) or f"call_{index}"), name, arguments))
    return tuple(found)


def _reported(usage: Any) -> tuple[int, int] | None:
    """(prompt, completion) tokens a provider reported; None if it reported none
    (litellm fills in zeros)."""
    prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
    if prompt <= 0:
        return None
    return prompt, int(getattr(usage, "completion_tokens", 0) or 0)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception it was raised from or while handling."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _root_cause(exc: BaseException) -> str:
    last = list(_chain(exc))[-1]
    return f"{type(last).__name__}: {last}" if str(last) else type(last).__name__


def _message(exc: BaseException) -> str:
    """litellm's message without its class prefixes ("litellm.InternalServerError: ...")."""
    return _PREFIXES.sub("", str(exc).strip()) or type(exc).__name__


_PREFIXES = re.compile(r"^(?:(?:litellm\.)?\w+(?:Error|Exception)(?::| -)\s*)+")


def _error_text(body: str) -> str:
    """The message of an OpenAI-style error body (``{"error": {"message": ...}}``), or the body."""
    try:
        data = json.loads(body)
    except ValueError:
        return body
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return str(error["message"])
    if isinstance(error, str):
        return error
    return body
