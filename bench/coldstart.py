"""Cold start of each command a user types to read: the whole process, as a shell runs it.

In a scratch project made by ``tierflow init``, with one run recorded (the
embedded model, so no server), times each command as medians of several
rounds, each a new process: ``--help``, ``runs``, ``show RUN``, ``spend``,
``validate``, ``doctor``. The baselines, measured in the same run: a bare
``python -c pass``, and ``python -c "import sqlalchemy, typer"`` (what any
database command must load). Goal: ``--help`` under 0.2 s; every read-only
command under 0.5 s of start-up plus its query.

    python bench/coldstart.py [--rounds 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PYTHON = sys.executable


def timed(argv: list[str], cwd: Path, rounds: int) -> float:
    """Median seconds of ``argv`` run ``rounds`` times, each a new process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TIERFLOW_")}
    seconds = []
    for _ in range(rounds):
        clock = time.perf_counter()
        subprocess.run(argv, cwd=cwd, env=env, check=True, capture_output=True)
        seconds.append(time.perf_counter() - clock)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds
    tierflow = [PYTHON, "-m", "orchestrator"]
    with tempfile.TemporaryDirectory() as scratch:
        project = Path(scratch)
        subprocess.run([*tierflow, "init"], cwd=project, check=True, capture_output=True)
        ran = subprocess.run(
            [*tierflow, "run", "hello", "--json"], cwd=project, check=True, capture_output=True
        )
        run_id = json.loads(ran.stdout)["run_id"]
        bare = timed([PYTHON, "-c", "pass"], project, rounds)
        floor = timed([PYTHON, "-c", "import sqlalchemy, typer"], project, rounds)
        print(f"cold start, medians of {rounds} new processes each (this machine)")
        print(f"{'command':<24} {'seconds':>8} {'× python':>9} {'× sqlalchemy+typer':>19}")
        print(f"{'python -c pass':<24} {bare:>8.3f} {1:>9.2f} {bare / floor:>19.2f}")
        print(f"{'import sqlalchemy, typer':<24} {floor:>8.3f} {floor / bare:>9.2f} {1:>19.2f}")
        for command in (
            ["--help"],
            ["runs"],
            ["show", run_id[:8]],
            ["spend"],
            ["validate"],
            ["doctor"],
        ):
            took = timed([*tierflow, *command], project, rounds)
            name = "tierflow " + " ".join(command)
            print(f"{name:<24} {took:>8.3f} {took / bare:>9.2f} {took / floor:>19.2f}")


if __name__ == "__main__":
    main()
