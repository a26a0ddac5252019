"""llama-cpp-python's own OpenAI-compatible server, as people run it for a local
tier, serving the SmolLM2 GGUF; tierflow reaches it through litellm."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Project, missing_service

pytestmark = pytest.mark.embedded

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
PRICE = {"input": 100, "output": 200}


# ``python -m llama_cpp.server``, with the models it loads on llama.cpp's plain
# CPU buffers, as tierflow's embedded tier loads them: a build on a VM whose CPU
# lists AMX crashes in the AMX kernels otherwise (see ``without_extra_buffers``).
SERVE = (
    "import runpy, llama_cpp\n"
    "from orchestrator.models.llamacpp import without_extra_buffers\n"
    "with without_extra_buffers(llama_cpp):\n"
    "    runpy.run_module('llama_cpp.server', run_name='__main__', alter_sys=True)\n"
)


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a real ``llama_cpp.server`` on a free port, stopped afterwards."""
    try:
        import llama_cpp.server.app  # noqa: F401  (the server extra's dependencies)

        from orchestrator.models.llamacpp import smollm2_path

        model = smollm2_path()
    except Exception as exc:  # ImportError or ModelUnavailable
        missing_service(f"llama-cpp-python's server or the SmolLM2 GGUF is missing: {exc}")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = tmp_path_factory.mktemp("llama") / "server.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                *(sys.executable, "-c", SERVE, "--model", str(model)),
                *("--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300  # loading the model on a busy machine
        while True:
            try:
                with urllib.request.urlopen(f"{url}/v1/models", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_schema_step_and_a_streamed_step_through_litellm(
    tmp_path: Path, llama_server: str
) -> None:
    entry = {"model": "openai/smollm2", "api_base": f"{llama_server}/v1", "timeout_s": 120}
    project = Project(
        tmp_path,
        {
            "tiers": {
                "plain": {"local": True, "models": [entry]},
                "streamed": {"local": True, "models": [{**entry, "stream": True}]},
            },
            "prices": {"openai/smollm2": PRICE},
        },
    )
    project.agent("helper", system="You answer in JSON.", prompt="{{ inputs.text }}", max_tokens=24)
    project.workflow(
        {
            "name": "both",
            "inputs": {"text": {"type": "string", "default": "Give the number three as n."}},
            "steps": [
                {"id": "number", "agent": "helper", "tier": "plain", "output": SCHEMA},
                {
                    "id": "words",
                    "agent": "helper",
                    "tier": "streamed",
                    "needs": ["number"],  # the server answers one request at a time
                    "prompt": "Write one sentence about the sea.",
                    "max_tokens": 200,  # room to finish: an answer cut at max_tokens fails
                },
            ],
        }
    )
    result = project.run("both")
    assert result.status == "succeeded", result.error
    assert isinstance(result.outputs["number"]["n"], int)
    assert isinstance(result.outputs["words"], str) and result.outputs["words"]
    calls = {(c["step_id"], c["attempt"]): c for c in project.calls(result.run_id)}
    refused, answered, streamed = calls["number", 1], calls["number", 2], calls["words", 1]
    # The server refuses json_schema: its own words are kept, and json_object follows.
    assert refused["outcome"] == "error"
    assert "Input should be 'text' or 'json_object'" in refused["error"]
    assert answered["outcome"] == "ok" and answered["usage_source"] == "reported"
    # The server sends no usage in a stream: litellm's tokenizer counts it.
    assert streamed["outcome"] == "ok" and streamed["usage_source"] == "counted"
    for call in (answered, streamed):
        assert call["prompt_tokens"] > 0 and call["completion_tokens"] > 0
        assert call["cost_usd"] > 0
