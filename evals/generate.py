"""Write evals/cases.jsonl and evals/calibration.jsonl: labelled cases from
reasoning-gym, a generator of tasks with exact answers (Apache-2.0), pinned to
the version below. The calibration cases are the same tasks from other seeds:
labels to calibrate a step's confidence on, held out from the cases it is
measured on.

    pip install reasoning-gym==0.1.25 && python evals/generate.py

Each line records its generator, version, dataset, seed and index under
``meta``. Arithmetic, calendar, counting and sorting tasks are the reasoning
half; yes/no syllogisms (classification) and finding a name in a list of
statements (field extraction) are the routine half.
"""

from __future__ import annotations

import json
from importlib.metadata import version
from pathlib import Path
from typing import Any

import reasoning_gym

GENERATOR = "reasoning-gym"
VERSION = "0.1.25"
SEED = 20261203
CALIBRATION_SEED = SEED + 1000
PER_TASK = 30
# Dataset, its configuration (small sizes: a 135M model has a 2048-token window), kind.
TASKS: list[tuple[str, dict[str, Any], str]] = [
    ("chain_sum", {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}, "reasoning"),
    ("basic_arithmetic", {"min_terms": 2, "max_terms": 3, "max_digits": 2, "operators": ["+", "-", "*"], "allow_parentheses": False, "allow_negation": False}, "reasoning"),
    ("calendar_arithmetic", {}, "reasoning"),
    ("letter_counting", {"min_words": 3, "max_words": 6}, "reasoning"),
    ("leg_counting", {"min_animals": 1, "max_animals": 3, "max_instances": 4}, "reasoning"),
    ("spell_backward", {}, "reasoning"),
    ("syllogism", {}, "routine"),
    ("needle_haystack", {"min_num_statements": 5, "max_num_statements": 12}, "routine"),
]  # fmt: skip


def cases(first_seed: int) -> list[dict[str, Any]]:
    found = []
    for offset, (name, config, kind) in enumerate(TASKS):
        seed = first_seed + offset
        dataset = reasoning_gym.create_dataset(name, seed=seed, size=PER_TASK, **config)
        for index in range(PER_TASK):
            entry = dataset[index]
            found.append(
                {
                    "inputs": {"task": name, "question": entry["question"].strip()},
                    "expect": {"answer": {"answer": str(entry["answer"]).strip()}},
                    "meta": {
                        "generator": GENERATOR,
                        "version": VERSION,
                        "dataset": name,
                        "config": config,
                        "seed": seed,
                        "index": index,
                        "kind": kind,
                    },
                }
            )
    return found


def main() -> None:
    installed = version("reasoning-gym")
    if installed != VERSION:
        raise SystemExit(f"reasoning-gym {installed} is installed; these cases come from {VERSION}")
    for name, first_seed in (("cases.jsonl", SEED), ("calibration.jsonl", CALIBRATION_SEED)):
        path = Path(__file__).parent / name
        lines = [json.dumps(case, ensure_ascii=False) for case in cases(first_seed)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        print(f"{path}: {len(lines)} cases")


if __name__ == "__main__":
    main()
