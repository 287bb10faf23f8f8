"""metrics.jsonl (one JSON object a line) and loss.png (train/val curves)."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    """Append step and epoch records to DIR/metrics.jsonl, one flushed line each."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _append(self, record: dict) -> None:
        # open per record: a few lines a minute, and no handle to leak or lose on a kill
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def step(self, step: int, epoch: int, loss: float, lr, **terms: float) -> None:
        """Record a reported step: reconstruction loss plus the quantizer's terms."""
        self._append({"kind": "step", "step": step, "epoch": epoch, "loss": loss, "lr": lr,
                      "time": round(time.time(), 3), **terms})

    def epoch(self, epoch: int, train_loss: float, val_loss: float, elapsed_s: float) -> None:
        """Record a finished (1-based) epoch."""
        self._append({"kind": "epoch", "epoch": epoch, "train_loss": train_loss,
                      "val_loss": val_loss, "elapsed_s": round(elapsed_s, 3),
                      "time": round(time.time(), 3)})


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
