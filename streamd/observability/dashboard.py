"""`streamd monitor`: the dashboard, laid out as the original pipeline's, refreshed in place on a
terminal.

On a TTY each frame replaces the previous one; into a pipe or file frames follow each other, and
`--json` prints one JSON object per line per refresh (exactly one with `--once`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import sys
from typing import TextIO

import orjson

from streamd.config.settings import Settings
from streamd.observability.monitor import Monitor, Snapshot

RULE = "=" * 60
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen


def human_bytes(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit in ("bytes", "kB") else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _n(value: int | float | None, estimated: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"~{value}" if estimated else str(value)


def _uptime(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def render(snap: Snapshot) -> str:
    when = dt.datetime.fromtimestamp(snap.taken_at).strftime("%Y-%m-%d %H:%M:%S")
    lines = [RULE, f"{'STREAMING PIPELINE DASHBOARD':<40}{when:>20}", RULE]
    lines += _redis_lines(snap)
    lines += _postgres_lines(snap)
    lines += _serve_lines(snap)
    for source, error in snap.errors.items():
        lines.append(f"{source.capitalize()} unavailable: {error}")
    lines.append(RULE)
    return "\n".join(lines)


def _redis_lines(snap: Snapshot) -> list[str]:
    r = snap.redis
    lines = [f"Redis Streams: (stream {snap.stream}, group {snap.group})"]
    if r is None:
        return [*lines, "  unavailable", ""]
    pending = "n/a (no group yet)" if r.pending is None else str(r.pending)
    return [
        *lines,
        f"  Stream Length: {r.stream_length}",
        f"  Pending Messages: {pending}",
        f"  Group Lag: {_n(r.lag)}",
        f"  DLQ Length: {r.dlq_length}",
        f"  Consumers: {r.consumers}",
        "",
    ]


def _postgres_lines(snap: Snapshot) -> list[str]:
    p = snap.postgres
    if p is None:
        return ["Postgres:", "  unavailable", ""]
    rate = "n/a" if snap.ingest_rate is None else f"{snap.ingest_rate:,.1f} events/sec"
    if snap.ingest_rate is not None and snap.ingest_rate_window_s == 60.0:
        rate += " (last minute)"
    lines = [
        "Postgres:",
        f"  Total Events: {_n(p.total_events, p.total_estimated)}",
        f"  Events (last minute): {_n(p.events_last_minute, p.last_minute_estimated)}",
        f"  Ingest Rate: {rate}",
        f"  DLQ Count: {p.dlq_count}",
        f"  Table Size: {human_bytes(p.table_size_bytes)}",
    ]
    if p.insert_latency is not None:
        lat = p.insert_latency
        lines.append(
            f"  Insert Latency: {lat.mean_ms:.2f} ms mean, {lat.max_ms:.2f} ms max "
            f"({lat.calls} calls, {lat.rows_per_call:.0f} rows/call)"
        )
    elif p.insert_latency_hint:
        hint = p.insert_latency_hint.removeprefix("insert latency: ")
        lines.append(f"  Insert Latency: n/a: {hint}")
    lines += ["", "Events by Type:" + (" (estimated)" if p.by_type_estimated else "")]
    lines += [f"  {name}: {count}" for name, count in p.events_by_type.items()] or ["  (none)"]
    return [*lines, ""]


def _serve_lines(snap: Snapshot) -> list[str]:
    if not snap.serve:
        return ["Serve Processes: none running for this stream and group", ""]
    lines: list[str] = []
    for serve in snap.serve:
        ready = "ready" if serve.ready else "not ready"
        lines.append(
            f"Serve Processes: (supervisor {serve.pid}, {serve.state or 'running'}, {ready}, "
            f"up {_uptime(serve.uptime_s)}, restarts {serve.restarts})"
        )
        lines.append(f"  {'PID':>8}  {'ROLE':<12}{'CPU%':>7}{'RSS':>12}")
        for proc in serve.processes:
            cpu = "n/a" if proc.cpu_percent is None else f"{proc.cpu_percent:.1f}"
            rss = "n/a" if proc.rss_bytes is None else human_bytes(proc.rss_bytes)
            lines.append(f"  {proc.pid:>8}  {proc.role:<12}{cpu:>7}{rss:>12}")
        lines.append("")
    return lines


async def run_monitor(
    settings: Settings,
    *,
    interval_s: float,
    once: bool,
    as_json: bool,
    out: TextIO | None = None,
) -> int:
    """Print frames until interrupted (or one, with once); exit code 1 if the last frame had
    errors, so `monitor --once` can serve as a check."""
    out = out or sys.stdout
    in_place = not as_json and not once and out.isatty()
    errors = False
    async with Monitor(settings) as monitor:
        while True:
            # With --once there is no previous frame to compare CPU times with: measure over a
            # short window instead.
            snap = await monitor.snapshot(min_cpu_sample_s=0.5 if once else 0.0)
            errors = bool(snap.errors)
            if as_json:
                out.write(orjson.dumps(snap.to_json()).decode() + "\n")
            else:
                out.write((CLEAR if in_place else "") + render(snap) + "\n")
            out.flush()
            if once:
                break
            await asyncio.sleep(interval_s)
    return 1 if errors else 0
