"""Did the kernel's OOM killer kill during a launch? Its counts, read at the launch and at the end (SPEC 4).

The child's memory cgroup counts its own kills: `oom_kill` in memory.events (cgroup v2, which
counts the cgroups below it too) or in memory.oom_control (v1, that cgroup only). Where no
cgroup count rose, /proc/vmstat's `oom_kill` counts every kill on the machine: weaker evidence
(a child that moved itself into a cgroup of its own, or another job's kill at the same moment).
Reads small files only; never raises.
"""
from __future__ import annotations

import os


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return ""


def _count(text: str, key: str = "oom_kill") -> int | None:
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[0] == key and parts[1].isdigit():
            return int(parts[1])
    return None


def _mounts(mountinfo: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(root, mount point) of the cgroup v2 mounts and of the v1 mounts with the memory controller."""
    v2, v1 = [], []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        root, point = fields[3], fields[4].replace("\\040", " ")
        if tail[0] == "cgroup2":
            v2.append((root, point))
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            v1.append((root, point))
    return v2, v1


def _under(mounts: list[tuple[str, str]], path: str) -> str | None:
    """The directory of cgroup `path` under one of the mounts, where it exists."""
    for root, point in mounts:
        if root == "/" or path == root or path.startswith(root.rstrip("/") + "/"):
            rel = path[len(root):] if root != "/" else path
            where = os.path.join(point, rel.lstrip("/"))
            if os.path.isdir(where):
                return where
    return None


def memory_cgroup_files(pid: int) -> list[tuple[str, str]]:
    """(cgroup path, counter file) of pid's memory cgroups: v2 memory.events and v1 memory.oom_control."""
    v2, v1 = _mounts(_read("/proc/self/mountinfo"))
    found = []
    for line in _read(f"/proc/{pid}/cgroup").splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            where, name = _under(v2, path), "memory.events"
        elif "memory" in controllers.split(","):
            where, name = _under(v1, path), "memory.oom_control"
        else:
            continue
        if where and os.path.exists(os.path.join(where, name)):
            found.append((path, os.path.join(where, name)))
    return found


class OomCounts:
    """The OOM killer's counts that concern one launch: taken at the launch, compared at its end."""

    def __init__(self, pid: int):
        self._cgroups = [(path, file, _count(_read(file))) for path, file in memory_cgroup_files(pid)]
        self._vmstat = _count(_read("/proc/vmstat"))

    def evidence(self) -> str | None:
        """Say where the OOM killer was seen killing since the launch, or None."""
        for path, file, before in self._cgroups:
            after = _count(_read(file))
            if before is not None and after is not None and after > before:
                n = after - before
                return (f"the OOM killer killed {n} process{'es' if n > 1 else ''} in memory cgroup {path} "
                        f"({os.path.basename(file)} oom_kill {before} -> {after})")
        after = _count(_read("/proc/vmstat"))
        if self._vmstat is not None and after is not None and after > self._vmstat:
            n = after - self._vmstat
            where = ", none in the child's memory cgroup" if self._cgroups else ""
            return (f"the OOM killer killed {n} process{'es' if n > 1 else ''} on this machine "
                    f"(/proc/vmstat oom_kill {self._vmstat} -> {after}){where}")
        return None
