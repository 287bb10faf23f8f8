"""Issue 11: no silent wrong resume, one line instead of a traceback, no garbled metrics,
no training on past a non-finite loss. Each test drives the real entry points in-process
(run, main) on tiny data and asserts on what a user sees: status, stderr, files."""
import json
import os
import pickle
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import tiny_cli_args, tiny_config, write_npz  # noqa: E402

from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.config import config_differences, data_difference  # noqa: E402
from trainer.outdir import RunLock  # noqa: E402
from trainer.run import run  # noqa: E402
from trainer.train import main  # noqa: E402

# tiny_config: 20 clips -> 16 train -> 4 steps per epoch of batch 4; 2 epochs = 8 steps


def one_error_line(capsys) -> str:
    """Return the single stderr line of a refused run, checking it is one line and no traceback."""
    # an injected fault's own line ("[fault] injected NaN loss at step 3") is not the error
    err = "".join(line for line in capsys.readouterr().err.splitlines(keepends=True)
                  if not line.startswith("[fault] "))
    assert err.count("\n") == 1 and err.startswith("train.py: error: "), err
    assert "Traceback" not in err and "weights_only=False" not in err and "allow_pickle=True" not in err
    return err.strip()


def records(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def steps_logged(out):
    return [r["step"] for r in records(out) if r["kind"] == "step"]


# --- 1. a resume with another configuration is refused, naming each field


def test_differences_name_each_refused_field_and_each_allowed_change():
    old = tiny_config("a").to_dict()
    new = tiny_config("b", size=32, seed=7, lr=0.5, epochs=5, log_every_s=1.0, fault="hang:3").to_dict()
    refused, changed = config_differences(old, new)
    assert refused == ["--size 16 there, 32 here", "--lr 0.001 there, 0.5 here",
                       "--seed 0 there, 7 here"]
    assert changed == ["--epochs 2 -> 5", "--log-every-s 0 -> 1", "--fault none -> hang:3"]  # not --out
    # with a data file the synthetic options mean nothing: its content is compared instead
    with_file = tiny_config("b", data="x.npz", size=32).to_dict()
    assert config_differences(tiny_config("a", data="y.npz").to_dict(), with_file) == ([], [])


def test_data_is_known_by_content_not_by_name():
    a = {"source": "a.npz", "hash": "1", "summary": "20 clips of 3x4x16x16 uint8"}
    assert data_difference(a, dict(a, source="renamed.npz")) is None
    other = data_difference(a, dict(a, source="b.npz", hash="2"))
    assert other.startswith("--data b.npz holds other videos than the checkpoint's a.npz")
    assert data_difference(dict(a, source=None, hash="3"), a) == "--data synthetic there, a.npz here"
    assert data_difference(dict(a, source=None), a) is None  # the synthetic set, saved to a file


@pytest.fixture(scope="module")
def trained_by_cli(tmp_path_factory):
    """A folder one epoch of the tiny command line trained (copied by each test that uses it)."""
    out = tmp_path_factory.mktemp("trained") / "run"
    assert main(tiny_cli_args(out, "--epochs", "1", "--heartbeat-s", "0")) == 0
    return out


@pytest.mark.parametrize("option, value, named", [
    ("--size", "32", "--size 16 there, 32 here"),
    ("--frames", "8", "--frames 4 there, 8 here"),
    ("--seed", "7", "--seed 0 there, 7 here"),
    ("--samples", "23", "--samples 20 there, 23 here"),
    ("--lr", "0.5", "--lr 0.001 there, 0.5 here"),
    ("--batch-size", "2", "--batch-size 4 there, 2 here"),
])
def test_resume_with_another_setting_is_refused(trained_by_cli, tmp_path, capsys, option, value, named):
    out = tmp_path / "run"
    shutil.copytree(trained_by_cli, out)
    before = (out / "metrics.jsonl").read_bytes(), (out / "checkpoint.pt").read_bytes()
    assert main(tiny_cli_args(out, "--epochs", "1", "--heartbeat-s", "0", option, value)) == 2
    line = one_error_line(capsys)
    assert f"checkpoint {out / 'checkpoint.pt'} was made with other settings: {named};" in line
    assert "--resume never" in line
    assert ((out / "metrics.jsonl").read_bytes(), (out / "checkpoint.pt").read_bytes()) == before


def test_another_data_file_of_the_same_shape_is_refused_and_a_renamed_copy_resumes(tmp_path, capsys):
    first = write_npz(tmp_path / "a.npz", n=20, frames=4, size=16)
    other = write_npz(tmp_path / "other.npz", n=20, frames=4, size=16, seed=1)
    copy = tmp_path / "copy.npz"
    shutil.copy(first, copy)
    out = tmp_path / "run"
    assert run(tiny_config(out, data=str(first), max_steps=2)) == 0
    capsys.readouterr()

    assert run(tiny_config(out, data=str(other))) == 2
    assert f"--data {other} holds other videos than the checkpoint's {first}" in one_error_line(capsys)

    assert run(tiny_config(out, data=str(copy), epochs=3)) == 0
    said = capsys.readouterr().out
    # a field that may change is allowed, and said
    assert f"Resuming from {out / 'checkpoint.pt'} at step 3; changed since the checkpoint:" \
           " --epochs 2 -> 3\n" in said


# --- 2. one line and exit 2, never a traceback


def good_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run(tiny_config(out, max_steps=1)) == 0
    return out, out / "checkpoint.pt", torch.load(out / "checkpoint.pt", weights_only=True)


class NotATensor:
    pass


@pytest.mark.parametrize("case, message", [
    ("foreign dict", "is not a checkpoint of this trainer (no 'optimizer')"),
    ("a list", "is not a checkpoint of this trainer (a list, not a dict)"),
    ("python object", "cannot be loaded (it holds Python objects other than tensors"),
    ("truncated", "cannot be loaded (truncated or corrupt)"),
    ("other shapes", "does not fit this model (size mismatch for encoder.conv_in.conv.weight"),
    ("nan weights", "holds NaN or infinite values (in encoder.conv_in.conv.weight)"),
    ("a folder", "is not a file"),
])
def test_bad_checkpoint_is_one_line_and_status_2(tmp_path, capsys, case, message):
    out, path, state = good_checkpoint(tmp_path)
    first = next(iter(state["model"]))
    if case == "foreign dict":
        torch.save({"model": {}}, path)
    elif case == "a list":
        torch.save([1, 2], path)
    elif case == "python object":
        path.write_bytes(pickle.dumps(NotATensor()))
    elif case == "truncated":
        path.write_bytes(path.read_bytes()[:3000])
    elif case == "other shapes":
        state["model"][first] = torch.zeros(3)
        torch.save(state, path)
    elif case == "nan weights":
        state["model"][first].view(-1)[0] = float("nan")
        torch.save(state, path)
    else:
        path.unlink()
        path.mkdir()
    capsys.readouterr()
    assert run(tiny_config(out)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"train.py: error: checkpoint {path} ") and message in line, line
    assert "--resume never" in line
    assert [r["step"] for r in records(out)] == [1]  # refused before anything was written


@pytest.mark.parametrize("damage", ["truncated", "bit flipped"])
def test_damaged_npz_is_one_line_and_status_2(tmp_path, capsys, damage):
    raw = bytearray(write_npz(tmp_path / "good.npz", frames=2, size=8).read_bytes())
    if damage == "truncated":
        raw = raw[:len(raw) // 2]
    else:
        raw[len(raw) // 2] ^= 0xFF  # inside the videos array: the zip's CRC catches it
    path = tmp_path / "bad.npz"
    path.write_bytes(bytes(raw))
    assert main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"train.py: error: --data {path}: not a readable .npz (truncated or corrupt")


def test_pickled_npz_is_refused_without_advising_allow_pickle(tmp_path, capsys):
    path = tmp_path / "objects.npz"
    np.savez(path, videos=np.array([NotATensor()], dtype=object), labels=np.zeros(1, np.int64))
    assert main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "it holds pickled objects, which are never loaded" in one_error_line(capsys)


def test_float_videos_outside_unit_range_are_refused_uint8_accepted(tmp_path, capsys):
    scaled = write_npz(tmp_path / "f.npz", videos=np.full((10, 3, 2, 8, 8), 200.0, np.float32))
    assert main(["--data", str(scaled), "--out", str(tmp_path / "out")]) == 2
    assert "float videos must lie in [0, 1], these range from 200 to 200" in one_error_line(capsys)
    assert not (tmp_path / "out" / "checkpoint.pt").exists()


@pytest.mark.parametrize("args, message", [
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    (["--seed", "-1"], "--seed must be in 0..2**63-1, got -1"),
    (["--log-every-s", "nan"], "--log-every-s must be a finite number >= 0, got nan"),
    (["--heartbeat-s", "nan"], "--heartbeat-s must be a finite number >= 0, got nan"),
    (["--checkpoint-every-s", "-1"], "--checkpoint-every-s must be a finite number >= 0"),
    (["--out", "/dev/null/x"], "--out /dev/null/x: cannot use it as the run folder (Not a directory)"),
])
def test_bad_numbers_and_folders_are_one_line_naming_the_option(tmp_path, capsys, args, message):
    assert main(["--samples", "20", "--frames", "4", "--size", "16", "--epochs", "1",
                 "--out", str(tmp_path / "out"), *args]) == 2
    assert message in one_error_line(capsys)


# --- 3. a failed progress or metrics write is a warning, once (the checkpoint case: integration)


def test_unwritable_progress_and_metrics_warn_once_and_training_goes_on(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    # appends to /dev/full fail with ENOSPC; the progress file there is not replaced (a device)
    (out / "metrics.jsonl").symlink_to("/dev/full")
    monkeypatch.setenv("MAGVIT_PROGRESS_FILE", "/dev/full")
    assert run(tiny_config(out)) == 0
    captured = capsys.readouterr()
    assert sorted(captured.err.splitlines()) == [
        f"train.py: warning: cannot write metrics {out / 'metrics.jsonl'} (No space left on device);"
        " training goes on (said once)",
        "train.py: warning: cannot write the progress file /dev/full (not a regular file);"
        " training goes on (said once)"]
    assert "Done: 2 epochs" in captured.out
    assert stat.S_ISCHR(os.stat("/dev/full").st_mode)  # the device is still a device
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 9


# --- 4. one trainer per folder


def test_second_trainer_on_the_same_folder_is_refused_naming_the_holder(tmp_path, capsys):
    out = tmp_path / "run"
    holder = RunLock(out).acquire()  # as another trainer would hold it
    try:
        assert run(tiny_config(out)) == 2
        line = one_error_line(capsys)
        assert line == (f"train.py: error: --out {out} is in use by another trainer (pid {os.getpid()});"
                        " wait for it to end, or use another --out")
        assert not (out / "metrics.jsonl").exists()
    finally:
        holder.release()
    assert run(tiny_config(out, epochs=1)) == 0  # free again once the holder let go


# --- 5. metrics.jsonl stays one clean history


def test_resume_cuts_metrics_back_to_the_checkpoint_dropping_a_torn_tail(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_config(out, max_steps=3)) == 0
    # what a SIGKILL after the checkpoint leaves: records of steps it never saved, a torn line
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "step", "step": 4, "epoch": 1, "loss": 0.1}) + "\n")
        f.write(json.dumps({"kind": "epoch", "epoch": 1, "train_loss": 0.1, "val_loss": 0.1}) + "\n")
        f.write('{"kind": "step", "st')
    capsys.readouterr()
    assert run(tiny_config(out)) == 0
    assert (f"Cut {out / 'metrics.jsonl'} back to step 3: dropped 2 record(s) of later steps"
            " and 1 torn line(s)") in capsys.readouterr().out
    assert steps_logged(out) == list(range(1, 9))  # every line parses: records() would raise
    assert [r["epoch"] for r in records(out) if r["kind"] == "epoch"] == [1, 2]


