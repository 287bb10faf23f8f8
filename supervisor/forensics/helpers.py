"""The supervisor's own helper processes (py-spy, torchfrtrace): known by pid, never the child's (SPEC 4).

As a child subreaper the supervisor sees every process below it, its own helpers
included; a helper still running when the child exits would pass for the child's
leftover, be reported as ORPHANS, signalled by the ladder and reaped by the
adopted-zombie sweep (its Popen then sees ECHILD and its output is lost). A helper
is started under the lock and its pid noted before the lock is let go, so the loop,
which asks is_helper() under the same lock, never sees one it does not know; the
pid is forgotten once the helper is reaped.
"""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading

_lock = threading.Lock()
_pids: set[int] = set()
_closed = False  # the run is ending: no new helper (a py-spy retry would hold up our exit)


def popen(argv: list[str], **kwargs) -> subprocess.Popen:
    """Start a helper (subprocess.Popen's arguments); call forget() once it is reaped."""
    with _lock:
        if _closed:
            raise OSError(errno.ECANCELED, "the supervisor is ending")
        proc = subprocess.Popen(argv, **kwargs)
        _pids.add(proc.pid)
    return proc


def forget(proc: subprocess.Popen) -> None:
    """Drop a reaped helper's pid: the number may now be given to anyone."""
    with _lock:
        _pids.discard(proc.pid)


def run(argv: list[str], timeout_s: float, **kwargs) -> tuple[int, bytes, bytes]:
    """Run a helper to its end with its output captured, as subprocess.run; raise TimeoutExpired past timeout_s."""
    proc = popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)
    try:
        try:
            out, err = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
        return proc.returncode, out, err
    finally:
        if proc.returncode is None:  # an exception of our own mid-wait: still ours to end and reap
            proc.kill()
            proc.wait()
        forget(proc)


def close() -> None:
    """Start no more helpers, and SIGKILL those still running, with their groups: the run is ending.

    A diagnosis thread waits on them (and the interpreter waits on py-spy's worker
    threads at exit): killing them is what lets us exit at once. Safe by
    construction: a pid here is not yet reaped, so it is still the helper's.
    """
    global _closed
    with _lock:
        _closed = True
        for pid in _pids:
            try:
                os.killpg(pid, signal.SIGKILL)  # torchfrtrace leads its own group, with whatever it started
            except OSError:
                pass
            try:
                os.kill(pid, signal.SIGKILL)  # py-spy runs in ours: the process alone
            except OSError:
                pass


def is_helper(pid: int) -> bool:
    """Say whether pid is one of our helpers, not yet reaped."""
    with _lock:
        return pid in _pids
