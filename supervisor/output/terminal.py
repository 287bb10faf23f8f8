"""The terminal writers: the child's bytes reach our stdout and stderr unchanged.

In chunks as large as the pipe gives them (a per-line relay is ten times slower
than cat), with a bounded backlog for a terminal that stops reading, and a sink
that fails (a broken link, a full disk) turned off rather than raising.
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import struct
import termios
import threading
import time
from collections import deque
from typing import Callable

from supervisor.child import grow_pipe
from supervisor.output.lines import os_error_text

TERMINAL_BACKLOG_BYTES = 1 << 20  # SPEC 5: at most 1 MiB waiting for a terminal that stops reading
STUCK_AFTER_S = 1.0  # a terminal that took none of our bytes for this long has stopped reading
WRITE_SLICE_BYTES = 1 << 16  # small enough that a slow-but-alive link shows progress within STUCK_AFTER_S


class TerminalWriter:
    """One of our terminal streams: a bounded backlog, drop accounting, and liveness.

    A write that fails (EPIPE or EIO: the SSH link is gone; ENOSPC: stdout is a
    file on a full disk) turns the writer off: later output is dropped silently,
    the log keeps it, and `error` says why, for the one line that reports it. `room()` tells the
    loop whether to read more from the child (back-pressure, as with cat); with a
    log, `stuck()` tells it that the terminal stopped reading, so the loop reads
    on and drops instead of blocking the child.
    """

    def __init__(self, fd: int):
        self.fd = fd
        self.dead = False
        self.error: str | None = None  # why it died: the link went away, the disk is full
        self.gone = False  # it died because the other end went away (EPIPE, EIO: an SSH link dropped)
        self.dropped_bytes = 0  # dropped because the backlog was full (reported later)
        self._pending = 0
        self._progress_at = time.monotonic()  # the last time the terminal took bytes (or had none to take)

    def room(self) -> bool:
        """True while the backlog is under the cap."""
        return self.dead or self._pending < TERMINAL_BACKLOG_BYTES

    def stuck(self, now: float) -> bool:
        """True when bytes are waiting and the terminal has taken none for STUCK_AFTER_S."""
        return self._pending > 0 and now - self._progress_at > STUCK_AFTER_S

    def stuck_at(self) -> float | None:
        """When stuck() will turn true if nothing moves, or None while nothing waits."""
        return self._progress_at + STUCK_AFTER_S if self._pending > 0 else None

    def take_dropped(self) -> int:
        """Return and reset the dropped count once the terminal is reading again."""
        if self.dropped_bytes and self._pending < TERMINAL_BACKLOG_BYTES // 2:
            n, self.dropped_bytes = self.dropped_bytes, 0
            return n
        return 0

    def poll_fd(self) -> int | None:
        """The fd the loop should poll for writability, or None (nothing waits, or a thread writes)."""
        return None

    def _record(self, e: OSError) -> None:
        """Turn the writer off for good, remembering why."""
        self.dead = True
        self.error = os_error_text(e)
        self.gone = e.errno in _GONE

    def pump(self) -> None:
        """Write what the terminal takes without waiting (loop-driven writers only)."""

    def _admit(self, data: bytes | memoryview, droppable: bool) -> bool:
        if not data or self.dead:
            return False
        if droppable and self._pending >= TERMINAL_BACKLOG_BYTES:
            self.dropped_bytes += len(data)
            return False
        if self._pending == 0:
            self._progress_at = time.monotonic()
        self._pending += len(data)
        return True


class LoopWriter(TerminalWriter):
    """Write from the loop itself with non-blocking writes: no thread, no hand-off, as fast as cat.

    Used for a file (writes never wait on a reader) and for a pipe or a tty that
    we could reopen as a description of our own, so O_NONBLOCK never leaks to the
    shell that shares the original one.
    """

    def __init__(self, fd: int):
        super().__init__(fd)
        self._queue: deque[memoryview] = deque()
        self._full = False  # a splice found the terminal full: poll for POLLOUT before the next
        self._splice_ok = hasattr(os, "splice")
        self._pipe_bytes = _pipe_size(fd)  # None unless the terminal is a pipe

    def splice_room(self) -> int:
        """How many bytes a splice may move now without blocking: a pipe's free space (0: full, and
        then room() is False until POLLOUT), else SPLICE_BYTES. A tee copies no more than this, so
        what it copied is moved whole instead of copied again on the next turn."""
        if self._pipe_bytes is None:
            return SPLICE_BYTES
        room = max(0, self._pipe_bytes - _unread_bytes(self.fd))
        if room == 0 and not self._full:
            self._progress_at = time.monotonic()  # stuck() counts from here, as after a splice that blocked
        self._full = room == 0
        return min(room, SPLICE_BYTES)

    def room(self) -> bool:
        """True while the backlog is under the cap and the terminal was not found full."""
        return self.dead or (not self._full and self._pending < TERMINAL_BACKLOG_BYTES)

    def stuck(self, now: float) -> bool:
        """As TerminalWriter.stuck, counting a splice that found the terminal full as bytes waiting."""
        return (self._pending > 0 or self._full) and now - self._progress_at > STUCK_AFTER_S

    def stuck_at(self) -> float | None:
        """When stuck() will turn true if nothing moves, or None while nothing waits."""
        return self._progress_at + STUCK_AFTER_S if self._pending > 0 or self._full else None

    def splice_from(self, src: int, count: int = 0) -> int | None:
        """Move the child's bytes from pipe src to the terminal inside the kernel: no copy through us.

        Returns the bytes moved (0: src is at end of file), -1 when nothing moves
        now (src is empty, or the terminal is full: then room() is False until
        POLLOUT), or None when the caller must read and write instead (bytes are
        queued, the terminal is gone, the splice failed on either side, or these
        two files cannot splice). count: at most this many bytes (those a SideCopy
        has just copied).
        """
        if not self._splice_ok or self._queue or self.dead:
            return None
        try:
            n = os.splice(src, self.fd, count or SPLICE_BYTES, flags=_SPLICE_FLAGS)
        except (BlockingIOError, InterruptedError):
            full = _unread_bytes(src) > 0  # bytes are there, so it was the terminal that blocked
            if full and not self._full:
                self._progress_at = time.monotonic()  # stuck() counts from here
            self._full = full
            return -1
        except OSError as e:
            # One call, two files: the error may be the source's (a pty master says EIO once the child
            # closed its side) as well as ours. Never take it for a dead terminal: a read and a write
            # tell which it was, and turn this writer off only if the write fails.
            if e.errno not in _GONE:  # EINVAL and kin: an O_APPEND file, a device without splice
                self._splice_ok = False
            return None
        self._progress_at = time.monotonic()
        return n

    def write(self, data: bytes | memoryview, droppable: bool = False) -> None:
        """Write what the terminal takes now and queue a copy of the rest; drop it instead if droppable and full.

        data may be a view of the loop's reusable read buffer: it is only copied
        when the terminal cannot take it at once, which keeps the fast path free
        of allocations (fresh 1 MiB buffers cost a page fault per 4 KiB).
        """
        if not self._admit(data, droppable):
            return
        view = memoryview(data)
        if not self._queue:
            view = view[self._write_some(view):]
        if view and not self.dead:
            self._queue.append(memoryview(bytes(view)))
            self.pump()

    def poll_fd(self) -> int | None:
        """The fd to poll for POLLOUT while bytes wait (queued, or still in the child's pipe)."""
        return self.fd if (self._pending or self._full) and not self.dead else None

    def pump(self) -> None:
        """Write until the queue is empty or the terminal would block (called when it is writable)."""
        self._full = False
        while self._queue:
            head = self._queue[0]
            n = self._write_some(head)
            if n == len(head):
                self._queue.popleft()
            else:
                self._queue[0] = head[n:]
                return

    def _write_some(self, view: memoryview) -> int:
        """Write as much of view as the terminal takes without waiting; return how much."""
        done = 0
        while done < len(view) and not self.dead:
            try:
                n = os.write(self.fd, view[done:])
            except (BlockingIOError, InterruptedError):
                break
            except OSError as e:  # gone, or a full disk: either way this sink is off, never the run
                self._die(e)
                break
            self._progress_at = time.monotonic()
            self._pending -= n
            done += n
        return done

    def flush(self, timeout_s: float | None, interrupted: Callable[[], bool] = lambda: False,
              wake_fd: int | None = None) -> bool:
        """Wait until everything queued is written (or the terminal died); False on timeout or interruption.

        wake_fd (the signal wake-up pipe) makes the wait end at once for interrupted() to look.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        if wake_fd is not None:
            poller.register(wake_fd, select.POLLIN)
        while (self._pending or self._full) and not self.dead:
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0 or interrupted():
                return False
            poller.poll(min(left, 1.0) * 1000)
            self.pump()
        return True

    def _die(self, e: OSError) -> None:
        self._record(e)
        self._queue.clear()
        self._pending = 0


class SideCopy:
    """Let the supervisor see the end of what it splices: tee(2) the child's pipe into a side pipe.

    tee duplicates the pipe's pages without consuming them; the splice to the terminal then
    moves the originals. Of the copy only the last `keep` bytes of what was relayed are read
    (the output counters and the tail of the stream need no more); the rest is spliced into
    /dev/null, so the relay stays inside the kernel.
    """

    def __init__(self, keep: int):
        import ctypes  # only when counting output on a spliced stdout: 2 ms of start-up

        libc = ctypes.CDLL(None, use_errno=True)
        self._tee = libc.tee
        self._tee.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_size_t, ctypes.c_uint]
        self._tee.restype = ctypes.c_ssize_t
        self._get_errno = ctypes.get_errno
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        grow_pipe(self._w)
        self._null = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self._buf = bytearray(keep)
        self._view = memoryview(self._buf)

    def copy(self, src: int, most: int = 0) -> int | None:
        """Copy what waits in pipe src (at most `most` bytes) into the side pipe; bytes copied, 0 at end
        of file, -1 when none wait, None when src cannot be teed (not a pipe): then read it instead."""
        n = self._tee(src, self._w, most or SPLICE_BYTES, _TEE_NONBLOCK)
        if n >= 0:
            return n
        err = self._get_errno()
        if err in (errno.EAGAIN, errno.EINTR):
            return -1
        return None

    def settle(self, copied: int, relayed: int) -> memoryview:
        """Empty the side pipe: return a view of the last bytes of the first `relayed` of the `copied`
        (valid until the next call); the rest was not relayed yet and will be copied again."""
        skip = max(0, relayed - len(self._buf))
        if skip:
            self._discard(skip)
        got = 0
        while got < relayed - skip:
            try:
                n = os.readv(self._r, [self._view[got:relayed - skip]])
            except (BlockingIOError, InterruptedError):
                n = 0  # cannot happen: tee put them there; never spin on it
            if n <= 0:
                break
            got += n
        self._discard(copied - relayed)
        return self._view[:got]

    def _discard(self, n: int) -> None:
        while n > 0:
            try:
                moved = os.splice(self._r, self._null, n, flags=_SPLICE_FLAGS)
            except (BlockingIOError, InterruptedError):
                moved = 0
            except OSError:  # no splice into /dev/null here: read them away
                moved = len(os.read(self._r, min(n, 1 << 16)))
            if moved <= 0:
                return
            n -= moved

    def close(self) -> None:
        """Close the side pipe and /dev/null."""
        for fd in (self._r, self._w, self._null):
            os.close(fd)


class ThreadWriter(TerminalWriter):
    """Write from a thread with blocking writes: for terminals we cannot reopen (a socket, no /proc)."""

    def __init__(self, fd: int, on_drain: Callable[[], None]):
        super().__init__(fd)
        self._on_drain = on_drain
        self._queue: deque[bytes] = deque()
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"terminal-writer-{fd}", daemon=True)
        self._thread.start()

    def write(self, data: bytes | memoryview, droppable: bool = False) -> None:
        """Queue a copy of data; with droppable, drop (and count) it instead when the backlog is full."""
        with self._cond:
            if self._admit(data, droppable):
                self._queue.append(bytes(data))
                self._cond.notify()

    def take_dropped(self) -> int:
        """Return and reset the dropped count once the terminal is reading again."""
        with self._cond:
            return super().take_dropped()

    def flush(self, timeout_s: float | None, interrupted: Callable[[], bool] = lambda: False,
              wake_fd: int | None = None) -> bool:
        """Wait until everything queued is written (or the writer died); False on timeout or interruption."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._cond:
            while self._pending and not self.dead:
                left = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if left <= 0 or interrupted():
                    return False
                self._cond.wait(left)
            return True

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue)
                # Coalesce small chunks into one write: fewer syscalls when lines arrive one by one.
                data = self._queue.popleft()
                while self._queue and len(data) < (1 << 16):
                    data += self._queue.popleft()
            error = self._write_all(data)
            ok = error is None
            with self._cond:
                # Wake the loop exactly when the backlog drops under the cap it stopped reading at.
                crossed = self._pending >= TERMINAL_BACKLOG_BYTES > self._pending - len(data)
                self._pending -= len(data)
                if not ok:
                    self._record(error)
                    self._queue.clear()
                    self._pending = 0
                self._cond.notify_all()
            if crossed or not ok:
                self._on_drain()
            if not ok:
                return

    def _write_all(self, data: bytes) -> OSError | None:
        """Write all of data; return the error that stopped it, or None."""
        view = memoryview(data)
        while view:
            try:
                # In slices, so a slow but live link shows progress within STUCK_AFTER_S.
                n = os.write(self.fd, view[:WRITE_SLICE_BYTES])
                self._progress_at = time.monotonic()
            except InterruptedError:
                continue
            except BlockingIOError:  # someone set O_NONBLOCK on the shared description: wait it out
                select.select([], [self.fd], [], 1.0)
                continue
            except OSError as e:  # gone, or a full disk: this sink is off, never the run
                return e
            view = view[n:]
        return None


