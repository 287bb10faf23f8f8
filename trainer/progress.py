"""What a person or a supervisor sees: batch lines, [PROGRESS] lines, the progress file."""
from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from tqdm import tqdm

from trainer.atomic import write_text_atomically


def emit(line: str) -> None:
    """Print one whole line to stdout and flush, without tearing a tqdm bar or another thread's line."""
    # one write per line: print() writes text and newline separately, and the heartbeat
    # thread could slip its line in between
    with tqdm.external_write_mode(file=sys.stdout):
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def progress_path_for(out_dir, rank: int = 0, world_size: int = 1, env=None) -> Path:
    """Return this process's progress file: $MAGVIT_PROGRESS_FILE or OUT_DIR/PROGRESS.txt, per rank.

    Under torchrun (world_size > 1) each rank gets its own file: a `*` in the path is
    replaced by the rank, else NAME.EXT becomes NAME-rank{R}.EXT beside it, which is
    what the supervisor watches by default.
    """
    env = os.environ if env is None else env
    path = env.get("MAGVIT_PROGRESS_FILE") or os.path.join(os.fspath(out_dir), "PROGRESS.txt")
    if "*" in path:
        return Path(path.replace("*", str(rank)))
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


def update_progress(progress_path, epoch: int, total_epochs: int, train_loss: float,
                    val_loss: float, elapsed_time: float, verbose: bool = True, **extra) -> None:
    """Write the end-of-epoch progress file and print `[PROGRESS] Epoch e/E - Train: x, Val: y`.

    `epoch` is 0-based, as in the original code; the file and the line show it 1-based.
    `extra` adds key: value lines (batch, total_batches, step); None values are left out.
    """
    shown = epoch + 1
    line = (f"Epoch {shown}/{total_epochs} - Train: {format_loss(train_loss)},"
            f" Val: {format_loss(val_loss)}")
    if progress_path is not None:
        text = progress_text(line, shown, total_epochs, train_loss, val_loss, elapsed_time, **extra)
        write_text_atomically(progress_path, text)
    if verbose:
        emit(f"[PROGRESS] {line}")


class BatchReporter:
    """Decide when a batch is reported, and report it: batch line, progress file, metrics.

    A batch is reported when it is the first or last of its epoch, or when
    `log_every_s` has passed since the last report. Only then is the loss read from
    the device, so a step costs no synchronisation otherwise.
    """

    def __init__(self, total_epochs: int, log_every_s: float = 30.0, verbose: bool = True,
                 progress_path=None, metrics=None, start_time: Optional[float] = None,
                 clock=time.monotonic):
        self.total_epochs = total_epochs
        self.log_every_s = log_every_s
        self.verbose = verbose  # print batch lines (off with --bar, and on ranks > 0)
        self.progress_path = progress_path
        self.metrics = metrics  # MetricsLog or None
        self.clock = clock
        self.start_time = clock() if start_time is None else start_time
        self.last_report = float("-inf")
        self.val_loss: Optional[float] = None  # last epoch's, shown in the progress file

    def due(self, batch: int, total_batches: int) -> bool:
        """Tell whether 0-based `batch` of `total_batches` should be reported."""
        if batch == 0 or batch == total_batches - 1:
            return True
        return self.clock() - self.last_report >= self.log_every_s

    def report(self, epoch: int, batch: int, total_batches: int, step: int, loss: float,
               lr: Optional[float] = None, **terms: float) -> None:
        """Report 0-based `batch` of 0-based `epoch`, `loss` being its recent mean."""
        self.last_report = self.clock()
        shown = epoch + 1
        if self.verbose:
            emit(f"  Batch {batch + 1}/{total_batches} - Loss: {format_loss(loss)}")
        if self.progress_path is not None:
            headline = (f"Epoch {shown}/{self.total_epochs} - Batch {batch + 1}/{total_batches}"
                        f" - Loss: {format_loss(loss)}")
            write_text_atomically(self.progress_path, progress_text(
                headline, shown, self.total_epochs, loss, self.val_loss,
                self.last_report - self.start_time, batch=batch + 1,
                total_batches=total_batches, step=step))
        if self.metrics is not None:
            self.metrics.step(step=step, epoch=shown, loss=loss, lr=lr, **terms)
