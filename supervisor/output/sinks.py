"""The --log and --events files: append-only, and never the reason a run is lost (SPEC 4).

A write that fails (a full disk, a file-size limit, a vanished folder) turns
the file off instead of raising; the owner is told once (`news()`), and the
file is tried again once a minute, so a disk that gets space back gets the log
back. Opening is non-blocking, so a FIFO with no reader fails at once instead
of hanging before the child starts.

Every write and reopen runs in the file's own thread, and the loop waits for it at
most WRITE_ANSWER_S: a file on a mount that hangs, or a FIFO whose reader stopped
(a suspended `tee`), turns the file off with one line instead of freezing the relay,
the heartbeats and the user's Ctrl-C. Once the write comes back, the file is back.
"""
from __future__ import annotations

import errno
import os
import stat
import threading
import time
from typing import Callable

from supervisor.output.events import event_json, log_prefix
from supervisor.output.lines import os_error_text

RETRY_EVERY_S = 60.0  # SPEC 4: a failed log file is retried once a minute
FLUSH_BYTES = 1 << 20  # buffered lines are written out past this, or once per loop turn
WRITE_ANSWER_S = 5.0  # a write not back by then is stuck (a hung mount, a stopped FIFO reader)
NOT_ANSWERING = f"not answering after {WRITE_ANSWER_S:g}s (a hung file system, or a reader that stopped?)"


class _Stuck(Exception):
    """The file's thread did not come back in time; it goes on with the call in flight."""


class _Worker:
    """One thread that makes a file's system calls; the loop waits for each at most a deadline."""

    def __init__(self, name: str):
        self._cond = threading.Condition()
        self._job: Callable[[], object] | None = None
        self._busy = False
        self._late: tuple[bool, object] | None = None  # the outcome of a call nobody waited for to the end
        self._result: tuple[bool, object] = (True, None)
        threading.Thread(target=self._run, name=f"{name}-file", daemon=True).start()

    def call(self, fn: Callable[[], object], timeout_s: float):
        """Return fn()'s value (or raise its error); raise _Stuck if it is not back in timeout_s or one still runs."""
        with self._cond:
            # Another thread's call in flight is waited for; one already given up on is stuck.
            if self._late is not None or not self._cond.wait_for(lambda: not self._busy, timeout_s):
                if self._busy:
                    raise _Stuck()
            self._job, self._busy, self._late = fn, True, None
            self._cond.notify_all()
            if not self._cond.wait_for(lambda: not self._busy, timeout_s):
                self._late = (True, None)  # marks the call as abandoned: its outcome is kept for take_late()
                raise _Stuck()
            ok, value = self._result
        if not ok:
            raise value  # type: ignore[misc]
        return value

    def take_late(self) -> tuple[bool, object] | None:
        """Once an abandoned call is back: (ok, value or error), else None (still stuck, or none)."""
        with self._cond:
            if self._busy or self._late is None:
                return None
            late, self._late = self._result, None
            return late

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._job is not None)
                fn, self._job = self._job, None
            try:
                result = (True, fn())
            except BaseException as e:  # handed to the caller
                result = (False, e)
            with self._cond:
                self._result, self._busy = result, False
                self._cond.notify_all()


