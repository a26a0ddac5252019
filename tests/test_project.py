"""A new project: `tierflow init`, finding tierflow.yaml from a subfolder, and an
empty folder left as it was."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import tierflow


def clean_env() -> dict[str, str]:
    """This environment without tierflow's own settings, as a new user's shell has."""
    return {k: v for k, v in os.environ.items() if not k.startswith("TIERFLOW_")}


@pytest.mark.embedded
def test_init_makes_a_project_that_runs_with_no_server_and_no_key(tmp_path: Path) -> None:
    made = tierflow("init", "hello-project", cwd=tmp_path, env=clean_env())
    assert made.returncode == 0, made.stderr
    project = tmp_path / "hello-project"
    assert "next: cd hello-project && tierflow run hello" in made.stdout
    for name in ("tierflow.yaml", "workflows/hello.yaml", "agents/greeter.yaml", ".gitignore"):
        assert (project / name).is_file(), name
    assert ".tierflow/" in (project / ".gitignore").read_text()
    assert "validate" not in made.stderr

    ran = tierflow("run", "hello", "--json", cwd=project, env=clean_env())
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["status"] == "succeeded" and result["outputs"]["greet"]
    assert "built-in defaults" not in ran.stderr  # it found the project's tierflow.yaml
    # The database sits in the project; its lock file does not sit beside it.
    assert (project / "tierflow.db").is_file()
    assert not list(project.glob("*.migrate-lock"))
    assert (project / ".tierflow" / "tierflow.db.migrate-lock").is_file()


def test_init_writes_nothing_over_a_file(tmp_path: Path) -> None:
    (tmp_path / "tierflow.yaml").write_text("# mine\n")
    made = tierflow("init", cwd=tmp_path, env=clean_env())
    assert made.returncode == 2
    assert "tierflow.yaml already exist" in made.stderr and "Traceback" not in made.stderr
    assert (tmp_path / "tierflow.yaml").read_text() == "# mine\n"
    assert not (tmp_path / "workflows").exists() and not (tmp_path / ".gitignore").exists()


def test_commands_find_the_project_from_a_subfolder(tmp_path: Path) -> None:
    assert tierflow("init", cwd=tmp_path, env=clean_env()).returncode == 0
    queued = tierflow("enqueue", "hello", cwd=tmp_path, env=clean_env())  # no model asked
    assert queued.returncode == 0, queued.stderr
    # From a subfolder, the same project: its workflows by name, its database.
    inside = tmp_path / "workflows"
    found = tierflow("run", "hello", "-i", "nope=1", cwd=inside, env=clean_env())
    assert found.returncode == 2
    # Paths under the current folder are shown from it, others in full.
    assert found.stderr.startswith("hello.yaml:"), found.stderr
    assert "hello.yaml: input 'nope': not declared" in found.stderr
    (tmp_path / "agents" / "greeter.yaml").write_text("role: [\n")
    for where, shown in (
        (tmp_path, "agents/greeter.yaml:"),
        (inside, f"{tmp_path / 'agents' / 'greeter.yaml'}:"),
    ):
        checked = tierflow("validate", cwd=where, env=clean_env())
        assert checked.returncode == 2 and checked.stderr.startswith(shown), checked.stderr
    listed = tierflow("runs", "--json", cwd=inside, env=clean_env())
    assert listed.returncode == 0, listed.stderr
    assert [(run["workflow"], run["status"]) for run in json.loads(listed.stdout)] == [
        ("hello", "queued")
    ]
    assert "built-in defaults" not in found.stderr + listed.stderr
    assert not (inside / "tierflow.db").exists()


def test_an_empty_folder_is_left_as_it_was(tmp_path: Path) -> None:
    for command in (["runs"], ["spend"], ["show", "abc"], ["run", "quickstart"], ["validate"]):
        proc = tierflow(*command, cwd=tmp_path, env=clean_env())
        assert proc.returncode in (0, 2), proc.stderr
        said = proc.stderr.splitlines()
        # Said once: no project here, so the built-in defaults apply.
        assert sum("using built-in defaults" in line for line in said) == 1, command
        assert "tierflow init" in said[0]
        assert "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # no database, no lock file, no .tierflow/


def test_version_is_the_installed_one() -> None:
    from importlib.metadata import version

    proc = tierflow("--version", cwd=Path.cwd())
    assert (proc.returncode, proc.stdout) == (0, f"tierflow {version('tierflow')}\n")


def test_init_in_a_git_repository_keeps_its_gitignore_and_adds_what_it_lacks(
    tmp_path: Path,
) -> None:
    (tmp_path / ".gitignore").write_text("node_modules/\n*.db\n")
    made = tierflow("init", cwd=tmp_path, env=clean_env())
    assert made.returncode == 0, made.stderr
    lines = (tmp_path / ".gitignore").read_text().splitlines()
    assert lines[:2] == ["node_modules/", "*.db"]  # kept as it was
    assert lines.count("*.db") == 1 and ".tierflow/" in lines and "*.db-wal" in lines
