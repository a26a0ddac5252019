"""The HTTP API on SQLite and PostgreSQL: the token, runs, spend, and filters as bound parameters."""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from conftest import Project, seed_ledger, tierflow, tiers_for
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from orchestrator.api import create_app, redact_tokens
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
    assert [c["outcome"] for c in seeded["calls"]] == ["ok", "ok", "unavailable", "ok"]


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"workflow": "piar", "inputs": {"text": "a"}}, 400, "did you mean 'pair'?"),
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
    ):
        answer = client.get("/spend", params=params, headers=AUTH)
        assert answer.status_code == 200, answer.text
        assert answer.json() == cli_json(served, "spend", *args), params
    bad = client.get("/spend", params={"by": "colour"}, headers=AUTH)
    assert bad.status_code == 400
    assert "choose one of workflow, step, tier, model, day, version" in bad.json()["detail"]
    assert client.get("/spend", params={"since": "yesterday"}, headers=AUTH).status_code == 400
    assert client.get("/spend", params={"top": "0"}, headers=AUTH).status_code == 422


def test_filters_are_bound_parameters(served: Project, client: TestClient) -> None:
    before = table_counts(served)
    all_runs = client.get("/runs", headers=AUTH).json()
    spend = client.get("/spend", headers=AUTH).json()
    for text in INJECTIONS:
        for field in ("workflow", "status"):
            answer = client.get("/runs", params={field: text}, headers=AUTH)
            assert answer.status_code == 200 and answer.json() == [], (field, text)
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
