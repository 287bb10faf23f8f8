"""The run folder (--out): one trainer at a time, leftovers cleaned, an old run moved aside."""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import List, Optional

LOCK_NAME = ".lock"
# what a run leaves in its folder; --resume never moves these aside
RUN_FILE_GLOBS = ("checkpoint.pt", "metrics.jsonl", "loss.png", "PROGRESS*.txt", "fault-*.fired")
# temporary files of atomic writes (atomic.py: .NAME.XXXX.tmp; metrics.plot_losses: .loss.png.tmp.png)
LEFTOVER_GLOBS = (".checkpoint.pt.*.tmp", ".metrics.jsonl.*.tmp", ".PROGRESS*.txt.*.tmp",
                  ".fault-*.fired.*.tmp", ".loss.png.tmp.png")


class RunLock:
    """An exclusive flock on OUT/.lock, held while the trainer runs.

    The kernel drops it when the process dies, however it dies, so a killed trainer
    never leaves a stale lock. The file keeps the holder's pid, for the refusal message.
    The file is never deleted: a waiter could then lock the unlinked file while a third
    process locks a new one.
    """

    def __init__(self, out):
        self.out = Path(out)
        self.fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        """Take the lock, creating OUT if needed; ValueError (one line) if that cannot be done."""
        path = self.out / LOCK_NAME
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise ValueError(f"--out {self.out}: cannot use it as the run folder"
                             f" ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            raise ValueError(f"--out {self.out} is in use by another trainer (pid {holder});"
                             " wait for it to end, or use another --out") from None
        except OSError as exc:
            os.close(fd)
            raise ValueError(f"--out {self.out}: cannot lock {path} ({exc.strerror or exc})") from None
        self.fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds all the same, only the pid goes unsaid
        return self

    def release(self) -> None:
        """Let the next trainer in."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _read_pid(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return text if text.isdigit() else "unknown"


def remove_leftovers(out) -> int:
    """Delete temporary files of writes cut short by a kill; return how many. Hold the lock."""
    removed = 0
    for pattern in LEFTOVER_GLOBS:
        for path in Path(out).glob(pattern):
            try:
                path.unlink()
                removed += 1
            except OSError:
                pass  # not ours to worry about: the next atomic write uses a new name
    return removed


def run_files(out) -> List[Path]:
    """Return what an earlier run left in OUT (checkpoint, metrics, plot, progress, fault markers)."""
    found = []
    for pattern in RUN_FILE_GLOBS:
        found.extend(sorted(Path(out).glob(pattern)))
    return found


def move_aside(out, now: Optional[float] = None) -> Optional[Path]:
    """Move an earlier run's files into OUT/previous-<UTC time>/; return that folder, or None.

    ValueError when they cannot be moved: starting over on top of them would mix two runs.
    """
    files = run_files(out)
    if not files:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    dest = Path(out) / f"previous-{stamp}"
    n = 1
    while os.path.lexists(dest):
        n += 1
        dest = Path(out) / f"previous-{stamp}-{n}"
    try:
        dest.mkdir()
        for path in files:
            os.rename(path, dest / path.name)
    except OSError as exc:
        raise ValueError(f"--resume never: cannot move the earlier run's files to {dest}"
                         f" ({exc.strerror or exc})") from None
    return dest


def fault_marker(out, step: int, rank: int) -> Path:
    """Return the file that says hang-once at `step` already fired on `rank` in this folder."""
    return Path(out) / f"fault-hang-once-step{step}-rank{rank}.fired"
