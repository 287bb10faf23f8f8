"""Checkpoints and resume: N steps straight equal N/2, stop, resume; stop signals; faults."""
import json
import os
import signal
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import tiny_config, wait_for  # noqa: E402

from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.run import run  # noqa: E402

# 20 clips -> 16 train -> 4 steps per epoch of batch 4; 2 epochs = 8 steps


def final_state(out):
    return load_checkpoint(Path(out) / "checkpoint.pt")


def assert_same_training(a, b):
    assert a["next_step"] == b["next_step"] == 9
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    for x, y in zip(a["history"], b["history"]):
        assert x["epoch"] == y["epoch"]
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["val_loss"] == pytest.approx(y["val_loss"], rel=1e-5)
    assert a["optimizer"]["state"][0]["step"] == b["optimizer"]["state"][0]["step"]
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"]


@pytest.mark.parametrize("stop_after", [3, 4])  # mid-epoch, and at an epoch boundary
def test_stop_and_resume_equals_straight_run(tmp_path, capsys, stop_after):
    assert run(tiny_config(tmp_path / "straight")) == 0
    straight = final_state(tmp_path / "straight")

    out = tmp_path / "resumed"
    assert run(tiny_config(out, max_steps=stop_after)) == 0
    first = capsys.readouterr().out
    assert f"Stopped after step {stop_after} (step budget)" in first
    assert final_state(out)["next_step"] == stop_after + 1
    assert not (out / "loss.png").exists()  # drawn at the end only

    assert run(tiny_config(out)) == 0
    second = capsys.readouterr().out
    assert f"Resuming from {out / 'checkpoint.pt'} at step {stop_after + 1}" in second
    assert_same_training(straight, final_state(out))
    assert (out / "loss.png").stat().st_size > 0

    # every step is reported once: no step repeated or skipped across the stop
    steps = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "step"]
    assert steps == list(range(1, 9))


def test_resume_never_starts_over(tmp_path, capsys):
    assert run(tiny_config(tmp_path, max_steps=2)) == 0
    assert run(tiny_config(tmp_path, epochs=1, resume="never")) == 0
    out = capsys.readouterr().out
    assert "Resuming" not in out and "  Batch 1/4" in out.split("Stopped after step 2")[1]


def test_checkpoint_from_another_shape_of_run_is_refused(tmp_path, capsys):
    assert run(tiny_config(tmp_path, max_steps=1)) == 0
    capsys.readouterr()
    assert run(tiny_config(tmp_path, batch_size=2)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 4 there, 2 here" in err and "--resume never" in err


@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT, signal.SIGTERM])
def test_stop_signal_checkpoints_and_returns_128_plus_n(tmp_path, capsys, signum):
    out = tmp_path / "run"
    progress = out / "PROGRESS.txt"

    def send_when_training():
        wait_for(progress.exists, 30, what="first progress file")
        os.kill(os.getpid(), signum)

    sender = threading.Thread(target=send_when_training, daemon=True)
    sender.start()
    status = run(tiny_config(out, epochs=50))
    sender.join(timeout=5)

    assert status == 128 + signum
    printed = capsys.readouterr().out
    name = signal.Signals(signum).name
    assert f"Stopped on {name} before step" in printed
    state = final_state(out)
    stopped_before = int(printed.split("before step ")[1].split(";")[0])
    assert state["next_step"] == stopped_before < 50 * 4
    assert signal.getsignal(signum) is not None  # handlers put back after the run
    assert run(tiny_config(out, epochs=1 + (stopped_before - 1) // 4 + 1)) == 0
    assert f"at step {stopped_before}" in capsys.readouterr().out


def test_crash_fault_raises_at_its_step(tmp_path, capsys):
    with pytest.raises(RuntimeError, match="injected crash at step 3"):
        run(tiny_config(tmp_path, fault="crash:3"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1].startswith("  Batch 2/4")  # steps 1 and 2 ran, step 3 did not
    assert not (tmp_path / "checkpoint.pt").exists()


def test_fault_on_another_rank_does_not_fire(tmp_path):
    assert run(tiny_config(tmp_path, fault="crash:3:1", epochs=1)) == 0


def progress_fields(out) -> dict:
    lines = (Path(out) / "PROGRESS.txt").read_text().splitlines()
    return {"headline": lines[0], **dict(line.split(": ", 1) for line in lines[1:])}


def test_resuming_a_finished_run_keeps_its_final_progress(tmp_path, capsys):
    assert run(tiny_config(tmp_path)) == 0
    final = progress_fields(tmp_path)
    assert final["headline"].startswith("Epoch 2/2 - Train: ")
    # killed while drawing loss.png: the declaration is left standing
    path = tmp_path / "PROGRESS.txt"
    path.write_text(path.read_text().replace(final["headline"], final["headline"] + " - drawing loss.png")
                    + "expect_next_s: 60\n")
    assert run(tiny_config(tmp_path)) == 0
    again = progress_fields(tmp_path)
    assert "expect_next_s" not in again
    same = ("headline", "epoch", "total_epochs", "batch", "total_batches", "step", "train_loss",
            "val_loss")
    assert {k: again.get(k) for k in same} == {k: final.get(k) for k in same}
