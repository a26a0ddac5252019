"""The HTTP API on SQLite and PostgreSQL: the token, runs, spend, and filters as bound parameters."""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import logging
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Project, seed_ledger, tierflow, tiers_for
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select
from test_dashboard import serving

from orchestrator import api
from orchestrator.api import COOKIE, create_app, redact_tokens
from orchestrator.settings import load_settings
from orchestrator.store import open_engine
from orchestrator.store.tables import model_calls, runs, step_runs
from orchestrator.testing import OllamaServer, OpenAIServer

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INJECTIONS = ["' OR 1=1 --", "x'; DROP TABLE runs; --", '" OR ""="', "%"]


@pytest.fixture
def served(
    tmp_path: Path, database_url: str, ollama: OllamaServer, frontier: OpenAIServer
) -> Project:
    """A project whose store holds the seeded ledger, and a workflow ``pair`` to queue."""
    open_engine(database_url, migrate=True).dispose()
    project = Project(
        tmp_path / "p", {"tiers": tiers_for(ollama, frontier), "database": database_url}
    )
    project.workflow(
        {
            "name": "pair",
            "inputs": {"text": {"type": "string"}, "count": {"type": "integer", "default": 1}},
            "steps": [{"id": "draft", "agent": "helper", "tier": "light"}],
        }
    )
    store = project.store()
    try:
        seed_ledger(store)
    finally:
        store.engine.dispose()
    return project


@pytest.fixture
def client(served: Project) -> Iterator[TestClient]:
    with TestClient(create_app(load_settings(served.config), token=TOKEN)) as client:
        yield client


