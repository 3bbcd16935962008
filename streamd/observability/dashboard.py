"""`streamd monitor`: the dashboard, refreshed in place on a terminal.

On a TTY each frame replaces the previous one, fits the terminal (100x30 when it cannot tell) and
is coloured for thresholds (unless NO_COLOR is set); into a pipe or file frames of 100x30 follow
each other without any control code, and `--json` prints one JSON object per line per refresh
(exactly one with `--once`).

Exit status, for `monitor --once` as a check: 0 when every source answered and every stream
named in the config exists; 1 when Redis or Postgres could not be read, or a named stream does not
exist (no such key, no rows: a typo?) or is a key of another type. A pattern that matches nothing
is a warning only: its streams may not have been created yet.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sys
from typing import TextIO

import orjson

from streamd.config.settings import Settings
from streamd.observability.frame import HEIGHT, WIDTH, human_bytes, render
from streamd.observability.monitor import Monitor, Snapshot

__all__ = ["human_bytes", "render", "run_monitor", "snapshot_failed"]

CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def snapshot_failed(snap: Snapshot) -> bool:
    """A source failed, or a stream the config names is not there."""
    broken = [v for v in snap.streams if v.redis is not None and v.redis.error]
    return bool(snap.errors or snap.missing_streams or broken)


def _frame_size(out: TextIO) -> tuple[int, int]:
    if not out.isatty():
        return WIDTH, HEIGHT
    size = shutil.get_terminal_size((WIDTH, HEIGHT))
    return max(60, size.columns), max(12, size.lines)


async def run_monitor(
    settings: Settings,
    *,
    interval_s: float,
    once: bool,
    as_json: bool,
    out: TextIO | None = None,
) -> int:
    """Print frames until interrupted (or one, with once); exit code 1 if the last frame had
    errors or a missing stream, so `monitor --once` can serve as a check."""
    out = out or sys.stdout
    tty = out.isatty()
    in_place = not as_json and not once and tty
    color = tty and not as_json and not os.environ.get("NO_COLOR")
    failed = False
    async with Monitor(settings) as monitor:
        while True:
            # With --once there is no previous frame to compare CPU times with: measure over a
            # short window instead.
            snap = await monitor.snapshot(min_cpu_sample_s=0.5 if once else 0.0)
            failed = snapshot_failed(snap)
            if as_json:
                out.write(orjson.dumps(snap.to_json()).decode() + "\n")
            else:
                width, height = _frame_size(out)
                frame = render(snap, width=width, height=height, color=color)
                out.write((CLEAR if in_place else "") + frame + "\n")
            out.flush()
            if once:
                break
            await asyncio.sleep(interval_s)
    return 1 if failed else 0
