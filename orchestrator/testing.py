"""Loopback model servers for tests and benchmarks: real HTTP, scripted replies.

``OllamaServer`` speaks Ollama's ``/api/chat`` and ``/api/tags``; ``OpenAIServer``
speaks OpenAI chat completions. The real ``ollama`` and litellm clients talk to
them, so a test exercises everything but the model. Queue replies with
``reply(...)`` or set ``responder``; every request body is kept in ``requests``.

Responses go out in one write with TCP_NODELAY set: otherwise Nagle's algorithm
and delayed ACKs add about 40 ms to every call.

    python -m orchestrator.testing openai   # serve until killed; prints the base URL
"""

from __future__ import annotations

import contextlib
import json
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``status`` other than 200 sends an error body instead."""

    text: str = "ok"
    delay_s: float = 0.0
    status: int = 200
    prompt_tokens: int | None = None  # None: one token per word of the prompt
    completion_tokens: int | None = None  # None: one token per word of the text
    raw: bytes | None = None  # sent as the body instead of a well-formed answer

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        """Prompt and completion tokens to report for this reply to ``body``."""
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion = self.completion_tokens
        return prompt, len(self.text.split()) if completion is None else completion


Responder = Callable[[dict[str, Any]], Reply]


class LoopbackServer:
    """A threaded HTTP server on 127.0.0.1 with a queue of scripted replies."""

    def __init__(self, *, default: Reply | None = None, port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.default = default or Reply()
        self.responder: Responder | None = None
        self._queue: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", port), self._handler_class())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def reply(self, *replies: Reply | str) -> None:
        """Queue replies for the next requests, in order; then ``default`` is used."""
        with self._lock:
            self._queue.extend(Reply(text=r) if isinstance(r, str) else r for r in replies)

    def chat_requests(self) -> list[dict[str, Any]]:
        return [r for r in self.requests if r["_path"] != "/api/tags"]

    def start(self) -> LoopbackServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> LoopbackServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        """The next scripted reply, after its delay (which runs on this request's thread)."""
        with self._lock:
            reply = self._queue.popleft() if self._queue else None
        if reply is None:
            reply = self.responder(body) if self.responder else self.default
        if reply.delay_s:
            time.sleep(reply.delay_s)
        return reply

    def route(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | bytes]:
        """Status and JSON payload (or raw bytes) for one request."""
        raise NotImplementedError

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def setup(self) -> None:
                super().setup()
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                self._serve("GET")

            def do_POST(self) -> None:
                self._serve("POST")

            def _serve(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else {}
                body["_path"] = self.path.split("?", 1)[0]
                body["_headers"] = {k.lower(): v for k, v in self.headers.items()}
                with server._lock:
                    server.requests.append(body)
                status, payload = server.route(method, body["_path"], body)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                head = (
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    "Content-Type: application/json\r\n"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode()
                # The client may have given up already (a timeout test).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(head + data)

        return Handler


class OllamaServer(LoopbackServer):
    """Speaks Ollama's ``/api/tags`` and non-streamed ``/api/chat``."""

    def __init__(self, *, models: tuple[str, ...] = ("llama3.2:1b",), **options: Any) -> None:
        super().__init__(**options)
        self.models = list(models)

    def route(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | bytes]:
        if path == "/api/tags":
            return 200, {
                "models": [
                    {
                        "name": m,
                        "model": m,
                        "modified_at": "2026-11-01T00:00:00Z",
                        "size": 1,
                        "digest": "0" * 64,
                        "details": {},
                    }
                    for m in self.models
                ]
            }
        if path != "/api/chat":
            return 404, {"error": f"no route {path}"}
        if body.get("model") not in self.models:
            return 404, {"error": f"model '{body.get('model')}' not found"}
        reply = self._next_reply(body)
        if reply.raw is not None:
            return reply.status, reply.raw
        if reply.status != 200:
            return reply.status, {"error": reply.text}
        prompt, completion = reply.usage(body)
        return 200, {
            "model": body["model"],
            "created_at": "2026-11-22T00:00:00Z",
            "message": {"role": "assistant", "content": reply.text},
            "done": True,
            "done_reason": "stop",
            "total_duration": 1000,
            "prompt_eval_count": prompt,
            "eval_count": completion,
        }


class OpenAIServer(LoopbackServer):
    """Speaks OpenAI's ``POST /v1/chat/completions`` (non-streamed)."""

    def route(
        self, method: str, path: str, body: dict[str, Any]
    ) -> tuple[int, dict[str, Any] | bytes]:
        if not path.endswith("/chat/completions"):
            return 404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}}
        reply = self._next_reply(body)
        if reply.raw is not None:
            return reply.status, reply.raw
        if reply.status != 200:
            return reply.status, {
                "error": {"message": reply.text, "type": "server_error", "code": None}
            }
        prompt, completion = reply.usage(body)
        return 200, {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "unknown"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            },
        }


def main(argv: list[str]) -> None:
    kind = argv[0] if argv else "openai"
    server = OllamaServer() if kind == "ollama" else OpenAIServer()
    server.start()
    sys.stdout.write(server.url + "\n")
    sys.stdout.flush()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main(sys.argv[1:])
