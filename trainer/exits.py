"""How a run ends: its exit statuses, the line that says why, the one line bad input gets,
and the closing work of a finished run (test loss, loss.png, the Done line).

Exit statuses (SPEC 8): 0 done; 2 bad input (one line); 65 a non-finite loss; 74 a
checkpoint could not be saved (the previous one kept); 128+N stopped by signal N;
141 (128 + SIGPIPE) stopped with a checkpoint because stdout lost its reader; 1 a bug
(a traceback).
"""
from __future__ import annotations

import signal
import sys

from trainer.console import emit, say_last
from trainer.loop import evaluate
from trainer.metrics import plot_losses
from trainer.progress import format_loss

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


def stopped(job, control, next_step: int) -> int:
    """Say why `job` (an epochs.Run) stopped early; return its exit status: 128+N for
    signal N, 141 when stdout lost its reader, 0 for the step budget."""
    if control.signum == signal.SIGPIPE:
        if job.dist.is_main:  # on stderr: no one reads stdout
            say_last(f"Stopped: stdout has no reader, before step {next_step}; checkpoint"
                     f" saved to {job.checkpoint_path}")
        return EXIT_NO_READER
    if control.signum:
        name = signal.Signals(control.signum).name
        if job.dist.is_main:
            emit(f"Stopped on {name} before step {next_step}; checkpoint saved to"
                 f" {job.checkpoint_path}")
        return exit_for_signal(control.signum)
    if job.dist.is_main:
        emit(f"Stopped after step {next_step - 1} (step budget); checkpoint saved to"
             f" {job.checkpoint_path}")
    return 0


def finish(job) -> None:
    """End a run that trained all its epochs: the test loss, loss.png and the Done line (rank 0)."""
    if not job.dist.is_main:
        # This rank's file would stand still while rank 0 tests and plots: say for how long, so a
        # supervisor watching every rank's file does not take the end of the run for a hang.
        job.reporter.declare("done; rank 0 finishes the run",
                             job.expect_s("testing") + job.expect_s("drawing loss.png"))
        return
    with job.phase("testing"):
        test_loss = evaluate(job.model, job.test_loader, job.device)
    wrote, lost = [f"{job.out}/checkpoint.pt"], ""
    m = job.metrics
    if m is None or not m.failed:
        wrote.append("metrics.jsonl")
    elif m.written:
        wrote.append(f"metrics.jsonl ({m.failed} of {m.failed + m.written} records lost)")
    else:
        lost = "; metrics.jsonl could not be written"
    with job.phase("drawing loss.png"):  # matplotlib's import alone can take seconds
        plot = job.out / "loss.png"
        if job.history and job.soft.attempt("the plot", plot, lambda: plot_losses(job.history, plot)):
            wrote.append("loss.png")
    done = (max(job.next_step, job.saved_step or 1) - 1) / job.steps_per_epoch
    epochs = f"{done:.0f}" if done == int(done) else f"{done:.2f}"
    emit(f"Done: {epochs} epochs in {job.elapsed_s():.1f}s; test loss {format_loss(test_loss)};"
         f" wrote {', '.join(wrote)}{lost}")
