"""Read what a run left on disk, tolerantly and read-only (SPEC 10).

The supervisor and the trainer may be writing these files while we read them: a last
line without its newline is half-written and skipped, a line that is not a JSON object
is counted and skipped, a missing file is an absent part of the record. Nothing here
raises on content, and nothing here writes.
"""
from __future__ import annotations

import glob
import json
import mmap
import os
import re
from dataclasses import dataclass, field
from datetime import datetime

from supervisor.watch.eta import parse_fields
from supervisor.watch.progress_files import read_regular

EVENTS_NAME = "events.jsonl"  # the names --run-dir gives the files (SPEC 1, 10)
LOG_NAME = "supervise.log"
PROGRESS_NAME = "PROGRESS.txt"
METRICS_NAME = "metrics.jsonl"
PROGRESS_HEAD_BYTES = 64 * 1024  # a progress file is a few lines; never read a huge one whole
PID_START_SLACK_S = 30.0  # a pid whose process started further than this from its start event was reused
# The supervisor's line for terminal drops (output.py); no event carries the count.
_DROPPED = re.compile(rb"terminal was not reading: dropped (\d+(?:\.\d+)?)([KMG]?)B? of output")
_UNITS = {b"": 1, b"K": 1 << 10, b"M": 1 << 20, b"G": 1 << 30}


@dataclass
class ProgressSnapshot:
    path: str
    headline: str | None  # the first line, as written (not yet made printable)
    fields: dict[str, str]  # the key: value lines
    mtime: float  # wall-clock seconds of the last write


@dataclass
class RunRecord:
    run: str  # what the user named: a folder or an events file
    folder: str  # where the run's files are looked for
    events_path: str | None  # None when there is no events file
    log_path: str | None
    metrics_path: str | None
    events: list[dict] = field(default_factory=list)  # the latest supervisor session's, each with "t" added
    earlier_sessions: list[list[dict]] = field(default_factory=list)  # older sessions appended to the same file
    skipped_lines: dict[str, int] = field(default_factory=dict)  # unreadable lines per file name
    metrics: list[dict] = field(default_factory=list)
    progress: ProgressSnapshot | None = None
    dropped_terminal_bytes: int | None = None  # None when there is no log to count them in
    child_alive: bool | None = None  # the latest start event's pid runs now (None: no start event)
    supervisor_alive: bool | None = None  # the latest start event's supervisor_pid runs now (None: not recorded)


def resolve(run: str) -> tuple[str, str | None]:
    """Return (folder, events file or None) for RUN, a run folder or an events file; ValueError if neither."""
    if os.path.isdir(run):
        events = os.path.join(run, EVENTS_NAME)
        return run, events if os.path.isfile(events) else None
    if os.path.isfile(run):
        return os.path.dirname(run) or ".", run
    raise ValueError(f"{run}: no such run folder or events file")


def read_record(run: str) -> RunRecord:
    """Read everything the run left: events, metrics, the progress file, terminal drops in the log."""
    folder, events_path = resolve(run)
    log_path = _existing(os.path.join(folder, LOG_NAME))
    metrics_path = _existing(os.path.join(folder, METRICS_NAME))
    record = RunRecord(run=run, folder=folder, events_path=events_path, log_path=log_path, metrics_path=metrics_path)
    if events_path:
        events, skipped = read_jsonl(events_path)
        record.skipped_lines[os.path.basename(events_path)] = skipped
        timed = [e for e in events if _add_time(e)]
        record.skipped_lines[os.path.basename(events_path)] += len(events) - len(timed)
        sessions = split_sessions(timed)
        record.events, record.earlier_sessions = sessions[-1], sessions[:-1]
    if metrics_path:
        record.metrics, record.skipped_lines[METRICS_NAME] = read_jsonl(metrics_path)
    record.progress = read_progress(progress_candidates(folder, record.events))
    drops = [e["bytes"] for e in record.events if e["event"] == "terminal-dropped" and type(e.get("bytes")) is int]
    if drops:
        record.dropped_terminal_bytes = sum(drops)  # exact, from the events
    elif log_path:
        record.dropped_terminal_bytes = count_dropped(log_path)  # older runs: from the log's rounded lines
    starts = [e for e in record.events if e["event"] == "start" and type(e.get("pid")) is int and e["pid"] > 0]
    if starts:
        record.child_alive = process_alive(starts[-1]["pid"], starts[-1]["t"])
        sup = starts[-1].get("supervisor_pid")
        if type(sup) is int and sup > 0:
            record.supervisor_alive = process_alive(sup, None)
    return record


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """Return the JSON objects of a JSONL file and how many lines were skipped (torn, not JSON, not objects)."""
    data = read_regular(path)
    if data is None:
        return [], 0
    lines = data.split(b"\n")
    skipped = 1 if lines[-1].strip() else 0  # no newline yet: a writer is mid-line
    objects = []
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:  # bad UTF-8 or bad JSON
            obj = None
        if isinstance(obj, dict):
            objects.append(obj)
        else:
            skipped += 1
    return objects, skipped


