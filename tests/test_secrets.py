"""A provider key is sent to its provider and shows up nowhere else."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Project, tiers_for
from fastapi.testclient import TestClient
from sqlalchemy import select

from orchestrator.api import create_app
from orchestrator.settings import load_settings
from orchestrator.store.tables import metadata
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

CANARY = "sk-canary-7f3a9c1e5b2d4f60"
TOKEN = "api-token-for-the-canary-test"


def test_a_provider_key_never_reaches_the_ledger_logs_reports_or_api(
    tmp_path: Path,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("CANARY_API_KEY", CANARY)
    caplog.set_level(logging.DEBUG)
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["models"][0]["api_key_env"] = "CANARY_API_KEY"
    project = Project(tmp_path / "p", {"tiers": tiers})
    project.workflow({"name": "ask", "steps": [{"id": "a", "agent": "helper", "tier": "frontier"}]})
    # A careless provider quotes the key back in its error; the retry answers.
    frontier.reply(
        Reply(text=f"Incorrect API key provided: {CANARY}", status=400),
        Reply(text="fine"),
    )
    failed = project.run("ask")
    done = project.run("ask")
    assert (failed.status, done.status) == ("failed", "succeeded")
    sent = [r["_headers"].get("authorization") for r in frontier.chat_requests()]
    assert sent == [f"Bearer {CANARY}"] * 2  # the key did go to its provider

    seen: list[str] = [failed.error or "", caplog.text]
    store = project.store()
    try:
        with store.engine.connect() as connection:
            for table in metadata.sorted_tables:
                seen.extend(repr(row) for row in connection.execute(select(table)))
    finally:
        store.engine.dispose()
    redacted = next(call["error"] for call in project.calls(failed.run_id) if call["error"])
    assert "[CANARY_API_KEY redacted]" in redacted

    for args in (
        ("show", failed.run_id, "--json"),
        ("show", failed.run_id),
        ("runs", "--json"),
        ("spend", "--json"),
        ("spend", "--by", "model", "--format", "csv"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args, "--config", str(project.config)],
            capture_output=True,
            text=True,
        )
        seen += [proc.stdout, proc.stderr]

    auth = {"Authorization": f"Bearer {TOKEN}"}
    with TestClient(create_app(load_settings(project.config), token=TOKEN)) as client:
        for path in ("/runs", f"/runs/{failed.run_id}", "/spend", "/spend?by=model"):
            response = client.get(path, headers=auth)
            assert response.status_code == 200, path
            seen.append(response.text)
        dashboard = client.get(f"/?token={TOKEN}")  # a browser's first visit
        assert dashboard.status_code == 200
        seen.append(dashboard.text)

    assert all(CANARY not in text for text in seen)
    assert any("redacted" in text for text in seen[2:])  # the error was kept, masked


LLM_AUTH = "tf-llm-auth-5d1c9e7a3b0f42e8a6c1"  # named by api_key_env, unlike any *_KEY pattern


@pytest.mark.parametrize("where", ["short", "at the cut"])
def test_a_key_named_in_api_key_env_is_masked_everywhere_even_at_the_cut(
    tmp_path: Path,
    ollama: OllamaServer,
    frontier: OpenAIServer,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    where: str,
) -> None:
    monkeypatch.setenv("LLM_AUTH", LLM_AUTH)
    caplog.set_level(logging.DEBUG)
    tiers = tiers_for(ollama, frontier)
    tiers["frontier"]["models"][0]["api_key_env"] = "LLM_AUTH"
    project = Project(tmp_path / "p", {"tiers": tiers})
    project.workflow({"name": "ask", "steps": [{"id": "a", "agent": "helper", "tier": "frontier"}]})
    # The provider echoes the key in its error; placed where a 300-character cut
    # of the message would split it.
    padding = "x" * (0 if where == "short" else 270)
    frontier.default = Reply(
        text=f"Invalid credentials {padding}{LLM_AUTH} for this org", status=400
    )
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "ask", "--config", str(project.config)],
        capture_output=True,
        text=True,
    )
    seen = [proc.stdout, proc.stderr]
    failed = project.run("ask")
    assert failed.status == "failed"
    assert frontier.chat_requests()[0]["_headers"]["authorization"] == f"Bearer {LLM_AUTH}"
    seen += [failed.error or "", caplog.text]
    store = project.store()
    try:
        with store.engine.connect() as connection:
            for table in metadata.sorted_tables:
                seen.extend(repr(row) for row in connection.execute(select(table)))
    finally:
        store.engine.dispose()
    for args in (("show", failed.run_id, "--json"), ("show", failed.run_id), ("runs", "--json")):
        shown = subprocess.run(
            [sys.executable, "-m", "orchestrator", *args, "--config", str(project.config)],
            capture_output=True,
            text=True,
        )
        seen += [shown.stdout, shown.stderr]
    # Not the key, nor any 8 characters of it.
    pieces = {LLM_AUTH[i : i + 8] for i in range(len(LLM_AUTH) - 7)}
    assert not [p for p in pieces for text in seen if p in text]
    assert any("[LLM_AUTH redacted]" in text for text in seen)


def test_the_providers_usual_key_variables_are_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.errors import redact

    monkeypatch.setenv("AZURE_API_BASE", "https://secret-tenant.example")  # not a key: kept
    monkeypatch.setenv("SNOWFLAKE_JWT", "eyJhbGciOiJSUzI1NiJ9.tierflow")  # litellm's; no KEY in it
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE12345")
    text = redact(
        "jwt eyJhbGciOiJSUzI1NiJ9.tierflow id AKIAEXAMPLE12345 at https://secret-tenant.example"
    )
    assert "eyJhbGciOiJSUzI1NiJ9" not in text and "AKIAEXAMPLE12345" not in text
    assert "https://secret-tenant.example" in text
