"""Read a YAML file safely and turn validation errors into ``FILE:LINE: field: message``.

Files load in three layers, as pydantic-ai's specs do: ``read_yaml`` (size cap,
safe loader, must be a mapping) → ``validate`` (pydantic, unknown keys refused) →
cross-file checks in ``spec``. Lines come from the same parse that builds the data.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from orchestrator.errors import SpecError

MAX_FILE_BYTES = 1024 * 1024

Loc = tuple[str | int, ...]
M = TypeVar("M", bound=BaseModel)


# libyaml's parser when PyYAML has it: the pure-Python one takes seconds on a 1 MiB file.
_BaseLoader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _SafeLoader(_BaseLoader):  # type: ignore[misc]
    """``yaml.SafeLoader`` with YAML 1.2 booleans: ``on``/``yes``/``no`` stay strings.

    Under YAML 1.1, ``escalation: {on: [...]}`` would load the key as ``True``.
    """


_SafeLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SafeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool",
    re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
    list("tTfF"),
)

MAX_DEPTH = 64  # mappings and lists inside one another
MAX_NODES = 50_000  # keys, values and list items in one file

# What YAML allows in a file: tab, newlines and printable characters (YAML 1.2, 5.1).
_NOT_PRINTABLE = re.compile(
    "[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
)
_UTF16_32_BOMS = {
    b"\xff\xfe\x00\x00": "UTF-32",
    b"\x00\x00\xfe\xff": "UTF-32",
    b"\xff\xfe": "UTF-16",
    b"\xfe\xff": "UTF-16",
}


@dataclass(frozen=True)
class YamlDoc:
    """A parsed YAML mapping and the line (1-based) where each key path starts."""

    path: Path
    data: dict[str, Any]
    lines: dict[Loc, int] = field(default_factory=dict)
    # Where the text of a literal block (``prompt: |``) starts: the line after its key.
    # (A folded block, ``>``, joins its lines: its errors name its key's line.)
    text_starts: dict[Loc, int] = field(default_factory=dict)

    def text_line(self, loc: Iterable[str | int], line: int = 1) -> int:
        """The file's line of ``line`` (1-based) of the text at ``loc``."""
        loc = tuple(loc)
        return self.text_starts.get(loc, self.line_of(loc)) + max(line - 1, 0)

    def line_of(self, loc: Iterable[str | int]) -> int:
        """Line of the deepest known prefix of ``loc``; 1 when nothing matches."""
        loc = tuple(loc)
        for end in range(len(loc), -1, -1):
            if loc[:end] in self.lines:
                return self.lines[loc[:end]]
        return 1

    def problem(self, loc: Iterable[str | int], message: str) -> str:
        loc = tuple(loc)
        return f"{self.path}:{self.line_of(loc)}: {format_loc(loc) or '(file)'}: {message}"


