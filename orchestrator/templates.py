"""Prompts and expressions, rendered in the bounded sandbox (``sandbox``) with StrictUndefined.

Only text from workflow and agent files is ever compiled. Inputs and model
outputs enter as values in the context, so ``{{ 7*7 }}`` inside a model's answer
reaches the next prompt as those seven characters.

Anything that goes wrong while a template renders or an expression evaluates
(an undefined name, ``1/0``, ``None >= 4``, a bound passed) is a
``TemplateProblem`` whose message names the expression: it is the workflow's
error, never the model's.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.environment import TemplateExpression
from jinja2.meta import TrackingCodeGenerator
from jinja2.parser import Parser

from orchestrator.sandbox import (
    BoundedEnvironment,
    LimitExceeded,
    bound,
    check_depth,
    check_nesting,
    metered,
)

CONTEXT_NAMES = frozenset({"inputs", "steps", "run", "item"})
# The context objects that hold inputs and step outputs: what taint follows.
DATA_NAMES = frozenset({"inputs", "steps"})
# (name, key): ``inputs.ticket`` is ("inputs", "ticket"); key None reads the whole object.
Read = tuple[str, str | None]
_SHOWN = 200  # characters of an expression quoted in an error


class TemplateProblem(Exception):
    """A template or expression is wrong; ``line`` is relative to its own text."""

    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


@functools.cache
def environment() -> BoundedEnvironment:
    # Stateless and configuration-free, so one per process is safe: each
    # evaluation's budget lives in a context variable, not here.
    return BoundedEnvironment()


def _parse(source: str, *, expression: bool) -> tuple[nodes.Template, int]:
    """The checked tree of ``source`` and its size in tokens; raises ``TemplateProblem``."""
    env = environment()
    try:
        tokens = check_nesting(env, source, expression=expression)
        if expression:
            parser = Parser(env, source, state="variable")
            expr = parser.parse_expression()
            if not parser.stream.eos:
                raise jinja2.TemplateSyntaxError(
                    "chunk after expression", parser.stream.current.lineno
                )
            ast = nodes.Template([nodes.Assign(nodes.Name("result", "store"), expr)], lineno=1)
        else:
            ast = env.parse(source)
        ast.set_environment(env)
        check_depth(ast)  # before anything walks the tree recursively
        return ast, tokens
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(exc.message or str(exc), exc.lineno) from None
    except LimitExceeded as exc:
        raise TemplateProblem(str(exc), exc.line) from None
    except RecursionError:
        raise TemplateProblem("nested too deeply to read") from None


def _names(ast: nodes.Template) -> set[str]:
    """The context names ``ast`` reads (``jinja2.meta.find_undeclared_variables``).

    Its code generator folds constants, which would evaluate ``0[0]`` and the
    like while a file is checked; here it runs with the optimizer off.
    """
    codegen = TrackingCodeGenerator(ast.environment)  # type: ignore[arg-type]
    codegen.optimizer = None
    try:
        codegen.visit(ast)
    except jinja2.TemplateSyntaxError as exc:  # an unknown filter or test, say
        raise TemplateProblem(exc.message or str(exc), exc.lineno) from None
    return codegen.undeclared_identifiers


def _compile(ast: nodes.Template) -> jinja2.Template:
    env = environment()
    try:
        return env.from_string(bound(ast, env))
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateProblem(exc.message or str(exc), exc.lineno) from None
    except LimitExceeded as exc:
        raise TemplateProblem(str(exc)) from None
    except (RecursionError, SyntaxError):
        raise TemplateProblem("nested too deeply to compile") from None


class Template:
    """A compiled prompt template and the names it reads from its context.

    ``label`` says what the template is (``prompt``, ``system``) in errors;
    ``tokens`` is its size, as the lexer counts it.
    """

    def __init__(self, source: str, *, label: str = "template") -> None:
        self.source = source
        self.label = label
        ast, self.tokens = _parse(source, expression=False)
        self.names = _names(ast)
        self.references = list(_references(ast))
        self.output_fields = list(_output_fields(ast))
        self.step_misreads = list(_step_misreads(ast))
        self.reads = frozenset(_reads(ast))
        self._template = _compile(ast)  # rewrites the tree: read it first

    def render(self, context: dict[str, Any]) -> str:
        try:
            with metered():
                return self._template.render(context)
        except Exception as exc:
            line = _template_line(exc.__traceback__)
            text = self.source.splitlines()[line - 1] if line else self.source
            where = f" line {line}" if line and "\n" in self.source.strip() else ""
            raise TemplateProblem(
                f"{self.label}{where} '{_shorten(text.strip())}' {_failure(exc)}"
            ) from None


class Expression:
    """A sandboxed expression such as ``steps.classify.output.urgency >= 4``.

    ``label`` says where it sits (``when``, ``for_each``, ``check``) in errors;
    ``tokens`` is its size, as the lexer counts it.
    """

    def __init__(self, source: str, *, label: str = "expression") -> None:
        self.source = source
        self.label = label
        ast, self.tokens = _parse(source, expression=True)
        self.names = _names(ast)
        self.references = list(_references(ast))
        self.output_fields = list(_output_fields(ast))
        self.step_misreads = list(_step_misreads(ast))
        self.reads = frozenset(_reads(ast))
        self._compiled = TemplateExpression(_compile(ast), undefined_to_none=False)

    def evaluate(self, context: dict[str, Any]) -> Any:
        try:
            with metered():
                value = self._compiled(**context)
                if isinstance(value, jinja2.Undefined):
                    value._fail_with_undefined_error()  # a missing field is an error, not a value
                return value
        except Exception as exc:
            raise TemplateProblem(
                f"{self.label} '{_shorten(self.source)}' {_failure(exc)}"
            ) from None


def _failure(exc: Exception) -> str:
    if isinstance(exc, LimitExceeded):
        return f"was stopped: {exc}"
    if isinstance(exc, RecursionError):
        return "was stopped: it recurses too deeply"
    if isinstance(exc, MemoryError):
        return "was stopped: out of memory"
    detail = str(exc).splitlines()[0][:_SHOWN] if str(exc) else ""
    return f"raised {type(exc).__name__}" + (f": {detail}" if detail else "")


def _shorten(text: str) -> str:
    return text if len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"


def _template_line(tb: TracebackType | None) -> int | None:
    """The template line that raised: Jinja maps its frames back to the source."""
    line = None
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "<template>":
            line = tb.tb_lineno
        tb = tb.tb_next
    return line


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


def _output_fields(ast: nodes.Template) -> Iterator[tuple[str, str]]:
    """Each ``(step, field)`` read as ``steps.STEP.output.FIELD`` (or with constant
    subscripts); a dict method such as ``output.items`` is not a field, and a read
    that allows for a missing field (``is defined``, ``| default(...)``) is left out."""
    for parent, node in _with_parents(ast):
        if not isinstance(node, nodes.Getattr | nodes.Getitem) or _guards(parent, node):
            continue
        output, field = node.node, _key(node)
        if field is None or (isinstance(node, nodes.Getattr) and hasattr(dict, field)):
            continue
        if not isinstance(output, nodes.Getattr | nodes.Getitem) or _key(output) != "output":
            continue
        step = output.node
        if not isinstance(step, nodes.Getattr | nodes.Getitem):
            continue
        name, step_id = step.node, _key(step)
        if isinstance(name, nodes.Name) and name.name == "steps" and step_id is not None:
            yield step_id, field


def _guards(parent: nodes.Node, node: nodes.Node) -> bool:
    """Whether ``parent`` allows ``node`` to be missing: ``node is defined``,
    ``node is undefined``, ``node | default(...)`` (or ``| d``)."""
    if isinstance(parent, nodes.Test) and parent.node is node:
        return parent.name in ("defined", "undefined")
    return (
        isinstance(parent, nodes.Filter) and parent.node is node and parent.name in ("default", "d")
    )


def _step_misreads(ast: nodes.Template) -> Iterator[tuple[str, str | None]]:
    """Each ``(step, key)`` where ``steps.STEP`` is read other than as its ``output``:
    ``steps.x`` whole gives ("x", None), ``steps.x.text`` gives ("x", "text")."""
    for parent, child in _with_parents(ast):
        if not isinstance(child, nodes.Getattr | nodes.Getitem):
            continue
        name, step_id = child.node, _key(child)
        if not (isinstance(name, nodes.Name) and name.name == "steps" and step_id):
            continue
        read = parent if isinstance(parent, nodes.Getattr | nodes.Getitem) else None
        key = _key(read) if read is not None and read.node is child else None
        if key != "output":
            yield step_id, key


def _key(node: nodes.Getattr | nodes.Getitem) -> str | None:
    """The constant key of ``x.key`` or ``x["key"]``; None for a computed one."""
    return node.attr if isinstance(node, nodes.Getattr) else _const(node.arg)


def _reads(ast: nodes.Template) -> Iterator[Read]:
    """Every read of ``inputs`` and ``steps``, failing closed: anything but a constant
    key (``inputs`` passed on whole, looped over, indexed by a variable, filtered,
    or a dict method such as ``inputs.items()``) reads the whole object."""
    for parent, child in _with_parents(ast):
        if not (isinstance(child, nodes.Name) and child.ctx == "load" and child.name in DATA_NAMES):
            continue
        key: str | None = None
        if isinstance(parent, nodes.Getattr) and parent.node is child:
            # A name such as `items` is the key when there is one and the
            # method when there is not: read the whole object.
            key = None if hasattr(dict, parent.attr) else parent.attr
        elif isinstance(parent, nodes.Getitem) and parent.node is child:
            key = _const(parent.arg)
        yield child.name, key


def _with_parents(ast: nodes.Template) -> Iterator[tuple[nodes.Node, nodes.Node]]:
    """Every ``(parent, node)`` of the tree below ``ast``."""
    stack: list[nodes.Node] = [ast]
    while stack:  # a loop, not recursion: deep nesting must not exhaust the stack
        parent = stack.pop()
        for node in parent.iter_child_nodes():
            stack.append(node)
            yield parent, node


def _const(node: nodes.Node) -> str | None:
    return node.value if isinstance(node, nodes.Const) and isinstance(node.value, str) else None
