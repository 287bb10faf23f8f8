"""Video clips: loading an .npz, the synthetic moving-shapes set, the split and the loaders."""
from __future__ import annotations

import hashlib
import itertools
import os
import pickle
import zipfile
import zlib
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

MOTIONS = ("right", "left", "down", "up")  # label i moves the shape in direction MOTIONS[i]


@dataclass
class VideoSet:
    videos: torch.Tensor  # (N, C, T, H, W), uint8 in 0..255 or float in [0, 1]
    labels: torch.Tensor  # (N,) int64


def _unreadable_reason(exc: BaseException) -> str:
    """Say in a few words why an archive could not be read, without advising allow_pickle."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "pickle" in text.lower():
        # numpy suggests allow_pickle=True here: never to someone who handed us a bad file
        return "it holds pickled objects, which are never loaded"
    if isinstance(exc, (zipfile.BadZipFile, zlib.error, EOFError)):
        return f"truncated or corrupt: {text}"
    return text


def load_npz(path, unit_range: bool = True) -> VideoSet:
    """Read `videos` (N, C, T, H, W) and `labels` (N,) from an .npz; ValueError if unusable.

    `unit_range` refuses float videos outside [0, 1] (0..255 floats would train on a
    loss 65,000 times too large); the seed's load_dataset API turns it off.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"--data {path}: no such file")
    if not os.path.isfile(path):  # a folder, or a device that would be read forever
        raise ValueError(f"--data {path}: not a regular file")
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):  # a lone .npy array
            raise ValueError("a single array, not an archive of named arrays")
        with npz:
            arrays = {k: npz[k] for k in ("videos", "labels") if k in npz.files}
            found = npz.files
    # Whatever a damaged or foreign file makes numpy or zipfile raise (BadZipFile, a bad
    # CRC, a zlib error, a bad header, a pickle) is bad input, not a bug of ours.
    except (OSError, EOFError, ValueError, AttributeError, KeyError, zipfile.BadZipFile,
            zlib.error, pickle.UnpicklingError, MemoryError, RuntimeError) as exc:
        raise ValueError(f"--data {path}: not a readable .npz ({_unreadable_reason(exc)})") from None
    missing = [k for k in ("videos", "labels") if k not in arrays]
    if missing:
        raise ValueError(f"--data {path}: missing array(s) {', '.join(missing)}"
                         f" (found: {', '.join(found) or 'none'})")
    videos, labels = arrays["videos"], arrays["labels"]
    if videos.ndim != 5 or min(videos.shape) < 1:
        raise ValueError(f"--data {path}: videos must have shape (N, C, T, H, W), got {videos.shape}")
    if labels.shape != (videos.shape[0],):
        raise ValueError(f"--data {path}: labels must have shape ({videos.shape[0]},),"
                         f" got {labels.shape}")
    if videos.shape[0] < 3:
        raise ValueError(f"--data {path}: need at least 3 clips (train, val, test),"
                         f" got {videos.shape[0]}")
    if videos.dtype != np.uint8 and not np.issubdtype(videos.dtype, np.floating):
        raise ValueError(f"--data {path}: videos must be uint8 or float, got {videos.dtype}")
    if np.issubdtype(videos.dtype, np.floating) and not np.isfinite(videos).all():
        raise ValueError(f"--data {path}: videos contain NaN or infinity")
    if unit_range and np.issubdtype(videos.dtype, np.floating):
        low, high = float(videos.min()), float(videos.max())
        if low < 0 or high > 1:
            raise ValueError(f"--data {path}: float videos must lie in [0, 1], these range from"
                             f" {low:g} to {high:g} (store uint8 0..255, or divide by 255)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"--data {path}: labels must be integers, got {labels.dtype}")
    if videos.dtype != np.uint8:
        largest = float(np.abs(videos).max())
        if largest > float(np.finfo(np.float32).max):
            raise ValueError(f"--data {path}: videos hold values beyond float32's range (up to"
                             f" {np.finfo(np.float32).max:.2g}): {largest:g} would become infinity")
        videos = videos.astype(np.float32, copy=False)
    return VideoSet(torch.from_numpy(videos), torch.from_numpy(labels.astype(np.int64)))


def identify(data: VideoSet, source: Optional[str]) -> dict:
    """Return what a checkpoint keeps to know its data again: content, not file name.

    A hash of the arrays (BLAKE2b, about 1 GB/s) plus their shape and type, so a
    renamed copy is the same data and another file of the same shape is not.
    """
    digest = hashlib.blake2b(digest_size=16)
    for array in (data.videos, data.labels):
        a = np.ascontiguousarray(array.numpy())
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(memoryview(a).cast("B"))
    shape = "x".join(map(str, data.videos.shape[1:]))
    dtype = str(data.videos.dtype).removeprefix("torch.")
    return {"source": None if source is None else os.fspath(source), "hash": digest.hexdigest(),
            "summary": f"{len(data.labels)} clips of {shape} {dtype}"}


def make_moving_shapes(samples: int, frames: int, size: int, seed: int = 0) -> VideoSet:
    """Draw `samples` clips (3, frames, size, size) of a disc or square moving on a dark colour.

    Each clip: one dark background colour, one bright shape, moving a few pixels a
    frame in one of the four MOTIONS (its label) and wrapping around the frame edge.
    """
    rng = np.random.default_rng(seed)
    n = samples
    labels = rng.integers(0, len(MOTIONS), n)
    background = rng.uniform(0.0, 0.25, (n, 3))  # dark, so the shape stands out
    foreground = rng.uniform(0.45, 1.0, (n, 3))
    radius = rng.uniform(0.12, 0.22, n) * size  # pixels
    is_disc = rng.random(n) < 0.5
    start = rng.uniform(0, size, (n, 2))  # (y, x) of the centre at frame 0
    speed = rng.uniform(0.04, 0.09, n) * size  # pixels per frame
    direction = np.array([[0, 1], [0, -1], [1, 0], [-1, 0]], dtype=float)[labels]  # (n, 2)

    t = np.arange(frames)
    centre = (start[:, None, :] + direction[:, None, :] * speed[:, None, None] * t[None, :, None])
    grid = np.arange(size) + 0.5
    # signed offsets on the torus, so a shape leaving on one side comes back on the other
    dy = (grid[None, None, :] - centre[..., 0:1] + size / 2) % size - size / 2  # (n, T, H)
    dx = (grid[None, None, :] - centre[..., 1:2] + size / 2) % size - size / 2  # (n, T, W)
    r = radius[:, None, None, None]
    disc = dy[..., :, None] ** 2 + dx[..., None, :] ** 2 <= r ** 2  # (n, T, H, W)
    square = (np.abs(dy[..., :, None]) <= r) & (np.abs(dx[..., None, :]) <= r)
    inside = np.where(is_disc[:, None, None, None], disc, square)[:, None]  # (n, 1, T, H, W)
    clips = np.where(inside, foreground[:, :, None, None, None], background[:, :, None, None, None])
    videos = np.round(clips * 255).astype(np.uint8)  # (n, 3, T, H, W): a quarter of float32
    return VideoSet(torch.from_numpy(videos), torch.from_numpy(labels.astype(np.int64)))


def background_baseline(videos: torch.Tensor) -> float:
    """Return the MSE of predicting each clip's background colour everywhere.

    The background is taken as a clip's median colour, which it is while the shapes
    cover less than half the frame (true of the synthetic set).
    """
    flat = to_unit_float(videos).flatten(2)  # (N, C, T*H*W)
    background = flat.median(dim=2).values[:, :, None]
    return float(((flat - background) ** 2).mean())


def to_unit_float(videos: torch.Tensor) -> torch.Tensor:
    """Return videos as float32, uint8 scaled from 0..255 to [0, 1]."""
    if videos.dtype == torch.uint8:
        return videos.float().div_(255.0)
    return videos.float()


def split_indices(n: int, seed: int = 0):
    """Split range(n) into shuffled train/val/test index arrays (80/10/10, at least 1 each)."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, round(0.1 * n))
    n_test = max(1, round(0.1 * n))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise ValueError(f"need at least 3 clips to split into train/val/test, got {n}")
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose order depends only on (seed, epoch) and can start mid-epoch."""

    def __init__(self, dataset, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0  # samples of this rank's epoch order to skip (resume mid-epoch)

    def set_start(self, start: int) -> None:
        """Skip the first `start` samples of the current epoch (resuming mid-epoch)."""
        self.start = start

    def __iter__(self):
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.start)


def make_loaders(data: VideoSet, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1):
    """Split data and return (train, val, test) loaders; train is sharded across ranks."""
    train_idx, val_idx, test_idx = split_indices(len(data.labels), seed)

    def subset(idx):
        idx = torch.from_numpy(np.sort(idx))
        return TensorDataset(data.videos[idx], data.labels[idx])

    train_set = subset(train_idx)
    sampler = ResumableSampler(train_set, num_replicas=world_size, rank=rank, seed=seed)
    train = DataLoader(train_set, batch_size=batch_size, sampler=sampler)
    val = DataLoader(subset(val_idx), batch_size=batch_size, shuffle=False)
    test = DataLoader(subset(test_idx), batch_size=batch_size, shuffle=False)
    return train, val, test


def load_dataset(path, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
    """Load an .npz and return (train_loader, val_loader, test_loader), split deterministically."""
    # the seed's API: any finite floats load, as they did there (the command line is stricter)
    data = load_npz(path, unit_range=False)
    return make_loaders(data, batch_size, seed=seed, rank=rank, world_size=world_size)


def synthetic_loaders(samples: int, frames: int, size: int, batch_size: int, seed: int = 0,
                      rank: int = 0, world_size: int = 1):
    """Return (train, val, test) loaders over the synthetic moving-shapes set."""
    data = make_moving_shapes(samples, frames, size, seed)
    return make_loaders(data, batch_size, seed=seed, rank=rank, world_size=world_size)
