"""Freeze a real process in a cgroup v1 freezer: the way to make a process that survives SIGKILL.

A frozen process that gets SIGKILL stays in state D until it is thawed; then it dies.
Its wchan is `__refrigerator` when it was running as it froze (a busy loop); frozen
asleep, it keeps the wchan of its sleep (`hrtimer_nanosleep` for `sleep`, kernel 6.x).
Usage:

    reason = freezer_unavailable()
    if reason:
        pytest.skip(reason)
    with frozen(pid):
        os.kill(pid, signal.SIGKILL)
        ...  # pid is in state D here
    # thawed: pid dies (or runs on, if it was not killed)
"""
from __future__ import annotations

import contextlib
import os
import secrets
import time

FREEZER_ROOT = "/sys/fs/cgroup/freezer"


def freezer_unavailable() -> str | None:
    """Return why no process can be frozen here, or None when frozen() will work."""
    probe = os.path.join(FREEZER_ROOT, f"magvit-test-probe-{secrets.token_hex(4)}")
    try:
        os.mkdir(probe)
    except OSError as e:
        return f"no writable cgroup v1 freezer at {FREEZER_ROOT}: {e.strerror or e}"
    try:
        if not os.path.exists(os.path.join(probe, "freezer.state")):
            return f"{FREEZER_ROOT} is not a cgroup v1 freezer hierarchy"
        return None
    finally:
        _rmdir(probe, timeout_s=2.0)


@contextlib.contextmanager
def frozen(pid: int, timeout_s: float = 5.0):
    """Freeze pid in a cgroup of its own for the block; always thaw, move it back and remove the cgroup."""
    group = os.path.join(FREEZER_ROOT, f"magvit-test-{pid}-{secrets.token_hex(4)}")
    os.mkdir(group)
    try:
        _write(os.path.join(group, "cgroup.procs"), str(pid))
        _write(os.path.join(group, "freezer.state"), "FROZEN")
        _wait(lambda: _read(os.path.join(group, "freezer.state")) == "FROZEN", timeout_s, f"pid {pid} to freeze")
        yield group
    finally:
        try:
            _write(os.path.join(group, "freezer.state"), "THAWED")
        except OSError:
            pass
        # A process that was not killed lives on: back to the root cgroup, or rmdir fails (EBUSY).
        for task in _read(os.path.join(group, "cgroup.procs")).split():
            try:
                _write(os.path.join(FREEZER_ROOT, "cgroup.procs"), task)
            except OSError:
                pass  # it died meanwhile
        _rmdir(group, timeout_s)


def _rmdir(path: str, timeout_s: float) -> None:
    # A killed task leaves the cgroup once it has finished exiting, a moment after the thaw.
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _wait(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.01)


def _write(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""
