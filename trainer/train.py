"""Train the video tokenizer: `python -u trainer/train.py [options]`, or import the pieces.

Importable for tests: load_dataset, train_one_epoch, update_progress (the names the
original code had), and main(argv) -> exit status.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__" and __package__ in (None, ""):
    # run as a script from anywhere: make `import trainer` find the repository
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import argparse
import faulthandler
import signal
from typing import Optional, Sequence

from trainer.config import TrainConfig
from trainer.data import load_dataset
from trainer.loop import train_one_epoch
from trainer.progress import update_progress
from trainer.run import prepare, report_error, run

__all__ = ["load_dataset", "train_one_epoch", "update_progress", "main", "run", "parse_args"]

PROG = "train.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line instead of usage + error, like every other bad input
        raise ValueError(message)


def parse_args(argv: Optional[Sequence[str]] = None) -> TrainConfig:
    """Turn the command line into a validated TrainConfig; ValueError names a bad option."""
    d = TrainConfig()
    p = _Parser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Train a small MAGVIT-style video tokenizer (3D conv + LFQ).")
    p.add_argument("--data", help=".npz with videos (N,C,T,H,W) and labels (N,); default: synthetic")
    p.add_argument("--samples", type=int, default=d.samples, help="synthetic clips")
    p.add_argument("--frames", type=int, default=d.frames, help="synthetic frames per clip")
    p.add_argument("--size", type=int, default=d.size, help="synthetic frame side, pixels")
    p.add_argument("--epochs", type=int, default=d.epochs, help="passes over the training split")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="clips per step per process")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="synthetic data, split, init, order")
    p.add_argument("--out", default=d.out, help="folder for checkpoint, metrics, loss.png")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda")
    p.add_argument("--resume", default=d.resume, help="auto (continue from OUT/checkpoint.pt) or never")
    p.add_argument("--log-every-s", type=float, default=d.log_every_s,
                   help="longest gap between batch lines and progress-file updates")
    p.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s,
                   help="heartbeat line period without the supervisor; 0 turns it off")
    p.add_argument("--bar", action="store_true", help="tqdm bar instead of batch lines")
    p.add_argument("--fault", help="hang:STEP[:RANK] or crash:STEP[:RANK] (testing supervisors)")
    ns = p.parse_args(argv)
    config = TrainConfig(**{k: v for k, v in vars(ns).items()})
    config.validate()
    return config


def install_stack_dumps() -> None:
    """Print every thread's Python stack on SIGSEGV/SIGABRT/SIGBUS/SIGILL/SIGFPE and on SIGUSR2.

    SIGABRT is how a supervisor asks a stuck process for its stacks before SIGKILL.
    SIGUSR2, not SIGUSR1, gives stacks on demand: SIGUSR1 means checkpoint and stop.
    """
    stderr = sys.__stderr__  # the real fd 2, even when sys.stderr is redirected in-process
    if stderr is None:
        return
    faulthandler.enable(file=stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR2, file=stderr, all_threads=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line; bad input is one line on stderr and exit status 2."""
    install_stack_dumps()
    try:
        config = parse_args(argv)
        prepared = prepare(config)
    except ValueError as exc:
        report_error(str(exc))
        return 2
    return run(config, prepared)


if __name__ == "__main__":
    sys.exit(main())
