"""DEAD_LETTER_REASONS (exported at 0 by the metrics, so alerts see the first dead letter) names
every reason the code gives a dead letter, and docs/dead-letters.md explains each of them."""

from __future__ import annotations

import re
from pathlib import Path

from streamd.pipeline.envelope import DEAD_LETTER_REASONS

ROOT = Path(__file__).resolve().parents[2]


def reasons_in_the_code() -> set[str]:
    found: set[str] = set()
    for path in (ROOT / "streamd").rglob("*.py"):
        text = path.read_text()
        found |= set(re.findall(r'reject\(\s*"(\w+)"', text))  # envelope.py's checks
        found |= set(re.findall(r'Rejection\((?:[^()"]|\([^()]*\))*?"([a-z_]+)"', text, re.S))
        found |= set(re.findall(r'_REASONS\.get\([^,]+,\s*"(\w+)"\)', text))  # sink's fallback
        if "_REASONS = {" in text:
            block = text.split("_REASONS = {", 1)[1].split("}", 1)[0]
            found |= set(re.findall(r':\s*"(\w+)"', block))
    return found


def test_every_reason_the_code_gives_is_listed() -> None:
    found = reasons_in_the_code()
    assert {
        "missing_type",
        "invalid_json",
        "poison",
        "rejected_by_postgres",
    } <= found  # the scan works
    assert found == set(DEAD_LETTER_REASONS)
    assert len(DEAD_LETTER_REASONS) == len(set(DEAD_LETTER_REASONS))


def test_the_docs_explain_every_reason() -> None:
    table = (ROOT / "docs" / "dead-letters.md").read_text().split("## Reasons", 1)[1]
    table = table.split("\n## ", 1)[0]
    documented = set()
    for row in table.splitlines():
        if row.startswith("| `"):
            documented |= set(re.findall(r"`(\w+)`", row.split("|")[1]))
    assert documented == set(DEAD_LETTER_REASONS)
