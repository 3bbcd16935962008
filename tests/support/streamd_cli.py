"""Running the real `streamd` command line in a subprocess, for the operator-tool tests."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping


def run_streamd(
    env: Mapping[str, str], *args: str, input: str | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """`python -m streamd ARGS` to completion; stdout and stderr captured as text.

    stdin is empty (not a TTY) unless `input` is given, as for a command run by a script."""
    return subprocess.run(
        [sys.executable, "-m", "streamd", *args],
        env=dict(env),
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def explain(result: subprocess.CompletedProcess[str]) -> str:
    """For assertion messages: the exit code and both outputs."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
