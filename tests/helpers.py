"""Shared helpers for the supervisor's tests: run it for real, wait with deadlines."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parent.parent
CHILD = str(ROOT / "tests" / "fixtures" / "child.py")
PY = sys.executable
SUP_LINE = re.compile(rb"^\[supervise \d\d:\d\d:\d\d\] ", re.M)


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "condition"):
    """Poll predicate until it returns something truthy; fail after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)


def sup_argv(*options: str, child: list[str] | None = None) -> list[str]:
    """argv of the supervisor (python -m supervisor) with options, --, and a command."""
    return [PY, "-m", "supervisor", *options, "--", *(child or [])]


def child_cmd(mode: str, *args: str) -> list[str]:
    """argv of the fixture child in a mode."""
    return [PY, CHILD, mode, *map(str, args)]


def base_env(**extra: str) -> dict[str, str]:
    """Environment for a supervisor under test: none of the caller's MAGVIT_SUPERVISE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGVIT_")}
    env["PYTHONPATH"] = str(ROOT)
    # One torch thread per process: on a busy 2-core machine two threads spin against each
    # other and a 0.04 s training step takes 1.4 s.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_sup(*options: str, child: list[str], cwd=None, timeout_s: float = 30.0, env=None, **kw):
    """Run the supervisor to completion; return CompletedProcess with bytes output."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run(
        sup_argv(*options, child=child), cwd=cwd, env=env or base_env(), timeout=timeout_s,
        stdin=subprocess.DEVNULL, **kw,
    )


def start_sup(*options: str, child: list[str], cwd=None, env=None, **kw) -> subprocess.Popen:
    """Start the supervisor in the background (stdout/stderr pipes unless given)."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen(sup_argv(*options, child=child), cwd=cwd, env=env or base_env(),
                            stdin=subprocess.DEVNULL, **kw)


def strip_sup_lines(data: bytes) -> bytes:
    """The child's stderr bytes: stderr minus the supervisor's own lines.

    A supervisor line that follows a partial child line starts on a line of its own,
    so the newline before it stays: it is the one byte the supervisor adds.
    """
    return re.sub(rb"(?m)^\[supervise \d\d:\d\d:\d\d\] [^\n]*\n", b"", data)


def sup_lines(data: bytes) -> list[str]:
    """The supervisor's own lines in captured stderr."""
    return [m.decode() for m in re.findall(rb"\[supervise \d\d:\d\d:\d\d\] [^\n]*", data)]


def alive(pid: int) -> bool:
    """True if pid runs (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree_of(proc: subprocess.Popen) -> None:
    """Clean-up for a test that failed midway: kill the supervisor and everything below it."""
    try:
        kids = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        kids = []
    for p in [*kids]:
        try:
            p.kill()
        except psutil.Error:
            pass
    try:
        proc.send_signal(signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def wait_tracking_peak_rss(proc: subprocess.Popen, timeout_s: float = 60.0) -> int:
    """Wait for proc; return its peak RSS in KiB, from VmHWM polled while it runs.

    Not ru_maxrss: that keeps the high-water mark of the forked parent's image from
    before exec (a pytest process that imported torch is ~450 MB).
    """
    peak = 0
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        peak = max(peak, int(line.split()[1]))
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"process {proc.pid} still running after {timeout_s}s")
        time.sleep(0.01)
    return peak


class LineReader:
    """Read a pipe incrementally and wait for bytes to show up, with deadlines."""

    def __init__(self, stream):
        self.fd = stream.fileno()
        os.set_blocking(self.fd, False)
        self.data = b""

    def pump(self) -> bytes:
        try:
            while True:
                chunk = os.read(self.fd, 1 << 16)
                if not chunk:
                    break
                self.data += chunk
        except BlockingIOError:
            pass
        return self.data

    def wait_for(self, needle: bytes, timeout_s: float = 10.0) -> bytes:
        return wait_for(lambda: needle in self.pump() and self.data, timeout_s, what=repr(needle))


def events_of(path) -> list[dict]:
    """Parse an events file strictly: every line valid UTF-8 and strict JSON (no NaN, no Infinity)."""
    text = Path(path).read_bytes().decode("utf-8")
    return [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
            for line in text.splitlines()]


def no_traceback(stderr: bytes) -> None:
    """The supervisor's own trouble is one line, never a Python traceback."""
    assert b"Traceback" not in stderr and b"internal error" not in stderr, stderr[-2000:]
