"""Why a launch ended: a short kind and one line of evidence, for the `exit` event and line (SPEC 4).

Pure: the status, how the supervisor was involved, the last bytes of each stream and the
OOM killer's counts in; (cause, detail) out. The order of the checks is the policy:

  1. status 0: nothing to explain, whatever the output said;
  2. the supervisor ended it for a stall: `stall`;
  3. a SIGKILL we did not send while the OOM killer killed: `oom-killer`;
  4. what the output names: `cuda-oom`, `nccl-timeout`, `nccl-error`, `dataloader-worker`, and
     faulthandler's `Fatal Python error: Segmentation fault` (the output wins over the signal:
     an NCCL watchdog prints its timeout, then aborts);
  5. SIGSEGV or SIGBUS: `segfault`;
  6. the last line of the last Python traceback: `exception`, only for a child that exited
     with a status (an unhandled exception ends Python with status 1, never with a signal:
     a traceback before a death by signal was printed by something that went on running);
  7. any other signal: `signal`, and the user's signal that the supervisor passed on;
  8. otherwise unknown: (None, None).
"""
from __future__ import annotations

import re
import signal
from dataclasses import dataclass

from supervisor.output.lines import one_line, printable

DETAIL_MAX_CHARS = 300


@dataclass(frozen=True)
class Ending:
    """What is known of one launch's end."""

    status: int  # shell-style: 128+N for signal N
    term_signal: int | None = None  # the signal it died of, None when it exited
    stalled: bool = False  # the supervisor ended it for a stall
    killed_by_us: bool = False  # the supervisor sent it SIGKILL (a stall's ladder, the user's second Ctrl-C)
    user_signal: int | None = None  # the user's signal that the supervisor passed on, if any
    stderr: bytes = b""  # the stream's last bytes (SPEC: 64 KiB)
    stdout: bytes = b""
    oom: str | None = None  # the OOM killer killed during the launch: where it was counted
    stall: str | None = None  # the stall, as its STALL line said it


_PREFIX = re.compile(r"^\[(?:rank|default)?\d+\]:\s?")  # torchrun's per-rank line prefix: [rank1]: or [default0]:
_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):")
_TORCHRUN_FAILED = "torch.distributed.elastic.multiprocessing.errors.ChildFailedError"
_WORKER_KILLED = re.compile(r"DataLoader worker \(pid.*?\) is killed by signal")
_ROOT_CAUSE_RANK = re.compile(r"Root Cause \(first observed failure\):.*?\brank\s*:\s*(\d+)", re.S)
_FATAL = re.compile(r"^Fatal Python error: (Segmentation fault|Bus error|Aborted|Floating-point exception|"
                    r"Illegal instruction)")
_FAULTHANDLER_FRAME = re.compile(r'^\s+File "(.*)", line (\d+) in (.*)$')

# (kind, pattern) in order of precedence; the detail is the matching line from the match on.
_OUTPUT_KINDS = [
    ("cuda-oom", re.compile(r"CUDA out of memory|OutOfMemoryError|CUDA error: out of memory")),
    ("nccl-timeout", re.compile(r"Watchdog caught collective operation timeout")),
    ("nccl-error", re.compile(r"NCCL error|nccl(?:Internal|System|UnhandledCuda|Remote)Error|ncclInvalidUsage")),
    ("dataloader-worker", re.compile(r"DataLoader worker \(pid.*?\) (?:is killed by signal|exited unexpectedly)")),
]


