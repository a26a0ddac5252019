"""Packaging and supply chain: an exact, safe litellm pin, and a public surface that stays small."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from conftest import REPO

COMPROMISED_LITELLM = {"1.82.7", "1.82.8"}


def dependencies() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def test_litellm_is_pinned_exactly_to_a_safe_release() -> None:
    [pin] = [d for d in dependencies() if re.match(r"litellm\b", d)]
    match = re.fullmatch(r"litellm==(\d+\.\d+\.\d+)", pin)
    assert match, f"litellm must be pinned with ==, found {pin!r}"
    assert match.group(1) not in COMPROMISED_LITELLM


def test_installed_litellm_is_not_a_compromised_release() -> None:
    version = importlib.metadata.version("litellm")
    assert version not in COMPROMISED_LITELLM
    # 1.82.8 planted a .pth file that runs at every interpreter start.
    site = Path(importlib.metadata.distribution("litellm").locate_file(""))
    assert not list(site.glob("litellm*.pth"))


def test_every_dependency_is_pinned() -> None:
    for dependency in dependencies():
        assert "==" in dependency, dependency
