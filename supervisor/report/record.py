"""Read what a run left on disk, tolerantly and read-only (SPEC 10).

The supervisor and the trainer may be writing these files while we read them: a last
line without its newline is half-written and skipped, a line that is not a JSON object
is counted and skipped, a missing file is an absent part of the record. Nothing here
raises on content, and nothing here writes. An events file that is there but cannot be
read is an error (ValueError), never an empty run.

The events file is streamed: a month of heartbeats is normal, so only what the summary
needs is kept (the rare events whole, the frequent ones thinned to a bounded sample, with
the figures that need every one of them, the peak RSS and the silences, added up on the way).
"""
from __future__ import annotations

import glob
import json
import math
import mmap
import os
import re
import stat
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime

from supervisor.report.stacks import hung_frame
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
# The trainer's line when it continues from a checkpoint (SPEC 8), as --log keeps it: the step it resumes at.
_RESUMING = re.compile(rb"^(\S+) out\| Resuming from .* at step (\d{1,15})")
MAX_LINE_BYTES = 16 << 20  # a longer line is no event the supervisor wrote: skipped without holding it
WALL_MIN, WALL_MAX = 0.0, 1e11  # 1970 .. year 5138: a time outside is absurd, read as absent
FREQUENT = ("heartbeat", "sample")  # thinned; every other event kind the summary reads is kept whole
KEPT = {"start", "exit", "progress-first", "stall", "diagnosis", "signal", "restart", "gave-up", "orphans",
        "unkillable", "alert-failed", "sink-failed", "sink-restored", "gpu-holders", "flight-recorder",
        "terminal-dropped", "slow", "slow-ended", *FREQUENT}
RECENT_KEPT = 1024  # the latest heartbeats (or samples) are kept whole: the ETA reads the last minutes ...
OLDER_KEPT = 2048  # ... and the older ones evenly thinned to at most this many


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
    earlier_sessions: list[list[dict]] = field(default_factory=list)  # older sessions appended: [first, exit]
    skipped_lines: dict[str, int] = field(default_factory=dict)  # unreadable lines per file name
    metrics: list[dict] = field(default_factory=list)
    progress: ProgressSnapshot | None = None
    dropped_terminal_bytes: int | None = None  # None when there is no log to count them in
    child_alive: bool | None = None  # the latest start event's pid runs now (None: no start event)
    supervisor_alive: bool | None = None  # the latest start event's supervisor_pid runs now (None: not recorded)
    peak_rss_bytes: int | None = None  # the largest tree RSS any heartbeat or sample of the session saw
    silences: list[list[float]] = field(default_factory=list)  # [begin, end] without output, from heartbeats
    resumes: list[tuple[float, int]] = field(default_factory=list)  # (time, step) of the trainer's resume lines


def resolve(run: str) -> tuple[str, str | None]:
    """Return (folder, events file or None) for RUN, a run folder or an events file; ValueError if neither."""
    if os.path.isdir(run):
        events = os.path.join(run, EVENTS_NAME)
        return run, events if os.path.lexists(events) else None  # there but unreadable: an error, later
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
        _read_events(record, events_path)
    if metrics_path:
        record.metrics, record.skipped_lines[METRICS_NAME] = read_jsonl(metrics_path)
    record.progress = read_progress(progress_candidates(folder, record.events))
    drops = [e["bytes"] for e in record.events if e["event"] == "terminal-dropped" and type(e.get("bytes")) is int]
    if drops:
        record.dropped_terminal_bytes = sum(drops)  # exact, from the events
    elif log_path:
        record.dropped_terminal_bytes = count_dropped(log_path)  # older runs: from the log's rounded lines
    if log_path and record.events:
        record.resumes = find_resumes(log_path, record.events[0]["t"])
    starts = [e for e in record.events if e["event"] == "start" and type(e.get("pid")) is int and e["pid"] > 0]
    if starts:
        record.child_alive = process_alive(starts[-1]["pid"], starts[-1]["t"])
        sup = starts[-1].get("supervisor_pid")
        if type(sup) is int and sup > 0:
            record.supervisor_alive = process_alive(sup, None)
    return record


