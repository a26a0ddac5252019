"""Tools from MCP servers over stdio, through the official ``mcp`` package.

tierflow.yaml names a server (``mcp: {files: {command: [python, -m, files_server]}}``)
and an agent lists the tools it may call as ``SERVER.TOOL`` (``files.read_file``);
the model sees the tool's own name, its description and its input schema, as the
server lists them.

Each server is started once per process, the first time one of its tools is
needed (loading a workflow that lists it, or ``tierflow tools``), in the
project's folder, with only a safe environment (``PATH``, ``HOME``…) and the
variables its ``env`` names; its stderr goes to ``.tierflow/mcp-NAME.log`` there. Its session lives on an event loop in a thread of
its own, so runs on any event loop, and the synchronous loading before them,
share it. A server whose connection breaks is started again on the next call. At
exit each is closed: its stdin closed, then, if it lingers, terminated. A forked
worker starts its own.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import json
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.tools import Tool, ToolProblem

# A tool name that every chat API takes (OpenAI's rule, the strictest).
MODEL_TOOL_NAME = r"^[A-Za-z0-9_-]{1,64}$"
START_S = 60.0  # how long a server has to start and list its tools
_CLOSE_S = 5.0  # how long exit waits for the servers to close


@dataclass(frozen=True)
class Server:
    """How to start one MCP server, and the limits of its tools' calls."""

    name: str
    command: tuple[str, ...]
    env: tuple[str, ...]  # names of variables passed on from this environment
    cwd: str
    timeout_s: float
    max_output_bytes: int

    def describe(self) -> str:
        return f"mcp {self.name}: {self.shell()}"

    def shell(self) -> str:
        """Its command, as one would type it."""
        import shlex

        return shlex.join(self.command)


class ToolFailed(Exception):
    """The server ran the tool and reported an error (``is_error``)."""


def listed_tools(server: Server) -> list[Tool]:
    """Every tool ``server`` lists, ready to offer; ``ToolProblem`` saying why not."""
    return [_tool(server, found) for found in _connections().listing(server)]


def _tool(server: Server, found: Any) -> Tool:
    import re

    if not re.fullmatch(MODEL_TOOL_NAME, found.name):
        raise ToolProblem(
            f"tool {found.name!r} has a name chat APIs refuse"
            " (letters, digits, _ and - only, at most 64)"
        )
    schema = dict(found.input_schema)
    call: Callable[..., Awaitable[Any]] = functools.partial(_call, server, found.name)
    return Tool(
        name=found.name,
        source=f"{server.describe()} ({found.name})",
        description=(found.description or "").strip(),
        parameters=schema,
        function=call,
        ready=functools.partial(_ready, server),
        check=_schema_check(found.name, schema),
        timeout_s=server.timeout_s,
        max_output_bytes=server.max_output_bytes,
    )


