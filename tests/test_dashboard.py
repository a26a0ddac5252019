"""The dashboard as a person sees it: `tierflow serve`, loaded in headless Chromium.

The ledger holds seeded rows and one real run that escalated from the light
tier (a loopback Ollama) to the frontier (a loopback OpenAI server). The test
reads the charts and figures from the DOM Chromium rendered, and keeps a
screenshot in test-artifacts/.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
import websockets.sync.client
from conftest import REPO, Project, missing_service, seed_ledger, wait_for

from orchestrator import reports
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

TOKEN = "dashboard-test-token"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"


class Elements(HTMLParser):
    """Every element's tag, attributes and chart (the id of its svg), and the text under each id."""

    VOID = frozenset({"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta"})

    def __init__(self) -> None:
        super().__init__()
        self.found: list[tuple[str, dict[str, str], str | None]] = []
        self.texts: dict[str, str] = {}
        self._chart: str | None = None
        self._open: list[tuple[str, str | None]] = []  # (tag, id) of the elements open

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {name: value or "" for name, value in attrs}
        if tag == "svg":
            self._chart = values.get("id")
        self.found.append((tag, values, self._chart))
        if "id" in values:
            self.texts[values["id"]] = ""
        if tag not in self.VOID:
            self._open.append((tag, values.get("id")))

    def handle_endtag(self, tag: str) -> None:
        if tag == "svg":
            self._chart = None
        while self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id is not None:
                self.texts[element_id] += data

    def bars(self, chart: str) -> list[dict[str, str]]:
        return [attrs for tag, attrs, where in self.found if tag == "rect" and where == chart]

    def attrs(self, element_id: str) -> dict[str, str]:
        return next(attrs for _, attrs, _ in self.found if attrs.get("id") == element_id)


