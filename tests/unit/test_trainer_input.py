"""Issue 21 items 12-14: bad input gets one line; --out is a folder, not a pattern; the
importable API shuffles each epoch anew and refuses values float32 cannot hold."""
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import TINY_MODEL, write_npz  # noqa: E402

from trainer.model import VideoTokenizer  # noqa: E402
from trainer.progress import progress_path_for  # noqa: E402
from trainer.train import load_dataset, main, train_one_epoch  # noqa: E402


@pytest.mark.parametrize("args, message", [
    (["--heartbeat-s", "1e10"], "--heartbeat-s must be at most 1e+09 (0 turns it off), got 1e+10"),
    (["--samples", "100000000000"], "--samples 100000000000 --frames 4 --size 16: the synthetic"
                                    " set needs about "),
    (["--size", "1000000"], "the synthetic set needs about "),
])
def test_impossible_sizes_are_one_line_and_status_2(tmp_path, capsys, args, message):
    argv = ["--samples", "20", "--frames", "4", "--size", "16", "--epochs", "1",
            "--out", str(tmp_path / "out"), *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err


def test_a_star_in_out_is_a_folder_name_not_a_pattern(tmp_path):
    out = tmp_path / "star*"
    assert progress_path_for(out, env={}) == out / "PROGRESS.txt"
    assert progress_path_for(out, rank=1, world_size=2, env={}) == out / "PROGRESS-rank1.txt"
    # the pattern rule stays where it belongs: $MAGVIT_PROGRESS_FILE
    env = {"MAGVIT_PROGRESS_FILE": str(tmp_path / "p*.txt")}
    assert progress_path_for(out, rank=1, world_size=2, env=env) == tmp_path / "p1.txt"


def test_a_run_in_a_folder_with_a_star_writes_its_progress_there(tmp_path, capsys):
    out = tmp_path / "star*"
    assert main(["--samples", "20", "--frames", "4", "--size", "16", "--epochs", "1",
                 "--batch-size", "4", "--out", str(out), "--heartbeat-s", "0"]) == 0
    assert (out / "PROGRESS.txt").is_file() and not (tmp_path / "star0").exists()


def test_train_one_epoch_shuffles_each_epoch_anew(tmp_path):
    train, _, _ = load_dataset(write_npz(tmp_path / "d.npz", n=40, frames=2, size=8), batch_size=4)
    seen = []

    class Recording(VideoTokenizer):
        def forward(self, video):
            seen[-1].append(video.flatten(1)[:, :4].clone())
            return super().forward(video)

    model = Recording(TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(2):
        seen.append([])
        train_one_epoch(model, train, optimizer, "cpu", epoch=epoch, verbose=False)
    first, second = torch.cat(seen[0]), torch.cat(seen[1])
    assert first.shape == second.shape and not torch.equal(first, second)


def test_load_dataset_refuses_values_float32_cannot_hold(tmp_path):
    videos = np.zeros((10, 3, 2, 8, 8), dtype=np.float64)
    videos[3, 1, 0, 4, 4] = 1e39  # finite in float64, infinite in float32
    path = write_npz(tmp_path / "big.npz", videos=videos)
    with pytest.raises(ValueError, match=r"beyond float32's range \(up to 3\.4e\+38\): 1e\+39"
                                         r" would become infinity"):
        load_dataset(path, batch_size=2)
