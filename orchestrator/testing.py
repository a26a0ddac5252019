"""Loopback model servers for tests and benchmarks: real HTTP, scripted replies.

``OllamaServer`` speaks Ollama's ``/api/chat`` and ``/api/tags``; ``OpenAIServer``
speaks OpenAI chat completions. The real ``ollama`` and litellm clients talk to
them, so a test exercises everything but the model. Queue replies with
``reply(...)`` or set ``responder``; every request body is kept in ``requests``.
``GoldAnswers`` is a responder that plays a stronger model in an evaluation
(it knows the answers; figures it produces are simulated, and say so).

A reply can also fail on the wire the way real providers and proxies do:
``FAILURES`` names one of each (a reply later than the client waits, a
connection closed or reset after the request, a body cut midway, malformed
JSON, an HTML page with status 200, no choices, no usage, a stream cut before
its first chunk, a 429 with ``Retry-After``, and 500/502/503).

Responses go out in one write with TCP_NODELAY set: otherwise Nagle's algorithm
and delayed ACKs add about 40 ms to every call.

    python -m orchestrator.testing openai   # serve until killed; prints the base URL
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal


@dataclass(frozen=True)
class Reply:
    """One scripted answer. ``status`` other than 200 sends an error body instead."""

    text: str = "ok"
    delay_s: float = 0.0
    status: int = 200
    prompt_tokens: int | None = None  # None: one token per word of the prompt
    completion_tokens: int | None = None  # None: one token per word of the text
    raw: bytes | None = None  # sent as the body instead of a well-formed answer
    # For a streamed request: the connection drops after this many chunks.
    abort_after: int | None = None
    # After reading the request: "close" or "reset" the connection with no
    # answer, or send the headers and half the body, then close ("mid_body").
    drop: Literal["close", "reset", "mid_body"] | None = None
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()  # more response headers, e.g. Retry-After
    with_usage: bool = True  # False: the answer (or stream) reports no usage
    empty: bool = False  # a 200 that holds no answer: OpenAI's ``choices: []``, Ollama's no message
    # Sent when the request asks for logprobs: each word's log-probability (the
    # list repeats its last value for more words), and an alternative's 3 lower.
    # () sends none, as a server that does not give them.
    logprobs: tuple[float, ...] = (-0.01,)
    # Ask for tools instead of answering: (name, arguments) each, in the protocol's
    # own shape (OpenAI sends arguments as a JSON string, Ollama as an object). A
    # string is sent as the arguments text, as a model that writes broken JSON does.
    tool_calls: tuple[tuple[str, Any], ...] = ()
    # The model stopped at max_tokens: finish reason "length" (Ollama's done_reason).
    truncated: bool = False

    @property
    def finish_reason(self) -> str:
        return "tool_calls" if self.tool_calls else "length" if self.truncated else "stop"

    def usage(self, body: dict[str, Any]) -> tuple[int, int]:
        """Prompt and completion tokens to report for this reply to ``body``."""
        prompt = self.prompt_tokens
        if prompt is None:
            prompt = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        completion = self.completion_tokens
        return prompt, len(self.text.split()) if completion is None else completion


Responder = Callable[[dict[str, Any]], Reply]


def _openai_message(reply: Reply, serial: int) -> dict[str, Any]:
    """An OpenAI answer's message: its text, or the tool calls it asks for."""
    if not reply.tool_calls:
        return {"role": "assistant", "content": reply.text}
    return {
        "role": "assistant",
        "content": reply.text or None,
        "tool_calls": [
            {
                "id": f"call_{serial}_{index}",
                "type": "function",
                "function": {
                    "name": name,
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments),
                },
            }
            for index, (name, arguments) in enumerate(reply.tool_calls)
        ],
    }


def token_logprobs(reply: Reply, pieces: list[str], start: int = 0) -> list[dict[str, Any]]:
    """Logprob entries for ``pieces`` of the answer, the first being word ``start``,
    shaped as OpenAI's ``logprobs.content`` and Ollama's ``logprobs`` both are."""
    entries = []
    for index, piece in enumerate(pieces, start):
        logprob = reply.logprobs[min(index, len(reply.logprobs) - 1)]
        chosen = {"token": piece, "logprob": logprob, "bytes": list(piece.encode())}
        other = {"token": "\u2581", "logprob": logprob - 3.0, "bytes": [226, 150, 129]}
        entries.append({**chosen, "top_logprobs": [chosen, other]})
    return entries


