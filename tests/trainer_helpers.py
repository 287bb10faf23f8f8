"""Shared pieces of the trainer's tests: tiny configs, tiny data, polling, child processes.

Imported by tests/unit/test_trainer_*.py and tests/integration/test_trainer_*.py
(which put this folder on sys.path first).
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import torch

from helpers import wait_for  # noqa: F401  (the supervisor tests' poller, re-exported)
from trainer.config import ModelConfig, TrainConfig

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "trainer" / "train.py"

# one torch thread: on a busy 2-core machine it beats two, and keeps timings steady
torch.set_num_threads(1)

TINY_MODEL = ModelConfig(width=4, codebook_bits=4)


def tiny_config(out, **overrides) -> TrainConfig:
    """Return a config that trains in well under a second: 20 clips of 3x4x16x16."""
    fields = dict(samples=20, frames=4, size=16, epochs=2, batch_size=4, out=str(out),
                  log_every_s=0.0, heartbeat_s=0.0, warmup_steps=2, model=TINY_MODEL)
    fields.update(overrides)
    return TrainConfig(**fields)


def tiny_cli_args(out, *extra: str) -> list:
    """Return train.py arguments for the same tiny run, on the command line."""
    return ["--samples", "20", "--frames", "4", "--size", "16", "--epochs", "2",
            "--batch-size", "4", "--out", str(out), "--log-every-s", "0", *extra]


def write_npz(path, n=10, channels=3, frames=8, size=32, dtype="float", seed=0, **arrays):
    """Write an .npz of random videos (N, C, T, H, W) and labels; `arrays` replace or add."""
    rng = np.random.default_rng(seed)
    if dtype == "uint8":
        videos = rng.integers(0, 256, (n, channels, frames, size, size), dtype=np.uint8)
    else:
        videos = rng.random((n, channels, frames, size, size), dtype=np.float32)
    content = {"videos": videos, "labels": rng.integers(0, 4, n)}
    content.update(arrays)
    np.savez(path, **{k: v for k, v in content.items() if v is not None})
    return Path(path)


class Child:
    """A `python -u trainer/train.py` child whose stdout and stderr lines are collected."""

    def __init__(self, args, env=None, cwd=None, command=None):
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        full_env.pop("MAGVIT_PROGRESS_FILE", None)
        full_env.pop("MAGVIT_SUPERVISED", None)
        full_env.update(env or {})
        command = command or [sys.executable, "-u", str(TRAIN_PY)]
        self.proc = subprocess.Popen(command + list(args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=full_env, cwd=cwd or REPO,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.out: list = []
        self.err: list = []
        self._readers = [threading.Thread(target=self._read, args=(s, l), daemon=True)
                         for s, l in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, lines):
        for raw in iter(stream.readline, b""):
            lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    def wait_line(self, text: str, timeout_s: float = 30, stream: str = "out") -> str:
        """Wait for a line containing `text` on stdout (or stderr); return it."""
        lines = self.out if stream == "out" else self.err
        return wait_for(lambda: next((l for l in list(lines) if text in l), None), timeout_s,
                        what=f"{text!r} on std{stream} (got: {lines[-5:]})")

    def wait(self, timeout_s: float = 60) -> int:
        """Wait for the exit status, then for the last output lines."""
        code = self.proc.wait(timeout=timeout_s)
        for t in self._readers:
            t.join(timeout=5)
        return code

    def kill(self) -> None:
        """SIGKILL the child's whole session (it may have started others)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 9)
        self.proc.wait(timeout=10)
