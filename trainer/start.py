"""Before the first step: the input checked, the run folder taken, the checkpoint checked
and loaded. Every refusal is a ValueError of one line (exit status 2)."""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Tuple

import numpy as np
import torch

from trainer.checkpoint import check_resumable, load_checkpoint, restore_rng
from trainer.config import Fault, TrainConfig, parse_faults
from trainer.data import VideoSet, identify, load_npz, make_moving_shapes
from trainer.distributed import Dist
from trainer.exits import first_line
from trainer.outdir import RunLock, move_aside, remove_leftovers
from trainer.console import emit


def resolve_device(choice: str) -> torch.device:
    """Map --device auto|cpu|cuda to a torch device; ValueError when CUDA is asked for but absent."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


@dataclasses.dataclass
class Prepared:
    faults: Tuple[Fault, ...]  # --fault, parsed
    device: torch.device  # --device, resolved (before the rank picks its GPU)
    data: VideoSet  # --data, or the synthetic set
    data_id: dict  # what a checkpoint knows the data by (content, not name)


def prepare(config: TrainConfig) -> Prepared:
    """Check everything the user gave before any training starts; ValueError names what is wrong."""
    config.validate()
    faults = parse_faults(config.fault)
    device = resolve_device(config.device)
    if config.data is not None:
        data = load_npz(config.data)
    else:
        data = _synthetic(config)
    return Prepared(faults, device, data, identify(data, config.data))


# bytes make_moving_shapes holds at once per pixel of a clip frame (float64 colours of three
# channels, masks, the uint8 result), a little over what it needs
SYNTHETIC_BYTES_PER_PIXEL = 40


def _physical_memory() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _synthetic(config: TrainConfig) -> VideoSet:
    """Make the synthetic set; ValueError (one line) when it cannot fit in this machine's memory."""
    c = config
    need = c.samples * c.frames * c.size * c.size * SYNTHETIC_BYTES_PER_PIXEL
    have = _physical_memory()
    problem = (f"--samples {c.samples} --frames {c.frames} --size {c.size}: the synthetic set needs"
               f" about {need / 2 ** 30:.3g} GiB to make")
    if have is not None and need > have:
        raise ValueError(f"{problem}, more than this machine's {have / 2 ** 30:.3g} GiB")
    try:
        return make_moving_shapes(c.samples, c.frames, c.size, c.seed)
    except MemoryError:
        raise ValueError(f"{problem}, more than this machine could give") from None


def take_folder(config: TrainConfig) -> RunLock:
    """Lock OUT, remove half-written leftovers, move an old run aside for --resume never (rank 0)."""
    lock = RunLock(config.out).acquire()
    try:
        remove_leftovers(config.out)
        if config.resume == "never":
            moved = move_aside(config.out)
            if moved is not None:
                emit(f"Moved the earlier run's files to {moved}/ (--resume never)")
    except BaseException:
        lock.release()
        raise
    return lock


@dataclasses.dataclass
class Resumed:
    """What a run continues from: the checkpoint's step, history and this rank's share."""

    next_step: int  # the first step to run (the checkpoint holds the state after next_step - 1)
    history: list  # {"epoch", "train_loss", "val_loss"} per finished epoch
    elapsed_s: float  # training time of the earlier processes
    carried_loss_sum: float  # this rank's loss summed over the epoch the checkpoint stopped in
    changed: list  # allowed differences to mention (`--epochs 3 -> 5`)


def resume_from(path, config: TrainConfig, dist: Dist, data_id: dict, steps_per_epoch: int,
                model, optimizer, scheduler, rng: np.random.Generator) -> Optional[Resumed]:
    """Load the checkpoint at `path` into model, optimizer, schedule and RNG; None if there is none.

    ValueError (one line) if it is not ours, was made with other settings or data, or
    does not fit.
    """
    state = load_checkpoint(path)
    if state is None:
        return None
    changed = check_resumable(state, path, config.to_dict(), data_id, dist.world_size,
                              steps_per_epoch)
    try:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        mine = state["rank_state"][dist.rank]
        restore_rng(mine["rng"], rng)
        carried = float(mine["epoch_loss_sum"])
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise ValueError(f"checkpoint {path} does not fit this model ({first_line(exc)});"
                         " move it away or pass --resume never") from None
    return Resumed(state["next_step"], state["history"], float(state["elapsed_s"]), carried,
                   changed)