class GoldAnswers:
    """A responder that plays a stronger model in an evaluation: it finds which
    question of ``answers`` (question text: gold answer) the prompt holds and
    answers ``{"answer": gold}``, except for a share ``error_rate`` of the
    questions, chosen by a hash of ``seed`` and the question, where it answers
    a wrong value of the same kind. The same question gets the same verdict on
    every call. A prompt with no known question gets ``{"answer": ""}``.

    Simulated: it knows the answers. Figures it produces say so.
    """

    def __init__(self, answers: dict[str, str], *, error_rate: float, seed: str) -> None:
        # Longest first: a question that holds a shorter one is found as itself.
        self._questions = sorted(answers, key=len, reverse=True)
        self._answers = answers
        self.error_rate, self.seed = error_rate, seed

    def wrong(self, question: str) -> bool:
        digest = hashlib.sha256(f"{self.seed}\0{question}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.error_rate

    def __call__(self, body: dict[str, Any]) -> Reply:
        prompt = str(body.get("messages", [{}])[-1].get("content", ""))
        question = next((q for q in self._questions if q in prompt), None)
        if question is None:
            return Reply(text=json.dumps({"answer": ""}))
        gold = self._answers[question]
        answer = _wrong_answer(gold) if self.wrong(question) else gold
        return Reply(text=json.dumps({"answer": answer}))


def _wrong_answer(gold: str) -> str:
    """A wrong answer shaped like ``gold``: a number off by one, a word changed."""
    try:
        return str(int(gold) + 1)
    except ValueError:
        pass
    swaps = {"Yes": "No", "No": "Yes", "yes": "no", "no": "yes", "True": "False", "False": "True"}
    return swaps.get(gold, gold[::-1] if len(set(gold)) > 1 else gold + "?")


@dataclass(frozen=True)
class Stream:
    """A chunked response: ``chunks`` in order, then the end, or a dropped connection."""

    chunks: list[bytes]
    complete: bool
    content_type: str


Payload = dict[str, Any] | bytes | Stream


def _unscripted(status: int, payload: Payload) -> tuple[int, Payload, Reply]:
    """An answer that no script chose (the model list, a missing route)."""
    return status, payload, Reply()


def _words(text: str) -> list[str]:
    """``text`` as stream pieces, one word (with its trailing space) each."""
    words = text.split(" ")
    return [word + " " for word in words[:-1]] + [words[-1]]


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

    def route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Payload, Reply]:
        """Status, JSON payload (or raw bytes, or a stream) and the reply it came from."""
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
                status, payload, reply = server.route(method, body["_path"], body)
                if reply.drop in ("close", "reset"):
                    self._drop(reset=reply.drop == "reset")
                    return
                if isinstance(payload, Stream):
                    self._send_stream(payload)
                    return
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                extra = "".join(f"{name}: {value}\r\n" for name, value in reply.headers)
                head = (
                    f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                    f"Content-Type: {reply.content_type}\r\n{extra}"
                    f"Content-Length: {len(data)}\r\n\r\n"
                ).encode()
                if reply.drop == "mid_body":
                    data = data[: len(data) // 2]
                # The client may have given up already (a timeout test).
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(head + data)
                    if reply.drop == "mid_body":
                        self.wfile.flush()
                        self._drop(reset=False)

            def _drop(self, *, reset: bool) -> None:
                """End the connection with nothing more: a FIN, or with ``reset`` an RST."""
                self.close_connection = True
                if reset:  # a zero linger time makes close() send an RST
                    self.connection.setsockopt(
                        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                    )
                    self.connection.close()
                    return
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

            def _send_stream(self, stream: Stream) -> None:
                head = (
                    "HTTP/1.1 200 OK\r\n"
                    f"Content-Type: {stream.content_type}\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n"
                ).encode()
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.wfile.write(head)
                    for chunk in stream.chunks:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                    if stream.complete:
                        self.wfile.write(b"0\r\n\r\n")
                        return
                # Cut off mid-body, as a crashed or disconnected provider would.
                self._drop(reset=False)

        return Handler


class OllamaServer(LoopbackServer):
    """Speaks Ollama's ``/api/tags`` and ``/api/chat``, streamed (NDJSON) or not."""

    def __init__(self, *, models: tuple[str, ...] = ("llama3.2:1b",), **options: Any) -> None:
        super().__init__(**options)
        self.models = list(models)

    def route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Payload, Reply]:
        if path == "/api/tags":
            return _unscripted(
                200,
                {
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
                },
            )
        if path != "/api/chat":
            return _unscripted(404, {"error": f"no route {path}"})
        if body.get("model") not in self.models:
            return _unscripted(404, {"error": f"model '{body.get('model')}' not found"})
        reply = self._next_reply(body)
        if reply.raw is not None:
            return reply.status, reply.raw, reply
        if reply.status != 200:
            return reply.status, {"error": reply.text}, reply
        prompt, completion = reply.usage(body)
        message: dict[str, Any] = {"role": "assistant", "content": reply.text}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"function": {"name": name, "arguments": arguments}}
                for name, arguments in reply.tool_calls
            ]
        final = {
            "model": body["model"],
            "created_at": "2026-11-22T00:00:00Z",
            "message": message,
            "done": True,
            "done_reason": "length" if reply.truncated else "stop",
            "total_duration": 1000,
            "prompt_eval_count": prompt,
            "eval_count": completion,
        }
        if not reply.with_usage:
            del final["prompt_eval_count"], final["eval_count"]
        if reply.empty:
            del final["message"]
        logprobs = bool(body.get("logprobs")) and bool(reply.logprobs)
        if body.get("stream") is False:
            if logprobs:
                final["logprobs"] = token_logprobs(reply, _words(reply.text))
            return 200, final, reply
        pieces = [
            {**final, "message": {"role": "assistant", "content": word}, "done": False}
            for word in _words(reply.text)
        ]
        if logprobs:
            for piece, entry in zip(pieces, token_logprobs(reply, _words(reply.text)), strict=True):
                piece["logprobs"] = [entry]
        for piece in pieces:
            for key in ("done_reason", "total_duration", "prompt_eval_count", "eval_count"):
                piece.pop(key, None)
        lines = [json.dumps(p).encode() + b"\n" for p in pieces]
        lines.append(
            json.dumps({**final, "message": {"role": "assistant", "content": ""}}).encode() + b"\n"
        )
        return 200, _cut(lines, reply, "application/x-ndjson"), reply