def test_resume_never_moves_the_old_run_aside(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_config(out, epochs=1)) == 0
    old = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "metrics.jsonl")}
    capsys.readouterr()
    assert run(tiny_config(out, epochs=1, resume="never", seed=3)) == 0
    said = capsys.readouterr().out
    moved = next(out.glob("previous-*"))
    assert f"Moved the earlier run's files to {moved}/ (--resume never)" in said
    assert {name: (moved / name).read_bytes() for name in old} == old
    assert sorted(p.name for p in moved.iterdir()) == ["PROGRESS.txt", "checkpoint.pt", "loss.png",
                                                       "metrics.jsonl"]
    assert [r["epoch"] for r in records(out)] == [1, 1, 1, 1, 1]  # 4 steps, 1 epoch: one run only


# --- 6. non-finite values


def test_nonfinite_loss_stops_with_65_and_saves_nothing(tmp_path, capsys):
    # by construction (--fault nan:3): whether a huge lr overflows depends on the CPU's kernels
    assert run(tiny_config(tmp_path, fault="nan:3")) == 65
    line = one_error_line(capsys)
    assert line == "train.py: error: loss is nan at step 3; no checkpoint was saved"
    assert not (tmp_path / "checkpoint.pt").exists()
    assert steps_logged(tmp_path) == [1, 2]  # the bad step is not recorded


