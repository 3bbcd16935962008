"""The docs stay true to the code: the generated CLI reference and the README's links."""

from __future__ import annotations

import re
from pathlib import Path

from streamd.cli.reference import render_cli_reference

ROOT = Path(__file__).resolve().parents[2]
BEGIN = "<!-- BEGIN GENERATED: streamd CLI reference"
END = "<!-- END GENERATED -->"


def test_cli_page_equals_the_generated_reference() -> None:
    page = (ROOT / "docs" / "cli.md").read_text()
    assert page.count(BEGIN) == 1 and page.count(END) == 1, "docs/cli.md: GENERATED markers lost"
    generated = page.split(BEGIN)[1].split("\n", 1)[1].split(END)[0]
    assert generated.strip() == render_cli_reference().strip(), (
        "docs/cli.md's CLI reference is stale: paste"
        " streamd.cli.reference.render_cli_reference() between its GENERATED markers"
    )


def test_cli_reference_covers_every_command_and_option() -> None:
    reference = render_cli_reference()
    for heading in ("## `streamd serve`", "### `streamd dlq replay`", "### `streamd dev up`"):
        assert heading in reference
    assert "- `--batch N`: Events per round trip, at most. (default `500`" in reference
    assert "env `STREAMD_CONFIG`" in reference
    assert "`--help`:" not in reference  # said once at the top, not under every command


def test_readme_links_point_at_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme)
    local = [t for t in targets if "://" not in t]
    assert local, "README.md links to no docs page"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert not missing, f"README.md links to missing files: {missing}"