def parse_ts(value) -> float | None:
    """Return the Unix time of an event's ISO-8601 `ts` (2026-11-28T14:03:05.123Z), None if unreadable."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo else None


def _add_time(event: dict) -> bool:
    """Give a well-formed event its time as "t" (Unix seconds); False for one without a name or time."""
    t = parse_ts(event.get("ts"))
    if t is None or not isinstance(event.get("event"), str):
        return False
    event["t"] = t
    return True


def split_sessions(events: list[dict]) -> list[list[dict]]:
    """Split an events file into supervisor sessions: each begins with a start of attempt 0."""
    sessions: list[list[dict]] = [[]]
    for e in events:
        if e["event"] == "start" and e.get("attempt", 0) == 0 and sessions[-1]:
            sessions.append([])
        sessions[-1].append(e)
    return sessions


def progress_candidates(folder: str, events: list[dict]) -> list[str]:
    """Return the progress files the run may have: PROGRESS.txt and its per-rank files, and stalled sources."""
    stem, ext = os.path.splitext(os.path.join(folder, PROGRESS_NAME))
    paths = [stem + ext, *sorted(glob.glob(glob.escape(stem) + "-rank*" + glob.escape(ext)))]
    for e in events:
        source = e.get("source")
        if e["event"] in ("stall", "progress-first") and isinstance(source, str) and os.path.isabs(source):
            paths.append(source)
    return list(dict.fromkeys(paths))


def read_progress(paths: list[str]) -> ProgressSnapshot | None:
    """Return the most recently written of the progress files, None when none can be read."""
    newest: ProgressSnapshot | None = None
    for path in paths:
        try:
            mtime = os.stat(path).st_mtime
        except (OSError, ValueError):
            continue
        if newest is not None and mtime <= newest.mtime:
            continue
        data = read_regular(path, PROGRESS_HEAD_BYTES)
        if data is None:
            continue
        text = data.decode("utf-8-sig", errors="replace")
        headline = text.split("\n", 1)[0].strip() or None
        newest = ProgressSnapshot(path=path, headline=headline, fields=parse_fields(text), mtime=mtime)
    return newest


def count_dropped(log_path: str) -> int | None:
    """Return the bytes the terminal dropped, summed from the supervisor's lines in the log (K/M/G rounded)."""
    try:
        with open(log_path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return 0
            # mmap: a log of gigabytes is searched without reading it into memory.
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                total, needle, at = 0, b"terminal was not reading: dropped ", 0
                while (at := data.find(needle, at)) != -1:
                    match = _DROPPED.match(data[at:at + 120])
                    if match:
                        total += int(float(match.group(1)) * _UNITS[match.group(2)])
                    at += len(needle)
                return total
    except (OSError, ValueError):
        return None


def process_alive(pid: int, started_at: float | None) -> bool:
    """Return True if pid runs (not a zombie) and started near `started_at`, so is not a reused pid."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime "))
    except FileNotFoundError:
        return False
    except (OSError, IndexError, ValueError, StopIteration):
        try:  # no /proc (not Linux): the pid's existence is all we can know
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    if fields[0] in (b"Z", b"X"):
        return False
    start = boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return started_at is None or abs(start - started_at) <= PID_START_SLACK_S


def _existing(path: str) -> str | None:
    return path if os.path.isfile(path) else None


