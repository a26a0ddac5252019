"""The real SmolLM2-135M model, in-process through llama-cpp-python: no server, no key."""

from __future__ import annotations

import json
import subprocess
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from conftest import IN_CI, REPO, missing_service

pytestmark = pytest.mark.embedded


@pytest.fixture(autouse=True)
def _needs_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401

        from orchestrator.models.llamacpp import smollm2_path

        smollm2_path()
    except Exception as exc:  # ImportError or ModelUnavailable
        if IN_CI:
            pytest.fail(f"CI requires the embedded extra: {exc}")
        missing_service(f"embedded model not installed: {exc}")


def test_quickstart_runs_on_the_embedded_model_and_shows_an_escalation(tmp_path: Path) -> None:
    """README's first command: no server, no key. SmolLM2 writes the facts; its
    headline fails the check and the step climbs to the simulated hosted tier."""
    env = {**_env(), "TIERFLOW_DATABASE_URL": f"sqlite:///{tmp_path / 'q.db'}"}
    quickstart = ["--config", "tierflow.quickstart.yaml"]
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "run", "quickstart", *quickstart, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["status"] == "succeeded"
    assert result["outputs"]["facts"]

    shown = subprocess.run(
        [sys.executable, "-m", "orchestrator", "show", result["run_id"], *quickstart, "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
    )
    calls = [c for c in json.loads(shown.stdout)["calls"] if c["outcome"] != "unavailable"]
    made = [(c["step_id"], c["model"], c["outcome"], c["simulated"]) for c in calls]
    assert made == [
        ("facts", "llamacpp/smollm2-135m", "ok", False),
        ("headline", "llamacpp/smollm2-135m", "invalid_output", False),
        ("headline", "openai/gpt-4o-mini", "ok", True),
    ]
    assert "wordcount <= 8" in calls[1]["error"]
    assert calls[2]["escalation_reason"] and Decimal(calls[2]["cost_usd"]) > 0
    assert all(c["prompt_tokens"] > 0 and c["completion_tokens"] > 0 for c in calls)
    assert [c["cost_usd"] for c in calls[:2]] == ["0", "0"]
    saved = sum(Decimal(c["reference_cost_usd"] or 0) - Decimal(c["cost_usd"]) for c in calls)
    assert saved > 0


def test_embedded_model_honours_a_json_schema(tmp_path: Path) -> None:
    from conftest import Project

    project = Project(
        tmp_path, {"tiers": {"light": {"local": True, "models": ["llamacpp/smollm2-135m"]}}}
    )
    project.workflow(
        {
            "name": "shape",
            "steps": [
                {
                    "id": "pick",
                    "agent": "helper",
                    "tier": "light",
                    "max_tokens": 40,
                    "prompt": "Is the sky blue? Answer as JSON with a boolean field 'yes'.",
                    "output": {
                        "type": "object",
                        "properties": {"yes": {"type": "boolean"}},
                        "required": ["yes"],
                    },
                }
            ],
        }
    )
    result = project.run("shape")
    assert result.status == "succeeded", result.error
    assert isinstance(result.outputs["pick"]["yes"], bool)


def test_the_real_model_gives_logprobs_that_score_its_answer(tmp_path: Path) -> None:
    import asyncio
    import math

    from conftest import Project

    from orchestrator.models.base import ModelRequest
    from orchestrator.models.llamacpp import LlamaCppClient

    request = ModelRequest(
        model="smollm2-135m",
        messages=[{"role": "user", "content": "What is 2+3? Answer with a number only."}],
        max_tokens=12,
        temperature=0.0,
        timeout_s=60,
        logprobs=True,
    )
    reply = asyncio.run(LlamaCppClient().complete(request))
    assert reply.logprobs is not None
    # One entry per answer token, each a log-probability with its best alternative's.
    assert len(reply.logprobs) == reply.completion_tokens > 0
    assert all(-100 < token.logprob <= 0 for token in reply.logprobs)
    assert all(token.runner_up is not None and token.runner_up <= 0 for token in reply.logprobs)
    assert any(not math.isclose(token.logprob, 0, abs_tol=1e-6) for token in reply.logprobs)

    project = Project(
        tmp_path, {"tiers": {"light": {"local": True, "models": ["llamacpp/smollm2-135m"]}}}
    )
    project.workflow(
        {
            "name": "sum",
            "steps": [
                {
                    "id": "add",
                    "agent": "helper",
                    "tier": "light",
                    "max_tokens": 12,
                    "prompt": "What is 2+3? Answer with a number only.",
                    "confidence": {"signal": "logprob", "min": 0.0},
                }
            ],
        }
    )
    result = project.run("sum")
    assert result.status == "succeeded", result.error
    (call,) = project.calls(result.run_id)
    assert call["signal"] == "logprob" and 0 < call["confidence"] <= 1


def test_embedded_model_times_out(tmp_path: Path) -> None:
    from conftest import Project

    light = {"local": True, "models": [{"model": "llamacpp/smollm2-135m", "timeout_s": 0.05}]}
    project = Project(tmp_path, {"tiers": {"light": light}, "escalation": {"max_attempts": 1}})
    project.workflow(
        {
            "name": "slow",
            "steps": [
                {
                    "id": "long",
                    "agent": "helper",
                    "tier": "light",
                    "max_tokens": 2000,
                    "prompt": "Write a very long story about the sea.",
                }
            ],
        }
    )
    result = project.run("slow")
    assert result.status == "failed"
    [call] = project.calls(result.run_id)
    assert call["outcome"] == "timeout"


def test_the_real_model_cut_at_max_tokens_is_truncated(tmp_path: Path) -> None:
    from conftest import Project

    light = {"local": True, "models": ["llamacpp/smollm2-135m"]}
    project = Project(tmp_path, {"tiers": {"light": light}})
    project.workflow(
        {
            "name": "long",
            "steps": [
                {
                    "id": "story",
                    "agent": "helper",
                    "tier": "light",
                    "max_tokens": 4,
                    "prompt": "Write a long story about the sea.",
                }
            ],
        }
    )
    result = project.run("long")
    assert result.status == "failed"
    [call] = project.calls(result.run_id)
    assert (call["outcome"], call["completion_tokens"]) == ("truncated", 4)
    assert "max_tokens 4" in call["error"]


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("OLLAMA_HOST", "TIERFLOW_CONFIG")}


