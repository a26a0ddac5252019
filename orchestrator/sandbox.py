"""The Jinja2 environment that workflow templates and expressions run in.

It is Jinja2's immutable sandbox with StrictUndefined, and three changes:

- **Data first.** ``inputs.items`` is the input named ``items`` when there is
  one, and ``dict.items`` only when there is not: a workflow's names are data.
- **Nothing runs while compiling.** Jinja folds constant expressions when it
  compiles (``10 ** (10 ** 8)`` would be computed by ``tierflow validate``);
  here the optimizer is off and every output goes through ``finalize``, so a
  template is only ever evaluated when it renders.
- **Bounded work.** Each evaluation (one prompt, one ``when``) has a budget of
  ``MAX_STEPS`` operations and ``MAX_PRODUCED`` characters or items built, and
  no single value may pass ``MAX_SIZE`` characters or items, or an integer
  ``MAX_INT_BITS`` bits. Operations whose result size is known up front
  (``*``, ``**``, ``range``, ``ljust``, ``replace``, ``join``, format widths…) are
  refused before they allocate. Nesting is bounded when compiling.

Going past a bound raises ``LimitExceeded``; ``templates`` turns it into the
step's error.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import string
from collections.abc import Callable, Iterable, Iterator, Mapping
from numbers import Number
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_STEPS = 200_000  # operations per evaluation: attribute reads, calls, loop turns…
MAX_PRODUCED = 16_000_000  # characters or items built by one evaluation, all values together
MAX_SIZE = 4_000_000  # characters or items in one value
MAX_INT_BITS = 4096  # about 1,233 decimal digits
MAX_RANGE = 10_000  # items in one range()
MAX_NESTING = 32  # open brackets, and nested tags such as {% for %} and {% if %}
MAX_BLOCKS = 8  # nested {% for %}, {% if %}, {% macro %}…: Python allows 20 blocks
MAX_DEPTH = 64  # depth of the expression tree: a.b.c…, 1 + 1 + …, not not …
MAX_TOKENS = 10_000  # tokens in one template or expression: compiling costs about 0.1 ms each

# Characters of a string scanned per step: C speed, about a microsecond.
_CHARS_PER_STEP = 1000


class LimitExceeded(Exception):
    """An expression or template went past one of the sandbox's bounds (at ``line``)."""

    def __init__(self, message: str, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


class _Meter:
    """What one evaluation has used so far."""

    __slots__ = ("produced", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.produced = 0

    def step(self, count: int = 1) -> None:
        self.steps += count
        if self.steps > MAX_STEPS:
            raise LimitExceeded(
                f"too much work: over {MAX_STEPS:,} operations (the limit for one evaluation)"
            )

    def will_build(self, size: int, what: str) -> None:
        """Refuse a value of ``size`` characters or items before it is built."""
        if size > MAX_SIZE:
            raise LimitExceeded(
                f"{what} would be {size:,} long, over the limit of {MAX_SIZE:,} characters or items"
            )
        if self.produced + size > MAX_PRODUCED:
            raise LimitExceeded(
                f"too much built: over {MAX_PRODUCED:,} characters or items (the limit for one evaluation)"
            )

    def built(self, value: Any, what: str = "a value") -> Any:
        """Account for ``value``, just built; refuse it if it is too large."""
        if isinstance(value, int) and not isinstance(value, bool):
            if value.bit_length() > MAX_INT_BITS:
                raise LimitExceeded(f"number too large: over the limit of {MAX_INT_BITS} bits")
        elif isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
            self.will_build(len(value), what)
            self.produced += len(value)
        return value


_METER: contextvars.ContextVar[_Meter | None] = contextvars.ContextVar("meter", default=None)


def _meter() -> _Meter:
    # Outside ``metered`` (nothing of ours evaluates there), each operation is
    # still bounded on its own.
    return _METER.get() or _Meter()


class metered:
    """``with metered():`` gives the evaluation inside its own fresh budget."""

    def __enter__(self) -> None:
        self._token = _METER.set(_Meter())

    def __exit__(self, *exc: object) -> None:
        _METER.reset(self._token)


def _scan_cost(value: Any) -> int:
    """Steps to charge for a pass over ``value``."""
    if isinstance(value, str | bytes):
        return 1 + len(value) // _CHARS_PER_STEP
    if isinstance(value, list | tuple | dict | set | frozenset | range):
        return 1 + len(value)
    return 1


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")
_DIGITS = re.compile(r"\d+")


def _check_width(text: str | None, what: str) -> None:
    if text is None:
        return
    if text == "*":
        raise LimitExceeded(f"{what}: a '*' width is not allowed")
    if len(text) > 7 or int(text) > MAX_SIZE:
        raise LimitExceeded(f"{what}: width {text} is over the limit of {MAX_SIZE:,}")


def _check_printf(fmt: str) -> None:
    for match in _PRINTF.finditer(fmt):
        _check_width(match.group(1), "%-format")
        _check_width(match.group(2), "%-format")


def _check_format(fmt: str) -> None:
    for _text, _field, spec, _conversion in string.Formatter().parse(fmt):
        if spec and "{" in spec:
            raise LimitExceeded("format: a width taken from an argument is not allowed")
        for digits in _DIGITS.findall(spec or ""):
            _check_width(digits, "format")


def _int_arg(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _check_join(meter: _Meter, sep: Any, items: list[Any]) -> None:
    size = len(sep) * max(len(items) - 1, 0) if isinstance(sep, str | bytes) else 0
    size += sum(len(item) for item in items if isinstance(item, str | bytes))
    meter.will_build(size, "join")


def _check_replace(meter: _Meter, text: Any, old: Any, new: Any, count: Any = -1) -> None:
    if not (isinstance(text, str) and isinstance(old, str)) and not (
        isinstance(text, bytes) and isinstance(old, bytes)
    ):
        return  # the call itself will refuse mixed types
    found = len(text) + 1 if not old else text.count(old)  # type: ignore[arg-type]
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    grows = len(new) - len(old) if isinstance(new, str | bytes) else 0
    meter.will_build(len(text) + found * max(grows, 0), "replace")


def _check_str_method(meter: _Meter, owner: str | bytes, name: str, args: tuple[Any, ...]) -> None:
    """Refuse a str or bytes method call whose result would be too large."""
    meter.step(_scan_cost(owner))
    if name in ("center", "ljust", "rjust", "zfill") and args:
        meter.will_build(_int_arg(args[0]), name)
    elif name == "expandtabs":
        tab = _int_arg(args[0]) if args else 8
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        meter.will_build(len(owner) + tabs * max(tab, 0), name)
    elif name == "replace" and len(args) >= 2:
        _check_replace(meter, owner, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name == "translate" and args and isinstance(args[0], Mapping):
        longest = max((len(v) for v in args[0].values() if isinstance(v, str)), default=1)
        meter.will_build(len(owner) * longest, name)
    elif name in ("format", "format_map") and isinstance(owner, str):
        _check_format(owner)


# --- filters -------------------------------------------------------------------------


def _guard_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func`` charged for its input, with the checks its arguments need."""
    pass_arg = getattr(func, "jinja_pass_arg", None)

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        rest = list(args[1:] if pass_arg is not None else args)
        value = rest[0] if rest else None
        meter.step(_scan_cost(value))
        check = _FILTER_CHECKS.get(name)
        if check is not None:
            if name == "join" and value is not None and not isinstance(value, str):
                rest[0] = list(value)  # counted now, so the check sees every item
                args = (*args[:1], *rest) if pass_arg is not None else tuple(rest)
            # Arguments the filter itself refuses (TypeError): let it say so.
            with contextlib.suppress(TypeError):
                check(meter, *rest, **kwargs)
        return meter.built(func(*args, **kwargs), f"the {name} filter's result")

    return guarded


def _filter_center(meter: _Meter, value: Any, width: Any = 80) -> None:
    meter.will_build(_int_arg(width), "center")


def _filter_indent(meter: _Meter, value: Any, width: Any = 4, *args: Any, **kw: Any) -> None:
    pad = len(width) if isinstance(width, str) else _int_arg(width)
    lines = str(value).count("\n") + 1
    meter.will_build(len(str(value)) + lines * pad, "indent")


def _filter_format(meter: _Meter, value: Any, *args: Any, **kwargs: Any) -> None:
    _check_printf(str(value))


def _filter_join(meter: _Meter, value: Any, d: Any = "", attribute: Any = None) -> None:
    if isinstance(value, list):
        _check_join(meter, d, value)


def _filter_replace(meter: _Meter, value: Any, old: Any, new: Any, count: Any = None) -> None:
    _check_replace(meter, str(value), old, new, -1 if count is None else count)


def _filter_batch(meter: _Meter, value: Any, linecount: Any, fill_with: Any = None) -> None:
    if fill_with is not None:
        meter.will_build(_int_arg(linecount), "batch")


def _filter_slice(meter: _Meter, value: Any, slices: Any, fill_with: Any = None) -> None:
    meter.will_build(_int_arg(slices), "slice")


def _filter_wordwrap(
    meter: _Meter,
    value: Any,
    width: Any = 79,
    break_long_words: Any = True,
    wrapstring: Any = None,
    *args: Any,
    **kwargs: Any,
) -> None:
    if isinstance(wrapstring, str):
        lines = len(str(value)) // max(_int_arg(width), 1) + 1
        meter.will_build(len(str(value)) + lines * len(wrapstring), "wordwrap")


def _filter_tojson(meter: _Meter, value: Any, indent: Any = None) -> None:
    size = len(indent) if isinstance(indent, str) else _int_arg(indent)
    if size > 16:
        raise LimitExceeded(f"tojson: indent {size} is over the limit of 16")


def _filter_sum(meter: _Meter, value: Any, attribute: Any = None, start: Any = 0) -> None:
    if not isinstance(start, Number):
        raise LimitExceeded("sum adds numbers only: give no start, or a number")


_FILTER_CHECKS: dict[str, Callable[..., None]] = {
    "center": _filter_center,
    "indent": _filter_indent,
    "format": _filter_format,
    "join": _filter_join,
    "replace": _filter_replace,
    "batch": _filter_batch,
    "slice": _filter_slice,
    "wordwrap": _filter_wordwrap,
    "tojson": _filter_tojson,
    "sum": _filter_sum,
}


def _guard_test(func: Any) -> Callable[..., Any]:
    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _meter().step(sum(_scan_cost(arg) for arg in args))
        return func(*args, **kwargs)

    return guarded


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise LimitExceeded(f"range of {len(numbers):,} items is over the limit of {MAX_RANGE:,}")
    return numbers


# --- the environment -------------------------------------------------------------


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """Jinja2's immutable sandbox, data first and bounded (see the module docstring)."""

    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})
    intercepted_unops = frozenset({"+", "-"})

    def __init__(self) -> None:
        super().__init__(
            undefined=jinja2.StrictUndefined,
            autoescape=False,
            keep_trailing_newline=True,
            optimized=False,
            finalize=_finalize,
        )
        # lipsum(n) writes n paragraphs; the other globals build nothing large.
        self.globals.pop("lipsum", None)
        self.globals["range"] = _bounded_range
        self.filters = {name: _guard_filter(name, f) for name, f in self.filters.items()}
        self.tests = {name: _guard_test(f) for name, f in self.tests.items()}

    def getattr(self, obj: Any, attribute: str) -> Any:
        _meter().step()
        if isinstance(obj, Mapping):
            # Data first: a key named like a method (items, keys, get) is the data.
            try:
                return obj[attribute]
            except (KeyError, TypeError):
                pass
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _meter().step()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        meter = _meter()
        meter.step()
        _check_binop(meter, operator, left, right)
        return meter.built(super().call_binop(context, operator, left, right), f"'{operator}'")

    def call_unop(self, context: Context, operator: str, arg: Any) -> Any:
        _meter().step()
        return super().call_unop(context, operator, arg)

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(__obj, "__self__", None) is __self and __obj.__name__ in _OWN:
            return __obj(*args)  # added by _Bound: it does its own counting
        meter = _meter()
        meter.step()
        method = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner = getattr(method, "__self__", None)
        if isinstance(owner, str | bytes):
            name = getattr(method, "__name__", "")
            if name == "join" and args and not isinstance(args[0], str | bytes):
                args = (list(args[0]), *args[1:])  # counted now, so the check sees every item
                _check_join(meter, owner, args[0])
            _check_str_method(meter, owner, name, args)
        result = super().call(__context, __obj, *args, **kwargs)
        return meter.built(result, f"{getattr(method, '__name__', 'the call')}()")

    def bounded_iter(self, iterable: Iterable[Any]) -> Iterator[Any]:
        """What a ``{% for %}`` loops over: one step per turn."""
        meter = _meter()
        for item in iterable:
            meter.step()
            yield item

    def scanned(self, value: Any) -> Any:
        """An operand of a comparison, charged for the scan the comparison may make."""
        _meter().step(_scan_cost(value))
        return value

    def bounded_concat(self, *values: Any) -> str:
        """``a ~ b``: refused before it builds a string that is too large."""
        texts = [str(value) for value in values]
        meter = _meter()
        meter.will_build(sum(len(text) for text in texts), "'~'")
        joined = "".join(texts)
        meter.built(joined)
        return joined


_OWN = frozenset({"bounded_iter", "bounded_concat", "scanned"})


def _check_binop(meter: _Meter, operator: str, left: Any, right: Any) -> None:
    sequence = (str, bytes, list, tuple)
    bits = 0  # a lower bound on the bits of an integer result
    if operator == "*":
        if isinstance(left, sequence) and isinstance(right, int):
            meter.will_build(len(left) * max(right, 0), "'*'")
        elif isinstance(right, sequence) and isinstance(left, int):
            meter.will_build(len(right) * max(left, 0), "'*'")
        elif isinstance(left, int) and isinstance(right, int) and left and right:
            bits = left.bit_length() + right.bit_length() - 1
    elif operator == "**":
        if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = (abs(left).bit_length() - 1) * right + 1
    elif operator == "+":
        if isinstance(left, sequence) and isinstance(right, sequence):
            meter.will_build(len(left) + len(right), "'+'")
    elif operator == "%" and isinstance(left, str):
        _check_printf(left)
    if bits > MAX_INT_BITS:
        raise LimitExceeded(f"number too large: over the limit of {MAX_INT_BITS} bits")


@jinja2.pass_context
def _finalize(context: Context, value: Any) -> str:
    # Every piece of output passes here, literal text too (see _Bound), so the
    # output of loops, macros and {% set %} blocks is all counted.
    text = value if isinstance(value, str) else str(value)
    meter = _meter()
    meter.step(_scan_cost(text))
    return meter.built(text, "the output")  # type: ignore[no-any-return]


class _Bound(NodeTransformer):
    """Rewrites a parsed template so every loop turn, concatenation and output is counted."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        node.iter = _env_call("bounded_iter", [node.iter], node.lineno)  # type: ignore[list-item]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return _env_call("bounded_concat", list(node.nodes), node.lineno)

    def visit_Compare(self, node: nodes.Compare) -> nodes.Node:
        # ==, < and `in` scan their operands at C speed, uncounted otherwise.
        self.generic_visit(node)
        node.expr = _env_call("scanned", [node.expr], node.lineno)
        for operand in node.ops:
            operand.expr = _env_call("scanned", [operand.expr], node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        node.nodes = [
            nodes.Const(child.data, lineno=child.lineno)
            if isinstance(child, nodes.TemplateData)
            else child
            for child in node.nodes
        ]
        return node


def _env_call(name: str, args: list[nodes.Expr], lineno: int) -> nodes.Call:
    return nodes.Call(nodes.EnvironmentAttribute(name), args, [], None, None, lineno=lineno)


def bound(ast: nodes.Template, env: jinja2.Environment) -> nodes.Template:
    """``ast`` (already through ``check_depth``) rewritten to count its work."""
    result = _Bound().visit(ast)
    result.set_environment(env)
    return result  # type: ignore[no-any-return]


_OPENERS = {"for", "if", "macro", "call", "filter", "with", "block", "autoescape", "set"}
_CLOSERS = {"end" + name for name in _OPENERS}
_BRACKETS = {"lparen": 1, "lbracket": 1, "lbrace": 1, "rparen": -1, "rbracket": -1, "rbrace": -1}


def check_nesting(env: jinja2.Environment, source: str, *, expression: bool = False) -> int:
    """Refuse brackets and block tags nested past the limits, and more than
    ``MAX_TOKENS`` tokens, before parsing; returns the number of tokens.

    Jinja's parser recurses once per level, so 2,000 parentheses would
    overflow Python's stack before any check on the tree could run.
    """
    brackets = blocks = count = 0
    tag: list[tuple[str, str]] | None = None
    state = "variable" if expression else None
    for token in env.lexer.tokenize(source, state=state):
        kind, lineno = token.type, token.lineno
        count += 1
        if count > MAX_TOKENS:
            raise LimitExceeded(
                f"more than {MAX_TOKENS:,} tokens (the limit for one template)", lineno
            )
        if kind in _BRACKETS:
            brackets += _BRACKETS[kind]
            if brackets > MAX_NESTING:
                raise LimitExceeded(
                    f"nested more than {MAX_NESTING} brackets deep (the limit)", lineno
                )
        elif kind == "block_begin":
            tag = []
        elif kind == "block_end" and tag is not None:
            name = tag[0][1] if tag and tag[0][0] == "name" else ""
            # {% set x = … %} is a statement; only {% set x %}…{% endset %} opens a block.
            if name in _OPENERS and not (name == "set" and any(k == "assign" for k, _ in tag)):
                blocks += 1
                if blocks > MAX_BLOCKS:
                    raise LimitExceeded(
                        f"nested more than {MAX_BLOCKS} tags deep ({{% {name} %}} and the like;"
                        " the limit)",
                        lineno,
                    )
            elif name in _CLOSERS:
                blocks -= 1
            tag = None
        elif tag is not None:
            tag.append((kind, str(token.value)))
    return count


def check_depth(ast: nodes.Node) -> None:
    """Refuse a tree deeper than ``MAX_DEPTH``; walked without recursion."""
    stack = [(ast, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise LimitExceeded(
                f"nested more than {MAX_DEPTH} levels deep (the limit)", node.lineno
            )
        stack.extend((child, depth + 1) for child in node.iter_child_nodes())
