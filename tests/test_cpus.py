"""samreg_rt.cpus: the CPU quota of cgroup v1 and v2 files laid out as the kernel mounts them."""
from __future__ import annotations

import os

import pytest

from samreg_rt import cpus


def _write(root, files: dict[str, str]):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize("files,proc,want", [
    ({"cpu.max": "max 100000\n"}, "0::/\n", None),                                   # v2, no limit
    ({"cpu.max": "150000 100000\n"}, "0::/\n", 2),                                   # 1.5 CPUs -> 2
    ({"kubepods/pod1/cpu.max": "400000 100000\n", "cpu.max": "max 100000"}, "0::/kubepods/pod1\n", 4),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, "3:cpu,cpuacct:/\n", None),  # v1
    ({"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "50000", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"},
     "4:cpu,cpuacct:/docker/x\n", 1),                                                  # half a CPU -> 1
    ({"cpu.max": "200000 100000", "cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000"},
     "0::/\n3:cpu:/\n", 2),                                                            # the smallest wins
    ({"cpu.max": "garbage"}, "0::/\n", None),                                        # unreadable: no limit
    ({}, "", None),                                                                  # no cgroup files
])
def test_cgroup_quota_cpus(tmp_path, files, proc, want):
    root = tmp_path / "cgroup"
    root.mkdir()
    _write(root, files)
    (tmp_path / "proc").write_text(proc)
    assert cpus.cgroup_quota_cpus(root, tmp_path / "proc") == want
    affinity = len(os.sched_getaffinity(0))
    assert cpus.usable_cpus(root, tmp_path / "proc") == (min(affinity, want) if want else affinity)


def test_usable_cpus_of_this_process():
    assert 1 <= cpus.usable_cpus() <= len(os.sched_getaffinity(0))
