"""The shipped evaluation: what tiering does on evals/cases.jsonl (240 reasoning-gym cases).

The light tier is the real embedded SmolLM2-135M. standard and frontier are
SIMULATED: loopback OpenAI-compatible servers (``orchestrator.testing.GoldAnswers``)
that know each case's gold answer and answer wrong on a stated share of the
questions, priced as gpt-4o-mini and gpt-4.1 are in litellm's table.

Runs the real ``tierflow eval`` command on a copy of evals/: first
``tier:light`` on evals/calibration.jsonl (the same tasks from other seeds),
whose verdicts are the labels that calibrate the step's logprob score on
SmolLM2; then, on evals/cases.jsonl, ``tier:light``, ``tier:frontier``,
``as-written`` and ``auto`` on the logprob workflow (an eval calibrates only
from labels given before it started, so these are held out); then
``tier:light`` on the consistency and judge workflows, for their signals' AUROC. Then times the router's decision (the ledger read and the
choice, as ``tier: auto`` makes it before each step) against the eval's
ledger, as medians of several rounds, and as a ratio to the light model's
median call.

    python bench/eval.py [--limit N] [--signal-limit N] [--rounds 200]
"""

# ruff: noqa: E402
from __future__ import annotations

import sys

# Run as a script, this folder comes first on sys.path, and bench/queue.py
# would shadow the standard library's ``queue``, which litellm and kombu import.
sys.path = [entry for entry in sys.path if not entry.endswith("bench")]

import argparse
import json
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from orchestrator import router
from orchestrator.settings import load_settings
from orchestrator.spec import find_workflow, load_workflow
from orchestrator.store import open_store
from orchestrator.testing import GoldAnswers, OpenAIServer

EVALS = Path(__file__).resolve().parent.parent / "evals"
# Stated error rates of the simulated tiers: assumptions, not measurements.
ERROR_RATES = {"standard": 0.25, "frontier": 0.05}
PORTS = (8781, 8782)  # where evals/tierflow.yaml expects standard and frontier
POLICIES = ("tier:light", "tier:frontier", "as-written", "auto")


def gold_answers(cases: Path) -> dict[str, str]:
    found = {}
    for line in cases.read_text().splitlines():
        case = json.loads(line)
        found[case["inputs"]["question"]] = case["expect"]["answer"]["answer"]
    return found


def project(servers: dict[str, OpenAIServer]) -> Path:
    """A copy of evals/ whose simulated tiers point at ``servers``."""
    root = Path(tempfile.mkdtemp(prefix="tierflow-eval-"))
    for part in ("agents", "workflows"):
        shutil.copytree(EVALS / part, root / part)
    for name in ("cases.jsonl", "calibration.jsonl"):
        shutil.copy(EVALS / name, root / name)
    config = (EVALS / "tierflow.yaml").read_text()
    for port, server in zip(PORTS, servers.values(), strict=True):
        config = config.replace(f"http://127.0.0.1:{port}/v1", f"{server.url}/v1")
    config = config.replace("sqlite:///eval.db", f"sqlite:///{root / 'eval.db'}")
    (root / "tierflow.yaml").write_text(config)
    return root


def tierflow_eval(
    root: Path, workflow: str, policies: tuple[str, ...], limit: int, cases: str = "cases.jsonl"
) -> Any:
    command = [sys.executable, "-m", "orchestrator", "eval", workflow, "--cases", cases]
    for policy in policies:
        command += ["--policy", policy]
    command += ["--limit", str(limit), "--json"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"tierflow eval {workflow} failed:\n{done.stderr}")
    took = time.perf_counter() - started
    print(f"  tierflow eval {workflow} --cases {cases} {' '.join(policies)}: {took:.0f} s")
    return json.loads(done.stdout)


