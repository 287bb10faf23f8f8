"""How a run ends: its exit statuses, and the one line bad input gets.

Exit statuses (SPEC 8): 0 done; 2 bad input (one line); 65 a non-finite loss; 74 a
checkpoint could not be saved (the previous one kept); 128+N stopped by signal N;
141 (128 + SIGPIPE) stopped with a checkpoint because stdout lost its reader; 1 a bug
(a traceback).
"""
from __future__ import annotations

import signal
import sys

EXIT_DONE = 0
EXIT_BUG = 1  # what Python gives an uncaught exception
EXIT_USAGE = 2  # bad input: options, data, checkpoint, --out
EXIT_NONFINITE = 65  # EX_DATAERR: the loss became NaN or infinite
EXIT_IOERR = 74  # EX_IOERR: a checkpoint could not be saved
# stdout lost its reader (EPIPE): what SIGPIPE would give, but with a checkpoint saved
EXIT_NO_READER = 128 + signal.SIGPIPE


def exit_for_signal(signum: int) -> int:
    """Return the status of a run stopped by signal `signum`: 128+N, as the shell shows it."""
    return 128 + signum


class SaveAborted(Exception):
    """A checkpoint save failed on rank 0 (every rank raises it, to stop together)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def report_error(message: str) -> None:
    """Print a one-line error for bad input (no traceback: nothing in the code went wrong)."""
    line = " ".join(message.split())
    try:
        sys.stderr.write(f"train.py: error: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


def first_line(exc: BaseException) -> str:
    """Return the line of an exception's message that says what is wrong, at most 300 chars."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # load_state_dict: "Error(s) in loading state_dict for X:" then the reasons
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    return (lines[0] if lines else type(exc).__name__)[:300]
