"""litellm's banner and debug hints never reach the user's terminal."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import Project, tierflow

from orchestrator.testing import FAILURES, OpenAIServer

NOISE = ("Give Feedback", "Get Help", "_turn_on_debug", "LiteLLM", "Provider List")


@pytest.mark.parametrize("mode", ["500", "closed", "malformed_json"])
def test_a_failing_provider_leaves_json_output_parseable_and_quiet(
    tmp_path: Path, frontier: OpenAIServer, mode: str
) -> None:
    frontier.default = FAILURES[mode]
    entry = {"model": "openai/gpt-4o-mini", "api_base": f"{frontier.url}/v1", "timeout_s": 2}
    project = Project(tmp_path, {"tiers": {"only": {"models": [entry]}}})
    project.workflow({"name": "ask", "steps": [{"id": "a", "agent": "helper", "tier": "only"}]})
    proc = tierflow("run", "ask", "--json", "--config", str(project.config), cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["status"] == "failed"
    assert frontier.chat_requests()  # the provider really was asked, and failed
    for noise in NOISE:
        assert noise not in proc.stdout + proc.stderr, (noise, proc.stdout, proc.stderr)


def test_importing_litellm_prints_nothing() -> None:
    code = "from orchestrator.models.litellm import import_litellm; import_litellm()"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert (proc.stdout, proc.stderr) == ("", "")
