"""Personal data in a prompt keeps the call on local tiers, and fails closed without one.

The frontier is a loopback server driven by the real litellm client; what it
receives is what a hosted provider would have received.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from conftest import Project, tierflow, tiers_for

from orchestrator import privacy
from orchestrator.settings import Privacy
from orchestrator.testing import OllamaServer, OpenAIServer, Reply

POSITIVES = {
    "email": ["write to jane.doe@example.com today", "Contact: a_b+tag@mail.co.uk"],
    "phone": [
        "call (415) 555-0134",
        "my number is +44 20 7946 0958",
        "ring 212-555-0187 after 5",
        "+49 30 901820",
        "415.555.0134",
    ],
    "card": ["card 4111 1111 1111 1111", "5555-5555-5555-4444", "amex 378282246310005"],
    "iban": [
        "IBAN GB82 WEST 1234 5698 7654 32",
        "pay DE89370400440532013000",
        "FR1420041010050500013M02606",
    ],
}
NEAR_MISSES = [
    "meeting on 2024-01-15",
    "due 15/01/2024",
    "order 123456789 shipped",
    "order #A-20931",
    "ISBN 978-3-16-148410-0",
    "ISBN 0-306-40615-2",
    "EAN 4006381333931",
    "version 1.2.3.4",
    "total $1,234,567.89",
    "at 12:30:45",
    "from 192.168.100.200",
    "tracking 1Z999AA10123456784",
    "card-like 1234 5678 9012 3456",  # fails Luhn
    "0000 0000 0000 0000",
    "user@localhost",
    "ticket TKT-2024-000123",
    "the years 1999 and 2000",
    "pi 3.14159265358979",
    "ZIP 94103-1234",
    "GB82 is a code",
    "UUID 123e4567-e89b-12d3-a456-426614174000",
    "timestamp 1701601234567",
]
# The one near-miss found: ten bare digits that form a valid US number.
KNOWN_FALSE_POSITIVES = {"invoice 2024000123": ["phone"]}


def kinds(text: str, config: Privacy | None = None) -> list[str]:
    config = config or Privacy()
    return privacy.find([text], config.detect, config.compiled(), config.region)


@pytest.mark.parametrize(("kind", "text"), [(k, t) for k, ts in POSITIVES.items() for t in ts])
def test_each_kind_is_found(kind: str, text: str) -> None:
    assert kinds(text) == [kind]


def test_near_misses_are_not_personal_data() -> None:
    found = {text: kinds(text) for text in [*NEAR_MISSES, *KNOWN_FALSE_POSITIVES]}
    flagged = {text: hit for text, hit in found.items() if hit}
    assert flagged == KNOWN_FALSE_POSITIVES


def test_checksums() -> None:
    assert privacy.luhn("4111111111111111") and not privacy.luhn("4111111111111112")
    assert privacy.iban_checks("GB82WEST12345698765432")
    assert not privacy.iban_checks("GB83WEST12345698765432")


def test_patterns_region_and_detect_are_configurable() -> None:
    config = Privacy(detect=["email"], patterns={"employee_id": r"\bE-\d{6}\b"}, region=None)
    assert kinds("E-123456 wrote from jane@example.com", config) == ["email", "employee_id"]
    assert kinds("call (415) 555-0134", config) == []  # phone is not detected
    national = Privacy(region=None)
    assert kinds("call (415) 555-0134", national) == []
    assert kinds("call +1 415 555 0134", national) == ["phone"]


def personal_step(project: Project, *, tier: str = "light", **step: Any) -> None:
    project.workflow(
        {
            "name": "one",
            "inputs": {"text": {"type": "string"}},
            "steps": [{"id": "only", "agent": "helper", "tier": tier, **step}],
        }
    )


CANARY = "reach me at canary.7731@example.com"


def test_a_prompt_with_an_email_never_reaches_the_frontier(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    personal_step(project, output={"type": "object", "required": ["ok"]})
    ollama.default = Reply(text="not json")  # every local answer is invalid
    result = project.run("one", {"text": CANARY})
    assert result.status == "failed"
    assert frontier.requests == []
    calls = project.calls(result.run_id)
    assert calls and {(c["tier_used"], c["personal"]) for c in calls} == {("light", "email")}


def test_a_step_with_no_local_tier_fails_closed(
    project: Project, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    personal_step(project, tier="frontier")
    result = project.run("one", {"text": "card 4111 1111 1111 1111"})
    assert result.status == "failed"
    assert frontier.requests == []
    (step,) = project.steps(result.run_id)
    assert "the prompt holds personal data (card)" in step["error"]
    assert project.calls(result.run_id) == []
    # The same step without personal data goes to the frontier as written.
    frontier.reply("fine")
    assert project.run("one", {"text": "card ending 1111"}).status == "succeeded"
    assert len(frontier.chat_requests()) == 1


def test_detection_can_be_turned_off(
    tmp_path: Path, ollama: OllamaServer, frontier: OpenAIServer
) -> None:
    project = Project(
        tmp_path / "p", {"tiers": tiers_for(ollama, frontier), "privacy": {"detect": []}}
    )
    personal_step(project, tier="frontier")
    frontier.reply("fine")
    result = project.run("one", {"text": CANARY})
    assert result.status == "succeeded"
    (request,) = frontier.chat_requests()
    assert CANARY in request["messages"][-1]["content"]
    assert project.calls(result.run_id)[0]["personal"] is None


def test_a_bad_pattern_is_refused_with_its_line(project: Project) -> None:
    config = project.config.read_text() + "privacy:\n  patterns:\n    badge: '[unclosed'\n"
    project.write("tierflow.yaml", config)
    personal_step(project)
    checked = tierflow("validate", "workflows/one.yaml", cwd=project.root)
    assert checked.returncode == 2
    out = checked.stdout + checked.stderr
    assert "tierflow.yaml:" in out and "pattern 'badge' is not a regular expression" in out, out
    assert "Traceback" not in out
