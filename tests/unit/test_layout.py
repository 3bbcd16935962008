"""The package's shape: every module small enough to read at once."""

from __future__ import annotations

from pathlib import Path

MAX_LINES = 500
PACKAGE = Path(__file__).resolve().parents[2] / "streamd"


def test_every_module_is_under_the_size_budget() -> None:
    sizes = {p: len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    over = {str(p.relative_to(PACKAGE)): n for p, n in sizes.items() if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines (split them by what they own): {over}"
