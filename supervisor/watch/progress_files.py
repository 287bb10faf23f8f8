"""Watch progress files on disk (SPEC 1.1, 7): which changed, and their first line.

Only metadata counts as progress: a change of (mtime_ns, size, inode). When it is
seen is the supervisor's business (its monotonic clock), never the file's mtime,
so a skewed clock on a network file system cannot fake or hide a stall. Whatever
sits at the path (garbage, a FIFO, a directory, nothing) must never raise here.
"""

from __future__ import annotations

import glob
import math
import os
import stat
import threading
import unicodedata

from supervisor.watch.eta import parse_fields

MAX_READ_BYTES = 4096  # the first line is all we show; never read a 100 MB file whole
MAX_LINE_CHARS = 200  # a heartbeat line must stay one terminal line-ish
ELLIPSIS = "\u2026"

Signature = tuple[int, int, int]  # (st_mtime_ns, st_size, st_ino)


def expand_pattern(pattern: str) -> list[str]:
    """Return the paths a --progress-file value stands for, as they exist now."""
    if any(ch in pattern for ch in "*?["):
        matches = set(glob.glob(pattern))
        if os.path.lexists(pattern):
            matches.add(pattern)  # a real name with a bracket in it, e.g. a folder "run[1]"
        return sorted(matches)
    # A plain DIR/NAME.EXT also covers the per-rank files torchrun workers write beside it.
    stem, ext = os.path.splitext(pattern)
    return [pattern] + sorted(glob.glob(stem + "-rank*" + ext))


class ProgressFiles:
    """The progress files matching one pattern, polled for changes."""

    def __init__(self, pattern: str, exclude: tuple[str, ...] = ()) -> None:
        self.pattern = pattern
        # The supervisor's own --log and --events are never progress, whatever the glob (SPEC 1.1):
        # its heartbeats would otherwise refresh "progress" and hide every hang.
        self.exclude = tuple(os.path.abspath(p) for p in exclude if p)
        self._seen: dict[str, Signature] = {}
        self._latest: str | None = None  # the path whose change was seen last

    @property
    def latest(self) -> str | None:
        """Return the most recently changed path, None before any change."""
        return self._latest

    def baseline(self) -> None:
        """Record the files as they are at launch, so leftovers of an old run are not progress."""
        self._seen = self._scan()
        self._latest = None

    def poll(self) -> list[str]:
        """Return the paths that changed or appeared since the last poll or baseline."""
        current = self._scan()
        changed = [path for path, sig in current.items() if self._seen.get(path) != sig]
        # A vanished file is forgotten, so its reappearance counts as progress.
        self._seen = current
        if changed:
            # Among several changed in one poll, show the one written last.
            self._latest = max(changed, key=lambda path: (current[path][0], path))
        return changed

    def read_changes(self) -> list[tuple[str, dict[str, str], str | None]]:
        """poll(), then read each changed file's head once: (path, fields, first line)."""
        changes = []
        for path in self.poll():
            head = _read_head(path)
            text = head.decode("utf-8", errors="replace") if head else ""
            changes.append((path, parse_fields(text), first_line_of(head)))
        return changes

    def first_line(self) -> str | None:
        """Return the first line of the most recently changed file, cleaned up, or None."""
        if self._latest is None:
            return None
        return read_first_line(self._latest)

    def _scan(self) -> dict[str, Signature]:
        """Return the signature of every regular file matching the pattern."""
        found: dict[str, Signature] = {}
        own = set()
        for path in self.exclude:
            try:
                st = os.stat(path)
                own.add((st.st_dev, st.st_ino))
            except (OSError, ValueError):
                pass
        for path in expand_pattern(self.pattern):
            try:
                st = os.stat(path)
            except (OSError, ValueError):  # gone, dangling link, no permission, NUL in path
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in own:
                found[path] = (st.st_mtime_ns, st.st_size, st.st_ino)
        return found


def expect_next_s(fields: dict[str, str], cap_s: float) -> float | None:
    """The deadline a progress file declares (`expect_next_s: N`, SPEC 1.1), capped; None when none or bad."""
    try:
        value = float(fields["expect_next_s"])
    except (KeyError, ValueError):
        return None
    return min(value, cap_s) if math.isfinite(value) and value > 0 else None