class OpenAIServer(LoopbackServer):
    """Speaks OpenAI's ``POST /v1/chat/completions``, streamed (SSE) or not."""

    def route(self, method: str, path: str, body: dict[str, Any]) -> tuple[int, Payload, Reply]:
        if not path.endswith("/chat/completions"):
            return _unscripted(
                404, {"error": {"message": f"no route {path}", "type": "invalid_request_error"}}
            )
        reply = self._next_reply(body)
        if reply.raw is not None:
            return reply.status, reply.raw, reply
        if reply.status != 200:
            error = {"message": reply.text, "type": "server_error", "code": None}
            return reply.status, {"error": error}, reply
        prompt, completion = reply.usage(body)
        usage = {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }
        if body.get("stream"):
            return 200, self._stream(body, reply, usage), reply
        answer = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", "unknown"),
            "choices": [
                {
                    "index": 0,
                    "message": _openai_message(reply, len(self.requests)),
                    "finish_reason": reply.finish_reason,
                    "logprobs": _openai_logprobs(body, reply, _words(reply.text)),
                }
            ],
            "usage": usage,
        }
        if not reply.with_usage:
            del answer["usage"]
        if reply.empty:
            answer["choices"] = []
        return 200, answer, reply

    def _stream(self, body: dict[str, Any], reply: Reply, usage: dict[str, int]) -> Stream:
        """Server-sent events: a delta per word, then usage if asked for, then [DONE]."""
        base = {
            "id": f"chatcmpl-{len(self.requests)}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": body.get("model", "unknown"),
        }
        events = [
            {
                **base,
                "choices": [
                    {
                        "index": 0,
                        "delta": {"content": word},
                        "finish_reason": None,
                        "logprobs": _openai_logprobs(body, reply, [word], index),
                    }
                ],
            }
            for index, word in enumerate(_words(reply.text))
        ]
        events.append(
            {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": reply.finish_reason}]}
        )
        if reply.with_usage and (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "choices": [], "usage": usage})
        lines = [b"data: " + json.dumps(event).encode() + b"\n\n" for event in events]
        lines.append(b"data: [DONE]\n\n")
        return _cut(lines, reply, "text/event-stream")


def _openai_logprobs(body: dict[str, Any], reply: Reply, pieces: list[str], start: int = 0) -> Any:
    """A choice's ``logprobs``: null unless the request asked and the reply gives them."""
    if not body.get("logprobs") or not reply.logprobs:
        return None
    return {"content": token_logprobs(reply, pieces, start), "refusal": None}


def _cut(chunks: list[bytes], reply: Reply, content_type: str) -> Stream:
    """The stream of ``chunks``, dropped after ``reply.abort_after`` of them if set."""
    if reply.abort_after is None:
        return Stream(chunks, complete=True, content_type=content_type)
    return Stream(chunks[: reply.abort_after], complete=False, content_type=content_type)


# One reply for each way a provider or a proxy in front of it fails after the
# request has reached it. ``slow`` outlasts any client timeout under 3 s;
# ``stream_cut`` fails only a streamed request.
FAILURES: dict[str, Reply] = {
    "slow": Reply(delay_s=3.0),
    "closed": Reply(drop="close"),
    "reset": Reply(drop="reset"),
    "body_cut": Reply(drop="mid_body"),
    "malformed_json": Reply(raw=b'{"id": "chatcmpl-1", "choices": [{"index": 0, "mess'),
    "html_200": Reply(
        raw=b"<html><body>Welcome to our portal</body></html>", content_type="text/html"
    ),
    "no_choices": Reply(empty=True, with_usage=False),
    "no_usage": Reply(with_usage=False),
    "stream_cut": Reply(abort_after=0),
    "rate_limited": Reply(status=429, text="Rate limit reached", headers=(("Retry-After", "1"),)),
    "500": Reply(status=500, text="The server had an error while processing your request"),
    "502": Reply(status=502, text="Bad gateway"),
    "503": Reply(status=503, text="The engine is currently overloaded"),
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
