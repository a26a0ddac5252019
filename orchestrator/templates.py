"""Prompts and expressions, rendered in Jinja2's immutable sandbox with StrictUndefined.

Only text from workflow and agent files is ever compiled. Inputs and model
outputs enter as values in the context, so ``{{ 7*7 }}`` inside a model's answer
reaches the next prompt as those seven characters.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jinja2
from jinja2 import meta, nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

CONTEXT_NAMES = frozenset({"inputs", "steps", "run", "item"})
# The context objects that hold inputs and step outputs: what taint follows.
DATA_NAMES = frozenset({"inputs", "steps"})
# (name, key): ``inputs.ticket`` is ("inputs", "ticket"); key None reads the whole object.
Read = tuple[str, str | None]


class TemplateProblem(Exception):
    """A template or expression is wrong; ``line`` is relative to its own text."""

    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


@functools.cache
def environment() -> ImmutableSandboxedEnvironment:
    # Stateless and configuration-free, so one per process is safe.
    return ImmutableSandboxedEnvironment(
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        keep_trailing_newline=True,
    )


class Template:
    """A compiled prompt template and the names it reads from its context."""

    def __init__(self, source: str) -> None:
        env = environment()
        try:
            ast = env.parse(source)
            self._template = env.from_string(ast)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateProblem(exc.message or str(exc), exc.lineno) from None
        self.names = meta.find_undeclared_variables(ast)
        self.references = list(_references(ast))
        self.reads = frozenset(_reads(ast))

    def render(self, context: dict[str, Any]) -> str:
        try:
            return self._template.render(context)
        except jinja2.TemplateError as exc:
            raise TemplateProblem(str(exc)) from None


class Expression:
    """A sandboxed expression such as ``steps.classify.output.urgency >= 4``."""

    def __init__(self, source: str) -> None:
        self.source = source
        env = environment()
        try:
            ast = env.parse("{{ (" + source + ") }}")
            self._compiled = env.compile_expression(source, undefined_to_none=False)
        except jinja2.TemplateSyntaxError as exc:
            raise TemplateProblem(exc.message or str(exc)) from None
        self.names = meta.find_undeclared_variables(ast)
        self.references = list(_references(ast))
        self.reads = frozenset(_reads(ast))

    def evaluate(self, context: dict[str, Any]) -> Any:
        try:
            return self._compiled(**context)
        except jinja2.TemplateError as exc:
            raise TemplateProblem(str(exc)) from None


def _references(ast: nodes.Template) -> Iterator[tuple[str, str, int]]:
    """Each ``(name, key, line)`` read from the context: ``steps.x.output`` gives ("steps", "x")."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        target = node.node if isinstance(node, nodes.Getattr | nodes.Getitem) else None
        if isinstance(target, nodes.Name) and target.name in CONTEXT_NAMES:
            if isinstance(node, nodes.Getattr):
                key: str | None = node.attr
            else:
                key = _const(node.arg) if isinstance(node, nodes.Getitem) else None
            if key is not None:
                yield target.name, key, node.lineno


def _reads(ast: nodes.Template) -> Iterator[Read]:
    """Every read of ``inputs`` and ``steps``, failing closed: anything but a constant
    key (``inputs`` passed on whole, looped over, indexed by a variable, filtered,
    or a dict method such as ``inputs.items()``) reads the whole object."""
    stack: list[nodes.Node] = [ast]
    while stack:  # a loop, not recursion: deep nesting must not exhaust the stack
        parent = stack.pop()
        for child in parent.iter_child_nodes():
            stack.append(child)
            if not (
                isinstance(child, nodes.Name) and child.ctx == "load" and child.name in DATA_NAMES
            ):
                continue
            key: str | None = None
            if isinstance(parent, nodes.Getattr) and parent.node is child:
                # The sandbox finds a dict's methods before its keys.
                key = None if hasattr(dict, parent.attr) else parent.attr
            elif isinstance(parent, nodes.Getitem) and parent.node is child:
                key = _const(parent.arg)
            yield child.name, key


def _const(node: nodes.Node) -> str | None:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else None
