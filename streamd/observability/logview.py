"""`streamd logs`: pretty-print streamd's JSON log lines from a file or stdin, optionally following
the file like `tail -F` (across rotation and truncation).

    journalctl -u streamd -o cat | streamd logs --level warning
    streamd logs /var/log/streamd.log --follow --grep ingest_progress
    streamd logs /var/log/streamd.log -n 20 --level warning    # the last 20 warnings

A JSON object line becomes `time level event key=value ... context`; anything else (a traceback, a
line from another program) passes through unchanged and is never hidden by --level, since the
lines that are not JSON are usually the ones that explain a crash.
"""

from __future__ import annotations

import io
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TextIO

import orjson

from streamd.errors import ConfigError, StreamdError

LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "critical": 50}
CONTEXT_KEYS = ("role", "proc", "pid", "consumer")  # bound once per process: shown last, dimmed
_LEVEL_COLORS = {"debug": "2", "info": "32", "warning": "33", "warn": "33", "error": "1;31"}
_RESET = "\x1b[0m"
POLL_S = 0.2


class LogFileError(StreamdError):
    """The log file cannot be read."""


@dataclass(frozen=True, slots=True)
class LogView:
    min_level: int = 0
    grep: str | None = None
    color: bool = False

    def render(self, raw: str) -> str | None:
        """The line to print for one input line (without its newline), or None to skip it."""
        if self.grep is not None and self.grep not in raw:
            return None
        record = parse_record(raw)
        if record is None:
            return raw  # not ours: unchanged
        level = str(record.get("level", "info")).lower()
        if LEVELS.get(level, 20) < self.min_level:
            return None
        return format_record(record, self.color)


def parse_record(raw: str) -> dict[str, Any] | None:
    if not raw.lstrip().startswith("{"):
        return None
    try:
        record = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def min_level(name: str | None) -> int:
    if name is None:
        return 0
    level = LEVELS.get(name.lower())
    if level is None:
        raise ConfigError(f"--level {name!r}: one of debug, info, warning, error, critical")
    return level


def _paint(text: str, code: str, color: bool) -> str:
    return f"\x1b[{code}m{text}{_RESET}" if color and code else text


def _value(value: Any) -> str:
    """Plain words as they are; text with spaces or quotes, and everything else, as JSON."""
    if isinstance(value, str) and value and not any(c in value for c in ' ="\n'):
        return value
    return orjson.dumps(value, default=str).decode()


def _timestamp(value: Any) -> str:
    """ISO 8601 from structlog ("2026-11-25T18:49:47.438555Z") shortened to milliseconds."""
    text = str(value)
    if len(text) >= 23 and text[10] == "T":
        return f"{text[:10]} {text[11:23]}"
    return text


def format_record(record: dict[str, Any], color: bool = False) -> str:
    fields = dict(record)
    when = _timestamp(fields.pop("timestamp", ""))
    level = str(fields.pop("level", "info")).lower()
    event = str(fields.pop("event", ""))
    exception = fields.pop("exception", None)
    context = {k: fields.pop(k) for k in CONTEXT_KEYS if k in fields}
    parts = [
        _paint(when, "2", color),
        _paint(f"{level.upper():<7}", _LEVEL_COLORS.get(level, ""), color),
        _paint(event, "1", color),
    ]
    parts += [f"{_paint(k, '36', color)}={_value(v)}" for k, v in fields.items()]
    parts += [_paint(f"{k}={_value(v)}", "2", color) for k, v in context.items()]
    line = " ".join(p for p in parts if p)
    if exception:
        line += "\n" + "\n".join("    " + x for x in str(exception).rstrip().splitlines())
    return line


# ---------------------------------------------------------------------------------------------
# reading


def _lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Complete lines from a sequence of byte chunks (a last unterminated line included)."""
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield _decode(line)
    if pending:
        yield _decode(pending)


def _decode(line: bytes) -> str:
    return line.rstrip(b"\r").decode("utf-8", "replace")


def tail_offset(f: BinaryIO, view: LogView, count: int, end: int) -> tuple[int, list[str]]:
    """Where the last `count` lines that `view` shows, among the complete lines before `end`,
    begin, and those lines rendered. Reads back from the end in growing steps: a file of
    gigabytes with the lines wanted near its end costs a few blocks."""
    want = count
    while True:
        start = _lines_back(f, want, end)
        f.seek(start)
        shown = _rendered(_lines(_read_range(f, end - start)), view)
        if len(shown) >= count or start == 0:
            return start, shown[-count:] if count else []
        want *= 4


def _lines_back(f: BinaryIO, count: int, end: int) -> int:
    """The offset where the last `count` lines before `end` begin."""
    if count <= 0:
        return end
    block, pos, newlines = 8192, end, 0
    while pos > 0:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step)
        if pos + step == end and data.endswith(b"\n"):
            data = data[:-1]  # the final newline ends the last line, it does not start one
        newlines += data.count(b"\n")
        if newlines >= count:
            index = -1
            for _ in range(newlines - count + 1):
                index = data.index(b"\n", index + 1)
            return pos + index + 1
        block *= 2
    return 0


def last_lines_offset(f: BinaryIO, count: int) -> int:
    """The offset where the last `count` lines of the file begin."""
    return _lines_back(f, count, f.seek(0, os.SEEK_END))


def _complete_end(f: BinaryIO) -> int:
    """The end of the file's last complete line: a line being written is left to the follower."""
    end = f.seek(0, os.SEEK_END)
    if end == 0:
        return 0
    f.seek(end - 1)
    if f.read(1) == b"\n":
        return end
    return last_lines_offset(f, 1)


