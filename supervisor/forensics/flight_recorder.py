"""The NCCL flight recorder of a stalled job (SPEC 4.1): ask every rank for a dump, and read it.

What torch does (torch/csrc/distributed/c10d, ProcessGroupNCCL and FlightRecorder):
- With a trace buffer (TORCH_FR_BUFFER_SIZE, formerly TORCH_NCCL_TRACE_BUFFER_SIZE, > 0) and
  TORCH_NCCL_DEBUG_INFO_PIPE_FILE=<pipe prefix>, each rank unlinks and mkfifo's
  `<pipe prefix><global rank>.pipe`, holds it open O_RDONLY | O_NONBLOCK, and its heartbeat
  monitor reads it about once a second: any byte read makes the rank dump.
- The dump (a pickle: version, pg_config, pg_status, entries) goes to
  `<dump prefix><global rank>`, the prefix from TORCH_FR_DUMP_TEMP_FILE, formerly
  TORCH_NCCL_DEBUG_INFO_TEMP_FILE (default ~/.cache/torch/comm_lib_trace_rank_), written in
  place with std::ofstream: the file may be seen empty or half written.
- Where both names of a setting are set, torch reads the first one set of
  (newer, older): getCvarString/getCvarInt scan the list backwards.
- `torchfrtrace <folder> --prefix <file prefix>` (torch.distributed.flight_recorder.fr_trace)
  matches the ranks' collectives and says where they disagree.
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from supervisor.forensics import helpers

BUFFER_ENTRIES = "2000"  # collectives each rank keeps (TORCH_FR_BUFFER_SIZE)
SETTLE_QUIET_S = 0.5  # a dump whose size has not changed for this long is complete
SETTLE_POLL_S = 0.1
SUMMARY_LINES = 40  # of torchfrtrace's output, in the diagnosis and the event
SUMMARY_LINE_CHARS = 500
DUMP_FILE_PREFIX = "rank_"
PIPE_FILE_PREFIX = "pipe_"
# (newer name, older name): torch reads whichever is set, the newer one first.
TWINS = (
    ("TORCH_FR_BUFFER_SIZE", "TORCH_NCCL_TRACE_BUFFER_SIZE"),
    ("TORCH_FR_DUMP_TEMP_FILE", "TORCH_NCCL_DEBUG_INFO_TEMP_FILE"),
)
PIPE_VAR = "TORCH_NCCL_DEBUG_INFO_PIPE_FILE"
DUMP_ON_TIMEOUT_VAR = "TORCH_NCCL_DUMP_ON_TIMEOUT"
_RANK = re.compile(r"[0-9]+")


@dataclass
class FlightRecord:
    """What one collection found: the ranks that were asked, their dumps, torchfrtrace's summary."""

    dir: str  # the folder of the dumps
    ranks: list[int]  # ranks whose FIFO took the byte
    files: list[str]  # their dumps, new since the byte (complete, or as far as they got in settle_s)
    summary: str = ""  # torchfrtrace's output (its first SUMMARY_LINES lines), "" without it
    pipes: list[str] = field(default_factory=list)  # every FIFO found; none: no rank has a dump pipe
    error: str = ""  # what went wrong in collect() itself, if anything

    def lines(self) -> list[str]:
        """Render the record as human lines for the diagnosis (lines.flight_recorder_lines)."""
        from supervisor.output.lines import flight_recorder_lines

        return flight_recorder_lines(self.event_fields())

    def event_fields(self) -> dict:
        """The fields of the `flight-recorder` event (SPEC 6)."""
        return {"dir": self.dir, "ranks": list(self.ranks), "files": list(self.files), "summary": self.summary,
                "pipes": list(self.pipes), "error": self.error}


def attempt_dir(fr_dir: str, attempt: int) -> str:
    """Return the folder of one attempt's pipes and dumps: <fr_dir>/attempt-<K>."""
    return os.path.join(os.path.abspath(fr_dir), f"attempt-{attempt}")


def child_env(fr_dir: str, attempt: int, environ: Mapping[str, str]) -> dict[str, str]:
    """Return the flight-recorder variables to add to the child's environment, where the user set none.

    A setting with two names (TWINS) that the user set under one name only gets the
    user's value under the other too, so that an older torch (which knows only the
    older name) and a newer one (which reads the newer name first) both see it.
    """
    folder = attempt_dir(fr_dir, attempt)
    wanted: list[tuple[tuple[str, ...], str]] = [
        (TWINS[0], BUFFER_ENTRIES),
        (TWINS[1], os.path.join(folder, DUMP_FILE_PREFIX)),
        ((PIPE_VAR,), os.path.join(folder, PIPE_FILE_PREFIX)),
        ((DUMP_ON_TIMEOUT_VAR,), "1"),
    ]
    added = {}
    for names, default in wanted:
        users = next((environ[name] for name in names if name in environ), None)
        for name in names:
            if name not in environ:
                added[name] = default if users is None else users
    return added


def prefixes(environ: Mapping[str, str]) -> tuple[str | None, str]:
    """Return (pipe prefix or None, dump prefix) as torch reads them from the child's environment."""
    pipe = environ.get(PIPE_VAR) or None
    dump = next((environ[name] for name in TWINS[1] if name in environ), None)
    if dump is None:
        cache = environ.get("XDG_CACHE_HOME") or os.path.join(environ.get("HOME", "/tmp"), ".cache")
        dump = os.path.join(cache, "torch", "comm_lib_trace_rank_")
    return pipe, dump


