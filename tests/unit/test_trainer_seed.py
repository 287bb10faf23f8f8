"""The original code's tests (shared/seeds/000): tiny data, one epoch, three epochs, update_progress."""
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import TINY_MODEL  # noqa: E402

from trainer.model import VideoTokenizer  # noqa: E402
from trainer.train import load_dataset, train_one_epoch, update_progress  # noqa: E402


def tiny_dataset(tmp_path):
    # as in the seed: 10 samples, 8 frames, 32x32, saved straight from torch tensors
    torch.manual_seed(0)
    tiny_videos = torch.randn(10, 3, 8, 32, 32)  # the seed used randn: any finite floats load
    tiny_labels = torch.randint(0, 4, (10,))
    path = tmp_path / "tiny_dataset.npz"
    np.savez(path, videos=tiny_videos, labels=tiny_labels)
    return path


def test_training_runs_one_epoch(tmp_path, capsys):
    train_loader, val_loader, test_loader = load_dataset(tiny_dataset(tmp_path), batch_size=2)
    assert (len(train_loader.dataset), len(val_loader.dataset), len(test_loader.dataset)) == (8, 1, 1)
    torch.manual_seed(0)
    model = VideoTokenizer(TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    result = train_one_epoch(model, train_loader, optimizer, "cpu", epoch=0)

    assert set(result) == {"loss"} and np.isfinite(result["loss"]) and result["loss"] > 0
    out = capsys.readouterr().out.splitlines()
    # first and last batch always, each flushed as a whole line
    assert out[0].startswith("  Batch 1/4 - Loss: ")
    assert out[-1].startswith("  Batch 4/4 - Loss: ")


def test_verbose_false_prints_nothing(tmp_path, capsys):
    train_loader, _, _ = load_dataset(tiny_dataset(tmp_path), batch_size=2)
    model = VideoTokenizer(TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_one_epoch(model, train_loader, optimizer, torch.device("cpu"), epoch=0, verbose=False)
    assert capsys.readouterr().out == ""


def test_loss_decreases_over_epochs(tmp_path):
    train_loader, _, _ = load_dataset(tiny_dataset(tmp_path), batch_size=2)
    torch.manual_seed(0)
    model = VideoTokenizer(TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = [train_one_epoch(model, train_loader, optimizer, "cpu", epoch=e, verbose=False)["loss"]
              for e in range(3)]
    assert losses[2] < losses[0], losses


def test_update_progress_prints_and_writes(tmp_path, capsys):
    progress_path = tmp_path / "PROGRESS.txt"
    update_progress(progress_path, epoch=2, total_epochs=100, train_loss=0.5, val_loss=0.61,
                    elapsed_time=812.44)

    assert capsys.readouterr().out == "[PROGRESS] Epoch 3/100 - Train: 0.5000, Val: 0.6100\n"
    lines = progress_path.read_text().splitlines()
    assert lines[0] == "Epoch 3/100 - Train: 0.5000, Val: 0.6100"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert fields["epoch"] == "3" and fields["total_epochs"] == "100"
    assert float(fields["train_loss"]) == 0.5 and float(fields["val_loss"]) == 0.61
    assert fields["elapsed_s"] == "812.4"
    assert fields["updated"].endswith("Z")
