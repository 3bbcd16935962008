"""`--procs auto`: the affinity mask capped by a cgroup CPU quota (fake cgroup trees: pure logic),
and what this machine answers."""

from __future__ import annotations

import os
from pathlib import Path

from streamd.config.cpus import available_cpus, cgroup_cpu_limit
from streamd.config.settings import Settings


def tree(tmp_path: Path, cgroup_lines: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    self_cgroup = tmp_path / "self-cgroup"
    self_cgroup.write_text(cgroup_lines)
    return root, self_cgroup


def test_v2_quota_of_the_process_cgroup(tmp_path: Path) -> None:
    root, me = tree(tmp_path, "0::/system.slice/streamd.service\n", {
        "system.slice/streamd.service/cpu.max": "150000 100000\n",
        "system.slice/cpu.max": "max 100000\n",
        "cpu.max": "max 100000\n",
    })  # fmt: skip
    assert cgroup_cpu_limit(root, me) == 1.5
    assert available_cpus(root, me) == min(len(os.sched_getaffinity(0)), 2)  # rounded up


def test_v2_quota_of_an_ancestor_and_the_tightest_wins(tmp_path: Path) -> None:
    root, me = tree(tmp_path, "0::/a/b\n", {
        "a/b/cpu.max": "300000 100000\n",
        "a/cpu.max": "50000 100000\n",
    })  # fmt: skip
    assert cgroup_cpu_limit(root, me) == 0.5
    assert available_cpus(root, me) == 1


def test_inside_a_container_the_quota_sits_at_the_mount_root(tmp_path: Path) -> None:
    # /proc/self/cgroup names the host's path; the container sees its own cgroup at the root.
    root, me = tree(tmp_path, "0::/docker/0123abcd\n", {"cpu.max": "100000 100000\n"})
    assert cgroup_cpu_limit(root, me) == 1.0


def test_v1_cfs_quota(tmp_path: Path) -> None:
    lines = "5:memory:/x\n2:cpu,cpuacct:/x\n"
    root, me = tree(tmp_path, lines, {
        "cpu,cpuacct/x/cpu.cfs_quota_us": "200000\n",
        "cpu,cpuacct/x/cpu.cfs_period_us": "100000\n",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
        "cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })  # fmt: skip
    assert cgroup_cpu_limit(root, me) == 2.0


def test_no_quota_or_nothing_readable_means_the_affinity_mask(tmp_path: Path) -> None:
    cases = [
        ("0::/\n", {"cpu.max": "max 100000\n"}),
        ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}),
        ("0::/\n", {"cpu.max": "garbage\n"}),
        ("0::/\n", {"cpu.max": "0 0\n"}),
        ("not a cgroup line\n", {}),
    ]
    for i, (lines, files) in enumerate(cases):
        root, me = tree(tmp_path / str(i), lines, files)
        assert cgroup_cpu_limit(root, me) is None, lines
        assert available_cpus(root, me) == len(os.sched_getaffinity(0))
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "no-such-file") is None


def test_procs_auto_on_this_machine() -> None:
    affinity = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit()
    expected = affinity if limit is None else max(1, min(affinity, -int(-limit // 1)))
    assert Settings(procs="auto").resolved_procs() == expected
    assert Settings(procs=3).resolved_procs() == 3