def prepare(fr_dir: str, attempt: int) -> str | None:
    """Create the attempt's folder; return why it cannot be used, or None."""
    folder = attempt_dir(fr_dir, attempt)
    try:
        # The default mode, as for the log and events files beside it: the FIFOs torch
        # makes in it are writable by their owner only, whatever the folder's mode.
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        return f"cannot create {folder}: {e.strerror or e}"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"cannot write to {folder}"
    return None


def collect(
    pipe_prefix: str,
    dump_prefix: str,
    settle_s: float = 20.0,
    trace_timeout_s: float = 30.0,
    now=time.monotonic,
) -> FlightRecord:
    """Ask every rank for its dump through its FIFO, wait for the dumps, summarise them; never raises."""
    record = FlightRecord(dir=os.path.dirname(dump_prefix) or ".", ranks=[], files=[])
    try:
        pipes = _find_pipes(pipe_prefix)
        record.pipes = [path for _, path in pipes]
        # Only dumps written after the byte count: an old one of an earlier stall, or an
        # earlier run in the same folder, would pass for a rank that did not answer.
        before = {rank: _identity(f"{dump_prefix}{rank}") for rank, _ in pipes}
        record.ranks = [rank for rank, path in pipes if _poke(path)]
        if record.ranks:
            record.files = _settle(dump_prefix, record.ranks, before, settle_s, now)
        if record.files:
            record.summary = _trace(record.dir, dump_prefix, trace_timeout_s)
    except Exception as e:  # the supervisor's own trouble never costs the child
        record.error = f"{type(e).__name__}: {e}"
    return record


def _find_pipes(pipe_prefix: str) -> list[tuple[int, str]]:
    """Return (rank, path) of every FIFO <pipe_prefix><rank>.pipe, by rank; anything else is skipped."""
    found = []
    for path in glob.glob(glob.escape(pipe_prefix) + "*.pipe"):
        middle = path[len(pipe_prefix):-len(".pipe")]
        if not _RANK.fullmatch(middle):
            continue
        try:
            if not stat.S_ISFIFO(os.lstat(path).st_mode):
                continue  # a plain file, a device or a link: never opened, never written
        except OSError:
            continue
        found.append((int(middle), path))
    return sorted(found)


def _poke(path: str) -> bool:
    """Write one byte to a FIFO without ever blocking; say whether a reader took it."""
    try:
        # No reader: ENXIO at once (O_NONBLOCK); O_NOFOLLOW: a link swapped in is refused.
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISFIFO(os.fstat(fd).st_mode):  # replaced since we looked
            return False
        return os.write(fd, b"1") == 1  # EAGAIN: full, nobody reads; EPIPE: the reader just left
    except OSError:
        return False
    finally:
        os.close(fd)


def _identity(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _settle(dump_prefix: str, ranks: list[int], before: dict, settle_s: float, now) -> list[str]:
    """Wait until each asked rank's new dump has stopped growing, at most settle_s; return the dumps seen."""
    deadline = now() + settle_s
    seen: dict[int, tuple[int, float]] = {}  # rank -> (size, when it last changed)
    while True:
        t = now()
        for rank in ranks:
            ident = _identity(f"{dump_prefix}{rank}")
            if ident is None or ident == before.get(rank) or ident[1] == 0:
                continue  # not there, the old one, or created and not yet written
            if rank not in seen or seen[rank][0] != ident[1]:
                seen[rank] = (ident[1], t)
        complete = sum(1 for size_since in seen.values() if t - size_since[1] >= SETTLE_QUIET_S)
        if complete == len(ranks) or t >= deadline:
            break
        time.sleep(SETTLE_POLL_S)
    return [f"{dump_prefix}{rank}" for rank in ranks if rank in seen]


def _trace(folder: str, dump_prefix: str, timeout_s: float) -> str:
    """Run torchfrtrace on the dumps when it is on PATH, bounded; return its first lines, or ""."""
    exe = shutil.which("torchfrtrace")
    if not exe:
        return ""
    argv = [exe, folder]
    if os.path.basename(dump_prefix):
        argv += ["--prefix", os.path.basename(dump_prefix)]
    # Not the supervisor's own settings: one of them may hold a webhook's secret.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAGVIT_SUPERVISE_")}
    with tempfile.TemporaryFile() as out:  # a file, not a pipe: nothing it leaves behind can hold us
        try:
            # One of our helpers, never the child's leftover: no ORPHANS, no ladder, no reaping but ours.
            proc = helpers.popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                 start_new_session=True)
        except OSError as e:
            return f"torchfrtrace could not run: {e.strerror or e}"
        try:
            status = proc.wait(timeout=timeout_s)
            ending = f"torchfrtrace: exit status {status}" if status else ""
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # not yet reaped: the group is still its own
            except OSError:
                pass
            proc.wait()
            ending = f"torchfrtrace: timed out after {timeout_s:g}s, killed"
        finally:
            if proc.returncode is None:  # our own trouble mid-wait: end and reap it all the same
                proc.kill()
                proc.wait()
            helpers.forget(proc)
        out.seek(0)
        text = out.read(1 << 16).decode("utf-8", "replace")  # enough for SUMMARY_LINES
        lines = [line[:SUMMARY_LINE_CHARS] for line in text.splitlines()]
    lines = lines[:SUMMARY_LINES] + ([ending] if ending else [])
    return "\n".join(lines)