class _Session:
    """One supervisor session's events as they stream by: the rare ones whole, the frequent ones thinned."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self.frequent: dict[str, _Thinned] = {name: _Thinned() for name in FREQUENT}
        self.first: dict | None = None
        self.exit: dict | None = None
        self.peak_rss: int | None = None
        self.silences: list[list[float]] = []

    def add(self, e: dict) -> None:
        self.first = self.first or e
        name = e["event"]
        if name == "exit":
            self.exit = e
        if name in FREQUENT:
            rss = e.get("rss_bytes")
            if type(rss) is int and 0 < rss < 1 << 62 and (self.peak_rss is None or rss > self.peak_rss):
                self.peak_rss = rss
            silent = e.get("silent_s")
            if name == "heartbeat" and isinstance(silent, (int, float)) and 0 < silent < WALL_MAX:
                self._silence(e["t"] - silent, e["t"])
            self.frequent[name].add(e)
        else:
            self.events.append(e)

    def _silence(self, begin: float, end: float) -> None:
        begin = max(begin, self.first["t"])  # never before the run: a bogus silent_s cannot stretch the axis
        if self.silences and begin <= self.silences[-1][1] + 1e-3:
            self.silences[-1][1] = max(self.silences[-1][1], end)
        else:
            self.silences.append([begin, end])

    def all_events(self) -> list[dict]:
        """Every kept event in file order (heartbeats and samples thinned)."""
        kept = [e for thinned in self.frequent.values() for e in thinned.items()]
        return sorted(self.events + kept, key=lambda e: e["_n"])


class _Thinned:
    """The latest RECENT_KEPT items whole, and the older ones evenly thinned to at most OLDER_KEPT."""

    def __init__(self) -> None:
        self.recent: deque = deque()
        self.older: list = []
        self.stride, self.passed = 1, 0

    def add(self, item) -> None:
        self.recent.append(item)
        if len(self.recent) > RECENT_KEPT:
            old = self.recent.popleft()
            if self.passed % self.stride == 0:
                self.older.append(old)
                if len(self.older) > OLDER_KEPT:
                    self.older = self.older[::2]
                    self.stride *= 2
            self.passed += 1

    def items(self) -> list:
        return self.older + list(self.recent)


def _read_events(record: RunRecord, path: str) -> None:
    """Stream the events file into the record: the latest session's events, a line for each earlier one."""
    name = os.path.basename(path)
    session, skipped, n = _Session(), 0, 0
    earlier: list[list[dict]] = []
    with open_regular(path) as f:
        for obj in iter_jsonl(f):
            if obj is None or not _add_time(obj):
                skipped += 1
                continue
            if obj["event"] not in KEPT:
                continue  # an event the summary does not read: nothing to keep
            n += 1
            obj["_n"] = n
            if obj["event"] == "start" and obj.get("attempt", 0) == 0 and session.first is not None:
                earlier.append([e for e in (session.first, session.exit) if e is not None])
                session = _Session()
            session.add(_slim(obj))
    record.skipped_lines[name] = skipped
    record.events = session.all_events()
    for e in record.events:
        del e["_n"]
    record.earlier_sessions = earlier
    record.peak_rss_bytes, record.silences = session.peak_rss, session.silences


def _slim(event: dict) -> dict:
    """Keep only what the summary reads: a month of heartbeats (or of repeated `warn` stalls, each with a
    diagnosis of many stacks) is held in little memory."""
    if event["event"] == "diagnosis":
        stacks = event.pop("stacks", None)
        event["hung_frame"] = hung_frame(stacks)  # the stacks themselves are never shown
        procs = event.get("processes")
        if isinstance(procs, list):  # only their RSS is read: one row with the tree's total stands for them
            event["processes"] = [{"rss_bytes": sum(p["rss_bytes"] for p in procs if isinstance(p, dict)
                                                    and type(p.get("rss_bytes")) is int and 0 <= p["rss_bytes"] < 1 << 62)}]
        return event
    if event["event"] not in FREQUENT:
        return event
    keep = ("ts", "event", "t", "_n", "pid", "silent_s", "progress_age_s", "cpu_percent", "rss_bytes", "progress",
            "eta_s", "step")
    return {k: event[k] for k in keep if k in event}


