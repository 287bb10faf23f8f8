"""Checkpoints: written atomically, loadable with torch.load(weights_only=True).

Only tensors and plain Python types go in (no argparse.Namespace, no legacy numpy
RandomState tuples), so the safe loader accepts the file.
"""
from __future__ import annotations

import os
import random
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.atomic import write_atomically
from trainer.config import config_differences, data_difference


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


class SaveFailed(Exception):
    """A checkpoint could not be written (disk full, read-only, too large); the old file stands."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason  # the OS's words: "No space left on device"


def _os_error_in(exc: BaseException) -> Optional[OSError]:
    """Return the OSError behind `exc`: torch.save wraps a failed write in RuntimeErrors."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def save_checkpoint(path, state: dict) -> None:
    """Write `state` to `path` atomically and durably (temporary file, fsync, os.replace).

    Raises SaveFailed when the file system refuses (ENOSPC, EROFS, EFBIG, ...): the
    temporary file is removed and the previous checkpoint is left as it was.
    """
    try:
        write_atomically(path, lambda f: torch.save(state, f), durable=True)
    except (OSError, RuntimeError) as exc:
        cause = _os_error_in(exc)
        if cause is None:
            raise  # a RuntimeError of torch's own: a bug, with its traceback
        raise SaveFailed(cause.strerror or str(cause)) from exc


REQUIRED = {"model": dict, "optimizer": dict, "scheduler": dict, "next_step": int,
            "rank_state": list, "steps_per_epoch": int, "world_size": int, "history": list,
            "elapsed_s": float, "config": dict, "data": dict}


def _load_reason(exc: BaseException) -> str:
    """Say why torch.load refused a file, in a few words and never advising weights_only=False."""
    text = str(exc)
    if "weights_only" in text or "Unsupported global" in text or "pickle" in text.lower():
        return "it holds Python objects other than tensors and plain values; never loaded, for safety"
    if "zip archive" in text or "central directory" in text or "failed finding" in text:
        return "truncated or corrupt"
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def load_checkpoint(path) -> Optional[dict]:
    """Load a checkpoint onto the CPU, or return None when there is none at `path`.

    ValueError (one line) when something is there that is not one of our checkpoints:
    a folder, an unreadable or foreign file, a file missing a field we need.
    """
    path = Path(path)
    if not os.path.lexists(path):
        return None
    if not path.is_file():
        raise ValueError(f"checkpoint {path} is not a file; move it away or pass --resume never")
    try:
        with warnings.catch_warnings():  # torch warns (in several lines) about foreign pickles
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated or foreign file: say which, not a pickle traceback
        raise ValueError(f"checkpoint {path} cannot be loaded ({_load_reason(exc)}); "
                         "move it away or pass --resume never") from None
    problem = _structure_problem(state)
    if problem:
        raise ValueError(f"checkpoint {path} is not a checkpoint of this trainer ({problem});"
                         " move it away or pass --resume never")
    return state


def _structure_problem(state) -> Optional[str]:
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    for key, kind in REQUIRED.items():
        if key not in state:
            return f"no {key!r}"
        value = state[key]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) \
            if kind is float else isinstance(value, kind)
        if not ok:
            return f"{key!r} is a {type(value).__name__}"
    if state["next_step"] < 1 or state["steps_per_epoch"] < 1 or state["world_size"] < 1:
        return "steps or process count below 1"
    if len(state["rank_state"]) != state["world_size"]:
        return "one random state per process expected"
    return None


def nonfinite_tensors(tensors) -> list:
    """Return the names of tensors holding NaN or infinity, from (name, tensor) pairs."""
    names, flags = [], []
    for name, t in tensors:
        if torch.is_tensor(t) and t.is_floating_point():
            names.append(name)
            flags.append(torch.isfinite(t).all())
    if not flags:
        return []
    ok = torch.stack(flags).tolist()  # one device read for all of them
    return [name for name, good in zip(names, ok) if not good]


def _optimizer_tensors(state: dict) -> list:
    """Return (name, tensor) pairs of an optimizer state dict (Adam's moments)."""
    pairs = []
    for index, per_param in (state.get("state") or {}).items():
        if isinstance(per_param, dict):
            pairs += [(f"optimizer state {index}.{k}", v) for k, v in per_param.items()]
    return pairs


def check_resumable(state: dict, path, config: dict, data_id: dict, world_size: int,
                    steps_per_epoch: int) -> list:
    """Refuse (ValueError, one line) a checkpoint this run must not continue; else return
    the allowed changes to mention (`--epochs 3 -> 5`).

    Refused: other settings (config.config_differences), other data (by content), another
    number of processes, NaN or infinite weights or optimizer moments.
    """
    refused, changed = config_differences(state["config"], config)
    data_problem = data_difference(state["data"], data_id)
    # two synthetic sets differ when their options do: naming those says it all
    if data_problem and not (refused and state["data"].get("source") is None
                             and data_id.get("source") is None):
        refused.append(data_problem)
    if state["world_size"] != world_size:
        refused.append(f"processes {state['world_size']} there, {world_size} here")
    elif state["steps_per_epoch"] != steps_per_epoch and not refused:
        refused.append(f"steps per epoch {state['steps_per_epoch']} there, {steps_per_epoch} here")
    if refused:
        raise ValueError(f"checkpoint {path} was made with other settings: {'; '.join(refused)};"
                         " resume with the same ones, or use another --out or --resume never")
    bad = nonfinite_tensors(list(state["model"].items()) + _optimizer_tensors(state["optimizer"]))
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise ValueError(f"checkpoint {path} holds NaN or infinite values (in {bad[0]}{more});"
                         " move it away or pass --resume never")
    return changed
