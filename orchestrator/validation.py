"""``tierflow validate`` and ``tierflow schema``: check files of any kind, describe them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError, UserError
from orchestrator.loading import read_yaml
from orchestrator.settings import Config, Settings, load_settings
from orchestrator.spec import Agent, Workflow, load_agent, load_workflow


def validate_paths(paths: list[Path], *, config: str | None) -> list[str]:
    """Every problem in ``paths`` (files or folders of .yaml), as ``FILE:LINE: field: message``."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted([*path.glob("*.yaml"), *path.glob("*.yml")]))
        else:
            files.append(path)
    problems: list[str] = []
    settings: Settings | None = None
    for path in files:
        try:
            kind = _kind(path)
            if kind == "config":
                load_settings(path)
            elif kind == "agent":
                load_agent(path)
            else:
                settings = settings or load_settings(config)
                load_workflow(path, settings)
        except SpecError as exc:
            problems.extend(exc.problems)
        except UserError as exc:
            problems.append(str(exc))
    return problems


def _kind(path: Path) -> str:
    data = read_yaml(path).data
    if "tiers" in data:
        return "config"
    if "steps" in data:
        return "workflow"
    return "agent"


def json_schemas() -> dict[str, Any]:
    return {
        "workflow": Workflow.model_json_schema(),
        "agent": Agent.model_json_schema(),
        "config": Config.model_json_schema(),
    }
