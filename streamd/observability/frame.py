"""The dashboard's frame: a pure function of a Snapshot, so that its layout is unit-tested.

The frame fits `height` rows of `width` columns whatever the number of streams and event types:
the fixed lines come first, then streams and types share what is left (the most active first,
then "... and N more"). The labels are the original pipeline's dashboard's ("Stream Length:",
"Total Events:", ...). Colour marks thresholds (a backlog, dead letters, a stalled stream, a
serve not ready) and is only used when asked for: on a terminal.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence

from streamd.observability.snapshot import InsertLatency, ServeStats, Snapshot, StreamView

WIDTH, HEIGHT = 100, 30
TYPE_COLUMNS = 3
MAX_WARNINGS = 3
LAG_WARN = 1_000  # entries not yet delivered: yellow above this
LAG_ALERT = 100_000  # red above this
STALE_S = 60.0  # a stream with a backlog and no row this long: red

RED, YELLOW, GREEN, RESET = "\x1b[31m", "\x1b[33m", "\x1b[32m", "\x1b[0m"


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


def _compact(value: int | float | None, estimated: bool = False) -> str:
    """A count in at most 7 characters: 12345, 123.4k, 12.3M."""
    if value is None:
        return "-"
    prefix = "~" if estimated else ""
    if abs(value) < 100_000:
        text = f"{value:.1f}" if isinstance(value, float) else str(value)
        return prefix + text
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{prefix}{value / size:.1f}{unit}"
    return prefix + str(value)


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.0f}h"


def _uptime(seconds: float) -> str:
    minutes, s = divmod(int(seconds), 60)
    hours, m = divmod(minutes, 60)
    return f"{hours}h{m:02d}m" if hours else f"{m}m{s:02d}s"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


Line = tuple[str, str | None]  # a line's text and its colour (None: plain)


def _plain(lines: Sequence[str]) -> list[Line]:
    return [(line, None) for line in lines]


# ---------------------------------------------------------------------------------------------


def render(snap: Snapshot, *, width: int = WIDTH, height: int = HEIGHT, color: bool = False) -> str:
    """The frame: at most `height` lines of at most `width` columns (colour codes aside)."""
    rule = "=" * width
    when = dt.datetime.fromtimestamp(snap.taken_at).strftime("%Y-%m-%d %H:%M:%S")
    title = f"{'STREAMING PIPELINE DASHBOARD':<{width - len(when)}}{when}"
    head = _plain([rule, title, rule]) + _totals(snap)
    tail = [*_serve_lines(snap.serve, width, max(2, height // 5)), *_notes(snap), (rule, None)]
    room = max(0, height - len(head) - len(tail))
    views = sorted(snap.streams, key=_activity)
    types = list((snap.postgres.events_by_type if snap.postgres else {}).items())
    stream_rows, type_rows = _share(room, len(views), types, snap)
    middle = _stream_lines(views, stream_rows, snap, width)
    middle += _plain(_type_lines(types, type_rows, snap, width))
    lines = head + middle + tail
    if len(lines) > height:  # a terminal smaller than every fixed line: the end is cut
        lines = [*lines[: height - 1], (rule, None)]
    out = []
    for text, colour in lines:
        text = _clip(text, width)
        out.append(f"{colour}{text}{RESET}" if color and colour else text)
    return "\n".join(out)


def _activity(view: StreamView) -> tuple[int, float, str]:
    """Streams that need a look first (missing, backlog, dead letters), then the busiest."""
    r = view.redis
    backlog = (r.lag or 0) + (r.pending or 0) if r else 0
    trouble = 0 if view.missing or (r is not None and r.error) else 1
    return trouble, -(backlog + (view.dlq_rows or 0) * 10 + (view.rate or 0.0)), view.name


def _share(
    room: int, n_streams: int, types: list[tuple[str, int]], snap: Snapshot
) -> tuple[int, int]:
    """Rows for stream lines and for type lines (each including its header and "N more")."""
    total_types = max(len(types), snap.postgres.types_total if snap.postgres else 0)
    want_streams = 1 + n_streams
    want_types = 1 + (math.ceil(len(types) / TYPE_COLUMNS) or 1) + (total_types > len(types))
    if want_streams + want_types <= room:
        return want_streams, want_types
    types_rows = min(want_types, max(3, room - want_streams))
    return max(0, room - types_rows), types_rows


def _totals(snap: Snapshot) -> list[Line]:
    r, p = snap.redis, snap.postgres
    n = len(snap.streams)
    names = ", ".join(v.name for v in snap.streams[:8]) + (", …" if n > 8 else "")
    what = f"{n} stream{'s' if n != 1 else ''}: {names}" if n != 1 else f"stream {names}"
    lines: list[Line] = [(f"Redis Streams: (group {snap.group}, {what})", None)]
    if r is None:
        lines.append(("  unavailable", None))
    else:
        pending = "n/a (no group yet)" if r.pending is None else str(r.pending)
        redelivered = sum(v.redelivered or 0 for v in snap.streams)
        line = (
            f"  Stream Length: {r.stream_length}  Pending Messages: {pending}  "
            f"Group Lag: {_n(r.lag)}  DLQ Length: {_n(r.dlq_length)}  Consumers: {_consumers(snap)}"
            f"  Redelivered: {redelivered}"
        )
        lag = r.lag or 0
        colour = RED if lag > LAG_ALERT else YELLOW if lag > LAG_WARN else None
        lines.append((line, colour))
    if p is None:
        return [*lines, *_plain(["Postgres:", "  unavailable"])]
    rate = "n/a" if snap.ingest_rate is None else f"{snap.ingest_rate:,.1f} events/sec"
    if snap.ingest_rate is not None:
        window = snap.ingest_rate_window_s
        rate += " (last minute)" if window == 60.0 else f" (last {window:g}s)"
    scope = "totals of these streams only" if len(p.tables) else "no tables yet"
    tables = f"table{'s' if len(p.tables) > 1 else ''} {', '.join(p.tables)}"
    lines += _plain(
        [
            f"Postgres: ({tables}; {scope})",
            f"  Total Events: {_n(p.total_events, p.total_estimated)}  "
            f"Events (last minute): {_n(p.events_last_minute, p.last_minute_estimated)}  "
            f"Ingest Rate: {rate}",
            f"  Latency (produced -> ingested, last minute): p50 {_ms(p.latency_p50_ms)}  "
            f"p99 {_ms(p.latency_p99_ms)}  Last Batch: {_age(p.last_batch_age_s)} ago",
            *_serve_latency(snap),
            _insert_latency(p.insert_latency, p.insert_latency_hint, p.table_size_bytes),
        ]
    )
    reasons = ", ".join(f"{k} {v}" for k, v in p.dlq_by_reason.items()) or "none"
    dlq = f"  DLQ Count: {p.dlq_count}  by reason: {reasons}"
    lines.append((dlq, RED if p.dlq_count else None))
    return lines


def _serve_latency(snap: Snapshot) -> list[str]:
    lat = snap.serve_latency
    if lat is None:
        return []

    def bound(ms: float | None) -> str:
        if ms is None:
            return "n/a"
        return "> 300 s" if math.isinf(ms) else f"<= {ms:g} ms"

    return [
        f"  Latency (produced -> commit, serve's histogram, {lat.window}): "
        f"p50 {bound(lat.p50_ms)}  p99 {bound(lat.p99_ms)}",
        f"  Write retries (faults a batch waited out, {lat.window}): {lat.write_retries}",
    ]


def _consumers(snap: Snapshot) -> str:
    """Consumers in the groups, and how many of them read lately (a dead serve's stay listed
    until reaped: a count alone reads 10 with no serve running)."""
    total = snap.redis.consumers if snap.redis else 0
    active = snap.active_consumers
    return str(total) if active is None or active == total else f"{total} ({active} active)"


def _insert_latency(lat: InsertLatency | None, hint: str | None, size: int) -> str:
    text = f"  Table Size: {human_bytes(size)}  Insert Latency: "
    if lat is not None:
        if lat.interval_mean_ms is not None:
            text += (
                f"{lat.interval_mean_ms:.2f} ms mean (last interval, {lat.interval_calls} calls)"
            )
            return text + f", {lat.max_ms:.2f} ms max since reset"
        return text + (
            f"{lat.mean_ms:.2f} ms mean, {lat.max_ms:.2f} ms max since reset "
            f"({lat.rows_per_call:.0f} rows/call)"
        )
    if hint and "shared_preload_libraries" in hint:
        return text + "n/a (needs pg_stat_statements in shared_preload_libraries)"
    return text + ("n/a: " + hint.removeprefix("insert latency: ") if hint else "n/a")


def _stream_columns(table_width: int, width: int) -> list[tuple[str, int]]:
    """(title, width) per column (no TABLE column when table_width is 0); STREAM takes what
    the others leave."""
    rest = [("LENGTH", 8), ("LAG", 7), ("PENDING", 7), ("RATE/s", 8), ("DLQ", 5)]
    rest += [("ROWS", 9), ("LAST", 6), ("P99 ms", 7)]
    if table_width:
        rest.insert(0, ("TABLE", table_width))
    used = 2 + sum(w + 1 for _, w in rest)
    return [("STREAM", max(8, width - used)), *rest]


def _stream_lines(views: Sequence[StreamView], rows: int, snap: Snapshot, width: int) -> list[Line]:
    if rows <= 0 or not views:
        return []
    tables = len({v.table for v in views}) > 1
    table_width = min(20, max(5, *(len(v.table) for v in views))) if tables else 0
    columns = _stream_columns(table_width, width)
    names = 2 if tables else 1  # columns of names, left-aligned; the numbers are right-aligned
    lines: list[Line] = [
        ("  " + " ".join(_cell(t, w, i < names) for i, (t, w) in enumerate(columns)), None)
    ]
    shown = views if len(views) <= rows - 1 else views[: max(0, rows - 2)]
    for view in shown:
        r = view.redis
        cells = [view.name] + ([view.table] if tables else [])
        if r is not None and r.error:
            cells.append(f"error: {r.error}")
            lines.append(("  " + " ".join(cells), RED))
            continue
        cells += [
            _compact(r.stream_length) if r else "-",
            _compact(r.lag) if r else "-",
            _compact(r.pending) if r else "-",
            "-" if view.rate is None else _compact(round(view.rate, 1)),
            _compact(view.dlq_rows),
            _compact(view.rows, view.rows_estimated),
            _age(view.last_batch_age_s),
            "-" if view.latency_p99_ms is None else _compact(round(view.latency_p99_ms, 1)),
        ]
        text = "  " + " ".join(
            _cell(_clip(c, w), w, i < names)
            for i, (c, (_, w)) in enumerate(zip(cells, columns, strict=True))
        )
        lines.append((text, _stream_colour(view)))
    hidden = len(views) - len(shown) + snap.streams_left_out
    if hidden:
        lines.append((f"  ... and {hidden} more streams (--json lists every one)", None))
    return lines


def _cell(text: str, width: int, left: bool) -> str:
    return text.ljust(width) if left else text.rjust(width)


def _stream_colour(view: StreamView) -> str | None:
    r = view.redis
    if view.missing:
        return RED
    lag = (r.lag or 0) if r else 0
    stalled = lag and (view.last_batch_age_s is None or view.last_batch_age_s > STALE_S)
    if lag > LAG_ALERT or stalled or view.dlq_rows:
        return RED
    return YELLOW if lag > LAG_WARN else None


def _type_lines(types: list[tuple[str, int]], rows: int, snap: Snapshot, width: int) -> list[str]:
    p = snap.postgres
    if rows <= 0 or p is None:
        return []
    total = max(len(types), p.types_total)
    cells_room = (rows - 1) * TYPE_COLUMNS
    shown = (
        types
        if len(types) <= cells_room and total == len(types)
        else types[: max(0, (rows - 2) * TYPE_COLUMNS)]
    )
    header = "Events by Type:" + (" (estimated)" if p.by_type_estimated else "")
    if len(shown) < total:
        header += f" (top {len(shown)} of {total})"
    lines = [header]
    if not types:
        return [*lines, "  (none)"]
    cell = width // TYPE_COLUMNS
    for i in range(0, len(shown), TYPE_COLUMNS):
        parts = []
        for name, count in shown[i : i + TYPE_COLUMNS]:
            number = _n(count, p.by_type_estimated)
            parts.append(f"  {_clip(name, cell - len(number) - 4)}: {number}".ljust(cell))
        lines.append("".join(parts).rstrip())
    if len(shown) < total:
        lines.append(f"  ... and {total - len(shown)} more types")
    return lines


def _serve_lines(serves: list[ServeStats], width: int, budget: int) -> list[Line]:
    """A head line per serve, then its processes, three to a line; when that would take more
    than `budget` lines, one summary line per serve instead."""
    if not serves:
        return [("Serve Processes: none running for these streams and group", None)]
    per_line = max(1, width // 33)
    full = sum(1 + math.ceil(len(s.processes) / per_line) for s in serves)
    lines: list[Line] = []
    for serve in serves:
        ready = "ready" if serve.ready else "not ready"
        head = (
            f"Serve Processes: (supervisor {serve.pid}, {serve.state or 'running'}, {ready}, "
            f"up {_uptime(serve.uptime_s)}, restarts {serve.restarts})"
        )
        lines.append((head, GREEN if serve.ready else RED))
        if full > budget:
            cpu = sum(p.cpu_percent or 0.0 for p in serve.processes)
            rss = sum(p.rss_bytes or 0 for p in serve.processes)
            workers = sum(1 for p in serve.processes if p.role.startswith("worker"))
            summary = f"  {len(serve.processes)} processes ({workers} workers): CPU {cpu:.1f}%"
            lines.append((f"{summary}, RSS {human_bytes(rss)} in all", None))
            continue
        cells = []
        for proc in serve.processes:
            cpu_text = "n/a" if proc.cpu_percent is None else f"{proc.cpu_percent:.1f}%"
            rss_text = "n/a" if proc.rss_bytes is None else human_bytes(proc.rss_bytes)
            cells.append(f"{proc.pid:>7} {proc.role:<10}{cpu_text:>6}{rss_text:>9}")
        for i in range(0, len(cells), per_line):
            row = "".join(c.ljust(width // per_line) for c in cells[i : i + per_line])
            lines.append((row.rstrip(), None))
    return lines


def _notes(snap: Snapshot) -> list[Line]:
    """Errors of a source, then warnings (a stream that does not exist, ...), a few at most."""
    notes = [f"{source.capitalize()} unavailable: {error}" for source, error in snap.errors.items()]
    notes += [f"Warning: {w}" for w in snap.warnings]
    if len(notes) > MAX_WARNINGS:
        notes = [
            *notes[: MAX_WARNINGS - 1],
            f"... and {len(notes) - MAX_WARNINGS + 1} more (--json)",
        ]
    return [(note, RED) for note in notes]
