"""What tierflow adds per step over raw litellm, and how fast `tierflow --help` starts.

A 10-step sequential workflow runs against an instant loopback OpenAI-compatible
server (in its own process), with the ledger on SQLite. The baseline is the same
10 calls made with raw ``litellm.acompletion`` in the same process and loop.
Rounds alternate between the two; figures are medians.

    python bench/overhead.py [--rounds 15]

Goals: ≤ 1.5 ms overhead per step, ratio ≤ 1.10, `tierflow --help` ≤ 0.3 s.
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and bench/queue.py
# would shadow the standard library's ``queue``, which litellm and kombu import.
sys.path = [entry for entry in sys.path if not entry.endswith("bench")]

import argparse
import asyncio
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import yaml

STEPS = 10


def start_server() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator.testing", "openai"], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def write_project(root: Path, url: str) -> None:
    (root / "agents").mkdir()
    (root / "workflows").mkdir()
    config = {
        "database": f"sqlite:///{root / 'bench.db'}",
        "tiers": {
            "frontier": {"models": [{"model": "openai/gpt-4o-mini", "api_base": f"{url}/v1"}]}
        },
        "reference_model": "openai/gpt-4.1",
    }
    (root / "tierflow.yaml").write_text(yaml.safe_dump(config))
    (root / "agents" / "echo.yaml").write_text("name: echo\nsystem: Be brief.\nmax_tokens: 16\n")
    steps = [
        {
            "id": f"s{i}",
            "agent": "echo",
            "tier": "frontier",
            "prompt": f"step {i}" + (f" after {{{{ steps.s{i - 1}.output }}}}" if i else ""),
            **({"needs": [f"s{i - 1}"]} if i else {}),
        }
        for i in range(STEPS)
    ]
    (root / "workflows" / "chain.yaml").write_text(
        yaml.safe_dump({"name": "chain", "steps": steps})
    )


async def measure(root: Path, url: str, rounds: int) -> tuple[list[float], list[float]]:
    from orchestrator.models import Clients
    from orchestrator.models.litellm import import_litellm
    from orchestrator.runner import Runner, open_store
    from orchestrator.settings import load_settings
    from orchestrator.spec import load_workflow

    litellm = import_litellm()
    settings = load_settings(root / "tierflow.yaml")
    workflow = load_workflow(root / "workflows" / "chain.yaml", settings)
    store = open_store(settings)
    clients = Clients()
    runner = Runner(settings=settings, store=store, clients=clients)

    async def raw() -> None:
        previous = ""
        for i in range(STEPS):
            response = await litellm.acompletion(
                model="openai/gpt-4o-mini",
                messages=[
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"step {i}" + (f" after {previous}" if i else "")},
                ],
                max_tokens=16,
                temperature=0,
                timeout=60,
                api_base=f"{url}/v1",
                api_key="no-key",
            )
            previous = response.choices[0].message.content
            litellm.cost_per_token(
                model="gpt-4o-mini",
                prompt_tokens=response.usage.prompt_tokens,
                completion_tokens=response.usage.completion_tokens,
            )

    async def ours() -> None:
        result = await runner.run(workflow, {})
        assert result.status == "succeeded", result.error

    for _ in range(3):  # warm both paths: client pools, caches, the SQLite file
        await raw()
        await ours()
    raw_times, our_times = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        await raw()
        raw_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        await ours()
        our_times.append(time.perf_counter() - start)
    await clients.aclose()
    store.engine.dispose()
    return raw_times, our_times


def cold_start(rounds: int) -> tuple[float, float]:
    tierflow = Path(sys.executable).with_name("tierflow")

    def timed(argv: list[str]) -> float:
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        return time.perf_counter() - start

    python = statistics.median(timed([sys.executable, "-c", "pass"]) for _ in range(rounds))
    help_ = statistics.median(timed([str(tierflow), "--help"]) for _ in range(rounds))
    return help_, python


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    os.environ.pop("OPENAI_API_KEY", None)
    server, url = start_server()
    try:
        with tempfile.TemporaryDirectory() as folder:
            root = Path(folder)
            write_project(root, url)
            raw_times, our_times = asyncio.run(measure(root, url, args.rounds))
    finally:
        server.terminate()
        server.wait()
    raw_median, our_median = statistics.median(raw_times), statistics.median(our_times)
    per_step_ms = (our_median - raw_median) / STEPS * 1000
    help_s, python_s = cold_start(7)
    print(f"{STEPS}-step workflow, {args.rounds} rounds, medians:")
    print(
        f"  raw litellm.acompletion : {raw_median * 1000:8.2f} ms per run ({raw_median / STEPS * 1000:.2f} ms per call)"
    )
    print(f"  tierflow (ledger SQLite): {our_median * 1000:8.2f} ms per run")
    print(f"  overhead per step       : {per_step_ms:8.3f} ms   (goal <= 1.5 ms)")
    print(f"  ratio tierflow / raw    : {our_median / raw_median:8.3f}   (goal <= 1.10)")
    print(
        f"  tierflow --help         : {help_s:8.3f} s    (goal <= 0.3 s; python -c pass: {python_s:.3f} s)"
    )


if __name__ == "__main__":
    main()