def open_regular(path: str):
    """Open a file to read; ValueError `cannot read PATH: REASON` when it cannot be (a directory, no permission)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)  # a FIFO never hangs us
    except OSError as e:
        raise ValueError(f"cannot read {path}: {os.strerror(e.errno) if e.errno else e}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        reason = os.strerror(21) if stat.S_ISDIR(mode) else "not a regular file"  # EISDIR
        raise ValueError(f"cannot read {path}: {reason}")
    return os.fdopen(fd, "rb")


def iter_jsonl(f):
    """Yield each complete line's JSON object, None for a line that is not one (torn, not JSON, too long)."""
    while True:
        line = f.readline(MAX_LINE_BYTES)
        if not line:
            return
        if not line.endswith(b"\n"):
            if len(line) < MAX_LINE_BYTES:
                yield None  # no newline yet: a writer is mid-line
                return
            while (rest := f.readline(MAX_LINE_BYTES)) and not rest.endswith(b"\n"):
                pass  # the rest of an over-long line, dropped as it is read
            yield None
            continue
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):  # bad UTF-8, bad JSON, a 5000-digit number, nesting too deep
            obj = None
        yield obj if isinstance(obj, dict) else None


def read_jsonl(path: str) -> tuple[list[dict], int]:
    """Return the JSON objects of a JSONL file and how many lines were skipped (torn, not JSON, not objects)."""
    try:
        f = open_regular(path)
    except ValueError:
        return [], 0
    objects, skipped = [], 0
    with f:
        try:
            for obj in iter_jsonl(f):
                if obj is None:
                    skipped += 1
                else:
                    objects.append(obj)
        except OSError:
            pass
    return objects, skipped


def parse_ts(value) -> float | None:
    """Return the Unix time of an event's ISO-8601 `ts` (2026-11-28T14:03:05.123Z), None if unreadable or absurd."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        t = moment.timestamp() if moment.tzinfo else None
    except (ValueError, OverflowError, OSError):
        return None
    return t if t is not None and WALL_MIN <= t <= WALL_MAX else None


MAX_NUMBER = 1e18  # beyond this a count, a size or a duration is absurd: read as absent


def as_number(value) -> float | None:
    """Return a JSON number as a float; None for anything else (strings, booleans, null, 1e999, 400 digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) and abs(number) <= MAX_NUMBER else None


def wall_time(value) -> float | None:
    """A Unix time from a file (a metrics `time`, an mtime): None unless a finite number in 1970 .. 5138."""
    t = as_number(value)
    return t if t is not None and WALL_MIN <= t <= WALL_MAX else None


def _add_time(event: dict) -> bool:
    """Give a well-formed event its time as "t" (Unix seconds); False for one without a name or time."""
    t = parse_ts(event.get("ts"))
    if t is None or not isinstance(event.get("event"), str):
        return False
    event["t"] = t
    return True


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
            mtime = wall_time(os.stat(path).st_mtime)
        except (OSError, ValueError):
            continue
        if mtime is None:
            continue  # written in 1960 or in the year 9999: no time to show
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


def find_resumes(log_path: str, since: float) -> list[tuple[float, int]]:
    """Return (time, step) of each `Resuming from ... at step N` line of the child in the log, since `since`."""
    found = []
    try:
        with open(log_path, "rb") as f:
            if os.fstat(f.fileno()).st_size == 0:
                return []
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                needle, at = b"out| Resuming from ", 0
                while (at := data.find(needle, at)) != -1:
                    begin = data.rfind(b"\n", 0, at) + 1
                    match = _RESUMING.match(data[begin:at + 4096])
                    t = parse_ts(match.group(1).decode("ascii", "replace")) if match else None
                    if t is not None and t >= since - 1:
                        found.append((t, int(match.group(2))))
                    at += len(needle)
    except (OSError, ValueError):
        return []
    return found


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


