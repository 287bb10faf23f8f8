"""Data: .npz loading, the synthetic moving-shapes set, the split, resumable sampling."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import write_npz  # noqa: E402

from trainer.data import (MOTIONS, ResumableSampler, background_baseline, load_dataset,  # noqa: E402
                          load_npz, make_moving_shapes, split_indices, to_unit_float)


def test_uint8_and_float_videos_load_into_unit_range(tmp_path):
    as_uint8 = load_npz(write_npz(tmp_path / "u.npz", dtype="uint8", frames=2, size=8))
    as_float = load_npz(write_npz(tmp_path / "f.npz", frames=2, size=8))
    assert as_uint8.videos.dtype == torch.uint8 and as_float.videos.dtype == torch.float32
    for data in (as_uint8, as_float):
        v = to_unit_float(data.videos)
        assert v.shape == (10, 3, 2, 8, 8) and 0 <= v.min() and v.max() <= 1
        assert data.labels.dtype == torch.int64


def test_split_is_deterministic_disjoint_and_complete():
    a, b = split_indices(50), split_indices(50)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    train, val, test = a
    assert (len(train), len(val), len(test)) == (40, 5, 5)
    assert sorted(np.concatenate(a).tolist()) == list(range(50))
    assert [len(part) for part in split_indices(3)] == [1, 1, 1]


def test_load_dataset_returns_three_loaders_of_batches(tmp_path):
    train, val, test = load_dataset(write_npz(tmp_path / "d.npz", n=20, frames=2, size=8),
                                    batch_size=4)
    videos, labels = next(iter(train))
    assert videos.shape == (4, 3, 2, 8, 8) and labels.shape == (4,)
    assert (len(train.dataset), len(val.dataset), len(test.dataset)) == (16, 2, 2)


def test_synthetic_set_is_seeded_and_moves_as_labelled():
    a = make_moving_shapes(24, frames=6, size=32, seed=7)
    b = make_moving_shapes(24, frames=6, size=32, seed=7)
    c = make_moving_shapes(24, frames=6, size=32, seed=8)
    assert torch.equal(a.videos, b.videos) and not torch.equal(a.videos, c.videos)
    assert a.videos.shape == (24, 3, 6, 32, 32) and a.videos.dtype == torch.uint8
    assert set(a.labels.tolist()) == set(range(len(MOTIONS)))
    # the shape is the bright part; follow its first displacement on the torus
    v = to_unit_float(a.videos).sum(1)  # (N, T, H, W)
    for clip, label in zip(v, a.labels.tolist()):
        mask = clip > clip.flatten(1).median(1).values[:, None, None] + 0.3
        dy, dx = _shift(mask[0], mask[1])
        expected = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}[MOTIONS[label]]
        assert (np.sign(dy), np.sign(dx)) == expected, (MOTIONS[label], dy, dx)


def _shift(before, after):
    # the cyclic shift that best maps one mask on the next
    best = max(((dy, dx) for dy in range(-4, 5) for dx in range(-4, 5)),
               key=lambda d: (torch.roll(before, d, (0, 1)) & after).sum().item())
    return best


def test_background_baseline_is_the_error_on_the_shape_only():
    videos = torch.full((1, 3, 2, 4, 4), 0.2)
    videos[:, :, :, 1:3, 1:3] = 1.0  # a 2x2 shape: a quarter of the frame, 0.8 from the background
    assert abs(background_baseline(videos) - 0.25 * 0.8 ** 2) < 1e-6
    assert background_baseline(make_moving_shapes(8, 2, 16).videos) > 0


def test_resumable_sampler_skips_exactly_the_consumed_samples():
    data = list(range(37))
    sampler = ResumableSampler(data, num_replicas=2, rank=1, seed=3)
    sampler.set_epoch(5)
    full = list(sampler)
    sampler.set_start(8)
    assert list(sampler) == full[8:] and len(sampler) == len(full) - 8
    sampler.set_epoch(6)
    sampler.set_start(0)
    assert list(sampler) != full  # a new order each epoch
    other_rank = ResumableSampler(data, num_replicas=2, rank=0, seed=3)
    other_rank.set_epoch(5)
    assert set(other_rank) | set(full) == set(data)