def print_policies(found: dict[str, Any]) -> None:
    simulated = {f"tier:{name}" for name in ERROR_RATES} | set(ERROR_RATES)

    def tiers(counts: dict[str, int]) -> str:
        return ", ".join(
            f"{tier}{'*' if tier in simulated else ''} {count}" for tier, count in counts.items()
        )

    print(f"\n{found['workflow']}: {found['cases']} cases (* simulated tier)")
    print(
        "| policy | quality (95% CI) | cost | cost per case | of tier:frontier | saved"
        " | calls by tier | escalations per case | false accepts | wasted | p50 / p95 ms | PGR |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in found["policies"]:
        low, high = row["quality_ci"]
        share = "-" if row["cost_share"] is None else f"{row['cost_share']:.1%}"
        pgr = "-" if row["pgr"] is None else f"{row['pgr']:.2f}"
        name = row["policy"] + ("*" if row["policy"] in simulated else "")
        print(
            f"| {name} | {row['quality']:.1%} ({low:.0%}–{high:.0%}) | ${row['cost_usd']}"
            f" | ${row['cost_per_case_usd']} | {share} | ${row['savings_usd']}"
            f" | {tiers(row['calls_by_tier'])} | {row['escalations_per_case']:.2f}"
            f" | {tiers(row['false_accepts']) or '-'} | {row['wasted_calls']}"
            f" ({tiers(row['wasted_by_tier']) or '-'})"
            f" | {row['latency_ms_p50']:.0f} / {row['latency_ms_p95']:.0f} | {pgr} |"
        )


def router_overhead(root: Path, rounds: int) -> tuple[float, float]:
    """The router's decision per call, p50 and p95 in ms: the ledger read and the choice."""
    settings = load_settings(root / "tierflow.yaml")
    loaded = load_workflow(find_workflow("tasks", settings), settings)
    store = open_store(settings)
    plan = loaded.steps[0]
    # The eval's own auto history, under its scope: the key its runs recorded.
    with store.engine.connect() as connection:
        key = connection.exec_driver_sql(
            "SELECT route_key FROM model_calls WHERE route_key IS NOT NULL LIMIT 1"
        ).scalar()
    assert key is not None, "the auto policy recorded no route key"
    ladder = settings.tier_names
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        rows = store.route_history(
            workflow=loaded.name, step_id=plan.id, route_key=key, limit=router.HISTORY
        )
        history = [router.Outcome(t, o, float(c), latency) for t, o, c, latency in rows]
        router.route(history, ladder, explore=0.05, latency_usd_per_s=1e-4)
        timings.append((time.perf_counter() - started) * 1000)
    store.engine.dispose()
    timings.sort()
    return statistics.median(timings), timings[int(0.95 * len(timings)) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=240, help="cases for the policy table")
    parser.add_argument("--signal-limit", type=int, default=120, help="cases for each signal")
    parser.add_argument("--rounds", type=int, default=200, help="router timing rounds")
    args = parser.parse_args()
    answers = gold_answers(EVALS / "cases.jsonl")
    servers = {name: OpenAIServer().start() for name in ERROR_RATES}
    for name, server in servers.items():
        server.responder = GoldAnswers(answers, error_rate=ERROR_RATES[name], seed=name)
    root = project(servers)
    print(f"eval project: {root}")
    rates = ", ".join(f"{name} {rate:.0%}" for name, rate in ERROR_RATES.items())
    print(f"simulated tiers answer wrong on a stated share of questions: {rates}")
    try:
        labels = tierflow_eval(root, "tasks", ("tier:light",), args.limit, "calibration.jsonl")
        print(f"  calibration labels: {labels['policies'][0]['right']} right of {labels['cases']}")
        main_table = tierflow_eval(root, "tasks", POLICIES, args.limit)
        signals = {"logprob": main_table["signals"]["logprob"]}
        for workflow, signal in (("tasks-consistency", "consistency"), ("tasks-judge", "judge")):
            found = tierflow_eval(root, workflow, ("tier:light",), args.signal_limit)
            signals[signal] = found["signals"][signal]
    finally:
        for server in servers.values():
            server.stop()
    print_policies(main_table)
    print("\n| signal | AUROC on tier light (real SmolLM2-135M) | answers | right |")
    print("|---|---|---|---|")
    for name, signal in signals.items():
        auroc = "n/a" if signal["auroc"] is None else f"{signal['auroc']:.3f}"
        print(f"| {name} | {auroc} | {signal['answers']} | {signal['right']} |")
    p50, p95 = router_overhead(root, args.rounds)
    light_p50 = next(p for p in main_table["policies"] if p["policy"] == "tier:light")
    ratio = p50 / light_p50["latency_ms_p50"]
    print(
        f"\nrouter per call, {args.rounds} rounds on the eval's ledger: p50 {p50:.3f} ms,"
        f" p95 {p95:.3f} ms; {ratio:.2%} of a light case's median latency"
    )


if __name__ == "__main__":
    main()
