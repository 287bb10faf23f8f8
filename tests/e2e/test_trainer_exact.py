"""Issue 21 item 1: a run does not depend on when it saved. The default model (the tiniest
configs hide a perturbation), bit for bit: saving at chosen steps vs never saving, in one
process; and a run hung and resumed three times under the supervisor vs a clean run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import REPO, TRAIN_PY  # noqa: E402

import trainer.run as run_module  # noqa: E402
from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.config import TrainConfig  # noqa: E402
from helpers import base_env  # noqa: E402

STEPS = 24  # of the default run's 39 a epoch: enough for several saves and resumes


def losses(out) -> dict:
    """Return {step: loss} and {"val": val_loss} of a run's metrics.jsonl (every step logged)."""
    found = {}
    for line in (Path(out) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            assert record["step"] not in found, f"step {record['step']} recorded twice"
            found[record["step"]] = record["loss"]
        elif record["kind"] == "epoch":
            found[f"val {record['epoch']}"] = record["val_loss"]
    return found


def default_run(out, **overrides) -> TrainConfig:
    """The default model and data, every step logged, no heartbeat."""
    return TrainConfig(out=str(out), log_every_s=0.0, heartbeat_s=0.0, **overrides)


def saving_at(steps):
    """A RunControl that saves after exactly `steps` (mid-epoch), whatever the clock says."""
    class SavingAt(run_module.RunControl):
        def checkpoint_due(self, step, now):
            return step in steps
    return SavingAt


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_saving_at_chosen_steps_is_bit_for_bit_the_run_that_never_saves(tmp_path, monkeypatch):
    assert run_module.run(default_run(tmp_path / "never", max_steps=STEPS)) == 0
    never = load_checkpoint(tmp_path / "never" / "checkpoint.pt")
    expected = losses(tmp_path / "never")
    assert sorted(expected) == list(range(1, STEPS + 1))
    for name, steps in [("every", set(range(1, STEPS))), ("third", set(range(3, STEPS, 3))),
                        ("odd", {1, 2, 7, 11, 19, 20})]:
        monkeypatch.setattr(run_module, "RunControl", saving_at(steps))
        assert run_module.run(default_run(tmp_path / name, max_steps=STEPS)) == 0, name
        state = load_checkpoint(tmp_path / name / "checkpoint.pt")
        assert losses(tmp_path / name) == expected, name
        for key, tensor in never["model"].items():
            assert torch.equal(state["model"][key], tensor), (name, key)
        for index, moments in never["optimizer"]["state"].items():
            for key, tensor in moments.items():
                assert torch.equal(state["optimizer"]["state"][index][key], tensor), (name, key)


def supervised(run_dir, *trainer_args, timeout_s=600):
    argv = [sys.executable, "-m", "supervisor", "--run-dir", str(run_dir), "--heartbeat", "0",
            "--stall-timeout", "10", "--startup-grace", "120", "--on-stall", "restart",
            "--kill-grace", "10", "--max-restarts", "6", "--",
            sys.executable, "-u", str(TRAIN_PY), "--out", str(run_dir), "--epochs", "1",
            "--log-every-s", "0", "--checkpoint-every-s", "1", *trainer_args]
    return subprocess.run(argv, cwd=REPO, env=base_env(), stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout_s)


@pytest.mark.heavy
@pytest.mark.timeout(900)
def test_a_run_hung_and_resumed_three_times_ends_with_the_clean_runs_exact_losses(tmp_path):
    clean = supervised(tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr.decode()[-3000:]
    faults = [a for step in (10, 20, 30) for a in ("--fault", f"hang-once:{step}")]
    faulted = supervised(tmp_path / "faulted", *faults)
    assert faulted.returncode == 0, faulted.stderr.decode()[-3000:]
    said = faulted.stdout.decode()
    assert said.count("Resuming from ") == 3, said[-3000:]
    a, b = losses(tmp_path / "clean"), losses(tmp_path / "faulted")
    assert sorted(k for k in a if isinstance(k, int)) == list(range(1, 40))
    differ = [k for k in a if a[k] != b.get(k)]
    assert not differ, f"first differing: {differ[:3]}: {[(a[k], b.get(k)) for k in differ[:3]]}"
    assert a == b
