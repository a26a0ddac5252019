"""What tierflow adds per step over raw litellm and over LangGraph by hand.

Three ways to make the same 10 dependent calls, in one process and loop, against
an instant loopback OpenAI-compatible server (in its own process):

- raw ``litellm.acompletion``, one call after another (the baseline);
- the same chain written by hand as a LangGraph ``StateGraph`` (no ledger);
- tierflow, through ``Client.arun`` called again and again as a web handler
  would, with its durable ledger on SQLite (pending row, settled row, lease).

Rounds alternate between the three; figures are medians. Also times
``tierflow --help``.

    python bench/overhead.py [--rounds 15]

Goals: tierflow's overhead per step at most LangGraph's plus 1.0 ms;
`tierflow --help` ≤ 0.3 s.
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
from typing import Any, TypedDict

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


async def measure(root: Path, url: str, rounds: int) -> dict[str, list[float]]:
    from langgraph.graph import END, START, StateGraph

    from orchestrator.client import Client
    from orchestrator.models.litellm import import_litellm

    litellm = import_litellm()
    client = Client(config=root / "tierflow.yaml")

    async def ask(i: int, previous: str) -> str:
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
        litellm.cost_per_token(
            model="gpt-4o-mini",
            prompt_tokens=response.usage.prompt_tokens,
            completion_tokens=response.usage.completion_tokens,
        )
        return str(response.choices[0].message.content)

    async def raw() -> None:
        previous = ""
        for i in range(STEPS):
            previous = await ask(i, previous)

    class State(TypedDict):
        previous: str

    def node(i: int) -> Any:
        async def call(state: State) -> dict[str, str]:
            return {"previous": await ask(i, state["previous"])}

        return call

    builder = StateGraph(State)
    for i in range(STEPS):
        builder.add_node(f"s{i}", node(i))
        builder.add_edge(START if i == 0 else f"s{i - 1}", f"s{i}")
    builder.add_edge(f"s{STEPS - 1}", END)
    graph = builder.compile()

    async def langgraph() -> None:
        await graph.ainvoke({"previous": ""}, config={"recursion_limit": STEPS + 2})

    async def ours() -> None:
        result = await client.arun("chain")
        assert result.status == "succeeded", result.error

    ways = {"raw": raw, "langgraph": langgraph, "tierflow": ours}
    for _ in range(3):  # warm every path: client pools, caches, the SQLite file
        for way in ways.values():
            await way()
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, way in ways.items():
            start = time.perf_counter()
            await way()
            times[name].append(time.perf_counter() - start)
    await client.aclose()
    return times


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
            times = asyncio.run(measure(root, url, args.rounds))
    finally:
        server.terminate()
        server.wait()
    raw, langgraph, ours = (statistics.median(times[name]) for name in times)

    def per_step(median: float) -> float:
        return (median - raw) / STEPS * 1000

    help_s, python_s = cold_start(7)
    print(f"{STEPS} dependent calls, {args.rounds} alternating rounds, medians:")
    print(
        f"  raw litellm.acompletion   : {raw * 1000:8.2f} ms per run ({raw / STEPS * 1000:.2f} ms per call)"
    )
    for label, median in (("LangGraph by hand", langgraph), ("tierflow Client.arun", ours)):
        print(
            f"  {label:<26}: {median * 1000:8.2f} ms per run, {per_step(median):6.3f} ms per step"
            f" over raw, ratio {median / raw:.3f}"
        )
    gap = per_step(ours) - per_step(langgraph)
    print(
        f"  tierflow over LangGraph   : {gap:8.3f} ms per step   (goal <= 1.0 ms, ledger included)"
    )
    print(
        f"  tierflow --help           : {help_s:8.3f} s    (goal <= 0.3 s; python -c pass: {python_s:.3f} s)"
    )


if __name__ == "__main__":
    main()
