"""`streamd logs`: formatting, filtering, pass-through of other lines, and --follow across appends,
rotation and truncation, on the real command and on a real serve's log."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from streamd.observability.logview import LogView, format_record, last_lines_offset
from tests.support.helpers import ServeProcess, wait_until
from tests.support.streamd_cli import explain, run_streamd

pytestmark = pytest.mark.timeout(60)


def line(event: str, level: str = "info", **fields: object) -> str:
    record = {"event": event, "level": level, "timestamp": "2026-11-25T18:49:47.438555Z"}
    return orjson.dumps(record | fields).decode()


# --- formatting ------------------------------------------------------------------------------


def test_a_json_line_becomes_time_level_event_fields_then_context() -> None:
    raw = line("batch_flushed", rows=500, ms=4.1, pid=7, proc=0, note="two words", ok=True)
    assert LogView().render(raw) == (
        '2026-11-25 18:49:47.438 INFO    batch_flushed rows=500 ms=4.1 note="two words" '
        "ok=true proc=0 pid=7"
    )


def test_colour_only_when_asked() -> None:
    raw = line("write_retrying", "warning", attempt=2)
    plain = LogView(color=False).render(raw)
    painted = LogView(color=True).render(raw)
    assert plain is not None and "\x1b[" not in plain
    assert painted is not None
    assert "\x1b[33mWARNING" in painted and "\x1b[1mwrite_retrying" in painted


def test_an_exception_is_shown_below_its_line() -> None:
    record = orjson.loads(line("worker_crashed", "error"))
    record["exception"] = "Traceback (most recent call last):\n  File x\nValueError: boom"
    shown = format_record(record).splitlines()
    assert shown[0].endswith("ERROR   worker_crashed")
    assert shown[1:] == [
        "    Traceback (most recent call last):",
        "      File x",
        "    ValueError: boom",
    ]


@pytest.mark.parametrize(
    "raw",
    ["plain", "Traceback (most recent call last):", "{not json", '{"no_event": 1}', "[1, 2]", ""],
)
def test_other_lines_pass_through_unchanged(raw: str) -> None:
    assert LogView().render(raw) == raw
    assert LogView(min_level=50).render(raw) == raw  # --level never hides them


def test_level_and_grep_filters() -> None:
    view = LogView(min_level=30, grep="rows")
    assert view.render(line("batch_flushed", "info", rows=1)) is None
    assert view.render(line("batch_slow", "warning", rows=1)) is not None
    assert view.render(line("batch_slow", "error")) is None  # no "rows" in it
    assert view.render("rows: a plain line") == "rows: a plain line"


@pytest.mark.parametrize("size", [0, 1, 5, 10, 11, 5000])
@pytest.mark.parametrize("count", [0, 1, 3, 10, 2000])
@pytest.mark.parametrize("final_newline", [True, False])
def test_last_lines_offset(size: int, count: int, final_newline: bool) -> None:
    lines = [f"line {i} " + "x" * (i % 37) for i in range(size)]
    data = ("\n".join(lines) + ("\n" if final_newline and lines else "")).encode()
    f = io.BytesIO(data)
    tail = data[last_lines_offset(f, count) :].decode().splitlines()
    assert tail == (lines[-count:] if count else [])


# --- the command -----------------------------------------------------------------------------


def test_logs_from_stdin_with_level(env: dict[str, str]) -> None:
    text = "\n".join(
        [
            line("debug_thing", "debug"),
            line("batch_flushed", rows=3),
            "not json",
            line("oops", "error"),
        ]
    )
    result = run_streamd(env, "logs", "--level", "info", input=text + "\n")
    assert result.returncode == 0, explain(result)
    out = result.stdout.splitlines()
    assert len(out) == 3
    assert "INFO    batch_flushed rows=3" in out[0]
    assert out[1] == "not json"
    assert "ERROR   oops" in out[2]
    assert "\x1b[" not in result.stdout  # a pipe: no colour


def test_logs_from_a_file_with_grep_and_bad_arguments(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "streamd.log"
    log.write_text(line("a", n=1) + "\n" + line("b", n=2) + "\nlast line, b, without newline")
    result = run_streamd(env, "logs", str(log), "--grep", "b")
    assert result.returncode == 0, explain(result)
    assert result.stdout.splitlines()[0].endswith("INFO    b n=2")
    assert result.stdout.splitlines()[1:] == ["last line, b, without newline"]
    missing = run_streamd(env, "logs", str(tmp_path / "nope.log"))
    assert missing.returncode == 1 and "cannot read" in missing.stderr
    bad_level = run_streamd(env, "logs", str(log), "--level", "loud")
    assert bad_level.returncode == 2 and "--level" in bad_level.stderr


def test_logs_of_a_real_serve(
    env: dict[str, str], start_serve: Callable[..., ServeProcess]
) -> None:
    serve = start_serve()
    serve.wait_ready(1)
    result = run_streamd(env, "logs", str(serve.log_path), "--grep", "worker_started")
    assert result.returncode == 0, explain(result)
    (shown,) = result.stdout.splitlines()
    assert " INFO    worker_started tasks=5 stream=events group=streamd" in shown


class Tail:
    """`streamd logs FILE --follow` as a subprocess, its output collected by a thread."""

    def __init__(self, env: dict[str, str], path: Path, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streamd", "logs", str(path), "--follow", *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[str] = []
        assert self.proc.stdout is not None
        stdout = self.proc.stdout
        self.reader = threading.Thread(target=self._read, args=(stdout,), daemon=True)
        self.reader.start()

    def _read(self, stdout: io.BufferedReader) -> None:  # type: ignore[type-arg]
        for raw in stdout:
            self.lines.append(raw.decode().rstrip("\n"))

    def wait_for(self, text: str) -> None:
        wait_until(lambda: any(text in x for x in self.lines), timeout=20, message=text)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def append(path: Path, *texts: str) -> None:
    with open(path, "a") as f:
        f.write("".join(t + "\n" for t in texts))


def test_follow_appends_rotation_and_truncation(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "streamd.log"
    append(log, *(line(f"old_{i}") for i in range(5)))
    tail = Tail(env, log, "-n", "2")
    try:
        tail.wait_for("old_4")
        assert [x.split()[3] for x in tail.lines] == ["old_3", "old_4"]  # the last 2 lines only
        append(log, line("appended"))
        tail.wait_for("appended")
        with open(log, "a") as f:  # a line written in two pieces is printed once, whole
            f.write('{"event": "split_')
            f.flush()
            wait_until(lambda: True)
            f.write('line", "level": "info"}\n')
        tail.wait_for("split_line")
        os.rename(log, tmp_path / "streamd.log.1")  # logrotate: move away, start a new file
        append(tmp_path / "streamd.log.1", line("late_in_old_file"))
        append(log, line("in_new_file"))
        tail.wait_for("in_new_file")
        tail.wait_for("late_in_old_file")
        # copytruncate: same file, emptied. (As for tail -F, truncation shows as the file being
        # shorter than what was read; a real log is long by the time it is rotated.)
        append(log, line("long", padding="x" * 4000))
        tail.wait_for("padding")
        log.write_text("")
        append(log, line("after_truncate"))
        tail.wait_for("after_truncate")
        append(log, "plain text passes")
        tail.wait_for("plain text passes")
    finally:
        tail.stop()
    assert sum("appended" in x for x in tail.lines) == 1
    assert [x for x in tail.lines if "split_line" in x] == ["INFO    split_line"]


def test_logs_without_a_file_at_a_terminal_says_what_to_do(env: dict[str, str]) -> None:
    import pty

    leader, follower = pty.openpty()
    try:
        result = subprocess.run(
            [sys.executable, "-m", "streamd", "logs"],
            env=env,
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)
    assert result.returncode == 2, explain(result)
    assert "pipe logs in" in result.stderr


# --- -n without --follow, and a reader that leaves -------------------------------------------


def test_lines_counts_what_is_shown_without_follow(env: dict[str, str], tmp_path: Path) -> None:
    log = tmp_path / "streamd.log"
    records = [line(f"ev_{i}", "warning" if i % 100 == 0 else "info") for i in range(5000)]
    log.write_text("\n".join(records) + "\n")
    last = run_streamd(env, "logs", str(log), "-n", "3")
    assert last.returncode == 0, explain(last)
    assert [x.split()[3] for x in last.stdout.splitlines()] == ["ev_4997", "ev_4998", "ev_4999"]
    # The last 2 warnings, far apart in the file: -n counts lines after the filters.
    warned = run_streamd(env, "logs", str(log), "-n", "2", "--level", "warning")
    assert [x.split()[3] for x in warned.stdout.splitlines()] == ["ev_4800", "ev_4900"]
    piped = run_streamd(env, "logs", "-n", "2", "--grep", "ev_49", input=log.read_text())
    assert [x.split()[3] for x in piped.stdout.splitlines()] == ["ev_4998", "ev_4999"]
    everything = run_streamd(env, "logs", str(log))
    assert len(everything.stdout.splitlines()) == 5000  # without -n: all of it
    bad = run_streamd(env, "logs", "-n", "2", "--follow", input="x\n")
    assert bad.returncode == 2 and "-n with --follow needs a FILE" in bad.stderr


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_a_reader_that_leaves_ends_it_quietly(
    env: dict[str, str], tmp_path: Path, source: str
) -> None:
    log = tmp_path / "streamd.log"
    log.write_text("".join(line(f"ev_{i}") + "\n" for i in range(50_000)))
    streamd = f"{sys.executable} -m streamd logs"
    command = f"{streamd} {log} | head -1" if source == "file" else f"{streamd} < {log} | head -1"
    done = subprocess.run(
        ["bash", "-c", f"{command}; exit ${{PIPESTATUS[0]}}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (0, ""), explain(done)
    assert "ev_0" in done.stdout