def cli_json(project: Project, *args: str) -> Any:
    proc = tierflow(*args, "--json", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def table_counts(project: Project) -> tuple[int, int, int]:
    store = project.store()
    try:
        with store.engine.connect() as connection:
            return tuple(  # type: ignore[return-value]
                connection.execute(select(func.count()).select_from(table)).scalar_one()
                for table in (runs, step_runs, model_calls)
            )
    finally:
        store.engine.dispose()


def test_every_route_needs_the_token(client: TestClient) -> None:
    for path in ("/runs", "/runs/run000", "/spend", "/openapi.json"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = client.get(path, headers=headers)
            assert answer.status_code == 401, (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"
            assert TOKEN not in answer.text
        assert client.get(path, headers=AUTH).status_code == 200, path
    assert client.post("/runs", json={"workflow": "pair"}).status_code == 401
    assert client.get("/").status_code == 401
    assert client.get("/docs").status_code == 404  # Swagger UI would load a CDN script


def test_openapi_describes_the_routes_and_the_bearer_scheme(client: TestClient) -> None:
    spec = client.get("/openapi.json", headers=AUTH).json()
    assert {"/runs", "/runs/{run_id}", "/spend"} <= set(spec["paths"])
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert "/" not in spec["paths"]


def test_runs_and_a_run_are_what_the_cli_prints(served: Project, client: TestClient) -> None:
    created = client.post(
        "/runs", json={"workflow": "pair", "inputs": {"text": "hi"}}, headers=AUTH
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    shown = client.get(f"/runs/{run_id}", headers=AUTH).json()
    assert shown["status"] == "queued" and shown["inputs"] == {"text": "hi", "count": 1}
    assert shown == cli_json(served, "show", run_id)
    assert client.get("/runs", headers=AUTH).json() == cli_json(served, "runs")
    filtered = client.get(
        "/runs", params={"workflow": "triage", "status": "succeeded", "limit": 2}, headers=AUTH
    ).json()
    assert [r["workflow"] for r in filtered] == ["triage", "triage"]
    assert filtered == cli_json(served, "runs", "--workflow", "triage", "--limit", "2")
    seeded = client.get("/runs/run002", headers=AUTH).json()  # a unique prefix, as in show
    assert [c["outcome"] for c in seeded["calls"]] == ["ok", "invalid_output", "unavailable", "ok"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"workflow": "piar", "inputs": {"text": "a"}}, 404, "did you mean 'pair'?"),
        ({"workflow": "pair"}, 400, "input 'text': required"),
        ({"workflow": "pair", "inputs": {"text": "a", "count": "many"}}, 400, "count"),
        ({"workflow": "../../etc/passwd"}, 422, "string_pattern_mismatch"),
        ({"workflow": "pair", "extra": 1}, 422, "extra_forbidden"),
        ({"inputs": {}}, 422, "missing"),
    ],
)
def test_bad_run_requests_are_refused_before_anything_is_written(
    served: Project, client: TestClient, body: dict[str, Any], status: int, message: str
) -> None:
    before = table_counts(served)
    answer = client.post("/runs", json=body, headers=AUTH)
    assert answer.status_code == status, answer.text
    assert message in answer.text
    assert table_counts(served) == before


def test_spend_is_what_the_cli_prints(served: Project, client: TestClient) -> None:
    for params, args in (
        ({}, []),
        ({"by": "version"}, ["--by", "version"]),
        ({"by": "day,tier", "since": "30d"}, ["--by", "day,tier", "--since", "30d"]),
        ({"top": "2"}, ["--top", "2"]),
        ({"tag": "team=growth", "by": "tag:team"}, ["--tag", "team=growth", "--by", "tag:team"]),
    ):
        answer = client.get("/spend", params=params, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json() == cli_json(served, "spend", *args), params
    bad = client.get("/spend", params={"by": "colour"}, headers=AUTH)
    assert bad.status_code == 400
    assert "choose one of workflow, step, tier, model, day, version" in bad.json()["detail"]
    assert client.get("/spend", params={"since": "yesterday"}, headers=AUTH).status_code == 400
    bad = client.get("/spend", params={"tag": "team"}, headers=AUTH)
    assert bad.status_code == 400
    assert bad.json()["detail"] == "tag 'team': expected key=value, like team=growth"
    assert client.get("/spend", params={"top": "0"}, headers=AUTH).status_code == 422


def test_filters_are_bound_parameters(served: Project, client: TestClient) -> None:
    before = table_counts(served)
    all_runs = client.get("/runs", headers=AUTH).json()
    spend = client.get("/spend", headers=AUTH).json()
    for text in INJECTIONS:
        answer = client.get("/runs", params={"workflow": text}, headers=AUTH)
        assert answer.status_code == 200 and answer.json() == [], text
        answer = client.get("/runs", params={"status": text}, headers=AUTH)
        assert answer.status_code == 400 and "choose one of queued" in answer.text, text
        assert client.get(f"/runs/{quote(text, safe='')}", headers=AUTH).status_code == 404
        for field in ("by", "since", "until"):
            answer = client.get("/spend", params={field: text}, headers=AUTH)
            assert answer.status_code == 400, (field, text)
        posted = client.post("/runs", json={"workflow": text}, headers=AUTH)
        assert posted.status_code == 422
        assert client.get("/", params={"token": text}).status_code == 401
    assert table_counts(served) == before
    assert client.get("/runs", headers=AUTH).json() == all_runs
    assert client.get("/spend", headers=AUTH).json() == spend


def test_the_dashboard_takes_the_token_once_then_a_cookie(client: TestClient) -> None:
    signed_in = client.get("/", params={"token": TOKEN}, follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
    cookie = signed_in.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    page = client.get("/")  # the client kept the cookie
    assert page.status_code == 200 and 'id="chart-spend"' in page.text
    # Names from the ledger are data: escaped, never markup.
    assert "&lt;b&gt;report&lt;/b&gt; &#39;x&#39;" in page.text and "<b>report</b>" not in page.text
    # The cookie opens the dashboard only, never the API.
    assert client.get("/runs").status_code == 401


def test_serve_refuses_to_start_without_a_token(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "TIERFLOW_API_TOKEN"}
    proc = tierflow("serve", "--port", "1", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert "TIERFLOW_API_TOKEN is not set" in proc.stderr and "Traceback" not in proc.stderr


def test_serve_names_an_address_it_cannot_listen_on(tmp_path: Path) -> None:
    env = {**os.environ, "TIERFLOW_API_TOKEN": TOKEN}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = tierflow("serve", "--port", str(port), cwd=tmp_path, env=env)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
    out_of_range = tierflow("serve", "--port", "99999", cwd=tmp_path, env=env)
    assert out_of_range.returncode == 2 and "'--port'" in out_of_range.stderr
    assert "Traceback" not in out_of_range.stderr


def test_the_access_log_never_keeps_a_token() -> None:
    record = logging.LogRecord(
        "uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/?days=7&token={TOKEN}&x=1", "1.1", 303), None,
    )  # fmt: skip
    assert redact_tokens(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /?days=7&token=***&x=1 HTTP/1.1" 303'


MiB = 1024 * 1024
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cache-control": "no-store",
}


@pytest.fixture
def live(served: Project) -> Iterator[int]:
    """A real `tierflow serve` over the seeded project: its port on 127.0.0.1."""
    with serving(served.root, token=TOKEN) as server:
        yield server.port
    assert "Traceback" not in server.log, server.log


def raw_post(port: int, headers: str, chunks: Iterable[bytes]) -> tuple[int, dict[str, str], Any]:
    """POST /runs on a socket of our own: ``headers`` as given, then ``chunks``, never
    the end of the body. The server must answer without waiting for the rest; the
    timeout only keeps a server that waits from hanging the suite."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as connection:
        head = f"POST /runs HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        connection.sendall(f"{head}Content-Type: application/json\r\n{headers}\r\n".encode())
        try:
            for chunk in chunks:
                connection.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # it answered and closed before taking all we meant to send
        answer = http.client.HTTPResponse(connection)
        answer.begin()
        body = json.loads(answer.read())
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, body


def test_a_body_over_the_limit_is_refused_before_it_is_read(served: Project, live: int) -> None:
    before = table_counts(served)
    # A declared length over 1 MiB: refused on the headers, before any body arrives.
    declared = raw_post(live, f"Content-Length: {10 * MiB}\r\n", [b'{"workflow": "pair", '])
    assert declared[0] == 413
    # Chunked, with no length declared: refused once the bytes read pass 1 MiB.
    piece = b"x" * 65536
    chunk = b"%x\r\n%s\r\n" % (len(piece), piece)
    chunked = raw_post(live, "Transfer-Encoding: chunked\r\n", [chunk] * 17)
    assert chunked[0] == 413
    for _, headers, body in (declared, chunked):
        assert headers["content-type"] == "application/json"
        assert headers["x-content-type-options"] == "nosniff"
        assert body == {"detail": "request body over the 1 MiB limit"}
    assert table_counts(served) == before


def test_large_bodies_and_inputs_are_refused_with_the_limit(
    served: Project, client: TestClient
) -> None:
    before = table_counts(served)
    huge = client.post(
        "/runs", json={"workflow": "pair", "inputs": {"text": "x" * (10 * MiB)}}, headers=AUTH
    )
    assert huge.status_code == 413
    assert "request body" in huge.json()["detail"] and "1 MiB" in huge.json()["detail"]
    # Under the body limit, over the inputs limit (256 KiB, encoded as JSON).
    big = client.post(
        "/runs", json={"workflow": "pair", "inputs": {"text": "x" * (256 * 1024)}}, headers=AUTH
    )
    assert big.status_code == 413
    assert "inputs" in big.json()["detail"] and "256 KiB" in big.json()["detail"]
    deep: Any = "x"
    for _ in range(40):
        deep = [deep]
    nested = client.post(
        "/runs", json={"workflow": "pair", "inputs": {"text": "a", "count": deep}}, headers=AUTH
    )
    assert nested.status_code == 422 and "nested deeper than 32" in nested.text
    assert table_counts(served) == before


def test_the_run_list_leaves_large_values_out(client: TestClient) -> None:
    text = "é" * 100_000  # 200 KB of UTF-8: allowed, and kept whole by GET /runs/ID
    created = client.post(
        "/runs", json={"workflow": "pair", "inputs": {"text": text}}, headers=AUTH
    )
    assert created.status_code == 201, created.text
    run_id = created.json()["run_id"]
    listed = client.get("/runs", headers=AUTH)
    assert len(listed.content) < 64 * 1024
    [row] = [row for row in listed.json() if row["id"] == run_id]
    assert row["inputs"] is None
    stored = json.dumps({"text": text, "count": 1}, ensure_ascii=False, separators=(",", ":"))
    assert row["omitted"] == {"inputs": len(stored.encode())}
    small = [row for row in listed.json() if row["id"] != run_id]
    assert small and all("omitted" not in row for row in small)
    assert client.get(f"/runs/{run_id}", headers=AUTH).json()["inputs"]["text"] == text


@pytest.mark.parametrize(
    "body",
    [
        '{"workflow": "pair", "inputs": {"text": "a\\ud800b"}}',
        '{"workflow": "pair", "inputs": {"text": "a", "\\udfff": 1}}',
        '{"workflow": "pair", "inputs": {"text": ["ok", {"x": "\\udc00"}]}}',
        '{"workflow": "pair", "inputs": "\\ud800"}',
        '{"workflow": "\\ud800"}',
        '{"workflow": "pair", "\\ud800": 1}',
    ],
)
def test_strings_that_are_not_unicode_are_refused(
    served: Project, client: TestClient, body: str
) -> None:
    before = table_counts(served)
    answer = client.post(
        "/runs", content=body, headers={**AUTH, "Content-Type": "application/json"}
    )
    assert answer.status_code == 422, answer.text
    assert "not valid Unicode (a lone surrogate" in answer.text
    assert table_counts(served) == before


def test_numbers_json_cannot_hold_are_refused(served: Project, client: TestClient) -> None:
    served.workflow(
        {
            "name": "ratio",
            "inputs": {"r": {"type": "number"}},
            "steps": [{"id": "draft", "agent": "helper", "tier": "light", "prompt": "{{ inputs.r }}"}],
        }
    )  # fmt: skip
    before = table_counts(served)
    for number in ("NaN", "Infinity", "-Infinity", "1e400"):
        answer = client.post(
            "/runs",
            content=f'{{"workflow": "ratio", "inputs": {{"r": {number}}}}}',
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert answer.status_code == 422, (number, answer.text)
        assert "not a finite number" in answer.text
    assert table_counts(served) == before
    fine = client.post("/runs", json={"workflow": "ratio", "inputs": {"r": 0.5}}, headers=AUTH)
    assert fine.status_code == 201, fine.text


def test_out_of_range_filters_are_400_naming_the_parameter(client: TestClient) -> None:
    for params, name in (
        ({"since": "999999999d"}, "since"),
        ({"until": "999999999d"}, "until"),
        ({"since": "9" * 30 + "d"}, "since"),
        ({"since": "9" * 5000 + "d"}, "since"),  # past int()'s digit limit
        ({"since": "2026-02-30"}, "since"),
        ({"until": "tomorrow"}, "until"),
    ):
        answer = client.get("/spend", params=params, headers=AUTH)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["detail"].startswith(f"{name} "), answer.text


def test_workflow_names_resolve_only_in_the_workflows_folder(
    served: Project, client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    stray = {"name": "notes", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]}
    for name in ("notes", "notes.yaml"):
        (elsewhere / name).write_text(json.dumps(stray))
    monkeypatch.chdir(elsewhere)  # the server's working directory holds ./notes
    before = table_counts(served)
    answer = client.post("/runs", json={"workflow": "notes"}, headers=AUTH)
    assert answer.status_code == 404, answer.text
    assert answer.json()["detail"] == "no workflow 'notes' in workflows/"
    assert str(elsewhere) not in answer.text
    for name in ("/etc/passwd", "../notes", "notes.yaml", "./notes", "NOTES"):
        refused = client.post("/runs", json={"workflow": name}, headers=AUTH)
        assert refused.status_code == 422, (name, refused.text)
    assert table_counts(served) == before
    inside = client.post("/runs", json={"workflow": "pair", "inputs": {"text": "a"}}, headers=AUTH)
    assert inside.status_code == 201, inside.text


def test_every_response_carries_the_security_headers(client: TestClient) -> None:
    answers = [
        client.get("/runs", headers=AUTH),
        client.get("/runs"),  # 401
        client.get("/runs/nope", headers=AUTH),  # 404
        client.get("/docs"),  # 404, no route
        client.get("/spend", params={"since": "x"}, headers=AUTH),  # 400
        client.post("/runs", json={}, headers=AUTH),  # 422
        client.post("/runs", content=b"x" * (MiB + 1), headers=AUTH),  # 413
        client.get("/openapi.json", headers=AUTH),
        client.get("/"),  # the sign-in page, 401
        client.get("/", params={"token": TOKEN}, follow_redirects=False),  # 303
        client.get("/"),  # the dashboard
    ]
    statuses = [answer.status_code for answer in answers]
    assert statuses == [200, 401, 404, 404, 400, 422, 413, 200, 401, 303, 200]
    for answer in answers:
        for name, value in SECURITY_HEADERS.items():
            assert answer.headers.get(name) == value, (answer.request.url, name)
        policy = answer.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        assert "unsafe-inline" not in policy and "script-src" not in policy
    # The policy fits the page: its one <style> is allowed by hash, and it has no
    # script and no style attribute (a hash cannot allow those).
    page = answers[-1]
    styles = re.findall(r"<style>(.*?)</style>", page.text, flags=re.DOTALL)
    assert len(styles) == 1
    digest = base64.b64encode(hashlib.sha256(styles[0].encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in page.headers["content-security-policy"]
    assert "<script" not in page.text and " style=" not in page.text


def cookie_of(answer: Any) -> str:
    return str(answer.cookies[COOKIE])


def test_the_dashboard_cookie_expires_and_changes(served: Project) -> None:
    settings = load_settings(served.config)
    with TestClient(create_app(settings, token=TOKEN)) as first:
        signed_in = first.get("/", params={"token": TOKEN}, follow_redirects=False)
        header = signed_in.headers["set-cookie"]
        assert f"Max-Age={api.COOKIE_MAX_AGE_S}" in header and api.COOKIE_MAX_AGE_S == 8 * 3600
        assert "HttpOnly" in header and "SameSite=strict" in header and "Path=/" in header
        cookie = cookie_of(signed_in)
        assert TOKEN not in cookie
        assert first.get("/").status_code == 200
        again = cookie_of(first.get("/", params={"token": TOKEN}, follow_redirects=False))
        assert again != cookie  # each sign-in is a new cookie
        service = first.app.state.service  # type: ignore[attr-defined]
        old = service.cookie_value(issued_at=time.time() - api.COOKIE_MAX_AGE_S - 1)
        first.cookies.clear()
        first.cookies.set(COOKIE, old)
        assert first.get("/").status_code == 401  # expired, whatever the browser kept
        first.cookies.set(COOKIE, cookie)
        assert first.get("/").status_code == 200
    # A server started again, with the same token or a new one, takes no old cookie.
    for token in (TOKEN, "another-token-for-tests"):
        with TestClient(create_app(settings, token=token)) as restarted:
            restarted.cookies.set(COOKIE, cookie)
            assert restarted.get("/").status_code == 401, token


# Lone surrogates and NUL often, not just as often as any other code point.
TEXT = st.lists(
    st.sampled_from(["\ud800", "\udfff", "\x00", "a", "é"]) | st.characters(), max_size=12
).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=12,
)
RUN_BODIES = st.fixed_dictionaries(
    {"workflow": st.sampled_from(["pair", "piar", "notes", "../pair", ""]) | TEXT | JSON_VALUES},
    optional={
        "inputs": st.fixed_dictionaries({}, optional={"text": JSON_VALUES, "count": JSON_VALUES})
        | JSON_VALUES,
        "extra": JSON_VALUES,
    },
)

# Bodies that get past the request model, so the inputs reach validation and the store.
NEAR_VALID = st.builds(
    lambda text, more: {"workflow": "pair", "inputs": {"text": text, **more}},
    TEXT,
    st.fixed_dictionaries({}, optional={"count": st.integers() | JSON_VALUES}),
)


@settings(
    max_examples=150,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(body=NEAR_VALID | RUN_BODIES | JSON_VALUES | st.binary(max_size=64))
def test_random_bodies_never_give_a_500(client: TestClient, body: Any) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    answer = client.post(
        "/runs", content=content, headers={**AUTH, "Content-Type": "application/json"}
    )
    event(f"status {answer.status_code}")  # --hypothesis-show-statistics: which paths ran
    assert answer.status_code in (201, 400, 404, 413, 422), (body, answer.text)
    assert answer.headers["content-type"] == "application/json"
    assert "detail" in answer.json() or answer.status_code == 201


def test_feedback_is_recorded_over_http(served: Project, client: TestClient) -> None:
    from orchestrator.store.tables import feedback

    run_id = served.run("pair", {"text": "hi"}).run_id
    said = client.post(
        f"/runs/{run_id}/steps/draft/feedback", json={"good": False, "note": "off"}, headers=AUTH
    )
    assert said.status_code == 201, said.text
    assert said.json() == {"run_id": run_id, "step_id": "draft", "good": False}
    store = served.store()
    try:
        with store.engine.connect() as connection:
            rows = connection.execute(
                select(feedback.c.step_id, feedback.c.good, feedback.c.note)
            ).all()
    finally:
        store.engine.dispose()
    assert [tuple(row) for row in rows] == [("draft", False, "off")]
    missing = client.post(f"/runs/{run_id}/steps/nope/feedback", json={"good": True}, headers=AUTH)
    assert missing.status_code == 400 and "has no step 'nope'" in missing.json()["detail"]
    unknown = client.post("/runs/zzz/steps/draft/feedback", json={"good": True}, headers=AUTH)
    assert unknown.status_code == 404
    unauthorised = client.post(f"/runs/{run_id}/steps/draft/feedback", json={"good": True})
    assert unauthorised.status_code == 401


def test_metrics_are_the_ledger_as_prometheus_counters(served: Project, client: TestClient) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    assert client.get("/metrics").status_code == 401  # behind the token, as every route
    answer = client.get("/metrics", headers=AUTH)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain; version=")
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    groups = client.get("/spend", params={"by": "workflow,tier,model"}, headers=AUTH).json()
    assert groups["groups"]
    for group in groups["groups"]:
        labels = (("model", group["model"]), ("tier", group["tier_used"] or ""))
        labels = (*labels, ("workflow", group["workflow"]))
        assert samples[("tierflow_calls_total", labels)] == group["calls"]
        assert samples[("tierflow_escalated_calls_total", labels)] == group["escalated_calls"]
        assert samples[("tierflow_call_latency_seconds_count", labels)] == group["calls"]
        prompt = tuple(sorted((*labels, ("direction", "prompt"))))
        assert samples[("tierflow_tokens_total", prompt)] == group["prompt_tokens"]
        cost = samples[("tierflow_cost_usd_total", labels)]
        assert cost == pytest.approx(float(group["cost_usd"]), rel=1e-12)
        reference = samples[("tierflow_reference_cost_usd_total", labels)]
        assert reference == pytest.approx(float(group["reference_cost_usd"]), rel=1e-12)


def test_serve_says_where_runs_queue_and_warns_of_an_ignored_broker(tmp_path: Path) -> None:
    env = {**os.environ, "TIERFLOW_API_TOKEN": TOKEN, "REDIS_URL": "redis://:pw@127.0.0.1:1/0"}
    env.pop("TIERFLOW_BROKER_URL", None)
    with socket.socket() as taken:  # it says so at start, before it listens
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = tierflow("serve", "--port", str(taken.getsockname()[1]), cwd=tmp_path, env=env)
    assert "POST /runs queues to the embedded broker in" in proc.stderr
    assert "warning: using the embedded broker" in proc.stderr and "$REDIS_URL" in proc.stderr
    assert "pw" not in proc.stderr