def _in(page: Elements, table: str, row: dict[str, str]) -> bool:
    """Whether ``row`` (a tr's attributes) belongs to the table with id ``table``."""
    key = {"steps": "data-step", "models": "data-model"}[table]
    return key in row and "data-runs" not in row


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accepting(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Serving:
    port: int
    log: str = ""  # what the server printed, once it has stopped


@contextmanager
def serving(root: Path, *, token: str) -> Iterator[Serving]:
    """A real `tierflow serve` in ``root`` on a free loopback port, stopped at the end."""
    served = Serving(free_port())
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "serve", "--port", str(served.port)],
        cwd=root,
        env={**os.environ, "TIERFLOW_API_TOKEN": token},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: accepting(served.port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.communicate()[0]
        yield served
    finally:
        proc.terminate()
        try:
            served.log = proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:  # a connection it still waits on
            proc.kill()
            served.log = proc.communicate()[0]


@pytest.fixture
def server(project: Project, ollama: OllamaServer, frontier: OpenAIServer) -> Iterator[str]:
    """`tierflow serve` on a loopback port over the seeded ledger plus one real run."""
    if not Path(CHROMIUM).exists():
        missing_service("Chromium not installed: apt-get install chromium")
    project.workflow(
        {
            "name": "shout",
            "budget": {"daily_usd": 1},
            "steps": [{"id": "loud", "agent": "helper", "tier": "light", "output": {"type": "object"}}],
        }
    )  # fmt: skip
    ollama.reply(Reply(text="not json", prompt_tokens=40, completion_tokens=4))
    frontier.reply(Reply(text='{"ok": true}', prompt_tokens=40, completion_tokens=6))
    assert project.run("shout").status == "succeeded"
    store = project.store()
    try:
        seed_ledger(store)
    finally:
        store.engine.dispose()
    with serving(project.root, token=TOKEN) as served:
        yield f"http://127.0.0.1:{served.port}"
    assert TOKEN not in served.log  # the access log shows token=***
    assert "token=***" in served.log
    assert f"dashboard and API at http://127.0.0.1:{served.port}/" in served.log


def chromium(tmp_path: Path, *args: str) -> str:
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",  # tests run as root in containers
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={tmp_path / 'chromium'}",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


# How far right the page reaches: the document's scroll width, or the right edge
# of the widest element, whichever is more. A page that fits reaches no further
# than the window's inner width.
REACH = (
    "Math.max(document.documentElement.scrollWidth, ...Array.from("
    "document.querySelectorAll('body *'), e => Math.ceil(e.getBoundingClientRect().right)))"
)


@contextmanager
def devtools(tmp_path: Path, url: str, width: int) -> Iterator[Callable[[str], Any]]:
    """Chromium showing ``url`` in a window ``width`` px wide, and a function that
    evaluates JavaScript in the loaded page through the DevTools protocol."""
    profile = tmp_path / "chromium"  # the cookie the token set is in this profile
    (profile / "DevToolsActivePort").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--user-data-dir={profile}",
            "--remote-debugging-port=0",
            f"--window-size={width},900",
            url,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        active = profile / "DevToolsActivePort"
        wait_for(lambda: active.exists() and len(active.read_text().splitlines()) >= 2)
        port = int(active.read_text().splitlines()[0])

        def pages() -> list[dict[str, Any]]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as got:
                return [target for target in json.loads(got.read()) if target["type"] == "page"]

        wait_for(lambda: len(pages()) == 1)  # the window may open after the port does
        [target] = pages()
        with websockets.sync.client.connect(target["webSocketDebuggerUrl"]) as socket_:
            ids = itertools.count(1)

            def evaluate(expression: str) -> Any:
                ident = next(ids)
                params = {"expression": expression, "returnByValue": True}
                socket_.send(
                    json.dumps({"id": ident, "method": "Runtime.evaluate", "params": params})
                )
                while (message := json.loads(socket_.recv(timeout=30))).get("id") != ident:
                    pass  # an event, not our answer
                # While the page navigates there may be no context to evaluate in.
                return message.get("result", {}).get("result", {}).get("value")

            # The window opens on about:blank, and /?token= redirects to /: wait for
            # the page the browser lands on, loaded.
            landing = url.partition("?")[0]
            wait_for(
                lambda: (
                    evaluate("location.href") == landing
                    and evaluate("document.readyState") == "complete"
                )
            )
            yield evaluate
    finally:
        proc.kill()
        proc.wait()


def test_dashboard_in_chromium(tmp_path: Path, server: str, project: Project) -> None:
    url = f"{server}/?token={TOKEN}"
    page = Elements()
    page.feed(chromium(tmp_path, "--dump-dom", url))

    store = project.store()
    since = datetime.now(UTC).date() - timedelta(days=29)
    expected = reports.report(store.engine, since=since).total
    by_tier = {row.key[0]: row for row in reports.spend(store.engine, by="tier", since=since)}
    [real_run] = [run for run in store.runs() if run["workflow"] == "shout"]
    store.engine.dispose()

    # The headline figures are the report's, to the pico-dollar.
    assert Decimal(page.attrs("total-cost")["data-usd"]) == expected.cost_usd
    assert Decimal(page.attrs("total-reference")["data-usd"]) == expected.reference_cost_usd
    assert Decimal(page.attrs("total-savings")["data-usd"]) == expected.savings_usd
    assert page.texts["total-calls"] == str(expected.calls)
    assert page.texts["escalation-rate"] == f"{expected.escalation_rate * 100:.1f}%"

    # Spend per day: one segment per (day, workflow) with spend; together, the total.
    segments = page.bars("chart-spend")
    assert sum(Decimal(bar["data-cost"]) for bar in segments) == expected.cost_usd
    assert {bar["data-workflow"] for bar in segments} == {"triage", "<b>report</b> 'x'", "shout"}
    assert all(float(bar["height"]) > 0 for bar in segments)
    # The tier mix: a bar per tier, cheapest first, with the report's calls.
    tiers = page.bars("chart-tiers")
    assert [bar["data-tier"] for bar in tiers] == ["light", "frontier", "standard"]
    assert {bar["data-tier"]: int(bar["data-calls"]) for bar in tiers} == {
        tier: row.calls for tier, row in by_tier.items()
    }
    savings = {bar["data-series"]: Decimal(bar["data-cost"]) for bar in page.bars("chart-savings")}
    assert savings == {"tiered": expected.cost_usd, "all-frontier": expected.reference_cost_usd}

    # The real run, its step, its tiers and why it escalated.
    assert real_run["id"][:12] in page.texts["runs"]
    assert (
        "loud · succeeded · asked light → used frontier (openai/gpt-4o-mini)" in page.texts["runs"]
    )
    assert "escalated: light/ollama/llama3.2:1b: invalid_output" in page.texts["runs"]
    # How close "shout" is to its daily budget: what its one run spent.
    today = datetime.now(UTC).date()
    spent = sum((call["cost_usd"] for call in project.calls(real_run["id"])), Decimal(0))
    assert spent > 0
    assert "daily budget of workflow 'shout'" in page.texts["budgets"]
    assert Decimal(page.attrs(f"workflow:shout:day:{today}")["data-spent"]) == spent
    assert Decimal(page.attrs(f"workflow:shout:day:{today}")["data-left"]) == 1 - spent
    # A workflow named with markup is text on the page, never an element.
    assert "<b>report</b> 'x'" in page.texts["workflows"]
    assert [attrs.get("id") for tag, attrs, _ in page.found if tag == "b"] == [
        "total-cost",
        "total-reference",
        "total-savings",
        "total-calls",
        "escalation-rate",
    ]

    # Where the money goes: each table dearest first, with the report's figures.
    for table, by in (("steps", "step"), ("models", "model")):
        rows = [attrs for tag, attrs, _ in page.found if tag == "tr" and "data-usd" in attrs]
        shown = [Decimal(attrs["data-usd"]) for attrs in rows if _in(page, table, attrs)]
        expected_rows = reports.spend(project.store().engine, by=by, since=since)
        assert shown == sorted((row.cost_usd for row in expected_rows), reverse=True), table
    workflows = [
        attrs["data-workflow"]
        for tag, attrs, _ in page.found
        if tag == "tr" and "data-workflow" in attrs
    ]
    costs = {row.key[0]: row.cost_usd for row in reports.spend(project.store().engine, since=since)}
    assert workflows == sorted(costs, key=lambda name: -costs[name])
    # The tier bars are as long as each tier's share of the money.
    widths = {bar["data-tier"]: float(bar["width"]) for bar in tiers}
    dearest = max(by_tier.values(), key=lambda row: row.cost_usd)
    assert max(widths, key=lambda tier: widths[tier]) == dearest.key[0]
    # Which steps escalate, and why: the real run's step climbed past invalid output.
    [loud] = [
        attrs
        for tag, attrs, _ in page.found
        if tag == "tr" and attrs.get("data-step") == "shout/loud" and "data-runs" in attrs
    ]
    assert (loud["data-runs"], loud["data-escalated"]) == ("1", "1")
    assert "invalid_output ×1" in page.texts["escalations"]
    # The savings figure links to its definition on the page.
    assert any(
        tag == "a" and attrs.get("href") == "#savings-definition" for tag, attrs, _ in page.found
    )
    assert "reference model with the tokens of the answer" in page.texts["savings-definition"]

    # A date range chosen on the page: a day with no spend shows none.
    empty = Elements()
    empty.feed(chromium(tmp_path, "--dump-dom", f"{server}/?since=2001-01-01&until=2001-01-02"))
    assert Decimal(empty.attrs("total-cost")["data-usd"]) == 0

    # The run page, linked from the runs table: every attempt, its tier and why.
    link = f"/run/{real_run['id']}"
    assert any(tag == "a" and attrs.get("href") == link for tag, attrs, _ in page.found)
    run_page = Elements()
    run_page.feed(chromium(tmp_path, "--dump-dom", f"{server}{link}"))
    attempts = [
        attrs for tag, attrs, _ in run_page.found if tag == "tr" and attrs.get("class") == "attempt"
    ]
    assert [a["data-outcome"] for a in attempts] == ["invalid_output", "ok"]
    assert sum(Decimal(a["data-usd"]) for a in attempts) == spent
    assert "openai/gpt-4o-mini" in run_page.texts["attempts"]

    # Both pages fit a 1400-px window, and the measure sees an element that does not.
    for shown in (url, f"{server}{link}"):
        with devtools(tmp_path, shown, 1400) as evaluate:
            assert evaluate("window.innerWidth") == 1400
            assert evaluate(REACH) <= 1400, shown
            evaluate(
                "document.body.appendChild(Object.assign("
                "document.createElement('div'), {style: 'width: 1600px'})) && 0"
            )
            assert evaluate(REACH) >= 1600

    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "dashboard.png"
    shot.unlink(missing_ok=True)
    chromium(tmp_path, "--window-size=1400,3000", f"--screenshot={shot}", url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    print(f"dashboard screenshot: {shot}")
