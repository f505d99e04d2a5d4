"""``--workers auto``: the CPUs the process may use, by affinity and cgroup CPU quota (v1 and v2), not the host's
core count; read from a fake file system root laid out as a container's."""
from __future__ import annotations

from pathlib import Path

import pytest

import bidder.__main__
import bidder.workers
from bidder.cpus import available_cpus, cgroup_cpu_limit


def layout(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.fixture
def eight_cores(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(8)))


def test_cgroup_v2_quota_in_a_container(tmp_path, eight_cores):
    # inside a container the cgroup namespace makes the container's group the root: "0::/"
    root = layout(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "300000 100000\n"})
    assert cgroup_cpu_limit(root) == 3.0
    assert available_cpus(root) == 3


def test_a_fractional_quota_rounds_down_but_never_to_zero(tmp_path, eight_cores):
    root = layout(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "250000 100000\n"})
    assert available_cpus(root) == 2
    layout(tmp_path, {"sys/fs/cgroup/cpu.max": "50000 100000\n"})
    assert available_cpus(root) == 1


def test_no_quota_leaves_the_affinity(tmp_path, eight_cores, monkeypatch):
    root = layout(tmp_path, {"proc/self/cgroup": "0::/\n", "sys/fs/cgroup/cpu.max": "max 100000\n"})
    assert cgroup_cpu_limit(root) is None
    assert available_cpus(root) == 8
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {2, 5})  # docker run --cpuset-cpus 2,5
    assert available_cpus(root) == 2


def test_a_parent_groups_quota_applies_to_its_children(tmp_path, eight_cores):
    # on a host (no cgroup namespace) the process sits deep in the hierarchy; a limit above it still binds
    root = layout(tmp_path, {
        "proc/self/cgroup": "0::/kubepods.slice/pod1/ctr\n",
        "sys/fs/cgroup/kubepods.slice/pod1/ctr/cpu.max": "max 100000\n",
        "sys/fs/cgroup/kubepods.slice/pod1/cpu.max": "400000 100000\n",
        "sys/fs/cgroup/kubepods.slice/cpu.max": "max 100000\n",
    })
    assert available_cpus(root) == 4


def test_cgroup_v1_quota(tmp_path, eight_cores):
    root = layout(tmp_path, {
        "proc/self/cgroup": "11:memory:/\n4:cpu,cpuacct:/\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "200000\n",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000\n",
    })
    assert available_cpus(root) == 2
    layout(tmp_path, {"sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "-1\n"})  # v1's "no limit"
    assert available_cpus(root) == 8


def test_no_cgroup_file_system(tmp_path, eight_cores):
    assert cgroup_cpu_limit(tmp_path) is None and available_cpus(tmp_path) == 8


def test_workers_auto_serves_one_worker_per_available_cpu(monkeypatch, small_bundle):
    served = []
    monkeypatch.setattr(bidder.__main__, "available_cpus", lambda: 3)
    monkeypatch.setattr(bidder.workers, "serve", lambda config: served.append(config.workers) or 0)
    assert bidder.__main__.main(["serve", "--workers", "auto", "--model", str(small_bundle), "--port", "1"]) == 0
    assert served == [3]
