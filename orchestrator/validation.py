"""``tierflow validate`` and ``tierflow schema``: check files of any kind, describe them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.errors import SpecError, UserError
from orchestrator.loading import read_yaml
from orchestrator.settings import Config, Settings, load_settings
from orchestrator.spec import Agent, Workflow, load_agent, load_workflow

# Folders a recursive validate never enters: tools' and Python's, not the project's.
SKIPPED_FOLDERS = {"node_modules", "venv", "site-packages", "__pycache__"}


def validate_paths(paths: list[Path], *, config: str | None) -> tuple[list[str], int]:
    """Every problem in ``paths`` (files, or folders searched recursively), as
    ``FILE:LINE: field: message``. With no paths, the whole project: its
    tierflow.yaml and every agent and workflow under its folders. Also how many
    files were checked."""
    settings: Settings | None = None
    if not paths:
        try:
            settings = load_settings(config)
        except (SpecError, UserError) as exc:
            return _problems(exc), 1
        root, conf = settings.root, settings.config
        folders = [root / conf.agents_dir, root / conf.workflows_dir]
        paths = [*([settings.path] if settings.path else []), *filter(Path.is_dir, folders)]
    files: list[tuple[Path, bool]] = []  # and whether it was named, not found in a folder
    for path in paths:
        files.extend(
            [(found, False) for found in _yaml_files(path)] if path.is_dir() else [(path, True)]
        )
    problems: list[str] = []
    checked = 0
    for path, named in files:
        try:
            kind = _kind(path)
            if kind == "other" and named:
                kind = "agent"  # named, it must be one of ours: its problems are said
            checked += kind != "other"
            if kind == "config":
                load_settings(path)
            elif kind == "agent":
                settings = settings or load_settings(config)
                load_agent(path, settings)
            elif kind == "workflow":
                settings = settings or load_settings(config)
                load_workflow(path, settings)
        except (SpecError, UserError) as exc:
            problems.extend(_problems(exc))
    # An agent is checked alone and with each workflow that uses it: say each problem once.
    return list(dict.fromkeys(problems)), checked


def _problems(exc: UserError) -> list[str]:
    return list(exc.problems) if isinstance(exc, SpecError) else [str(exc)]


def _yaml_files(folder: Path) -> list[Path]:
    """The .yaml and .yml files under ``folder``, hidden and tool folders left out."""
    found = []
    for path in sorted([*folder.rglob("*.yaml"), *folder.rglob("*.yml")]):
        inside = path.relative_to(folder).parts[:-1]
        if not any(part.startswith(".") or part in SKIPPED_FOLDERS for part in inside):
            found.append(path)
    return found


def _kind(path: Path) -> str:
    """config, workflow or agent, by the keys the file holds; "other" for a YAML
    file of something else (found while searching a folder), which is left alone."""
    data = read_yaml(path).data
    if "tiers" in data:
        return "config"
    if "steps" in data:
        return "workflow"
    if path.parent.name == "agents" or {"system", "prompt"} & set(data):
        return "agent"
    return "other" if "name" not in data else "agent"


def json_schemas() -> dict[str, Any]:
    return {
        "workflow": Workflow.model_json_schema(),
        "agent": Agent.model_json_schema(),
        "config": Config.model_json_schema(),
    }