_GONE = (errno.EPIPE, errno.EIO, errno.EBADF, errno.ECONNRESET, errno.ENXIO)
SPLICE_BYTES = 1 << 20
_SPLICE_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_TEE_NONBLOCK = 2  # SPLICE_F_NONBLOCK, which tee(2) takes too


def _pipe_size(fd: int) -> int | None:
    """A pipe's capacity (F_GETPIPE_SZ), None for anything else."""
    try:
        if stat.S_ISFIFO(os.fstat(fd).st_mode):
            return fcntl.fcntl(fd, 1032)  # F_GETPIPE_SZ
    except OSError:
        pass
    return None


def _unread_bytes(fd: int) -> int:
    """Bytes waiting in a pipe (FIONREAD)."""
    try:
        return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
    except OSError:
        return 0


def open_terminal(fd: int, on_drain: Callable[[], None]) -> TerminalWriter:
    """Pick the writer for one of our output fds: loop-driven where that cannot block the loop."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        writer = LoopWriter(fd)
        writer.dead, writer.error = True, "not open"  # closed before we started: everything goes to the log only
        return writer
    if stat.S_ISREG(mode) or (stat.S_ISCHR(mode) and not os.isatty(fd)):
        return LoopWriter(fd)  # a file or /dev/null: a write never waits on a reader
    if stat.S_ISFIFO(mode) or os.isatty(fd):
        try:
            own = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
        except OSError:
            pass
        else:
            grow_pipe(own)
            return LoopWriter(own)
    grow_pipe(fd)
    return ThreadWriter(fd, on_drain)
