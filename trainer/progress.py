"""What a person or a supervisor sees: batch lines, [PROGRESS] lines, the progress file
(stdout itself: trainer/console.py)."""
from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from trainer.atomic import write_text_atomically
from trainer.console import emit, warn


def progress_path_for(out_dir, rank: int = 0, world_size: int = 1, env=None) -> Path:
    """Return this process's progress file: $MAGVIT_PROGRESS_FILE or OUT_DIR/PROGRESS.txt, per rank.

    Under torchrun (world_size > 1) each rank gets its own file: a `*` in the path is
    replaced by the rank, else NAME.EXT becomes NAME-rank{R}.EXT beside it, which is
    what the supervisor watches by default.
    """
    env = os.environ if env is None else env
    pattern = env.get("MAGVIT_PROGRESS_FILE")
    if pattern and "*" in pattern:  # a pattern's star only: a `*` in --out is part of a name
        return Path(pattern.replace("*", str(rank)))
    path = pattern or os.path.join(os.fspath(out_dir), "PROGRESS.txt")
    if world_size > 1:
        p = Path(path)
        return p.with_name(f"{p.stem}-rank{rank}{p.suffix}")
    return Path(path)


def format_loss(value: Optional[float]) -> str:
    """Format a loss the way every progress line shows it."""
    return "none" if value is None else f"{value:.4f}"


def progress_text(headline: str, epoch: int, total_epochs: int, train_loss: Optional[float],
                  val_loss: Optional[float], elapsed_s: float, **extra) -> str:
    """Return the progress file's content (SPEC section 7): a headline, then key: value lines."""
    fields = {"epoch": epoch, "total_epochs": total_epochs, **extra,
              "train_loss": "none" if train_loss is None else f"{train_loss:.6g}",
              "val_loss": "none" if val_loss is None else f"{val_loss:.6g}",
              "elapsed_s": f"{elapsed_s:.1f}",
              "updated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return headline + "\n" + "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)


class SoftWrites:
    """Writes whose failure is a warning, once per kind of file, and never the end of the run.

    The progress file and metrics.jsonl serve the people watching; a full or read-only
    disk must not kill the training they watch. (A checkpoint that cannot be saved is
    another matter: see checkpoint.SaveFailed.)
    """

    def __init__(self, warner: Callable[[str], None] = warn):
        self.warner = warner
        self.warned: set = set()  # kinds of file already warned about

    def attempt(self, what: str, path, write: Callable[[], None]) -> bool:
        """Call write(); on OSError warn once for `what`; tell whether it worked."""
        try:
            write()
            return True
        except OSError as exc:
            self.failed(what, path, exc)
            return False

    def failed(self, what: str, path, exc: OSError) -> None:
        """Warn that `what` could not be written or read, the first time only."""
        if what not in self.warned:
            self.warned.add(what)
            self.warner(f"cannot write {what} {path} ({exc.strerror or exc}); training goes on"
                        " (said once)")


def update_progress(progress_path, epoch: int, total_epochs: int, train_loss: float,
                    val_loss: float, elapsed_time: float, verbose: bool = True,
                    soft: Optional[SoftWrites] = None, **extra) -> None:
    """Write the end-of-epoch progress file and print `[PROGRESS] Epoch e/E - Train: x, Val: y`.

    `epoch` is 0-based, as in the original code; the file and the line show it 1-based.
    `extra` adds key: value lines (batch, total_batches, step); None values are left out.
    With `soft`, a failed write is a warning instead of an OSError.
    """
    shown = epoch + 1
    line = (f"Epoch {shown}/{total_epochs} - Train: {format_loss(train_loss)},"
            f" Val: {format_loss(val_loss)}")
    if progress_path is not None:
        text = progress_text(line, shown, total_epochs, train_loss, val_loss, elapsed_time, **extra)
        write = lambda: write_text_atomically(progress_path, text)  # noqa: E731
        if soft is None:
            write()
        else:
            soft.attempt("the progress file", progress_path, write)
    if verbose:
        emit(f"[PROGRESS] {line}")


# Between printed lines the progress file is still replaced after a step once it is this
# old, so it is never more than a second old while steps take under half a second.
PROGRESS_EVERY_S = 0.5


