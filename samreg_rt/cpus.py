"""How many CPUs this process may use: its affinity mask and its cgroup's CPU quota.

A container limited to 2 CPUs by a quota (``docker run --cpus 2``, Kubernetes CPU limits) still sees
every CPU of the host in its affinity mask; a thread per visible CPU then oversubscribes the quota
and the kernel throttles the whole process. ``usable_cpus`` is the smaller of the two limits.
"""
from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs of the affinity mask (``os.cpu_count()`` where there is none), at most the cgroup's
    CPU quota rounded up (``cgroup_quota_cpus``); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_quota_cpus(cgroup_root, proc_cgroup)
    return max(1, min(cpus, quota) if quota else cpus)


def cgroup_quota_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"),
                      proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The CPU quota of this process's cgroup in CPUs, rounded up (quota 150 ms per 100 ms period -> 2),
    or None when there is none (no limit, not Linux, unreadable files).

    cgroup v2: ``cpu.max`` ("max 100000" or "150000 100000") of the process's cgroup (the path after
    "0::" in ``proc_cgroup``) or of the root (inside a container's cgroup namespace). cgroup v1:
    ``cpu.cfs_quota_us`` (-1: none) and ``cpu.cfs_period_us`` of the ``cpu`` hierarchy. The smallest
    quota found wins."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    paths: dict[str, str] = {}      # "v2", "v1": this process's cgroup path in that hierarchy
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif len(parts) == 3 and "cpu" in parts[1].split(","):
            paths["v1"] = parts[2]
    found = []
    for sub in {paths.get("v2", ""), ""}:
        found.append(_quota(_read(cgroup_root / sub.lstrip("/") / "cpu.max"), None))
    for mount in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        for sub in {paths.get("v1", ""), ""}:
            directory = cgroup_root / mount / sub.lstrip("/")
            found.append(_quota(_read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")))
    quotas = [q for q in found if q is not None]
    return min(quotas) if quotas else None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _quota(text: str | None, period_text: str | None) -> int | None:
    """CPUs of a v2 ``cpu.max`` text (period_text None) or of v1 quota and period texts; None: no quota."""
    if text is None:
        return None
    fields = text.split() if period_text is None else [text, period_text or ""]
    try:
        quota, period = (None if fields[0] in ("max", "-1") else int(fields[0])), int(fields[1])
    except (IndexError, ValueError):
        return None
    if quota is None or quota <= 0 or period <= 0:
        return None
    return max(1, math.ceil(quota / period))
