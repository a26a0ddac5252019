"""The tierflow command as a user runs it: a subprocess, exit codes, and no tracebacks."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import socket
import subprocess
import sys
import threading
from decimal import Decimal
from pathlib import Path
from typing import Any

from conftest import Project, tierflow

from orchestrator.store.database import head_revision
from orchestrator.testing import OllamaServer, OpenAIServer, Reply


def cli_show(project: Project) -> Any:
    """``tierflow show --json`` of the project's newest run."""
    [latest, *_] = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)
    return json.loads(tierflow("show", latest["id"], "--json", cwd=project.root).stdout)


def typed_project(project: Project) -> None:
    project.workflow(
        {
            "name": "pair",
            "inputs": {"text": {"type": "string"}, "count": {"type": "integer", "default": 1}},
            "steps": [
                {
                    "id": "draft",
                    "agent": "helper",
                    "tier": "light",
                    "prompt": "{{ inputs.text }} x{{ inputs.count }}",
                },
                {
                    "id": "polish",
                    "agent": "helper",
                    "tier": "frontier",
                    "needs": ["draft"],
                    "prompt": "{{ steps.draft.output }}",
                },
            ],
        }
    )


def test_run_show_runs_and_spend(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    typed_project(project)
    ollama.reply(Reply(status=400, text="boom"), "drafted")
    frontier.reply(Reply(text="polished", prompt_tokens=1000, completion_tokens=100))
    proc = tierflow("run", "pair", "-i", "text=hello", "-i", "count=3", "--json", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    # The light model errored once, the draft escalated to the frontier, polish ran there.
    assert result["status"] == "succeeded", proc.stderr
    assert ollama.chat_requests()[0]["messages"][-1]["content"] == "hello x3"
    run_id = result["run_id"]

    shown = tierflow("show", run_id[:8], cwd=project.root)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0].startswith("succeeded")
    for text in ("draft", "polish", "error", "boom", "escalated"):
        assert text in shown.stdout
    detail = json.loads(tierflow("show", run_id, "--json", cwd=project.root).stdout)
    assert [c["outcome"] for c in detail["calls"]] == ["error", "ok", "ok"]

    listed = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)
    assert [r["id"] for r in listed] == [run_id]

    spent = json.loads(
        tierflow("spend", "--by", "model", "--format", "json", cwd=project.root).stdout
    )
    models = {g["model"]: g for g in spent["groups"]}
    # Money is a plain decimal, never an exponent: $0 reads 0, not 0E-12.
    amounts = [v for g in [*spent["groups"], spent["total"]] for k, v in g.items() if "usd" in k]
    assert "0" in amounts and all(re.fullmatch(r"-?\d+(\.\d+)?", v) for v in amounts)
    assert models["openai/gpt-4o-mini"]["calls"] == 2
    assert Decimal(spent["total"]["cost_usd"]) == sum(
        Decimal(g["cost_usd"]) for g in spent["groups"]
    )
    table = tierflow("spend", "--by", "tier", cwd=project.root)
    assert table.returncode == 0 and "frontier" in table.stdout and "total" in table.stdout
    rows = list(
        csv.DictReader(
            io.StringIO(
                tierflow(
                    "spend", "--by", "day", "--since", "7d", "--format", "csv", cwd=project.root
                ).stdout
            )
        )
    )
    assert len(rows) == 1 and Decimal(rows[0]["cost_usd"]) == Decimal(spent["total"]["cost_usd"])
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", rows[0][k]) for k in rows[0] if "usd" in k)


