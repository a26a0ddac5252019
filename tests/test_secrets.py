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
