"""The default onnxruntime thread count follows the cgroup CPU quota (container `cpus:`, Kubernetes limits)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service import cpu_quota
from service.cpu_quota import cgroup_cpu_limit, default_intra_op_threads
from service.settings import Settings


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")


def cgroups(tmp_path: Path, memberships: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    for name, text in files.items():
        write(root / name, text)
    proc = tmp_path / "proc-self-cgroup"
    write(proc, memberships)
    return root, proc


def test_v2_container_with_its_own_namespace(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/", {"cpu.max": "150000 100000"})
    assert cgroup_cpu_limit(root, proc) == 1.5
    assert default_intra_op_threads(root, proc) == 1


def test_v2_unlimited_is_no_quota(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/user.slice", {"user.slice/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert default_intra_op_threads(root, proc) == 0


def test_v2_a_parent_quota_binds_its_children(tmp_path: Path) -> None:
    files = {"kubepods/cpu.max": "200000 100000", "kubepods/pod1/ctr/cpu.max": "max 100000"}
    root, proc = cgroups(tmp_path, "0::/kubepods/pod1/ctr", files)
    assert cgroup_cpu_limit(root, proc) == 2.0


def test_v1_container_sees_its_own_subtree_at_the_mount_root(tmp_path: Path) -> None:
    """Docker on cgroup v1 (these machines): /proc/self/cgroup names the host path, the mount is the container's."""
    memberships = "4:memory:/docker/abc\n2:cpuacct:/docker/abc\n1:cpu:/docker/abc\n0::/"
    files = {"cpu/cpu.cfs_quota_us": "300000", "cpu/cpu.cfs_period_us": "100000", "unified/cgroup.procs": "1"}
    root, proc = cgroups(tmp_path, memberships, files)
    assert cgroup_cpu_limit(root, proc) == 3.0
    assert default_intra_op_threads(root, proc) == min(3, len(os.sched_getaffinity(0)))


def test_v1_without_quota(tmp_path: Path) -> None:
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    root, proc = cgroups(tmp_path, "3:cpu,cpuacct:/\n0::/", files)
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-too") is None


def test_a_small_quota_still_gets_one_thread(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/", {"cpu.max": "20000 100000"})
    assert default_intra_op_threads(root, proc) == 1


def test_settings_default_follows_the_quota_and_an_explicit_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_quota, "cgroup_cpu_limit", lambda *args: 2.0)
    monkeypatch.delenv("RIDE_INTRA_OP_THREADS", raising=False)
    assert Settings().intra_op_threads == min(2, len(os.sched_getaffinity(0)))
    monkeypatch.setenv("RIDE_INTRA_OP_THREADS", "0")
    assert Settings().intra_op_threads == 0
    assert Settings.from_cli(["--intra-op-threads", "5"]).intra_op_threads == 5