def test_failed_run_exits_1_and_keeps_its_ledger(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    typed_project(project)
    ollama.reply(Reply(status=400, text="down"))
    frontier.default = Reply(status=400, text="also down")
    proc = tierflow("run", "pair", "-i", "text=x", cwd=project.root)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert "no tier gave a valid answer" in proc.stdout
    [run] = json.loads(tierflow("runs", "--json", "--status", "failed", cwd=project.root).stdout)
    detail = json.loads(tierflow("show", run["id"], "--json", cwd=project.root).stdout)
    assert [c["outcome"] for c in detail["calls"]] == ["error", "error"]
    # The table cuts the long error at 60 characters and says it did.
    table = tierflow("runs", cwd=project.root, env={**os.environ, "COLUMNS": "200"}).stdout
    assert f"{run['error'][:59].split()[-1]}…" in table, table  # its cell may wrap


def test_answers_and_errors_print_as_they_are_never_as_markup(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    typed_project(project)
    answer = "[/] closes nothing; [bold]stays[/bold] as typed"
    ollama.reply(Reply(status=400, text="bad [/red] request"), "[red]draft[/]")
    frontier.reply(Reply(text=answer))
    proc = tierflow("run", "pair", "-i", "text=x", cwd=project.root)
    assert proc.returncode == 0, proc.stderr
    assert answer in proc.stdout
    assert "bad [/red] request" in proc.stdout
    [run] = json.loads(tierflow("runs", "--json", cwd=project.root).stdout)
    shown = tierflow("show", run["id"], cwd=project.root)
    assert shown.returncode == 0 and "bad [/red] request" in shown.stdout


def test_bad_input_exits_2_with_one_message(project: Project, ollama: OllamaServer) -> None:
    typed_project(project)
    cases = [
        (["run", "pair"], "input 'text': required (string); pass -i text=..."),
        (
            ["run", "pair", "-i", "text=a", "-i", "count=many"],
            "not a valid integer; integer inputs take JSON, e.g. -i 'count=3'",
        ),
        (["run", "pair", "-i", "nonsense"], "expected key=value"),
        (["run", "piar", "-i", "text=a"], "did you mean 'pair'?"),
        (["show", "feedbeef"], "no run 'feedbeef'"),
        (["spend", "--by", "color"], "choose one of workflow, step, tier, model, day"),
        (["spend", "--since", "last tuesday"], "expected YYYY-MM-DD"),
        (["spend", "--since", "999999999d"], "within the years 1 to 9999"),
        (["spend", "--nope"], "No such option: --nope"),
        (["runs", "--limit", "many"], "Invalid value for '--limit'"),
        (["runs", "--status", "done"], "status 'done': choose one of queued, running, waiting"),
        (["run", "pair", "--config", "missing.yaml"], "missing.yaml:0: (file): cannot read"),
    ]
    for args, message in cases:
        proc = tierflow(*args, cwd=project.root)
        assert proc.returncode == 2, (args, proc.stderr)
        assert message in proc.stderr, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
    assert ollama.requests == []


def test_broken_yaml_in_a_run_names_file_and_line(project: Project) -> None:
    (project.root / "workflows" / "broken.yaml").write_text(
        "name: broken\nsteps:\n  - id: a\n    agent: [helper\n"
    )
    proc = tierflow("run", "broken", cwd=project.root)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "workflows/broken.yaml:4: (file): invalid YAML: did not find expected ',' or ']'"
    )
    assert "Traceback" not in proc.stderr


def test_help_does_not_import_heavy_modules() -> None:
    code = (
        "import sys\nfrom orchestrator.cli import app\n"
        "try:\n    app(['--help'], standalone_mode=False)\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('litellm', 'langgraph', 'sqlalchemy', 'llama_cpp', 'ollama', 'openai', 'fastapi', 'uvicorn', 'jinja2') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_schema_command_prints_json_schema(tmp_path: Path) -> None:
    proc = tierflow("schema", "workflow", cwd=tmp_path)
    assert proc.returncode == 0
    assert json.loads(proc.stdout)["title"] == "Workflow"


def test_db_upgrade_creates_the_schema(tmp_path: Path) -> None:
    (tmp_path / "tierflow.yaml").write_text(
        "database: sqlite:///fresh.db\ntiers: {light: {models: [llamacpp/smollm2-135m], local: true}}\n"
    )
    proc = tierflow("db", "upgrade", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert f"at revision {head_revision()}" in proc.stdout
    assert (tmp_path / "fresh.db").exists()


def test_cancel_command(project: Project, ollama: OllamaServer) -> None:
    typed_project(project)
    settings_path = str(project.config)
    import orchestrator

    ollama.reply("a")
    proc = tierflow("run", "pair", "-i", "text=x", "--json", cwd=project.root)
    finished = json.loads(proc.stdout)["run_id"]
    done = tierflow("cancel", finished[:8], cwd=project.root)  # a prefix will do
    assert done.returncode == 2 and f"run {finished} already" in done.stderr
    missing = tierflow("cancel", "nope", cwd=project.root)
    assert missing.returncode == 2 and "no run 'nope'" in missing.stderr
    assert orchestrator.get_run(finished, config=settings_path) is not None


def test_an_unreachable_model_is_said_once_per_run(tmp_path: Path, ollama: OllamaServer) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        light = [
            {"model": "ollama/llama3.2:1b", "api_base": down, "timeout_s": 5},
            {"model": "ollama/llama3.2:1b", "api_base": ollama.url, "timeout_s": 5},
        ]
        project = Project(tmp_path / "p", {"tiers": {"light": {"local": True, "models": light}}})
        steps = [{"id": "one", "agent": "helper", "tier": "light"}]
        steps += [{"id": f"s{n}", "agent": "helper", "tier": "light", "needs": [f"s{n - 1}" if n > 2 else "one"]} for n in (2, 3)]  # fmt: skip
        project.workflow({"name": "three", "steps": steps})
        ollama.reply("a", "b", "c")
        proc = tierflow("run", "three", cwd=project.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    said = [line for line in proc.stdout.splitlines() if "skipped ollama/" in line]
    assert len(said) == 1, proc.stdout
    assert "unreachable" in said[0]
    assert [line.split()[1] for line in proc.stdout.splitlines() if line.startswith("✓")] == [
        "one",
        "s2",
        "s3",
    ]
    # The ledger still records every skip.
    outcomes = [c["outcome"] for c in cli_show(project)["calls"]]
    assert outcomes.count("unavailable") == 3


def test_show_follow_prints_steps_as_they_end_then_the_run(
    project: Project, ollama: OllamaServer
) -> None:
    from conftest import kill, start_run, wait_for, write_two_steps

    write_two_steps(project)
    release = threading.Event()

    def answer(body: dict[str, Any]) -> Reply:
        prompt = body["messages"][-1]["content"]
        if prompt == "second":
            release.wait(timeout=60)  # the second step ends only when the test says so
        return Reply(text=f"{prompt} done")

    ollama.responder = answer
    running = start_run(project, "two")
    follower = None
    try:
        wait_for(lambda: any(s == ("first", 1, "settled") for s in project.ledger_states()))
        store = project.store()
        [run] = store.runs()
        store.engine.dispose()
        follower = subprocess.Popen(
            [sys.executable, "-m", "orchestrator", "show", run["id"][:8], "--follow"],
            cwd=project.root,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follower.stdout is not None
        lines = iter(follower.stdout.readline, "")
        assert next(lines).startswith(f"following two  run {run['id']}")
        assert next(lines).startswith("first  succeeded")  # while second still runs
        assert follower.poll() is None
        release.set()
        rest, said = follower.communicate(timeout=60)
        assert follower.returncode == 0, said
    finally:
        release.set()
        kill(running)
        if follower is not None and follower.poll() is None:
            follower.kill()
            follower.communicate()
    assert "second  succeeded" in rest
    assert f"succeeded  two  run {run['id']}" in rest
    assert "spent $0 · saved" in rest and '"second": "second done"' in rest


def test_show_says_when_a_queued_run_waits_with_no_worker(project: Project) -> None:
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from orchestrator.store.tables import runs

    typed_project(project)
    queued = tierflow("enqueue", "pair", "-i", "text=x", cwd=project.root)
    assert queued.returncode == 0, queued.stderr
    run_id = queued.stdout.split()[-1]
    fresh = tierflow("show", run_id, cwd=project.root)
    assert fresh.returncode == 0 and "no worker has taken it" not in fresh.stdout
    store = project.store()
    try:  # it has waited 4 lease periods (60 s each, the default)
        with store.engine.begin() as connection:
            long_ago = datetime.now(UTC) - timedelta(seconds=240)
            connection.execute(update(runs).where(runs.c.id == run_id).values(enqueued_at=long_ago))
    finally:
        store.engine.dispose()
    stale = tierflow("show", run_id, cwd=project.root)
    assert re.search(r"queued for 2[45]\ds and no worker has taken it", stale.stdout)
    assert "consuming queue tierflow on the embedded broker" in stale.stdout


def test_a_skipped_step_says_its_when_was_false(project: Project, ollama: OllamaServer) -> None:
    steps = [
        {"id": "asked", "agent": "helper", "tier": "light"},
        {"id": "left", "agent": "helper", "tier": "light", "when": "inputs.text == 'never'"},
    ]
    project.workflow({"name": "maybe", "steps": steps})
    ollama.reply("yes")
    proc = tierflow("run", "maybe", cwd=project.root)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "– left  skipped: its when was false" in proc.stdout
    assert len(ollama.chat_requests()) == 1


def test_a_failed_steps_reasons_are_shown_under_it(tmp_path: Path, ollama: OllamaServer) -> None:
    """Each failed step shows why: its attempts' lines, and its own error in full
    where an attempt was said under an earlier step (an unreachable model)."""
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        down = f"http://127.0.0.1:{closed.getsockname()[1]}"
        light = [{"model": "ollama/llama3.2:1b", "api_base": down, "timeout_s": 5}]
        project = Project(tmp_path / "p", {"tiers": {"light": {"local": True, "models": light}}})
        steps = [{"id": i, "agent": "helper", "tier": "light"} for i in ("one", "two")]
        project.workflow({"name": "both", "steps": steps})
        proc = tierflow("run", "both", cwd=project.root)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    # The unreachable model is said once, under the step that failed first.
    first, second = (" ".join(block.split()) for block in proc.stdout.split("✗ ")[1:3])
    assert "skipped ollama/llama3.2:1b: Ollama unreachable" in first
    assert "skipped" not in second
    # The step that failed second says why in its own error, in full.
    assert "no tier gave a valid answer" in second
    assert "unavailable: Ollama unreachable" in second, proc.stdout
