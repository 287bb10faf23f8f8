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
from trainer.console import close_stdout
from trainer.progress import update_progress
from trainer.run import prepare, report_error, run

__all__ = ["load_dataset", "train_one_epoch", "update_progress", "main", "run", "parse_args"]

PROG = "train.py"


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line instead of usage + error, like every other bad input
        raise ValueError(message)


def _epilog() -> str:
    from trainer.config import MAY_CHANGE_ON_RESUME, SILENT_CHANGES

    may = ", ".join(o for f, o in MAY_CHANGE_ON_RESUME.items() if f not in SILENT_CHANGES)
    return (f"Resuming (--resume auto) over OUT/checkpoint.pt: only {may} (and --out, if the"
            " folder moved) may differ from the checkpoint's run; any other difference (data"
            " by content, shapes, seed, lr, batch size, ...) is refused. Exit status: 0 done,"
            " 2 bad input, 65 non-finite loss, 74 checkpoint not saved (previous kept),"
            " 128+N stopped by signal N, 141 stopped because stdout lost its reader, 1 a bug.")


def parse_args(argv: Optional[Sequence[str]] = None, env=None) -> TrainConfig:
    """Turn the command line into a validated TrainConfig; ValueError names a bad option."""
    env = os.environ if env is None else env
    d = TrainConfig()
    p = _Parser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Train a small MAGVIT-style video tokenizer (3D conv + LFQ).",
                epilog=_epilog())
    p.add_argument("--data", help=".npz with videos (N,C,T,H,W) and labels (N,); default: synthetic")
    p.add_argument("--samples", type=int, default=d.samples, help="synthetic clips")
    p.add_argument("--frames", type=int, default=d.frames, help="synthetic frames per clip")
    p.add_argument("--size", type=int, default=d.size, help="synthetic frame side, pixels")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="passes over the training split (may change on resume)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="clips per step per process")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=d.seed, help="synthetic data, split, init, order")
    p.add_argument("--out", default=env.get("MAGVIT_RUN_DIR") or d.out,
                   help="folder for checkpoint, metrics, loss.png; $MAGVIT_RUN_DIR, when set,"
                        " is the default")
    p.add_argument("--device", default=d.device, help="auto, cpu or cuda (may change on resume)")
    p.add_argument("--resume", default=d.resume,
                   help="auto (continue from OUT/checkpoint.pt) or never (move an old run aside)")
    p.add_argument("--log-every-s", type=float, default=d.log_every_s,
                   help="longest gap between batch lines (may change on resume)")
    p.add_argument("--heartbeat-s", type=float, default=d.heartbeat_s,
                   help="heartbeat line period without the supervisor; 0 turns it off"
                        " (may change on resume)")
    p.add_argument("--checkpoint-every-s", type=float, default=d.checkpoint_every_s,
                   help="longest time between checkpoints, besides each epoch end; 0: epoch"
                        " ends only (may change on resume)")
    p.add_argument("--bar", action="store_true",
                   help="tqdm bar instead of batch lines (may change on resume)")
    p.add_argument("--fault", action="append", default=None,
                   help="hang:STEP[:RANK], hang-once:STEP[:RANK], crash:STEP[:RANK] or"
                        " nan:STEP[:RANK] (the step's loss made NaN), repeatable (testing"
                        " supervisors; may change on resume)")
    ns = p.parse_args(argv)
    ns.fault = tuple(ns.fault or ())
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
    try:
        return run(config, prepared)
    finally:
        close_stdout()


if __name__ == "__main__":
    sys.exit(main())
