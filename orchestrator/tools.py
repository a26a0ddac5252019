"""Tools an agent may call: Python callables named in tierflow.yaml.

``tools: {lookup_order: "myproject.tools:lookup_order"}`` (or ``{call: ...,
timeout_s: ..., max_output_bytes: ...}``) names a function, sync or async, in a
module importable from the project's folder. Its JSON schema comes from its type
hints and docstring, through pydantic; a parameter without a type hint is
refused. Only tools named there can run, and only for agents that list them.
Tools of MCP servers (``mcp:``) come from ``orchestrator.mcptools``.

A call's arguments are validated against the schema before the tool runs. The
tool runs in the worker that holds the step, with a timeout (``timeout_s``,
default 30 s): an async tool is cancelled, a sync one runs in a thread that is
left to finish on its own while the step goes on. Its result is sent to the
model as JSON (text as it is), cut at ``max_output_bytes`` (default 16 KiB)
with a note saying so. Results are data: never rendered as templates.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import inspect
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from orchestrator.errors import redact

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024


class ToolProblem(Exception):
    """A tool that cannot be offered: it does not import, or its signature has no schema."""


@dataclass(frozen=True)
class Tool:
    """A tool ready to offer to a model and to run."""

    name: str
    source: str  # module:function, as tierflow.yaml names it
    description: str
    parameters: dict[str, Any]  # JSON Schema of its arguments
    function: Callable[..., Any]
    # A call's arguments checked against the schema; ValueError saying why not.
    check: Callable[[dict[str, Any]], dict[str, Any]]
    timeout_s: float = DEFAULT_TIMEOUT_S
    max_output_bytes: int = DEFAULT_MAX_OUTPUT_BYTES
    # Awaited before each call, outside its timeout: an MCP server started again.
    ready: Callable[[], Awaitable[None]] | None = None

    def schema(self) -> dict[str, Any]:
        """The tool as chat APIs take it (OpenAI's and Ollama's ``tools`` entries)."""
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class ToolResult:
    """What a call gave: the text for the model, and what the ledger keeps of it."""

    content: str  # sent to the model as the tool's answer
    outcome: str  # ok, truncated, error, timeout
    duration_ms: float
    result_bytes: int  # of the whole result, before any cut
    error: str | None = None


@functools.cache
def cached_tool(name: str, source: str, root: str, timeout_s: float, max_output_bytes: int) -> Tool:
    """``load_tool``, once per process for each configuration of a tool."""
    return load_tool(
        name, source, Path(root), timeout_s=timeout_s, max_output_bytes=max_output_bytes
    )


def load_tool(name: str, source: str, root: Path, **limits: Any) -> Tool:
    """Import ``source`` (``module:function``) with ``root`` on the path, and read its schema."""
    module_name, _, attribute = source.partition(":")
    if not module_name or not attribute:
        raise ToolProblem(f"{source!r} is not module:function")
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ToolProblem(
            f"{source}: cannot import {module_name}: {type(exc).__name__}: {exc}"
        ) from None
    function = getattr(module, attribute, None)
    if not callable(function):
        raise ToolProblem(f"{source}: {module_name} has no function {attribute}")
    model = _arguments_model(name, source, function)
    return Tool(
        name=name,
        source=source,
        description=_description(function),
        parameters=model.model_json_schema(),
        function=function,
        check=functools.partial(_checked, name, model),
        **limits,
    )


def _description(function: Callable[..., Any]) -> str:
    """The docstring's first paragraph: what the model is told the tool does."""
    doc = inspect.getdoc(function) or ""
    return doc.split("\n\n", 1)[0].strip()


def _arguments_model(name: str, source: str, function: Callable[..., Any]) -> Any:
    from pydantic import ConfigDict, create_model

    try:
        signature = inspect.signature(function)
        hints = _hints(function)
    except (TypeError, ValueError, NameError) as exc:
        raise ToolProblem(f"{source}: cannot read its signature: {exc}") from None
    fields: dict[str, Any] = {}
    for parameter in signature.parameters.values():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            raise ToolProblem(f"{source}: *{parameter.name} has no schema; name each parameter")
        if parameter.name not in hints:
            raise ToolProblem(
                f"{source}: parameter {parameter.name!r} has no type hint, so it has no schema"
            )
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[parameter.name] = (hints[parameter.name], default)
    try:
        return create_model(f"{name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    except Exception as exc:
        raise ToolProblem(f"{source}: its parameters have no JSON schema: {exc}") from None


def _hints(function: Callable[..., Any]) -> dict[str, Any]:
    import typing

    hints = typing.get_type_hints(function)
    hints.pop("return", None)
    return hints


def parse_arguments(tool: Tool, raw: Any) -> dict[str, Any]:
    """A call's arguments, checked against the tool's schema; ``ValueError`` saying why not."""
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except ValueError:
            raise ValueError(f"arguments of {tool.name} are not JSON: {raw[:80]!r}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"arguments of {tool.name} are not an object")
    return tool.check(raw)


def _checked(name: str, model: Any, raw: dict[str, Any]) -> dict[str, Any]:
    """``raw`` validated by a Python tool's arguments model."""
    from pydantic import ValidationError

    try:
        checked = model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "(arguments)"
        raise ValueError(f"arguments of {name}: {where}: {first['msg']}") from None
    return {field: getattr(checked, field) for field in type(checked).model_fields}


async def run_tool(tool: Tool, arguments: dict[str, Any]) -> ToolResult:
    """Run ``tool``, within its timeout; its own exception is a result the model sees."""
    started = time.perf_counter()
    try:
        if tool.ready is not None:
            await tool.ready()
            started = time.perf_counter()
        async with asyncio.timeout(tool.timeout_s):
            if inspect.iscoroutinefunction(tool.function):
                value = await tool.function(**arguments)
            else:
                value = await asyncio.to_thread(tool.function, **arguments)
    except TimeoutError:
        return _failed(tool, started, "timeout", f"no result within {tool.timeout_s:g}s")
    except Exception as exc:  # its message may quote a secret: masked before anyone sees it
        return _failed(tool, started, "error", redact(f"{type(exc).__name__}: {exc}"))
    text = value if isinstance(value, str) else _json(value)
    data = text.encode()
    outcome = "ok"
    if len(data) > tool.max_output_bytes:
        kept = data[: tool.max_output_bytes].decode(errors="ignore")
        text = f"{kept}\n[cut: the result was {len(data)} bytes; {tool.max_output_bytes} are shown]"
        outcome = "truncated"
    return ToolResult(text, outcome, _since(started), len(data))


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except ValueError as exc:  # a circular structure
        return f"(a result that is not JSON: {exc})"


def _failed(tool: Tool, started: float, outcome: str, error: str) -> ToolResult:
    return ToolResult(f"error: {error}", outcome, _since(started), 0, error=error[:500])


def _since(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