class BatchReporter:
    """Decide when a batch is reported, and report it: batch line, progress file, metrics.

    A batch is reported (printed, and recorded in metrics) when it is the first or last
    of its epoch, or when `log_every_s` has passed since the last report. Only then is the
    loss read from the device, so a step costs no synchronisation otherwise. The progress
    file is also replaced after any step once it is PROGRESS_EVERY_S old (showing the
    last loss read), and around slow phases with `expect_next_s` (declare).
    """

    def __init__(self, total_epochs: int, log_every_s: float = 30.0, verbose: bool = True,
                 progress_path=None, metrics=None, start_time: Optional[float] = None,
                 clock=time.monotonic, soft: Optional[SoftWrites] = None,
                 print_progress: Optional[bool] = None):
        self.total_epochs = total_epochs
        self.log_every_s = log_every_s
        self.verbose = verbose  # print batch lines (off with --bar, and on ranks > 0)
        # print [PROGRESS] lines (with --bar too, on rank 0 only)
        self.print_progress = verbose if print_progress is None else print_progress
        self.progress_path = progress_path
        self.metrics = metrics  # MetricsLog or None
        self.clock = clock
        self.soft = soft or SoftWrites()
        self.start_time = clock() if start_time is None else start_time
        self.last_report = float("-inf")
        self.last_write = float("-inf")  # of the progress file
        self.val_loss: Optional[float] = None  # last epoch's, shown in the progress file
        self.train_loss: Optional[float] = None  # last read, shown until the next read
        self._last: Optional[tuple] = None  # (headline, epoch, fields) of the last plain write

    def due(self, batch: int, total_batches: int) -> bool:
        """Tell whether 0-based `batch` of `total_batches` should be reported."""
        if batch == 0 or batch == total_batches - 1:
            return True
        return self.clock() - self.last_report >= self.log_every_s

    def report(self, epoch: int, batch: int, total_batches: int, step: int, loss: float,
               lr: Optional[float] = None, **terms: float) -> None:
        """Report 0-based `batch` of 0-based `epoch`, `loss` being its recent mean."""
        self.last_report = self.clock()
        self.train_loss = loss
        if self.verbose:
            emit(f"  Batch {batch + 1}/{total_batches} - Loss: {format_loss(loss)}")
        self._write_batch(epoch, batch, total_batches, step)
        if self.metrics is not None:
            self.metrics.step(step=step, epoch=epoch + 1, loss=loss, lr=lr, **terms)

    def tick(self, epoch: int, batch: int, total_batches: int, step: int) -> None:
        """After a step that was not reported: replace the progress file if it is getting old.

        The step is remembered either way: a phase's declaration (a save every 0.2 s keeps
        the file fresh, so this never writes) shows it, not the step of the last write.
        """
        content = self._batch(epoch, batch, total_batches, step)
        if self.clock() - self.last_write >= PROGRESS_EVERY_S:
            self.write(*content)
        else:
            self._last = content

    def _batch(self, epoch: int, batch: int, total_batches: int, step: int) -> tuple:
        """Return what the file shows after 0-based `batch`: (headline, epoch, loss, fields)."""
        shown = epoch + 1
        headline = (f"Epoch {shown}/{self.total_epochs} - Batch {batch + 1}/{total_batches}"
                    f" - Loss: {format_loss(self.train_loss)}")
        return (headline, shown, self.train_loss,
                dict(batch=batch + 1, total_batches=total_batches, step=step))

    def _write_batch(self, epoch: int, batch: int, total_batches: int, step: int) -> None:
        self.write(*self._batch(epoch, batch, total_batches, step))

    def write(self, headline: str, shown_epoch: int, train_loss: Optional[float], fields: dict,
              expect_next_s: Optional[float] = None) -> None:
        """Replace the progress file (SPEC 7); a failure is a warning, once."""
        self.last_write = self.clock()
        if expect_next_s is None:
            self._last = (headline, shown_epoch, train_loss, fields)
        else:
            fields = dict(fields, expect_next_s=f"{expect_next_s:.0f}")
        if self.progress_path is None:
            return
        text = progress_text(headline, shown_epoch, self.total_epochs, train_loss, self.val_loss,
                             self.last_write - self.start_time, **fields)
        self.soft.attempt("the progress file", self.progress_path,
                          lambda: write_text_atomically(self.progress_path, text))

    def epoch_ended(self, epoch: int, train_loss: float, val_loss: float, steps: int,
                    total_batches: int) -> dict:
        """Make the end of 0-based `epoch` what the file shows (a resume of a finished run
        shows it again); return its key: value fields. Writes nothing."""
        self.val_loss = val_loss
        self.train_loss = train_loss
        shown = epoch + 1
        fields = dict(batch=total_batches, total_batches=total_batches, step=steps)
        self._last = (f"Epoch {shown}/{self.total_epochs} - Train: {format_loss(train_loss)},"
                      f" Val: {format_loss(val_loss)}", shown, train_loss, fields)
        return fields

    def end_epoch(self, epoch: int, train_loss: float, val_loss: float, steps: int,
                  total_batches: int) -> None:
        """Write the end-of-epoch progress file; print the [PROGRESS] line when verbose."""
        fields = self.epoch_ended(epoch, train_loss, val_loss, steps, total_batches)
        self.last_write = self.clock()
        update_progress(self.progress_path, epoch, self.total_epochs, train_loss, val_loss,
                        self.last_write - self.start_time, verbose=self.print_progress,
                        soft=self.soft, **fields)

    def start(self, epoch: int, total_batches: int, next_step: int) -> None:
        """Set what the file shows before the first step of this process (0-based epoch)."""
        shown = epoch + 1
        done = (next_step - 1) % total_batches
        self._last = (f"Epoch {shown}/{self.total_epochs} - starting at step {next_step}", shown,
                      None, dict(batch=done, total_batches=total_batches, step=next_step - 1))

    def declare(self, what: str, expect_next_s: float) -> None:
        """Say in the progress file that `what` starts and may take expect_next_s (SPEC 7)."""
        headline, shown, loss, fields = self._last or (f"Epoch 1/{self.total_epochs}", 1, None, {})
        self.write(f"{headline} - {what}", shown, loss, fields, expect_next_s=expect_next_s)

    def clear(self) -> None:
        """Rewrite the last plain content, without expect_next_s: the declared phase is over."""
        if self._last is not None:
            self.write(*self._last)