def format_loc(loc: Iterable[str | int]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def suggest(name: object, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or ``""``."""
    close = difflib.get_close_matches(str(name), list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def read_yaml(path: Path | str) -> YamlDoc:
    """Parse ``path`` with the safe loader; it must hold a mapping of at most 1 MiB."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise SpecError(f"{path}:0: (file): cannot read: {exc.strerror or exc}") from exc
    if len(raw) > MAX_FILE_BYTES:
        raise SpecError(f"{path}:1: (file): {len(raw)} bytes is over the 1 MiB limit")
    return parse_yaml(decode(raw, path=path), path=path)


def decode(raw: bytes, *, path: Path) -> str:
    """``raw`` as UTF-8 text (a UTF-8 byte-order mark is dropped), or a ``SpecError``."""
    for bom, encoding in _UTF16_32_BOMS.items():
        if raw.startswith(bom):
            raise SpecError(f"{path}:1: (file): the file is {encoding}; save it as UTF-8")
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        byte = raw[exc.start]
        raise SpecError(
            f"{path}:{line}: (file): not UTF-8 text (byte 0x{byte:02x}); save it as UTF-8"
        ) from None


def parse_yaml(text: str, *, path: Path) -> YamlDoc:
    """Parse ``text`` with the safe loader; it must hold a mapping."""
    bad = _NOT_PRINTABLE.search(text)
    if bad:
        line = text.count("\n", 0, bad.start()) + 1
        code = f"U+{ord(bad.group()):04X}"
        hint = (
            "is the file UTF-16? save it as UTF-8"
            if code == "U+0000"
            else "write it as an escape in a double-quoted string"
        )
        raise SpecError(
            f"{path}:{line}: (file): control character {code} is not allowed in YAML; {hint}"
        )
    try:
        _check_shape(text, path)
        loader = _SafeLoader(text)
        try:
            node = loader.get_single_node()
            if node is None:
                raise SpecError(f"{path}:1: (file): the file is empty; expected a mapping")
            lines: dict[Loc, int] = {}
            starts: dict[Loc, int] = {}
            problems: list[str] = []
            _record_lines(node, (), lines, starts, set(), path, problems)
            if problems:
                raise SpecError(*problems)
            data = loader.construct_document(node)
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        # An error "at the end of the stream" points past the last line.
        line = min(mark.line + 1, text.count("\n") or 1) if mark else 1
        hint = _yaml_hint(exc.problem or "", text, mark)
        raise SpecError(f"{path}:{line}: (file): invalid YAML: {exc.problem}{hint}") from None
    except yaml.YAMLError as exc:
        problem = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise SpecError(f"{path}:1: (file): invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        kind = type(data).__name__
        raise SpecError(f"{path}:1: (file): expected a mapping at the top, found {kind}")
    return YamlDoc(path=path, data=data, lines=lines, text_starts=starts)


# What the YAML parser's words usually mean, for someone who never read its source.
_YAML_HINTS = (
    ("expected '-' indicator", " (check the indentation: items of one list line up)"),
    ("expected key", " (check the indentation: keys of one mapping line up)"),
    ("expected <block end>", " (check the indentation: keys of one mapping line up)"),
    (
        "mapping values are not allowed",
        " (quote a value that holds ': ', or check the indentation)",
    ),
    ("end of stream", " (a quote left open?)"),
)


def _yaml_hint(problem: str, text: str, mark: yaml.Mark | None) -> str:
    lines = text.splitlines()
    if mark is not None and mark.line < len(lines) and lines[mark.line][mark.column :][:1] == "\t":
        return " (a tab: YAML takes spaces, not tabs)"
    return next((hint for said, hint in _YAML_HINTS if said in problem), "")


def _check_shape(text: str, path: Path) -> None:
    """Refuse nesting past ``MAX_DEPTH`` and more than ``MAX_NODES`` values, before composing.

    The events come from a parser that does not recurse, so this is safe on any
    input; the composer that builds the tree does recurse, once per level.
    """
    depth = nodes = 0
    loader = _SafeLoader(text)
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    line = event.start_mark.line + 1 if event.start_mark else 1
                    raise SpecError(
                        f"{path}:{line}: (file): nested deeper than {MAX_DEPTH} levels (the limit)"
                    )
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            if isinstance(event, yaml.NodeEvent):
                nodes += 1
                if nodes > MAX_NODES:
                    line = event.start_mark.line + 1 if event.start_mark else 1
                    raise SpecError(
                        f"{path}:{line}: (file): more than {MAX_NODES:,} keys, values and"
                        " list items (the limit for one file)"
                    )
    finally:
        loader.dispose()


def _record_lines(
    node: yaml.Node,
    loc: Loc,
    lines: dict[Loc, int],
    starts: dict[Loc, int],
    seen: set[int],
    path: Path,
    problems: list[str],
) -> None:
    # An alias is the same node object reached twice. Refusing them keeps a
    # 1 MiB file from expanding into a billion-laughs document.
    if id(node) in seen:
        line = lines.get(loc, node.start_mark.line + 1)
        raise SpecError(
            f"{path}:{line}: {format_loc(loc)}: YAML anchors and aliases are not allowed"
        )
    seen.add(id(node))
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        first_at: dict[tuple[str, str], int] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else str(key_node)
            line = key_node.start_mark.line + 1
            if isinstance(key_node, yaml.ScalarNode):
                # Keys are the same when they load as the same value: `1` and "1" differ.
                same = (key_node.tag, key_node.value)
                if same in first_at:
                    problems.append(
                        f"{path}:{line}: {format_loc((*loc, key))}: duplicate key"
                        f" '{key}' (first at line {first_at[same]})"
                    )
                    continue
                first_at[same] = line
            lines[(*loc, key)] = line
            if isinstance(value_node, yaml.ScalarNode) and value_node.style == "|":
                starts[(*loc, key)] = value_node.start_mark.line + 2
            _record_lines(value_node, (*loc, key), lines, starts, seen, path, problems)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _record_lines(item, (*loc, index), lines, starts, seen, path, problems)


def validate(model: type[M], doc: YamlDoc, *, data: Any = None) -> M:
    """``model.model_validate`` with every error turned into a ``FILE:LINE`` problem."""
    try:
        return model.model_validate(doc.data if data is None else data)
    except ValidationError as exc:
        source = doc.data if data is None else data
        raise SpecError(*(_problem(model, doc, err, source) for err in exc.errors())) from None


def _problem(model: type[BaseModel], doc: YamlDoc, err: Any, data: Any) -> str:
    loc = _clean_loc(err["loc"], data)
    if err["type"] == "extra_forbidden":
        allowed = _fields_at(model, loc[:-1])
        hint = suggest(loc[-1], allowed) if allowed else ""
        return doc.problem(loc, f"unknown key{hint}")
    message = err["msg"]
    if message.startswith("Value error, "):
        message = message[len("Value error, ") :]
    if err["type"] == "string_pattern_mismatch" and err["ctx"]["pattern"] in _PATTERN_WORDS:
        message = f"{err['input']!r}: write {_PATTERN_WORDS[err['ctx']['pattern']]}"
    if err["type"] == "literal_error" and isinstance(err.get("input"), str):
        choices = re.findall(r"'((?:[^'\\]|\\.)*)'", err["ctx"]["expected"])
        message += suggest(err["input"], choices)
    return doc.problem(loc, message)


# The patterns of names, in words: what a file's author reads instead of a regex.
_PATTERN_WORDS = {
    r"^[a-z0-9][a-z0-9_-]*$": "lower-case letters, digits, '_' and '-', starting with a"
    " letter or digit",
    r"^[a-z0-9][a-z0-9-]*$": "lower-case letters, digits and '-', starting with a letter or digit",
    r"^[a-z0-9_-]+/.+$": "provider/model, like ollama/llama3.2:1b or openai/gpt-4o-mini",
}


def _clean_loc(loc: Iterable[Any], data: Any) -> Loc:
    """Keep the parts of a pydantic location that exist in the data.

    pydantic puts union member names (``str``, ``ModelEntry``) into locations;
    walking the data drops them without guessing at their spelling.
    """
    loc = tuple(loc)
    out: list[str | int] = []
    for index, part in enumerate(loc):
        if (isinstance(data, dict) and part in data) or (
            isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data)
        ):
            data = data[part]
        elif index < len(loc) - 1:
            continue  # a union member's name, not a key of the file
        out.append(part)
    return tuple(out)


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Field names of the pydantic model found by following ``loc`` from ``model``."""
    current: Any = model
    for part in loc:
        current = _unwrap(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            info = current.model_fields.get(str(part))
            if info is None:
                return []
            current = info.annotation
        else:
            args = typing.get_args(current)
            current = args[-1] if args else None
    current = _unwrap(current)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _unwrap(annotation: Any) -> Any:
    """The first pydantic model inside an Optional/Union/list/dict annotation, if any."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(annotation) if _is_model(a)]
        return models[0] if models else annotation
    return annotation


def _is_model(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)