def _schema_check(name: str, schema: dict[str, Any]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """Arguments checked against the server's input schema; ``ValueError`` saying why not."""
    from jsonschema import Draft202012Validator

    validator = Draft202012Validator(schema)

    def check(arguments: dict[str, Any]) -> dict[str, Any]:
        error = next(iter(validator.iter_errors(arguments)), None)
        if error is not None:
            where = ".".join(str(part) for part in error.absolute_path) or "(arguments)"
            raise ValueError(f"arguments of {name}: {where}: {error.message}")
        return arguments

    return check


async def _ready(server: Server) -> None:
    """``server`` running (started again if it exited), within ``START_S``."""
    started = _connections().start(server)
    try:
        async with asyncio.timeout(START_S):
            await asyncio.wrap_future(started)
    except TimeoutError:
        raise ToolFailed(f"{server.describe()} did not start within {START_S:g}s") from None


async def _call(server: Server, name: str, /, **arguments: Any) -> Any:
    """A server's tool as an async function of its arguments (what ``run_tool`` awaits)."""
    return await _connections().call(server, name, arguments)


@dataclass
class _Connection:
    """One server's process and session, held open by ``hold`` until ``stop``."""

    server: Server
    ready: asyncio.Future[tuple[Any, list[Any]]]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def hold(self) -> None:
        from mcp import ClientSession, StdioServerParameters
        from mcp.client.stdio import stdio_client

        parameters = StdioServerParameters(
            command=self.server.command[0],
            args=list(self.server.command[1:]),
            env={name: os.environ[name] for name in self.server.env if name in os.environ},
            cwd=self.server.cwd,
        )
        log = log_path(self.server)
        log.parent.mkdir(exist_ok=True)
        try:
            with log.open("a") as errlog:
                async with (
                    stdio_client(parameters, errlog=errlog) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    self.ready.set_result((session, await _list(session)))
                    await self.stop.wait()
        except Exception as exc:  # it would not start, or its connection broke
            if not self.ready.done():
                self.ready.set_exception(exc)


def log_path(server: Server) -> Path:
    """Where ``server``'s stderr goes: ``.tierflow/mcp-NAME.log`` in the project's folder."""
    return Path(server.cwd) / ".tierflow" / f"mcp-{server.name}.log"


async def _list(session: Any) -> list[Any]:
    from mcp.types import PaginatedRequestParams

    listed = await session.list_tools()
    tools = list(listed.tools)
    while listed.next_cursor:
        listed = await session.list_tools(params=PaginatedRequestParams(cursor=listed.next_cursor))
        tools.extend(listed.tools)
    return tools


class _Connections:
    """Every server this process started, on an event loop of their own."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.open: dict[Server, _Connection] = {}  # touched on ``loop`` only
        self.thread = threading.Thread(target=self._serve, name="tierflow-mcp", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.loop.run_forever()
        finally:
            self.loop.close()

    def start(self, server: Server) -> concurrent.futures.Future[tuple[Any, list[Any]]]:
        """``server``'s session and tools, once it runs (started if it is not running)."""
        return asyncio.run_coroutine_threadsafe(self._session(server), self.loop)

    def listing(self, server: Server) -> list[Any]:
        """The tools ``server`` lists, starting it if it is not running."""
        started = self.start(server)
        try:
            _, tools = started.result(timeout=START_S)
        except TimeoutError:
            started.cancel()
            raise ToolProblem(
                f"`{server.shell()}` did not list its tools within {START_S:g}s"
                f" (its stderr: {log_path(server)})"
            ) from None
        except Exception as exc:
            raise ToolProblem(
                f"`{server.shell()}` did not start: {_why(exc)} (its stderr: {log_path(server)})"
            ) from None
        return list(tools)

    async def call(self, server: Server, name: str, arguments: dict[str, Any]) -> Any:
        """Tool ``name``'s result: text, or its structured content when it has no text."""
        made = asyncio.run_coroutine_threadsafe(self._call(server, name, arguments), self.loop)
        return await asyncio.wrap_future(made)  # cancelled with it: the call is cancelled too

    async def _call(self, server: Server, name: str, arguments: dict[str, Any]) -> Any:
        session, _ = await self._session(server)
        try:
            result = await session.call_tool(name, arguments)
        except Exception as exc:
            # The session may be broken (a server that exited): the next call starts it again.
            self._close(server)
            raise ToolFailed(f"the MCP call failed: {_why(exc)}") from None
        texts = [block.text for block in result.content if getattr(block, "type", "") == "text"]
        if result.is_error:
            raise ToolFailed(" ".join(texts) or "the tool reported an error")
        if texts:
            return "\n".join(texts)
        return json.dumps(result.structured_content, default=str)

    async def _session(self, server: Server) -> tuple[Any, list[Any]]:
        connection = self.open.get(server)
        if connection is None or (connection.task is not None and connection.task.done()):
            connection = _Connection(server, self.loop.create_future())
            connection.task = self.loop.create_task(connection.hold())
            self.open[server] = connection
        try:
            return await asyncio.shield(connection.ready)
        except Exception:
            self.open.pop(server, None)  # the next try starts it afresh
            raise

    def _close(self, server: Server) -> None:
        connection = self.open.pop(server, None)
        if connection is not None:
            connection.stop.set()

    def close(self) -> None:
        """Stop every server (at exit), waiting a little for each to go, then the loop."""

        async def stop_all() -> None:
            held = [c.task for c in self.open.values() if c.task is not None]
            for connection in self.open.values():
                connection.stop.set()
            if held:
                await asyncio.wait(held, timeout=_CLOSE_S)
            self.open.clear()

        if os.getpid() != self.pid:
            return  # a forked child's copy: the parent closes its own
        with contextlib.suppress(Exception):  # exiting anyway: the servers see their stdin close
            asyncio.run_coroutine_threadsafe(stop_all(), self.loop).result(timeout=_CLOSE_S + 1)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=_CLOSE_S)


def _why(exc: BaseException) -> str:
    """An error's message, looking inside the exception groups anyio raises."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}"


_running: _Connections | None = None
_lock = threading.Lock()


def _connections() -> _Connections:
    global _running
    with _lock:
        if _running is None or _running.pid != os.getpid():  # a forked worker starts its own
            _running = _Connections()
            atexit.register(_running.close)
        return _running
