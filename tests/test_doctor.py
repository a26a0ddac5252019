"""tierflow validate over a whole project, and tierflow doctor: can each tier serve?"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Project, tierflow

from orchestrator.doctor import KEY_VARIABLES
from orchestrator.testing import OllamaServer, OpenAIServer


def test_validate_with_no_argument_checks_the_whole_project(
    project: Project, ollama: OllamaServer
) -> None:
    project.workflow({"name": "fine", "steps": [{"id": "a", "agent": "helper", "tier": "light"}]})
    nested = project.root / "workflows" / "team"
    nested.mkdir()
    (nested / "broken.yaml").write_text(
        "name: broken\nsteps:\n  - id: a\n    agent: helpr\n    tier: light\n"
    )
    hidden = project.root / ".cache"  # a tool's folder: never read
    hidden.mkdir()
    (hidden / "junk.yaml").write_text("steps: 3\n")
    proc = tierflow("validate", cwd=project.root)
    assert proc.returncode == 2
    assert "workflows/team/broken.yaml:4: steps[0].agent" in proc.stderr
    assert "did you mean 'helper'" in proc.stderr
    assert "junk.yaml" not in proc.stderr and "Traceback" not in proc.stderr
    # A folder argument recurses too; the same problem, found from the project's folder.
    folder = tierflow("validate", ".", cwd=project.root)
    assert folder.returncode == 2 and "broken.yaml:4" in folder.stderr

    (nested / "broken.yaml").unlink()
    # An agent's problem is said once, though a workflow that uses it loads it again.
    project.write("agents/shouty.yaml", {"name": "Shouty", "prompt": "hi"})
    project.workflow({"name": "loud", "steps": [{"id": "a", "agent": "shouty"}]})
    once = tierflow("validate", cwd=project.root)
    assert once.returncode == 2
    assert once.stderr.count("agents/shouty.yaml:") == 1, once.stderr
    (project.root / "agents" / "shouty.yaml").unlink()
    (project.root / "workflows" / "loud.yaml").unlink()
    fine = tierflow("validate", cwd=project.root)
    assert (fine.returncode, fine.stdout) == (
        0,
        "ok: 3 files checked\n",
    )  # tierflow.yaml, helper, fine, fine.stderr


def test_doctor_says_which_tiers_can_serve(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(
        tmp_path / "p",
        {
            "tiers": {
                "light": {
                    "local": True,
                    "models": [
                        {"model": "ollama/llama3.2:1b", "api_base": ollama.url},
                        {"model": "ollama/qwen2.5:7b", "api_base": ollama.url},
                    ],
                },
                "frontier": {
                    "models": [{"model": "openai/gpt-4o-mini", "api_base": f"{frontier.url}/v1"}]
                },
                "hosted": {"models": ["anthropic/claude-sonnet-4-5"]},
            }
        },
    )
    env = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"}
    proc = tierflow("doctor", "--json", cwd=project.root, env=env)
    assert proc.returncode == 1  # hosted has no key
    found = json.loads(proc.stdout)
    rows = {row["model"]: row for row in found["models"]}
    assert rows["ollama/llama3.2:1b"]["problem"] is None
    assert rows["ollama/llama3.2:1b"]["reachable"] == "yes"
    assert "is not pulled" in rows["ollama/qwen2.5:7b"]["problem"]  # the server lists no such model
    assert rows["openai/gpt-4o-mini"]["reachable"] == "yes"  # its api_base answers
    assert "per 1M tokens" in rows["openai/gpt-4o-mini"]["price"]
    assert rows["anthropic/claude-sonnet-4-5"]["key"] == "missing (ANTHROPIC_API_KEY)"
    assert found["cannot_serve"] == {
        "hosted": ["anthropic/claude-sonnet-4-5: ANTHROPIC_API_KEY not set"]
    }
    table = tierflow("doctor", cwd=project.root, env=env)
    assert "tier hosted cannot serve" in table.stdout
    warned = tierflow("validate", cwd=project.root, env=env)
    assert warned.returncode == 0  # the files are valid; the tier is a warning here
    assert "warning: tier hosted cannot serve" in warned.stderr

    ready = tierflow("doctor", cwd=project.root, env={**env, "ANTHROPIC_API_KEY": "sk-test"})
    assert ready.returncode == 0 and "every tier can serve" in ready.stdout
    assert "sk-test" not in ready.stdout


def test_doctor_finds_an_ollama_that_does_not_answer(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = {"light": {"local": True, "models": [{"model": "ollama/llama3.2:1b", "api_base": f"http://127.0.0.1:{port}"}]}}  # fmt: skip
    project = Project(tmp_path / "p", {"tiers": config})
    proc = tierflow("doctor", "--json", cwd=project.root)
    assert proc.returncode == 1
    [row] = json.loads(proc.stdout)["models"]
    assert row["reachable"] == "no" and "Ollama unreachable" in row["problem"]


@pytest.mark.parametrize("provider", sorted(KEY_VARIABLES))
def test_the_key_table_agrees_with_litellm(provider: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.models.litellm import import_litellm

    monkeypatch.delenv(KEY_VARIABLES[provider], raising=False)
    said = import_litellm().validate_environment(model=f"{provider}/some-model")["missing_keys"]
    assert said == [KEY_VARIABLES[provider]]
