"""JSON Schemas written in workflow files: checked at load, and used with no network.

jsonschema resolves a ``$ref`` it does not hold by fetching its URL, while it
checks each answer, with no timeout. Here a ``$ref`` may only point inside the
schema that holds it (``#/$defs/x``, ``#anchor``): anything else is refused at
load, and the validators used at run time have a registry that cannot
retrieve anything, so no schema can make tierflow open a connection.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from referencing.jsonschema import DRAFT202012

Loc = tuple[str | int, ...]

_REFERENCE_KEYS = ("$ref", "$dynamicRef")
# A registry with no `retrieve`: an unknown URI is an error, never a fetch.
_OFFLINE: referencing.Registry[Any] = referencing.Registry()


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ``ValueError`` unless ``schema`` is a valid 2020-12 JSON Schema."""
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"not a valid JSON schema: {exc.message}") from None


def outside_references(schema: dict[str, Any]) -> list[tuple[Loc, str]]:
    """Each reference that does not point inside ``schema``: (where in it, what is wrong)."""
    found = list(_references(schema, ()))
    problems = [
        (loc, f"$ref '{ref}' is not inside the schema; refer to '#/$defs/NAME' instead")
        for loc, ref in found
        if not ref.startswith("#")
    ]
    if problems or not found or _nested_ids(schema):
        return problems  # a nested $id moves the base of the refs below it: not checked here
    resolver = _OFFLINE.resolver_with_root(DRAFT202012.create_resource(schema))
    for loc, ref in found:
        try:
            resolver.lookup(ref)
        except referencing.exceptions.Unresolvable:
            problems.append((loc, f"$ref '{ref}' points at nothing in the schema"))
    return problems


def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    """A validator for ``schema`` that resolves references only inside it (kept for reuse)."""
    try:
        key = json.dumps(schema, sort_keys=True, default=repr)
    except (TypeError, ValueError, RecursionError):  # keys YAML made of mixed types
        return jsonschema.Draft202012Validator(schema, registry=_OFFLINE)
    found = _VALIDATORS.get(key)
    if found is None:
        if len(_VALIDATORS) >= _KEPT:
            _VALIDATORS.clear()
        found = _VALIDATORS[key] = jsonschema.Draft202012Validator(schema, registry=_OFFLINE)
    return found


_KEPT = 256
_VALIDATORS: dict[str, jsonschema.Draft202012Validator] = {}


def _references(node: Any, loc: Loc) -> Iterator[tuple[Loc, str]]:
    """Every reference in ``node``, as (where, target); walked without recursion."""
    stack = [(node, loc)]
    while stack:
        current, where = stack.pop()
        if isinstance(current, dict):
            for key, value in current.items():
                if key in _REFERENCE_KEYS and isinstance(value, str):
                    yield where, value
                else:
                    stack.append((value, (*where, key)))
        elif isinstance(current, list):
            stack.extend((item, (*where, index)) for index, item in enumerate(current))


def _nested_ids(schema: dict[str, Any]) -> bool:
    stack: list[Any] = [value for key, value in schema.items() if key != "$id"]
    while stack:
        current = stack.pop()
        if isinstance(current, dict):
            if "$id" in current:
                return True
            stack.extend(current.values())
        elif isinstance(current, list):
            stack.extend(current)
    return False
