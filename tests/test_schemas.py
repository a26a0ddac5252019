"""Output and input schemas never make tierflow open a connection."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import jsonschema
import pytest
import referencing.exceptions

from orchestrator import schemas


class _Counting(BaseHTTPRequestHandler):
    hits: ClassVar[list[str]]

    def do_GET(self) -> None:
        self.hits.append(self.path)
        body = b'{"type": "string"}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def schema_host() -> Iterator[tuple[str, list[str]]]:
    hits: list[str] = []
    handler = type("Handler", (_Counting,), {"hits": hits})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", hits
    finally:
        server.shutdown()
        server.server_close()


def test_a_remote_ref_is_never_fetched_by_the_run_time_validator(
    schema_host: tuple[str, list[str]],
) -> None:
    url, hits = schema_host
    schema = {"$ref": f"{url}/schema.json"}
    with pytest.raises(referencing.exceptions.Unresolvable):
        list(schemas.validator(schema).iter_errors("text"))
    assert hits == []
    # What jsonschema does on its own, and why the registry above matters.
    with pytest.warns(DeprecationWarning, match="remote"):
        assert list(jsonschema.Draft202012Validator(schema).iter_errors("text")) == []
    assert hits == ["/schema.json"]


def test_local_references_resolve_and_outside_ones_are_named() -> None:
    schema = {
        "$defs": {"n": {"type": "integer"}},
        "type": "object",
        "properties": {"a": {"$ref": "#/$defs/n"}, "b": {"$ref": "other.json"}},
    }
    assert schemas.outside_references(schema) == [
        (
            ("properties", "b"),
            "$ref 'other.json' is not inside the schema; refer to '#/$defs/NAME' instead",
        )
    ]
    del schema["properties"]["b"]  # type: ignore[attr-defined]
    assert schemas.outside_references(schema) == []
    assert [e.message for e in schemas.validator(schema).iter_errors({"a": "x"})] == [
        "'x' is not of type 'integer'"
    ]
    assert schemas.outside_references({"$ref": "#/$defs/missing"}) == [
        ((), "$ref '#/$defs/missing' points at nothing in the schema")
    ]
