"""Test kinds by folder: tests/unit (pure logic, no servers, seconds), tests/integration (real
Redis, Postgres and `streamd serve`), tests/faults (chaos, hung servers, fuzzing, outages). Each
test is marked by its folder, so `./run.sh test -m unit` runs only the fast ones. The shared
fixtures live in tests/support/fixtures.py."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["tests.support.fixtures", "tests.support.prometheus", "tests.support.cluster"]

_KINDS = ("unit", "integration", "faults")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        kind = Path(str(item.path)).parent.name
        if kind in _KINDS:
            item.add_marker(getattr(pytest.mark, kind))