def declared_step(fields: dict[str, str]) -> int | None:
    """The `step:` a progress file declares (steps done), None when absent or not a plain count."""
    value = fields.get("step", "")
    return int(value) if value.isascii() and value.isdigit() and len(value) <= 15 else None


def read_first_line(path: str) -> str | None:
    """Return the cleaned-up first line of `path`, None when unreadable or empty."""
    return first_line_of(_read_head(path))


def first_line_of(data: bytes | None) -> str | None:
    """Return the cleaned-up first line of a file's head, None when there is none."""
    if not data:
        return None
    text = data.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace")
    text = "".join(" " if ch == "\t" else ch for ch in text if ch == "\t" or unicodedata.category(ch) != "Cc")
    text = text.strip()
    if len(text) > MAX_LINE_CHARS:
        text = text[: MAX_LINE_CHARS - 1].rstrip() + ELLIPSIS
    return text or None


def _read_head(path: str) -> bytes | None:
    """Read at most MAX_READ_BYTES from the start of a regular file, None on any trouble."""
    return read_regular(path, MAX_READ_BYTES)


def read_regular(path: str, limit: int | None = None) -> bytes | None:
    """Read a regular file (at most `limit` bytes), None on any trouble; never blocks on a FIFO or opens a device."""
    try:
        # Check before opening: opening a device can have side effects (a tape rewinds).
        if not stat.S_ISREG(os.stat(path).st_mode):
            return None
        # O_NONBLOCK: if a FIFO was swapped in since the check, neither open nor read can hang.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except (OSError, ValueError):
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError:
        return None
    finally:
        os.close(fd)


class Scanner:
    """Poll progress files in a thread of their own: a hung file system never freezes the loop.

    A stat on a dead NFS mount can block for minutes. The loop asks for a scan
    and takes the answer on a later turn; meanwhile heartbeats and the other
    stall clocks run on, and a scan that does not answer is itself a stall.
    """

    def __init__(self, files: ProgressFiles, on_done=lambda: None, baseline_at: float | None = None) -> None:
        """baseline_at: first take the launch's baseline (ProgressFiles.baseline), started at this time."""
        self.files = files
        self._on_done = on_done  # wakes the loop: a finished scan is taken on the very next turn
        self._cond = threading.Condition()
        self._baseline = self._wanted = baseline_at is not None
        self._closed = False
        # A baseline in flight is a scan in flight: one that never answers becomes a stall.
        self._busy_since: float | None = baseline_at
        self._changes: list[tuple[str, dict[str, str], str | None]] = []
        self._first_lines: dict[str, str | None] = {}
        self._thread = threading.Thread(target=self._run, name="progress-scan", daemon=True)
        self._thread.start()

    def request(self, now: float) -> None:
        """Start a scan unless one is running."""
        with self._cond:
            if self._busy_since is None:
                self._busy_since = now
                self._wanted = True
                self._cond.notify()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no scan (or baseline) is in flight; False when one still is after timeout_s."""
        with self._cond:
            return self._cond.wait_for(lambda: self._busy_since is None, timeout_s)

    def take(self) -> list[tuple[str, dict[str, str], str | None]]:
        """Return and forget the changes found by scans finished since the last call."""
        with self._cond:
            changes, self._changes = self._changes, []
        return changes

    def hung_s(self, now: float) -> float:
        """How long the scan in flight has been running (0 when none is)."""
        with self._cond:
            return 0.0 if self._busy_since is None else max(0.0, now - self._busy_since)

    def first_line(self, path: str | None = None) -> str | None:
        """The first line of path (default: the latest changed file) as last read, without touching the disk."""
        path = self.files.latest if path is None else path
        with self._cond:
            return self._first_lines.get(path) if path else None

    def close(self) -> None:
        """Let the scan thread end (after the scan in flight, if any)."""
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._wanted or self._closed)
                if self._closed:
                    return
                self._wanted = False
                baseline, self._baseline = self._baseline, False
            try:
                if baseline:
                    self.files.baseline()
                    changes = []
                else:
                    changes = self.files.read_changes()
            except Exception:  # never let the scan thread die: a stall is better than silence
                changes = []
            with self._cond:
                self._changes += changes
                self._first_lines.update((path, first) for path, _, first in changes)
                self._busy_since = None
                self._cond.notify_all()
            if changes:
                self._on_done()
