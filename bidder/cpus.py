"""How many CPUs this process may use: the default number of workers, one per core.

Not the host's core count (``os.cpu_count``): a container sees every core of its host but may run on fewer,
limited by its CPU affinity (``docker run --cpuset-cpus``, Kubernetes' static CPU manager) or by a CFS quota
(``docker run --cpus``, a Kubernetes CPU limit). More workers than that would take turns on the cores,
throttled by the quota, each with its own ONNX Runtime session and buffers.

A fractional quota rounds down (at least one), as Go's automaxprocs does: 2.5 CPUs run two workers at full
speed rather than three throttled ones.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["available_cpus", "cgroup_cpu_limit"]


def available_cpus(root: Path = Path("/")) -> int:
    """The CPUs of this process's affinity, fewer if its cgroups' CPU quota allows fewer; at least 1."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        affinity = min(affinity, max(1, math.floor(limit)))
    return max(1, affinity)


def cgroup_cpu_limit(root: Path = Path("/")) -> float | None:
    """The tightest CPU quota (CPUs: quota / period) over this process's cgroup and its ancestors, cgroup v2 or
    v1; None when none is set or the files cannot be read (not Linux, no cgroup file system)."""
    try:
        membership = (root / "proc/self/cgroup").read_text()
    except OSError:
        return None
    limits = []
    for line in membership.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, group = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # cgroup v2: one unified hierarchy
            limits += _v2_limits(root / "sys/fs/cgroup", group)
        elif "cpu" in controllers.split(","):
            limits += _v1_limits(root / "sys/fs/cgroup", controllers, group)
    return min(limits) if limits else None


def _ancestors(mount: Path, group: str) -> list[Path]:
    """``group``'s directory and each parent's up to the mount: a limit set above the group applies too. Inside
    a container the group may be the host's path while the mount is the container's own cgroup: the mount
    itself is always looked at."""
    parts = [p for p in group.strip("/").split("/") if p]
    return [mount.joinpath(*parts[:i]) for i in range(len(parts), 0, -1)] + [mount]


def _v2_limits(mount: Path, group: str) -> list[float]:
    limits = []
    for directory in _ancestors(mount, group):
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
        except (OSError, ValueError):
            continue
        if quota != "max" and int(period) > 0:
            limits.append(int(quota) / int(period))
    return limits


def _v1_limits(mount: Path, controllers: str, group: str) -> list[float]:
    limits = []
    for name in (controllers, "cpu", "cpu,cpuacct"):
        for directory in _ancestors(mount / name, group):
            try:
                quota = int((directory / "cpu.cfs_quota_us").read_text())
                period = int((directory / "cpu.cfs_period_us").read_text())
            except (OSError, ValueError):
                continue
            if quota > 0 and period > 0:
                limits.append(quota / period)
        if limits:
            break
    return limits
