"""Find processes outside the child's tree that still hold the GPU open (SPEC 4: GPU-HOLDERS).

After a kill and before a restart, a leftover rank that escaped the tree (or any other
process) holding /dev/nvidia* keeps GPU memory or a context the new attempt needs.
Its open file descriptors say so, with no NVML and no GPU driver library needed.

Only the job's own processes count: those that carry the marker the supervisor put in
the child's environment (MARKER, naming this supervisor), or sit in the child's session
or process group. nvidia-persistenced, DCGM, another user's job started meanwhile and
the supervisor's own helpers (an alert hook running nvidia-smi) are none of its business.
"""
from __future__ import annotations

import glob
import os
from typing import Callable

MARKER = "MAGVIT_SUPERVISOR_PID"  # in the child's environment: the pid of the supervisor that started it
# Where the GPU devices are; tests point it at stand-in files (a CPU box has no /dev/nvidia*).
DEVICE_PREFIX = os.environ.get("MAGVIT_GPU_DEVICE_PREFIX") or "/dev/nvidia"


def find_holders(exclude_pids: set[int], device_prefix: str | None = None,
                 keep: Callable[[int], bool] = lambda pid: True) -> list[tuple[int, str]]:
    """Return (pid, command) of every process keep() accepts with a file under device_prefix open; never raises."""
    device_prefix = device_prefix or DEVICE_PREFIX
    if not glob.glob(glob.escape(device_prefix) + "*"):
        return []  # no such device on this machine: nobody can hold one, and /proc need not be scanned
    me = os.getpid()
    holders = []
    for pid in _pids():
        if pid == me or pid in exclude_pids:
            continue
        if _holds(pid, device_prefix) and keep(pid):
            holders.append((pid, _command(pid)))
    return holders


def of_lineage(pid: int, supervisor_pid: int, sessions: set[int]) -> bool:
    """Say whether pid is the job's: it carries the marker naming supervisor_pid, or is in one of its sessions."""
    try:
        if os.getsid(pid) in sessions or os.getpgid(pid) in sessions:
            return True
    except OSError:  # gone
        return False
    return environ_var(pid, MARKER) == str(supervisor_pid)


def environ_var(pid: int, name: str) -> str | None:
    """The value of name in pid's environment (as it was at exec), None when unset or unreadable."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            data = f.read()
    except OSError:  # gone, or another user's
        return None
    key = name.encode() + b"="
    for entry in data.split(b"\0"):
        if entry.startswith(key):
            return entry[len(key):].decode("utf-8", "replace")
    return None


def _pids() -> list[int]:
    try:
        return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())
    except OSError:
        return []


def _holds(pid: int, device_prefix: str) -> bool:
    """Say whether one of pid's open files starts with device_prefix; False when we may not look or it is gone."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:  # gone, or another user's process
        return False
    for fd in fds:
        try:
            if os.readlink(f"{fd_dir}/{fd}").startswith(device_prefix):
                return True
        except OSError:  # closed meanwhile
            continue
    return False


def _command(pid: int) -> str:
    """Return the command line, or [name] for a process without one, or "?" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = [a.decode("utf-8", "replace") for a in f.read().split(b"\0") if a]
        if argv:
            return " ".join(argv)
        with open(f"/proc/{pid}/comm", "rb") as f:
            return f"[{f.read().decode('utf-8', 'replace').strip()}]"
    except OSError:
        return "?"
