"""``local: true`` means local: in-process, loopback, a private address or a listed host."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.errors import SpecError
from orchestrator.settings import load_settings


def write_config(folder: Path, entry: Any, **config: Any) -> Path:
    path = folder / "tierflow.yaml"
    # openai/local and openai/x stand for self-hosted servers: priced, so only locality counts.
    prices = {"openai/local": {}, "openai/x": {"input": 1, "output": 1}}
    data = {"tiers": {"light": {"local": True, "models": [entry]}}, "prices": prices, **config}
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


LOCAL = [
    "llamacpp/smollm2-135m",
    "ollama/llama3.2:1b",  # OLLAMA_HOST unset: 127.0.0.1:11434
    {"model": "ollama/llama3.2:1b", "api_base": "http://127.0.0.1:11434"},
    {"model": "ollama/llama3.2:1b", "api_base": "localhost:11434"},
    {"model": "ollama/llama3.2:1b", "api_base": "http://LOCALHOST."},
    {"model": "openai/local", "api_base": "http://[::1]:8000/v1"},
    {"model": "openai/local", "api_base": "http://10.1.2.3:8000/v1"},
    {"model": "openai/local", "api_base": "https://192.168.0.5/v1"},
    {"model": "openai/local", "api_base": "http://172.16.4.4:8000"},
    {"model": "openai/local", "api_base": "http://169.254.10.1:8000"},
    {"model": "openai/local", "api_base": "http://[fd00::5]:8000"},
]


@pytest.mark.parametrize("entry", LOCAL, ids=[str(e) for e in LOCAL])
def test_in_process_loopback_and_private_models_are_local(tmp_path: Path, entry: Any) -> None:
    load_settings(write_config(tmp_path, entry))


HOSTED = [
    (
        {"model": "azure/gpt-4o", "api_base": "https://myorg.openai.azure.com"},
        "host 'myorg.openai.azure.com' is not loopback, a private address or in local_hosts",
    ),
    ("openai/gpt-4o-mini", "openai/gpt-4o-mini is a hosted provider"),
    ("ollama/gpt-oss:120b-cloud", "Ollama cloud model"),
    ("ollama/gemma4:cloud", "Ollama cloud model"),
    ({"model": "ollama/qwen3-coder:480b-cloud", "api_base": "http://127.0.0.1:11434"}, "cloud"),
    (
        {"model": "ollama/qwen2.5:7b", "api_base": "http://gpu-box:11434"},
        "host 'gpu-box' is not loopback",
    ),
    ({"model": "openai/x", "api_base": "http://8.8.8.8:8000/v1"}, "host '8.8.8.8'"),
    ({"model": "openai/x", "api_base": "http://100.64.0.1/v1"}, "host '100.64.0.1'"),
    # Hosts that a different URL parser reads differently are never judged local.
    ({"model": "openai/x", "api_base": "http://127.0.0.1@evil.example/v1"}, "api_base"),
    ({"model": "openai/x", "api_base": "http://evil.example\\@127.0.0.1/v1"}, "api_base"),
    ({"model": "openai/x", "api_base": "http://2130706433/v1"}, "host '2130706433'"),
    ({"model": "openai/x", "api_base": "ftp://127.0.0.1/v1"}, "api_base"),
]


@pytest.mark.parametrize("entry,reason", HOSTED, ids=[str(e) for e, _ in HOSTED])
def test_anything_else_in_a_local_tier_is_refused_with_the_reason_and_line(
    tmp_path: Path, entry: Any, reason: str
) -> None:
    path = write_config(tmp_path, entry)
    with pytest.raises(SpecError) as caught:
        load_settings(path)
    [problem] = caught.value.problems
    line = path.read_text().splitlines().index("    models:") + 2
    assert problem.startswith(f"{path}:{line}: tiers.light.models[0]: "), problem
    assert "tier is marked local but" in problem and reason in problem


def test_a_host_listed_in_local_hosts_is_local_and_names_are_never_resolved(
    tmp_path: Path,
) -> None:
    entry = {"model": "ollama/qwen2.5:7b", "api_base": "http://GPU-Box.internal:11434"}
    load_settings(write_config(tmp_path, entry, local_hosts=["gpu-box.internal"]))
    # "localhost.localdomain" resolves to 127.0.0.1 on most machines; it is still not
    # judged local, because tierflow never asks DNS.
    entry = {"model": "ollama/qwen2.5:7b", "api_base": "http://localhost.localdomain:11434"}
    with pytest.raises(SpecError, match="not loopback, a private address or in local_hosts"):
        load_settings(write_config(tmp_path, entry, local_hosts=["gpu-box.internal"]))


def test_ollama_host_decides_for_ollama_models_without_an_api_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OLLAMA_HOST", "10.0.0.2:11434")
    load_settings(write_config(tmp_path, "ollama/llama3.2:1b"))
    monkeypatch.setenv("OLLAMA_HOST", "https://ollama.com")
    with pytest.raises(SpecError, match=r"OLLAMA_HOST host 'ollama\.com' is not loopback"):
        load_settings(write_config(tmp_path, "ollama/llama3.2:1b"))


@pytest.mark.parametrize("host", ["http://gpu-box", "gpu-box:11434", "gpu box", ""])
def test_local_hosts_holds_bare_host_names(tmp_path: Path, host: str) -> None:
    with pytest.raises(SpecError, match="local_hosts"):
        load_settings(write_config(tmp_path, "llamacpp/smollm2-135m", local_hosts=[host]))


def test_a_tier_that_is_not_local_may_hold_anything(tmp_path: Path) -> None:
    path = tmp_path / "tierflow.yaml"
    path.write_text(
        "tiers:\n  remote:\n    models:\n      - ollama/gpt-oss:120b-cloud\n"
        "      - {model: azure/gpt-4o, api_base: 'https://myorg.openai.azure.com'}\n"
    )
    load_settings(path)
