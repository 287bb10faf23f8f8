"""What a finished run leaves and prints: lines, --bar, metrics.jsonl, loss.png, the progress file."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import tiny_config  # noqa: E402

from trainer.run import run  # noqa: E402


def test_batch_lines_progress_lines_and_files(tmp_path, capsys):
    assert run(tiny_config(tmp_path)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("Data: 20 clips of 3x4x16x16 (16/2/2 train/val/test), 4 steps per epoch;"
                      f" predicting the background scores {float(out[0].split()[-1]):.4f}")
    epoch1 = out[1:out.index("Epoch 2/2")]
    assert epoch1[0] == "Epoch 1/2"
    assert [line.split(" - ")[0] for line in epoch1[1:5]] == [f"  Batch {i}/4" for i in range(1, 5)]
    assert epoch1[5].startswith("[PROGRESS] Epoch 1/2 - Train: ") and ", Val: " in epoch1[5]
    assert out[-1].startswith("Done: 2 epochs in ")

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "step"]
    epochs = [r for r in records if r["kind"] == "epoch"]
    assert set(steps[0]) == {"kind", "step", "epoch", "loss", "lr", "time", "entropy_loss", "commit_loss"}
    assert set(epochs[0]) == {"kind", "epoch", "train_loss", "val_loss", "elapsed_s", "time"}
    assert [r["epoch"] for r in epochs] == [1, 2]
    # the printed [PROGRESS] numbers are the epoch records, rounded
    assert f"Train: {epochs[0]['train_loss']:.4f}, Val: {epochs[0]['val_loss']:.4f}" in epoch1[5]

    progress = (tmp_path / "PROGRESS.txt").read_text().splitlines()
    assert progress[0] == out[-2].removeprefix("[PROGRESS] ")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # no temporary file left behind; the lock file stays (deleting it would race)
    assert [p.name for p in tmp_path.glob(".*")] == [".lock"]


def test_bar_replaces_batch_lines(tmp_path, capsys):
    assert run(tiny_config(tmp_path, bar=True)) == 0
    out = capsys.readouterr().out
    assert "  Batch " not in out
    assert "Epoch 1/2: 100%" in out and "4/4" in out  # tqdm's bar, per epoch
    assert "[PROGRESS] Epoch 1/2 - Train: " in out and "[PROGRESS] Epoch 2/2 - Train: " in out
    assert (tmp_path / "PROGRESS.txt").read_text().startswith("Epoch 2/2 - Train: ")


def test_progress_file_follows_magvit_progress_file(tmp_path, capsys, monkeypatch):
    target = tmp_path / "elsewhere" / "P.txt"
    monkeypatch.setenv("MAGVIT_PROGRESS_FILE", str(target))
    assert run(tiny_config(tmp_path / "out", epochs=1)) == 0
    assert target.read_text().startswith("Epoch 1/1 - Train: ")
    assert not (tmp_path / "out" / "PROGRESS.txt").exists()
