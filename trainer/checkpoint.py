"""Checkpoints: written atomically, loadable with torch.load(weights_only=True).

Only tensors and plain Python types go in (no argparse.Namespace, no legacy numpy
RandomState tuples), so the safe loader accepts the file.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.atomic import write_atomically


def capture_rng(np_rng: Optional[np.random.Generator]) -> dict:
    """Return every random state that shapes the next step (torch, CUDA, numpy, python)."""
    state = {"torch": torch.get_rng_state(), "python": _python_state_to_list(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if np_rng is not None:
        state["numpy"] = np_rng.bit_generator.state  # a dict of ints and strings
    return state


def restore_rng(state: dict, np_rng: Optional[np.random.Generator]) -> None:
    """Put back the random states captured by capture_rng."""
    torch.set_rng_state(state["torch"])
    random.setstate(_python_state_from_list(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if np_rng is not None and "numpy" in state:
        np_rng.bit_generator.state = state["numpy"]


def _python_state_to_list(state) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_state_from_list(state: list):
    version, internal, gauss = state
    return version, tuple(internal), gauss


def save_checkpoint(path, state: dict) -> None:
    """Write `state` to `path` atomically and durably (temporary file, fsync, os.replace)."""
    write_atomically(path, lambda f: torch.save(state, f), durable=True)


def load_checkpoint(path) -> Optional[dict]:
    """Load a checkpoint onto the CPU, or return None when there is none at `path`."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise ValueError(f"checkpoint {path} cannot be loaded ({exc}); "
                         "move it away or pass --resume never") from None
