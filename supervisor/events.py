"""The one place output formats live: supervisor lines, log lines, JSON events.

SPEC section 3 (lines) and 6 (events) are an interface: change them here or nowhere.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from typing import Any

LOG_PIECE_BYTES = 64 * 1024  # --log lines longer than this are split (SPEC 3)


def fmt_duration(seconds: float) -> str:
    """Render seconds the way people read them: 45s, 5m03s, 2h04m."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def fmt_limit(seconds: float) -> str:
    """Render a configured limit: 10m rather than 10m00s, 1.5s kept exact."""
    if seconds < 60:
        return f"{seconds:g}s"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return fmt_duration(seconds)


def fmt_bytes(n: int | None) -> str:
    """Render a byte count compactly: 512K, 2.1G."""
    if n is None:
        return "?"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n}B"


def one_line(text: str, limit: int) -> str:
    """Put text on one line (whitespace runs become one space), cut to limit characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def utc_iso_ms(wall: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds: 2026-11-28T14:03:05.123Z."""
    wall = time.time() if wall is None else wall
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def sup_line(text: str, wall: float | None = None) -> str:
    """Format a supervisor line: '[supervise HH:MM:SS] text'."""
    wall = time.time() if wall is None else wall
    return f"[supervise {time.strftime('%H:%M:%S', time.localtime(wall))}] {text}"


def terminal_stamp(wall: float) -> bytes:
    """The --timestamps prefix of relayed lines: 'HH:MM:SS.mmm '."""
    ms = int(wall * 1000) % 1000
    return f"{time.strftime('%H:%M:%S', time.localtime(wall))}.{ms:03d} ".encode()


def log_prefix(wall: float, tag: str) -> bytes:
    """The --log prefix: '2026-11-28T14:03:05.123Z out| '."""
    return f"{utc_iso_ms(wall)} {tag}| ".encode()


class LogFile:
    """Append-only --log file; lines are bytes, written whole, flushed by the loop."""

    def __init__(self, path: str):
        self.path = path
        self._f = open(path, "ab", buffering=1 << 20)
        self._dirty = False

    def write_lines(self, wall: float, tag: str, lines: list[bytes]) -> None:
        """Write each line with the timestamp and tag prefix."""
        if not lines:
            return
        prefix = log_prefix(wall, tag)
        self._f.write(prefix + (b"\n" + prefix).join(lines) + b"\n")
        self._dirty = True

    def flush(self) -> None:
        """Push buffered lines to the OS (called once per loop turn, not per line)."""
        if self._dirty:
            self._f.flush()
            self._dirty = False

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        self._f.close()


class EventLog:
    """--events: one JSON object per line, flushed at once."""

    def __init__(self, path: str):
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def emit(self, event: dict[str, Any]) -> None:
        """Append one event as a single write, so concurrent readers never see half a line."""
        os.write(self._fd, (json.dumps(event, default=str, separators=(", ", ": ")) + "\n").encode())

    def close(self) -> None:
        """Close the file."""
        os.close(self._fd)


def make_event(name: str, wall: float | None = None, **fields: Any) -> dict[str, Any]:
    """Build an event object: ts and event first, then the fields in order."""
    return {"ts": utc_iso_ms(wall), "event": name, **fields}
