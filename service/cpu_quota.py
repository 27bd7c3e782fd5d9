"""The CPUs this process may use: its CPU affinity, and the CPU quota of its cgroup (what a container's ``cpus:``
limit or a Kubernetes CPU limit allows).

onnxruntime's default intra-op pool has one thread per physical core of the host, whatever the process is allowed:
under a quota of 2 CPUs on a 64-core host that is 64 threads fighting for 2 CPUs' worth of time, and the kernel
throttles them all; pinned to one core (``taskset``, a cpuset), its threads take turns on that core (measured 1.9-2x
slower than one thread). The server's default thread counts come from :func:`available_cpus` instead.

Both cgroup versions are read. v2: ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"). v1: ``cpu.cfs_quota_us`` (-1
for none) and ``cpu.cfs_period_us``. Every level from the process's own cgroup up to the mount root counts (a
parent's quota binds its children), and so does the mount root itself, which is the container's own cgroup when
the engine mounts only that subtree.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")
_V1_CPU_MOUNTS = ("cpu,cpuacct", "cpu", "cpuacct,cpu")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _levels(mount: Path, cgroup_path: str) -> list[Path]:
    """``mount``/``cgroup_path`` and each of its parents up to ``mount``, plus ``mount`` itself."""
    parts = [part for part in cgroup_path.split("/") if part]
    return [mount.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")
    if text is None:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max" or not period:
        return None
    return int(quota) / int(period)


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    if quota is None or period is None or int(quota) <= 0 or int(period) <= 0:
        return None
    return int(quota) / int(period)


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota that applies to this process, in CPUs (1.5 = one and a half), or None for none."""
    memberships = _read(proc_self_cgroup) or ""
    quotas = []
    for line in memberships.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            directories = _levels(root, path)
            quotas += [_v2_quota(directory) for directory in directories]
        elif "cpu" in controllers.split(","):
            for mount in _V1_CPU_MOUNTS:
                if (root / mount).is_dir():
                    quotas += [_v1_quota(directory) for directory in _levels(root / mount, path)]
                    break
    found = [quota for quota in quotas if quota is not None]
    return min(found) if found else None


def available_cpus(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """The CPUs this process may use: the ones it may run on (its affinity), fewer when the cgroup CPU quota allows
    less (the quota rounded down, at least 1)."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, proc_self_cgroup)
    return cpus if limit is None else max(1, min(cpus, math.floor(limit)))
