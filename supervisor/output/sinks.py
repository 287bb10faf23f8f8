"""The --log and --events files: append-only, and never the reason a run is lost (SPEC 4).

A write that fails (a full disk, a file-size limit, a vanished folder) turns
the file off instead of raising; the owner is told once (`news()`), and the
file is tried again once a minute, so a disk that gets space back gets the log
back. Opening is non-blocking, so a FIFO with no reader fails at once instead
of hanging before the child starts.
"""
from __future__ import annotations

import errno
import os
import stat
import time

from supervisor.output.events import event_json, log_prefix
from supervisor.output.lines import os_error_text

RETRY_EVERY_S = 60.0  # SPEC 4: a failed log file is retried once a minute
FLUSH_BYTES = 1 << 20  # buffered lines are written out past this, or once per loop turn


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

    def _write(self, data: bytes | bytearray) -> bool:
        """Write all of data, or turn the file off; True when it was written."""
        if self._fd is None:
            self.lost += 1
            return False
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view):]
        except OSError as e:
            self._fail(e)
            return False
        return True

    def _fail(self, e: OSError) -> None:
        self.error = os_error_text(e)
        self.lost += 1
        self._failed_at = time.monotonic()
        self._news.append(("failed", self.error))
        self._close_fd()

    def retry(self, now: float) -> None:
        """Try a failed file again, once a minute."""
        if self._fd is not None or now - self._failed_at < RETRY_EVERY_S:
            return
        self._failed_at = now
        try:
            fd = open_append(self.path)
        except OSError:
            return
        try:
            # A record cut short by the full disk: start the next one on a line of its own.
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and st.st_size and os.pread(fd, 1, st.st_size - 1) != b"\n":
                os.write(fd, b"\n")
        except OSError:
            os.close(fd)
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
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


class LogFile(FileSink):
    """--log: lines are bytes, buffered, written whole by flush() once per loop turn."""

    def __init__(self, path: str):
        super().__init__(path, "log")
        self._buf = bytearray()

    def write_lines(self, wall: float, tag: str, lines: list[bytes]) -> None:
        """Buffer each line with the timestamp and tag prefix."""
        if not lines:
            return
        if self._fd is None:
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
