"""Find processes outside the child's tree that still hold the GPU open (SPEC 4: GPU-HOLDERS).

After a kill and before a restart, a leftover rank that escaped the tree (or any other
process) holding /dev/nvidia* keeps GPU memory or a context the new attempt needs.
Its open file descriptors say so, with no NVML and no GPU driver library needed.

nvidia-persistenced, DCGM and other monitors hold /dev/nvidia* all the time: the
supervisor reports only processes started during its run.
"""
from __future__ import annotations

import glob
import os


def find_holders(exclude_pids: set[int], device_prefix: str = "/dev/nvidia") -> list[tuple[int, str]]:
    """Return (pid, command) of every process with a file under device_prefix open, by pid; never raises."""
    if not glob.glob(glob.escape(device_prefix) + "*"):
        return []  # no such device on this machine: nobody can hold one, and /proc need not be scanned
    me = os.getpid()
    holders = []
    for pid in _pids():
        if pid == me or pid in exclude_pids:
            continue
        if _holds(pid, device_prefix):
            holders.append((pid, _command(pid)))
    return holders


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
