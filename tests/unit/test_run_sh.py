"""run.sh's embedded Python (the demo's look at Redis and Postgres) imports what exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

RUN_SH = Path(__file__).resolve().parents[2] / "run.sh"


def test_the_embedded_python_compiles_and_its_streamd_imports_resolve() -> None:
    blocks = re.findall(r"<<'PY'\n(.*?)\nPY\n", RUN_SH.read_text(), flags=re.S)
    assert blocks, "run.sh has no embedded Python any more: drop this test"
    for source in blocks:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("streamd"):
                module = __import__(node.module or "", fromlist=["_"])
                for alias in node.names:
                    assert hasattr(module, alias.name), f"run.sh: {node.module}.{alias.name}"
