"""The benchmark harness's own accounting (bench/run.py): pure parts, no servers."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import orjson
import psutil

from bench.run import CpuSample, DrainResult, report, report_from_json, tree_cpu

BURN = "import time\nend = time.process_time() + 0.3\nwhile time.process_time() < end: pass\n"
# a parent that waits on a child which burns CPU, then sleeps (so it is still alive to be read)
PARENT = (
    f"import subprocess, sys\nsubprocess.run([sys.executable, '-c', {BURN + 'time.sleep(30)'!r}])\n"
)


def test_tree_cpu_counts_children_that_already_exited() -> None:
    before = tree_cpu(os.getpid())
    subprocess.run([sys.executable, "-c", BURN], check=True)
    # the child is gone: its CPU is only in our children_* times, which tree_cpu must add
    assert tree_cpu(os.getpid()) - before >= 0.25


def test_tree_cpu_counts_live_grandchildren() -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        used = 0.0
        for _ in range(100):
            used = tree_cpu(parent.pid)
            if used >= 0.25:
                break
            time.sleep(0.05)
        assert used >= 0.25
    finally:
        for proc in psutil.Process(parent.pid).children(recursive=True):
            proc.kill()
        parent.kill()
        parent.wait()
    assert tree_cpu(None) == 0.0


def test_report_shows_cpu_per_event_and_survives_a_json_round_trip(tmp_path: Path) -> None:
    drain = DrainResult(
        {"seed design": [50_000.0], "streamd": [150_000.0], "raw parallel COPY": [300_000.0]},
        {
            "seed design": [CpuSample(20.0, 6.0, 28.0)],
            "streamd": [CpuSample(4.0, 2.4, 8.5), CpuSample(5.0, 2.0, 9.5)],
            "raw parallel COPY": [CpuSample(1.0, 0.0, 8.0)],
        },
    )
    args = argparse.Namespace(events=500_000, repeat=2, duration=60.0)
    text = report(args, drain, None, None)
    assert "3.00x" in text and "0.50x" in text
    cpu_table = text.split("CPU per event", 1)[1].splitlines()
    streamd_cpu = next(line for line in cpu_table if line.strip().startswith("streamd"))
    assert streamd_cpu.split()[1:] == ["4.5", "2.2", "9.0", "15.7"]  # medians, then their sum
    saved = tmp_path / "run.json"
    saved.write_bytes(
        orjson.dumps({"args": vars(args), "drain": drain}, default=lambda o: o.__dict__)
    )
    assert report_from_json(saved) == text
    # a file from before the CPU accounting: rates only
    saved.write_bytes(orjson.dumps({"args": vars(args), "drain": drain.rates}))
    assert "CPU per event" not in report_from_json(saved)