def test_nonfinite_loss_keeps_the_last_good_checkpoint(tmp_path, capsys):
    # a checkpoint after every step: the last one before the loss went bad must survive
    assert run(tiny_config(tmp_path, fault="nan:3", checkpoint_every_s=1e-9)) == 65
    line = one_error_line(capsys)
    assert line == "train.py: error: loss is nan at step 3; last good checkpoint at step 2 kept"
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["next_step"] == 3
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert steps_logged(tmp_path) == [1, 2]


def test_nonfinite_loss_on_another_rank_does_not_fire(tmp_path):
    assert run(tiny_config(tmp_path, fault="nan:3:1", epochs=1)) == 0


# --- 7. minor


def test_leftover_temporary_checkpoint_is_removed(tmp_path):
    tmp_path.joinpath(".checkpoint.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    assert run(tiny_config(tmp_path, epochs=1)) == 0
    assert [p.name for p in tmp_path.glob(".*")] == [".lock"]


def test_resuming_a_finished_run_with_fewer_epochs_says_what_it_has(tmp_path, capsys):
    assert run(tiny_config(tmp_path)) == 0
    capsys.readouterr()
    assert run(tiny_config(tmp_path, epochs=1)) == 0
    said = capsys.readouterr().out
    assert "The checkpoint is past the 4 steps of --epochs 1: nothing to train" in said
    assert "Done: 2 epochs in " in said and "Done: 1 epochs" not in said