def test_the_real_model_calls_tools_through_a_grammar(tmp_path: Path) -> None:
    """SmolLM2 has no tool calling of its own: a JSON-schema grammar lets it say only
    a call of a listed tool (with arguments of its schema) or an answer."""
    import shutil

    from conftest import REPO, Project
    from sqlalchemy import select

    from orchestrator.store.tables import tool_calls

    project = Project(
        tmp_path,
        {
            "tiers": {"light": {"local": True, "models": ["llamacpp/smollm2-135m"]}},
            "tools": {"lookup_order": "examples.shop:lookup_order"},
        },
    )
    shutil.copytree(REPO / "examples", tmp_path / "examples")
    shutil.copy(REPO / "agents" / "support.yaml", tmp_path / "agents" / "support.yaml")
    project.workflow(
        {
            "name": "desk",
            "steps": [
                {
                    "id": "ask",
                    "agent": "support",
                    "tier": "light",
                    "prompt": "Where is order A1001?",
                }
            ],
        }
    )
    result = project.run("desk")
    turns = project.calls(result.run_id)
    assert turns and all(t["outcome"] in ("tool_calls", "ok", "invalid_output") for t in turns)
    # A turn that is not valid can only be the loop running out: every reply parsed.
    assert all("max_turns" in t["error"] for t in turns if t["outcome"] == "invalid_output")
    store = project.store()
    try:
        with store.engine.connect() as connection:
            ran = connection.execute(select(tool_calls.c.name, tool_calls.c.outcome)).all()
    finally:
        store.engine.dispose()
    assert len(ran) == sum(t["outcome"] == "tool_calls" for t in turns)
    assert all(name == "lookup_order" and outcome in ("ok", "error") for name, outcome in ran)
