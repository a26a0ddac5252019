"""What the HTTP server lets in, and what every response it sends carries.

``Guard`` is ASGI middleware around the application:

- A request body over ``MAX_BODY_BYTES`` (1 MiB) is answered 413 and never
  reaches the application: at once when its ``Content-Length`` says so, else as
  soon as the bytes read pass the limit (a chunked body). At most the limit is
  held in memory.
- Every response carries ``headers`` (the security headers), errors included.

``check_json`` refuses what a request body may hold but the store cannot keep:
strings that are not valid Unicode (lone surrogates) and numbers JSON has no
text for (NaN, Infinity). ``json_size`` and ``json_depth`` measure a value.
"""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.loading import format_loc

MAX_BODY_BYTES = 1024 * 1024

_TOO_LARGE = json.dumps({"detail": "request body over the 1 MiB limit"}).encode()
_FAILED = json.dumps({"detail": "internal error"}).encode()


class Guard:
    """Caps request bodies and adds ``headers`` to every response (see the module)."""

    def __init__(self, app: ASGIApp, *, headers: dict[str, str]) -> None:
        self.app = app
        self.headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]
        self._names = {name for name, _ in self.headers}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_guarded(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                kept = [(k, v) for k, v in message.get("headers", []) if k not in self._names]
                message["headers"] = [*kept, *self.headers]
            await send(message)

        body = await _read_body(scope, receive)
        if body is None:
            await _answer(send_guarded, 413, _TOO_LARGE)
            return
        replay: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive_replayed() -> Message:
            return replay.pop() if replay else await receive()

        try:
            await self.app(scope, receive_replayed, send_guarded)
        except Exception:
            # Starlette's own 500 is sent outside this middleware, without the
            # headers; answer here, and let the error go on to be logged.
            if not started:
                await _answer(send_guarded, 500, _FAILED)
            raise


async def _read_body(scope: Scope, receive: Receive) -> bytes | None:
    """The whole body, or None once it is known to be over the limit."""
    for name, value in scope.get("headers", []):
        if name == b"content-length" and value.isdigit() and int(value) > MAX_BODY_BYTES:
            return None
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return b""
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def _answer(send: Send, status: int, body: bytes) -> None:
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        # The rest of a refused body is never read, so the connection cannot carry
        # another request.
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def check_json(value: Any) -> None:
    """Raise ``ValueError`` naming the first string (key or value) that is not valid
    Unicode, or number that is not finite, anywhere in ``value``."""
    stack: list[tuple[Any, tuple[str | int, ...]]] = [(value, ())]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            _check_unicode(item, path)
        elif isinstance(item, float) and not math.isfinite(item):
            raise ValueError(
                f"{_where(path)}: {item} is not a finite number (JSON has no NaN or Infinity)"
            )
        elif isinstance(item, dict):
            for key, inner in item.items():
                _check_unicode(key, (*path, key))
                stack.append((inner, (*path, key)))
        elif isinstance(item, list):
            stack.extend((inner, (*path, index)) for index, inner in enumerate(item))


def json_depth(value: Any) -> int:
    """How deep lists and objects nest in ``value``: 0 for a scalar, 1 for ``[1]``."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, dict):
            stack.extend((inner, depth + 1) for inner in item.values())
        elif isinstance(item, list):
            stack.extend((inner, depth + 1) for inner in item)
    return deepest


def json_size(value: Any) -> int:
    """The bytes of ``value`` as compact UTF-8 JSON (lone surrogates, stored by other
    ways in, count as the three bytes they would take)."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
    return len(text.encode("utf-8", "surrogatepass"))


def _check_unicode(text: str, path: tuple[str | int, ...]) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        lone = _escaped(text[exc.start])
        raise ValueError(
            f"{_where(path)}: not valid Unicode (a lone surrogate {lone} at character"
            f" {exc.start}); send UTF-8 text"
        ) from None


def _where(path: tuple[str | int, ...]) -> str:
    """The path as ``inputs.text[0]``, with any lone surrogate in a key escaped."""
    return (
        format_loc(part if isinstance(part, int) else _escaped(part) for part in path) or "the body"
    )


def _escaped(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")
