"""The trainer's stdout and stderr: whole lines, flushed, and a failed write never the end
of the run (a full disk loses the lines; no reader stops the run with a checkpoint)."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def warn(message: str) -> None:
    """Print `train.py: warning: ...` on stderr; never raise (stderr may be gone too)."""
    try:
        sys.stderr.write(f"train.py: warning: {message}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


class _Stdout:
    """What became of stdout: a failed write is a warning (once), never the end of the run.

    EPIPE means no one reads any more (`| head`, a supervisor that died): stdout is pointed
    at /dev/null, and the run stops at the next step boundary with a checkpoint
    (RunControl asks stdout_gone()). Any other failure (ENOSPC on /dev/full) loses the
    lines, and training goes on.
    """

    failed = False  # a write failed (warned once)
    gone = False  # EPIPE: no reader


_STDOUT = _Stdout()


def stdout_gone() -> bool:
    """Tell whether stdout lost its reader (EPIPE): the run should checkpoint and stop."""
    return _STDOUT.gone


def _silence_stdout() -> None:
    """Point fd 1 at /dev/null, so later writes (tqdm, the exit's flush) fail no more."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
    except (OSError, ValueError, AttributeError):
        pass


def _stdout_failed(exc: BaseException) -> None:
    if isinstance(exc, BrokenPipeError):
        if not _STDOUT.gone:
            _STDOUT.gone = True
            _silence_stdout()
            warn("stdout has no reader (Broken pipe): saving a checkpoint and stopping")
    elif not _STDOUT.failed:
        _STDOUT.failed = True
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        warn(f"cannot write stdout ({reason}); training goes on, its lines are lost (said once)")


def emit(line: str) -> None:
    """Print one whole line to stdout and flush, without tearing a tqdm bar or another thread's
    line; a failed write is a warning (see _Stdout), never an exception."""
    if _STDOUT.gone:
        return
    try:
        # one write per line: print() writes text and newline separately, and the heartbeat
        # thread could slip its line in between
        with tqdm.external_write_mode(file=sys.stdout):
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except (OSError, ValueError) as exc:  # ValueError: stdout closed
        _stdout_failed(exc)


class BarStdout:
    """Stdout for a tqdm bar (--bar): its failed writes go where emit's do, never raising.

    It counts as sys.stdout for tqdm, so emit still clears the bar before a line.
    """

    def write(self, text: str) -> int:
        if _STDOUT.gone:
            return 0
        try:
            return sys.stdout.write(text)
        except (OSError, ValueError) as exc:
            _stdout_failed(exc)
            return 0

    def flush(self) -> None:
        if _STDOUT.gone:
            return
        try:
            sys.stdout.flush()
        except (OSError, ValueError) as exc:
            _stdout_failed(exc)

    def __getattr__(self, name):
        return getattr(sys.stdout, name)

    def __eq__(self, other) -> bool:
        return other is self or other is sys.stdout

    __hash__ = object.__hash__


def say_last(line: str) -> None:
    """Print a closing line on stdout, or on stderr when stdout has no reader."""
    if not _STDOUT.gone:
        emit(line)
        return
    try:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def close_stdout() -> None:
    """Flush stdout before exit; if that fails, point it at /dev/null (no "Exception ignored")."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError) as exc:
        _stdout_failed(exc)
        _silence_stdout()
