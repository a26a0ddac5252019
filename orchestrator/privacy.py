"""Personal data in a rendered prompt: which kinds it holds, never the values.

A prompt that holds any is sent only to tiers marked local; a step with none
left fails closed. The kinds:

- ``email``: an address with a dotted domain;
- ``phone``: a number Google's libphonenumber (``phonenumbers``) finds valid and
  grouped as its country writes numbers (``Leniency.STRICT_GROUPING``),
  written internationally (+44 …) or in the national form of ``region``;
- ``card``: 13 to 19 digits, in groups or not, that pass the Luhn check;
- ``iban``: a country code, two check digits and up to 30 letters or digits,
  in groups of four or not, that pass ISO 13616's mod-97 check;
- and each of ``privacy.patterns``, a regular expression named in tierflow.yaml.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

KINDS = ("email", "phone", "card", "iban")

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# Seven digits, with the separators people write between them: the least a phone
# number holds. Text without such a run is not handed to libphonenumber at all.
_DIGIT_RUN = re.compile(r"\d(?:[\s().-]{0,3}\d){6}")
_CARD = re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")


def find(
    texts: Iterable[str],
    detect: Iterable[str],
    patterns: Mapping[str, re.Pattern[str]],
    region: str | None,
) -> list[str]:
    """The kinds of personal data in ``texts``, in a fixed order."""
    text = "\n".join(texts)
    wanted = set(detect)
    found = [
        kind
        for kind in KINDS
        if kind in wanted
        and {"email": _has_email, "phone": _has_phone, "card": _has_card, "iban": _has_iban}[kind](
            text, region
        )
    ]
    found += [name for name, pattern in patterns.items() if pattern.search(text)]
    return found


def _has_email(text: str, _region: str | None) -> bool:
    return "@" in text and _EMAIL.search(text) is not None


def _has_phone(text: str, region: str | None) -> bool:
    if _DIGIT_RUN.search(text) is None:
        return False
    phonenumbers = _phonenumbers()
    matcher = phonenumbers.PhoneNumberMatcher(
        text, region, leniency=phonenumbers.Leniency.STRICT_GROUPING
    )
    return any(True for _ in matcher)


def _has_card(text: str, _region: str | None) -> bool:
    return any(luhn(re.sub(r"\D", "", match.group())) for match in _CARD.finditer(text))


def _has_iban(text: str, _region: str | None) -> bool:
    return any(iban_checks(match.group()) for match in _IBAN.finditer(text))


def luhn(digits: str) -> bool:
    """True for a digit string whose Luhn checksum is 0 (payment card numbers)."""
    total = 0
    for position, char in enumerate(reversed(digits)):
        value = int(char)
        if position % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return total % 10 == 0 and len(set(digits)) > 1  # not 0000 0000 0000 0000


def iban_checks(text: str) -> bool:
    """True for an IBAN (spaces aside) whose ISO 13616 mod-97 remainder is 1."""
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    moved = compact[4:] + compact[:4]
    number = "".join(str(int(char, 36)) for char in moved)
    return int(number) % 97 == 1


@functools.cache
def _phonenumbers() -> Any:
    import phonenumbers  # its metadata loads on first use, about 20 ms

    return phonenumbers
