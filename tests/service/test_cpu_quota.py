"""The default onnxruntime thread count is the CPUs this process may use: its affinity, and the cgroup CPU quota
(container `cpus:`, Kubernetes limits)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from service import cpu_quota
from service.cpu_quota import available_cpus, cgroup_cpu_limit
from service.settings import Settings
from tests.server_process import REPO_ROOT

AFFINITY = len(os.sched_getaffinity(0))


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
    assert available_cpus(root, proc) == 1


def test_v2_unlimited_is_no_quota(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/user.slice", {"user.slice/cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == AFFINITY  # no quota: every CPU it may run on (0 meant the host's cores)


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
    assert available_cpus(root, proc) == min(3, AFFINITY)


def test_v1_without_quota(tmp_path: Path) -> None:
    files = {"cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"}
    root, proc = cgroups(tmp_path, "3:cpu,cpuacct:/\n0::/", files)
    assert cgroup_cpu_limit(root, proc) is None


def test_no_cgroups_at_all(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(tmp_path / "absent", tmp_path / "absent-too") is None


def test_a_small_quota_still_gets_one_thread(tmp_path: Path) -> None:
    root, proc = cgroups(tmp_path, "0::/", {"cpu.max": "20000 100000"})
    assert available_cpus(root, proc) == 1


def test_settings_default_follows_the_quota_and_an_explicit_value_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_quota, "cgroup_cpu_limit", lambda *args: 2.0)
    monkeypatch.delenv("RIDE_INTRA_OP_THREADS", raising=False)
    assert Settings().intra_op_threads == min(2, AFFINITY)
    monkeypatch.setenv("RIDE_INTRA_OP_THREADS", "0")
    assert Settings().intra_op_threads == 0
    assert Settings.from_cli(["--intra-op-threads", "5"]).intra_op_threads == 5


def test_a_process_pinned_to_one_cpu_defaults_to_one_thread() -> None:
    """onnxruntime sizes its own pool by the host's physical cores and ignores affinity: pinned to one core, that
    default served 137 req/s and one thread 257-277. The settings' default follows the affinity."""
    script = (
        "import os\n"
        "os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})\n"
        "from service.settings import Settings\n"
        "print(Settings().intra_op_threads, Settings().decode_threads)\n"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("RIDE_INTRA_OP_THREADS", "RIDE_DECODE_THREADS")}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["1", "1"]
