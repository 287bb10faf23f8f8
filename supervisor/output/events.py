"""The formats of the files: --log line prefixes and --events JSON objects.

SPEC section 3 (log lines) and 6 (events) are an interface: change them here or
nowhere. The supervisor's own lines are built in lines.py from these events.
"""
from __future__ import annotations

import json
import math
import time
from datetime import datetime, timezone
from typing import Any

LOG_PIECE_BYTES = 64 * 1024  # --log lines longer than this are split (SPEC 3)


def utc_iso_ms(wall: float | None = None) -> str:
    """ISO-8601 UTC with milliseconds: 2026-11-28T14:03:05.123Z."""
    wall = time.time() if wall is None else wall
    return datetime.fromtimestamp(wall, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def log_prefix(wall: float, tag: str) -> bytes:
    """The --log prefix: '2026-11-28T14:03:05.123Z out| '."""
    return f"{utc_iso_ms(wall)} {tag}| ".encode()


def make_event(name: str, wall: float | None = None, **fields: Any) -> dict[str, Any]:
    """Build an event object: ts and event first, then the fields in order, every text strict-JSON safe."""
    return {"ts": utc_iso_ms(wall), "event": name, **{k: json_safe(v) for k, v in fields.items()}}


def json_safe(value: Any) -> Any:
    """Replace what strict JSON cannot hold: a lone surrogate (a byte that was not UTF-8) becomes \\xNN text,
    a NaN or an infinity null."""
    if isinstance(value, str):
        return value if value.isprintable() or _no_surrogates(value) else printable_surrogates(value)
    if isinstance(value, bytes):
        return printable_surrogates(value.decode("utf-8", "surrogateescape"))
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or Infinity
    return value


def _no_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable_surrogates(text: str) -> str:
    """Turn the surrogates of text into \\xNN (bytes kept by surrogateescape) or \\uDxxx."""
    return "".join(
        (f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF else f"\\u{ord(ch):04x}")
        if 0xD800 <= ord(ch) <= 0xDFFF else ch
        for ch in text
    )


def event_json(event: dict[str, Any]) -> str:
    """One event as one line of strict JSON."""
    return json.dumps(event, default=str, separators=(", ", ": "), allow_nan=False)