def _read_range(f: BinaryIO, size: int) -> Iterator[bytes]:
    while size > 0:
        chunk = f.read(min(65536, size))
        if not chunk:
            return
        size -= len(chunk)
        yield chunk


def _rendered(lines: Iterable[str], view: LogView) -> list[str]:
    return [shown for raw in lines if (shown := view.render(raw)) is not None]


class Follower:
    """Reads a file from `offset` to its end, then keeps reading what is appended, like
    `tail -F`: a file replaced by rotation is reopened (after what the old one still held is
    read), and a file truncated in place is read again from its start. As with tail, truncation
    is seen as the file being shorter than what was read: lines written into it faster than that
    are missed."""

    def __init__(self, file: BinaryIO, path: Path, offset: int) -> None:
        self.path = path
        self.file = file
        self.file.seek(offset)
        self.inode = os.fstat(self.file.fileno()).st_ino

    def chunks(self, stop: Callable[[], bool]) -> Iterator[bytes]:
        while not stop():
            data = self.file.read(65536)
            if data:
                yield data
                continue
            if not self._reopened():
                time.sleep(POLL_S)

    def _reopened(self) -> bool:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False  # mid-rotation: the new file is not there yet
        if st.st_ino != self.inode:
            self.file.close()
            self.file = open(self.path, "rb")  # noqa: SIM115 - kept open across calls
            self.inode = os.fstat(self.file.fileno()).st_ino
            return True
        if st.st_size < self.file.tell():
            self.file.seek(0)  # truncated (copytruncate): start over
            return True
        return False

    def close(self) -> None:
        self.file.close()


def _read_all(f: BinaryIO) -> Iterator[bytes]:
    while chunk := f.read(65536):
        yield chunk


def _read_pipe(f: io.BufferedReader) -> Iterator[bytes]:
    """What has arrived, as soon as it arrives (read() would wait for a full 64 KiB)."""
    while chunk := f.read1(65536):
        yield chunk


FOLLOW_LAST = 10  # --follow starts with this many lines unless -n says otherwise


def show_logs(
    path: str | None,
    view: LogView,
    *,
    follow: bool = False,
    last: int | None = None,
    out: TextIO | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> None:
    """Print the rendered lines of `path` (None or "-": stdin), or only the `last` N of them
    that the view shows; with follow, keep going (starting with the last 10 unless `last`)."""
    out = out or sys.stdout
    if path in (None, "-"):
        _show_stdin(path, view, follow=follow, last=last, out=out)
        return
    file_path = Path(path)
    try:
        f = open(file_path, "rb")  # noqa: SIM115 - closed below, or by the Follower
    except OSError as exc:
        raise LogFileError(f"{path}: cannot read: {exc.strerror or exc}") from None
    if not follow:
        with f:
            if last is None:
                _emit(_lines(_read_all(f)), view, out, live=False)
            else:
                _, shown = tail_offset(f, view, last, f.seek(0, os.SEEK_END))
                _write(shown, out)
        return
    end = _complete_end(f)
    _, shown = tail_offset(f, view, FOLLOW_LAST if last is None else last, end)
    _write(shown, out)
    follower = Follower(f, file_path, end)
    try:
        _emit(_lines(follower.chunks(stop)), view, out, live=True)
    finally:
        follower.close()


def _show_stdin(
    path: str | None, view: LogView, *, follow: bool, last: int | None, out: TextIO
) -> None:
    if path is None and sys.stdin.isatty():
        raise ConfigError(
            "no FILE given and stdin is a terminal: name a log file, or pipe logs in "
            "(journalctl -u streamd -o cat | streamd logs)"
        )
    if follow and last is not None:
        raise ConfigError(
            "-n with --follow needs a FILE: a pipe has no end to count back from "
            "(a pipe is followed anyway; journalctl -n N -f counts for you)"
        )
    stdin = sys.stdin.buffer
    chunks = _read_pipe(stdin) if isinstance(stdin, io.BufferedReader) else _read_all(stdin)
    if last is None:
        _emit(_lines(chunks), view, out, live=True)  # a pipe may be live
        return
    kept: deque[str] = deque(maxlen=last)
    for raw in _lines(chunks):
        shown = view.render(raw)
        if shown is not None and last:
            kept.append(shown)
    _write(list(kept), out)


def _write(shown: list[str], out: TextIO) -> None:
    for text in shown:
        out.write(text + "\n")
    out.flush()


def _emit(lines: Iterable[str], view: LogView, out: TextIO, *, live: bool) -> None:
    for raw in lines:
        shown = view.render(raw)
        if shown is not None:
            out.write(shown + "\n")
            if live:
                out.flush()  # someone is watching: never hold a line back
    out.flush()
