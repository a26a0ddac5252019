"""``tierflow schema`` describes every field, so editors show what each one means."""

from __future__ import annotations

import json
from typing import Any

import pytest
from conftest import tierflow

KINDS = ("workflow", "agent", "config")


def undescribed(schema: dict[str, Any]) -> list[str]:
    """``OBJECT.FIELD`` for each property of the schema, or of one of its ``$defs``,
    with no description; ``OBJECT`` for such an object that has properties."""
    objects = {"(top)": schema, **schema.get("$defs", {})}
    found = []
    for name, shape in objects.items():
        properties = shape.get("properties", {})
        if properties and not str(shape.get("description", "")).strip():
            found.append(name)
        found += [
            f"{name}.{field}"
            for field, spec in properties.items()
            if not str(spec.get("description", "")).strip()
        ]
    return found


@pytest.fixture(scope="module")
def schemas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    proc = tierflow("schema", cwd=tmp_path_factory.mktemp("schema"))
    assert proc.returncode == 0, proc.stderr
    printed: dict[str, Any] = json.loads(proc.stdout)
    assert set(printed) == set(KINDS)
    return printed


@pytest.mark.parametrize("kind", KINDS)
def test_every_field_has_a_description(schemas: dict[str, Any], kind: str) -> None:
    schema = schemas[kind]
    assert schema["properties"], "the walk below would pass on an empty schema"
    assert undescribed(schema) == []


def test_a_field_without_a_description_is_found() -> None:
    schema = {
        "description": "A file.",
        "properties": {"name": {"type": "string", "description": "Its name."}},
        "$defs": {
            "Part": {
                "description": "A part.",
                "properties": {
                    "size": {"type": "integer", "description": " "},
                    "kind": {"type": "string"},
                },
            },
            "Bare": {"properties": {"x": {"description": "An x."}}},
        },
    }
    assert undescribed(schema) == ["Part.size", "Part.kind", "Bare"]
