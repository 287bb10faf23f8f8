"""The run's place on disk: the --run-dir folder held by one supervisor, paths that may not answer.

A path on a hung mount (NFS, FUSE) blocks whoever touches it, for minutes or for
ever. Everything the run touches there at launch (the run folder and its lock, the
--log and --events folders, the flight-recorder folder) is touched in a thread, with
a deadline: past it the run goes ahead without that feature, and says so once.
"""
from __future__ import annotations

import dataclasses
import errno
import fcntl
import os
import threading
from typing import Callable, TypeVar

from supervisor.config import Config
from supervisor.forensics.gpu_holders import MARKER, environ_var

ANSWER_WITHIN_S = 5.0  # a local disk answers in microseconds, a loaded NFS server in well under a second
LOCK_NAME = ".supervise.lock"  # not the trainer's OUT/.lock: the child writes in the same folder
NOT_ANSWERING = "not answering after {:g}s (a hung file system?)"
T = TypeVar("T")


class NoAnswer(Exception):
    """The call did not return within its deadline; it goes on in a thread nobody waits for."""


class InUse(Exception):
    """Another live supervisor holds the run folder."""

    def __init__(self, run_dir: str, holder: int | None):
        super().__init__(run_dir, holder)
        self.run_dir, self.holder = run_dir, holder

    def __str__(self) -> str:
        who = f"supervisor pid {self.holder}" if self.holder else "another supervisor"
        return f"--run-dir {self.run_dir} is in use by {who} (one supervisor per run folder)"


def within(fn: Callable[[], T], timeout_s: float = ANSWER_WITHIN_S) -> T:
    """Return fn() (or raise what it raised) if it returns within timeout_s; else raise NoAnswer."""
    box: dict[str, object] = {}

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=call, name="within-deadline", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        raise NoAnswer(NOT_ANSWERING.format(timeout_s))
    if "error" in box:
        raise box["error"]  # type: ignore[misc]
    return box["value"]  # type: ignore[return-value]


def claim(run_dir: str) -> int:
    """Create run_dir and hold its lock for this process's life; return the lock's fd.

    flock: the kernel lets go however the holder ends (SIGKILL, OOM), so a crashed
    supervisor never leaves a stale lock. The holder's pid is written inside, to name it.
    Raise InUse when another supervisor holds it, OSError when the folder cannot be made.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = _holder(fd)
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise InUse(run_dir, holder) from None
        raise
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass  # the lock holds without the pid; a second supervisor then names no pid
    return fd


def _holder(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def settle(cfg: Config) -> tuple[Config, list[tuple[str, str, str]], int | None]:
    """Claim the run folder and check that the run's folders answer; drop those that do not.

    Return (the config without the features whose folder did not answer, their
    (sink, path, error) to report once the output is up, the lock's fd or None).
    Raise InUse, or OSError for a folder that answered with an error (a bad option: 125).
    """
    dropped: list[tuple[str, str, str]] = []
    lock_fd = None
    run_dir_hung = None
    if cfg.run_dir:
        try:
            lock_fd = within(lambda: claim(cfg.run_dir))
        except NoAnswer as e:
            run_dir_hung = str(e)
            dropped.append(("run-dir", cfg.run_dir, f"{e}; not locked"))
    for sink, path in (("log", cfg.log_path), ("events", cfg.events_path),
                       ("flight-recorder", cfg.flight_recorder)):
        if not path:
            continue
        folder = path if sink == "flight-recorder" else os.path.dirname(path)
        if run_dir_hung and (folder + os.sep).startswith(os.path.join(cfg.run_dir, "")):
            dropped.append((sink, path, run_dir_hung))  # inside a folder that does not answer: asked once
            continue
        try:
            within(lambda: os.path.lexists(folder))  # the lookup that would hang the open
        except NoAnswer as e:
            dropped.append((sink, path, str(e)))
    gone = {"log": "log_path", "events": "events_path", "flight-recorder": "flight_recorder"}
    cfg = dataclasses.replace(cfg, **{gone[s]: None for s, _, _ in dropped if s in gone})
    return cfg, dropped, lock_fd


def other_watchers(progress_file: str) -> list[int]:
    """Pids of other live supervisors whose child was given the same progress file, by pid.

    Their children carry MAGVIT_PROGRESS_FILE and the marker naming their supervisor
    (SPEC 2). Slow on a machine with many processes whose memory is locked: call within().
    """
    me = os.getpid()
    found = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        pid = int(name)
        if environ_var(pid, "MAGVIT_PROGRESS_FILE") != progress_file:
            continue
        owner = environ_var(pid, MARKER)
        if owner and owner.isdigit() and int(owner) != me and _alive(int(owner)):
            found.add(int(owner))
    return sorted(found)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
