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
import hashlib
import os
import stat
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
        return (f"--run-dir {self.run_dir} is in use by {who} (one supervisor per run folder and events file;"
                " the nodes of one job each give their own --events)")


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


def lock_name(run_dir: str, events_path: str | None) -> str:
    """The lock's file name: one run per events file in a folder.

    The folder's own events.jsonl (the default) is `.supervise.lock`. Supervisors that each
    write an events file of their own may share a folder: one per node of a multi-node job
    (SPEC 11: `--events RUN/events-$(hostname).jsonl`), whose records never mix.
    """
    if events_path is None or events_path == os.path.join(run_dir, "events.jsonl"):
        return LOCK_NAME
    inside = os.path.relpath(events_path, run_dir)
    if inside.startswith(os.pardir):
        return f".supervise-{hashlib.sha1(os.fsencode(events_path)).hexdigest()[:12]}.lock"
    return f".supervise-{inside.replace(os.sep, '_')}.lock"


def claim(run_dir: str, events_path: str | None = None) -> int:
    """Create run_dir and hold its lock for this process's life; return the lock's fd.

    flock: the kernel lets go however the holder ends (SIGKILL, OOM), so a crashed
    supervisor never leaves a stale lock. The holder's pid is written inside, to name it.
    Raise InUse when another supervisor holds it, OSError when the folder cannot be made.
    """
    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, lock_name(run_dir, events_path))
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


@dataclasses.dataclass
class Settled:
    """What settle() found: the config to run with, and what to say once the output is up."""

    config: Config  # without the features whose folder did not answer
    dropped: list[tuple[str, str, str]]  # (sink, path, error) of each feature left out
    shared: list[tuple[str, str, list[int]]]  # (sink, path, pids) of files other live supervisors write
    fds: list[int]  # the locks: held until the process ends, however it ends


def settle(cfg: Config) -> Settled:
    """Claim the run folder, mark the --log and --events files ours, and leave out folders that do not answer.

    Raise InUse, or OSError for a folder that answered with an error (a bad option: 125).
    """
    found = Settled(cfg, [], [], [])
    run_dir_hung = None
    if cfg.run_dir:
        try:
            found.fds.append(within(lambda: claim(cfg.run_dir, cfg.events_path)))
        except NoAnswer as e:
            run_dir_hung = str(e)
            found.dropped.append(("run-dir", cfg.run_dir, f"{e}; not locked"))
    for sink, path in (("log", cfg.log_path), ("events", cfg.events_path),
                       ("flight-recorder", cfg.flight_recorder)):
        if not path:
            continue
        folder = path if sink == "flight-recorder" else os.path.dirname(path)
        if run_dir_hung and (folder + os.sep).startswith(os.path.join(cfg.run_dir, "")):
            found.dropped.append((sink, path, run_dir_hung))  # inside a folder that does not answer: asked once
            continue
        try:
            if sink == "flight-recorder":
                within(lambda: os.path.lexists(folder))  # the lookup that would hang the mkdir
                continue
            fd, holders = within(lambda: _mark_ours(path))  # the open that would hang the sink's open
        except NoAnswer as e:
            found.dropped.append((sink, path, str(e)))
            continue
        if fd is not None:
            found.fds.append(fd)
        if holders:
            found.shared.append((sink, path, holders))
    gone = {"log": "log_path", "events": "events_path", "flight-recorder": "flight_recorder"}
    found.config = dataclasses.replace(cfg, **{gone[s]: None for s, _, _ in found.dropped if s in gone})
    return found


def _mark_ours(path: str) -> tuple[int | None, list[int]]:
    """flock a regular --log or --events file; return (its fd, the pids of others holding it).

    Appending is what the sink does anyway; a FIFO without a reader (ENXIO), or any other
    trouble, is left to the sink's own open to report.
    """
    try:
        # Never open a FIFO here: closing it again would hand its reader (tee, cat) an end of file.
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None, []
    except FileNotFoundError:
        pass  # a new file: nobody else writes it yet
    except OSError:
        return None, []
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY,
                     0o644)
    except OSError:
        return None, []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            return None, []
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, []
    except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None, []
        return None, _flock_holders(st)


def _flock_holders(st: os.stat_result) -> list[int]:
    """The pids holding a flock on the file of st, from /proc/locks."""
    key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = set()
    try:
        with open("/proc/locks") as f:
            for line in f:
                fields = line.replace("->", " ").split()  # "-> " marks a waiter
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == key and fields[4].isdigit():
                    pids.add(int(fields[4]))
    except OSError:
        pass
    pids.discard(os.getpid())
    return sorted(pids)


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