def cause_of(end: Ending) -> tuple[str | None, str | None]:
    """Return (cause, detail) for a launch's end; (None, None) for status 0 or when nothing tells."""
    if end.status == 0:
        return None, None
    if end.stalled:
        return "stall", _detail(end.stall or "the supervisor ended it: no progress")
    texts = [_lines(end.stderr), _lines(end.stdout)]  # with --pty, everything arrived on stdout
    died_of = end.term_signal
    if died_of == signal.SIGKILL and not end.killed_by_us and end.oom:
        return "oom-killer", _detail(f"SIGKILL; {end.oom}")
    for kind, pattern in _OUTPUT_KINDS:
        found = _last_match(texts, pattern)
        if found is not None:
            detail = found
            if kind == "nccl-timeout" and "WorkNCCL(" in found:
                detail = found[found.index("WorkNCCL("):]
            if kind == "dataloader-worker":
                # PyTorch says first how the worker died, then that it is gone: the first says more.
                detail = _last_match(texts, _WORKER_KILLED) or detail
                if end.oom:
                    detail += f" ({end.oom})"
            return kind, _detail(detail)
    fatal = _fatal_error(texts)
    if fatal is not None and fatal[0] in ("Segmentation fault", "Bus error"):
        return "segfault", _detail(f"{fatal[0]} in {fatal[1]}" if fatal[1] else fatal[0])
    if died_of in (signal.SIGSEGV, signal.SIGBUS):
        return "segfault", _detail(_signal_name(died_of))
    if died_of is None:
        exception = _last_exception(texts)
        if exception is not None:
            return "exception", _detail(exception)
    if died_of is not None:
        name = _signal_name(died_of)
        if end.user_signal is not None:
            return "signal", _detail(f"{name}; the user's {_signal_name(end.user_signal)}, passed on by the supervisor")
        if fatal is not None and fatal[1]:
            return "signal", _detail(f"{name} in {fatal[1]}")
        return "signal", _detail(name)
    if end.user_signal is not None:
        return "signal", _detail(f"the user's {_signal_name(end.user_signal)}, passed on by the supervisor; "
                                 f"the child exited {end.status}")
    return None, None


def _detail(text: str) -> str:
    """One printable line of at most DETAIL_MAX_CHARS."""
    return one_line(printable(" ".join(text.split())), DETAIL_MAX_CHARS)


def _signal_name(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"SIG{sig}"


def _lines(data: bytes) -> list[str]:
    """The stream's lines as last shown (a line redrawn with \\r is its last state), torchrun's prefixes kept."""
    text = data.decode("utf-8", "replace")
    return [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
            for line in text.split("\n")]


def _last_match(texts: list[list[str]], pattern: re.Pattern) -> str | None:
    """The last line (of stderr, else stdout) that pattern finds, without torchrun's rank prefix."""
    for lines in texts:
        for line in reversed(lines):
            if pattern.search(line):
                return _PREFIX.sub("", line).strip()
    return None


def _fatal_error(texts: list[list[str]]) -> tuple[str, str | None] | None:
    """faulthandler's last `Fatal Python error: X` and the innermost frame it printed ('f (file:line)')."""
    for lines in texts:
        for i in range(len(lines) - 1, -1, -1):
            m = _FATAL.match(_PREFIX.sub("", lines[i]))
            if not m:
                continue
            for line in lines[i + 1:]:
                f = _FAULTHANDLER_FRAME.match(_PREFIX.sub("", line))
                if f:
                    return m.group(1), f"{f.group(3)} ({f.group(1)}:{f.group(2)})"
            return m.group(1), None
    return None


def _last_exception(texts: list[list[str]]) -> str | None:
    """The last line of the last Python traceback: its exception, `ValueError: shape mismatch`.

    Under torchrun, whose own ChildFailedError ends the output, the failed rank's traceback:
    the root cause's rank where torchrun names it, else the last traceback before torchrun's.
    """
    for lines in texts:
        text = "\n".join(lines)
        m = _ROOT_CAUSE_RANK.search(text)
        if m:
            mine = [ln for ln in lines if ln.startswith((f"[rank{m.group(1)}]:", f"[default{m.group(1)}]:"))]
            found = _exceptions(mine)
            if found:
                return found[-1]
        found = [e for e in _exceptions(lines) if not e.startswith(_TORCHRUN_FAILED)]
        if found:
            return found[-1]
    return None


def _exceptions(lines: list[str]) -> list[str]:
    """The exception line of each traceback in lines, in order."""
    found = []
    stripped = [_PREFIX.sub("", ln) for ln in lines]
    for i, line in enumerate(stripped):
        if not _TRACEBACK.match(line):
            continue
        for after in stripped[i + 1:]:
            if after.strip() and not after[0].isspace():
                found.append(after.strip())
                break
    return found
