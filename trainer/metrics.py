"""metrics.jsonl (one JSON object a line) and loss.png (train/val curves)."""
from __future__ import annotations

import json
import math
import os
import stat
import time
from pathlib import Path
from typing import Optional, Tuple

from trainer.atomic import write_atomically
from trainer.progress import SoftWrites


class MetricsLog:
    """Append step and epoch records to DIR/metrics.jsonl, one flushed line each.

    A failed write is a warning (once) and the run goes on. On resume the file is cut
    back to the checkpoint's step (cut_back), so it stays one clean history: no step
    twice, no torn line glued to the next record.
    """

    def __init__(self, path, soft: Optional[SoftWrites] = None):
        self.path = Path(path)
        self.soft = soft or SoftWrites()
        self.written = 0  # records appended
        self.failed = 0  # records lost to a failed write
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # the first append says so, as a warning

    def _append(self, record: dict) -> None:
        # NaN and infinity are not JSON: null instead (the run stops at such a loss anyway)
        record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                  for k, v in record.items()}
        line = (json.dumps(record) + "\n").encode("utf-8")

        def append():
            # open per record: a few lines a minute, and no handle to leak or lose on a kill;
            # one write() of the whole line, so a kill leaves at most one torn last line
            with open(self.path, "ab", buffering=0) as f:
                f.write(line)

        if self.soft.attempt("metrics", self.path, append):
            self.written += 1
        else:
            self.failed += 1

    def cut_back(self, next_step: int, steps_per_epoch: int) -> Tuple[int, int]:
        """Drop records of steps from `next_step` on, and torn lines; keep everything else.

        Return (later records dropped, torn lines dropped). Records after the checkpoint
        are about to be made again: an epoch record belongs with the epoch's last step. A
        record of another kind, or with a step that is not a later one, is left alone.
        """
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                return 0, 0  # a device or a pipe (/dev/full, /dev/zero): nothing to cut, never read it
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return 0, 0
        except OSError as exc:
            self.soft.failed("metrics", self.path, exc)
            return 0, 0
        *lines, tail = raw.split(b"\n")  # tail: bytes after the last newline (a torn line)
        kept, later, torn = [], 0, 1 if tail else 0
        for line in lines:
            verdict = _verdict(line, next_step, steps_per_epoch)
            later += verdict == "later"
            torn += verdict == "torn"
            if verdict == "keep":
                kept.append(line)
        if later or torn:
            text = b"".join(line + b"\n" for line in kept)
            self.soft.attempt("metrics", self.path,
                              lambda: write_atomically(self.path, lambda f: f.write(text)))
        return later, torn

    def step(self, step: int, epoch: int, loss: float, lr, **terms: float) -> None:
        """Record a reported step: reconstruction loss plus the quantizer's terms."""
        self._append({"kind": "step", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                      "time": round(time.time(), 3), **terms})

    def epoch(self, epoch: int, train_loss: float, val_loss: float, elapsed_s: float) -> None:
        """Record a finished (1-based) epoch."""
        self._append({"kind": "epoch", "epoch": epoch, "train_loss": train_loss,
                      "val_loss": val_loss, "elapsed_s": round(elapsed_s, 3),
                      "time": round(time.time(), 3)})


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _verdict(line: bytes, next_step: int, steps_per_epoch: int) -> str:
    """Tell what cut_back does with a metrics line: "keep", "later" (a record of a step from
    `next_step` on: made again after the resume) or "torn" (not JSON: a write cut short)."""
    try:
        record = json.loads(line)
    except ValueError:  # torn, or two records glued together
        return "torn"
    if not isinstance(record, dict):
        return "keep"
    kind = record.get("kind")
    if kind == "step" and _number(record.get("step")) and record["step"] >= next_step:
        return "later"
    if (kind == "epoch" and _number(record.get("epoch"))
            and record["epoch"] * steps_per_epoch >= next_step):
        return "later"
    return "keep"


def plot_losses(history: list, path) -> None:
    """Draw train and val loss per epoch from history [{"epoch", "train_loss", "val_loss"}]."""
    import matplotlib

    matplotlib.use("Agg")  # no display on a training box; must precede pyplot
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train")
    ax.plot(epochs, [h["val_loss"] for h in history], marker="o", label="val")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss (MSE)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)  # then rename, so a viewer never opens half a PNG
    plt.close(fig)
    tmp.replace(path)