def open_append(path: str) -> int:
    """Open path for appending without ever blocking; raise OSError with a reason a person reads."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    except OSError as e:
        if e.errno == errno.ENXIO:  # a FIFO nobody reads: open(2) without O_NONBLOCK would hang here
            raise OSError(e.errno, "a FIFO with no reader", path) from None
        raise
    if stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.set_blocking(fd, True)  # a reader is there (tee, a pipe): let it set the pace, lose nothing
    return fd


class FileSink:
    """One append-only file that may fail and come back."""

    def __init__(self, path: str, name: str):
        self.path = path
        self.name = name  # "log" or "events", as in the sink-failed event
        self.error: str | None = None  # why it is off, while it is
        self.lost = 0  # records dropped while it was off
        self._fd: int | None = open_append(path)
        self._failed_at = 0.0
        self._news: list[tuple[str, str | int]] = []  # ("failed", error) / ("restored", lost)
        self._io = _Worker(name)
        self._stuck = False  # a write is hanging in the file's thread: off until it comes back

    def _write(self, data: bytes | bytearray) -> bool:
        """Write all of data, or turn the file off; True when it was written."""
        if self._fd is None or self._stuck:
            self.lost += 1
            return False
        fd = self._fd

        def write_all() -> None:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]

        try:
            self._io.call(write_all, WRITE_ANSWER_S)
        except _Stuck:
            self._stuck = True  # the bytes in flight still land when it comes back: not counted as lost
            self.error = NOT_ANSWERING
            self._failed_at = time.monotonic()
            self._news.append(("failed", self.error))
            return False
        except OSError as e:
            self._fail(e)
            return False
        return True

    def _unstuck(self) -> None:
        """A stuck write came back: the file works again, or failed for good with its own error."""
        late = self._io.take_late()
        if late is None:
            return
        self._stuck = False
        ok, value = late
        if ok:
            self._news.append(("restored", self.lost))
            self.error, self.lost = None, 0
        elif isinstance(value, OSError):
            self.lost -= 1  # _fail counts one more, and nothing more was lost than while stuck
            self._fail(value)

    def _fail(self, e: OSError) -> None:
        self.error = os_error_text(e)
        self.lost += 1
        self._failed_at = time.monotonic()
        self._news.append(("failed", self.error))
        self._close_fd()

    def retry(self, now: float) -> None:
        """See whether a stuck write came back (every turn); try a failed file again, once a minute."""
        if self._stuck:
            self._unstuck()
            return
        if self._fd is not None or now - self._failed_at < RETRY_EVERY_S:
            return
        self._failed_at = now
        try:
            fd = self._io.call(lambda: _reopen(self.path), WRITE_ANSWER_S)  # the open can hang as the writes did
        except (OSError, _Stuck):
            return
        if fd is None:
            return
        self._fd = fd
        self._news.append(("restored", self.lost))
        self.error, self.lost = None, 0

    def news(self) -> list[tuple[str, str | int]]:
        """Return and forget what happened since the last call: ("failed", error) or ("restored", lost)."""
        news, self._news = self._news, []
        return news

    def close(self) -> None:
        """Close the file (a failure at close is one more failure, never an exception)."""
        self._close_fd()

    def _close_fd(self) -> None:
        if self._fd is not None and not self._stuck:  # a close can hang as the write did: leave that fd be
            fd, self._fd = self._fd, None
            try:
                self._io.call(lambda: os.close(fd), WRITE_ANSWER_S)  # NFS flushes at close
            except (OSError, _Stuck):
                pass


def _reopen(path: str) -> int | None:
    """Open a failed file again; None when it cannot be used yet."""
    try:
        fd = open_append(path)
    except OSError:
        return None
    try:
        # A record cut short by the full disk: start the next one on a line of its own.
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode) and st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
            os.write(fd, b"\n")
    except OSError:
        os.close(fd)
        return None
    return fd


class LogFile(FileSink):
    """--log: lines are bytes, buffered, written whole by flush() once per loop turn."""

    def __init__(self, path: str):
        super().__init__(path, "log")
        self._buf = bytearray()

    def write_lines(self, wall: float, tag: str, lines: list[bytes]) -> None:
        """Buffer each line with the timestamp and tag prefix."""
        if not lines:
            return
        if self._fd is None or self._stuck:
            self.lost += len(lines)
            return
        prefix = log_prefix(wall, tag)
        self._buf += prefix + (b"\n" + prefix).join(lines) + b"\n"
        if len(self._buf) >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Write the buffered lines out (called once per loop turn, not per line)."""
        if self._buf:
            data, self._buf = self._buf, bytearray()
            self._write(data)  # the bytearray itself: no copy of up to a MiB per turn

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        super().close()


class EventLog(FileSink):
    """--events: one JSON object per line, written at once in a single write."""

    def __init__(self, path: str):
        super().__init__(path, "events")

    def emit(self, event: dict) -> None:
        """Append one event as a single write, so concurrent readers never see half a line."""
        self._write((event_json(event) + "\n").encode())
