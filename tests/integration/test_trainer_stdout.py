"""Issue 21 item 3: stdout that fails is never the end of the run nor a lost step. A reader
that goes away (`| head -4`, a supervisor that died) gets a checkpoint and a clean stop with
its own status; a full device (`> /dev/full`) gets one warning and the run goes on."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import REPO, TRAIN_PY, tiny_cli_args  # noqa: E402

from trainer.checkpoint import load_checkpoint  # noqa: E402


def env():
    e = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    for name in ("MAGVIT_PROGRESS_FILE", "MAGVIT_SUPERVISED", "MAGVIT_RUN_DIR"):
        e.pop(name, None)
    return e


def steps_logged(out):
    return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "step"]


def train_until_the_reader_goes(out, read, *extra):
    """Train 100 epochs of 4 steps with stdout a pipe; read(stdout) what the reader takes, then close
    it (the run is far from done); return (what was read, the trainer's status, its stderr)."""
    proc = subprocess.Popen([sys.executable, "-u", str(TRAIN_PY),
                             *tiny_cli_args(out, "--epochs", "100", "--heartbeat-s", "0", *extra)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), cwd=REPO)
    try:
        taken = read(proc.stdout)
        proc.stdout.close()
        err = proc.stderr.read().decode()
        return taken, proc.wait(timeout=90), err
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.timeout(120)
def test_a_reader_that_goes_away_gets_a_checkpoint_and_status_141(tmp_path):
    out = tmp_path / "run"
    head, status, err = train_until_the_reader_goes(
        out, lambda stdout: [stdout.readline() for _ in range(4)])  # what `| head -4` reads
    assert head[3].startswith(b"  Batch 2/4 - Loss: ")
    assert status == 141, err  # 128 + SIGPIPE: stopped because no one reads
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = err.splitlines()
    assert lines[0] == ("train.py: warning: stdout has no reader (Broken pipe): saving a checkpoint"
                        " and stopping")
    state = load_checkpoint(out / "checkpoint.pt")
    assert lines[1] == (f"Stopped: stdout has no reader, before step {state['next_step']};"
                        f" checkpoint saved to {out / 'checkpoint.pt'}")
    assert len(lines) == 2
    # no step lost: every step up to the checkpoint was trained and recorded, once
    assert state["next_step"] > 2 and steps_logged(out) == list(range(1, state["next_step"]))


@pytest.mark.timeout(120)
def test_a_full_stdout_is_one_warning_and_the_run_ends_as_usual(tmp_path):
    out = tmp_path / "run"
    with open("/dev/full", "wb") as full:
        done = subprocess.run([sys.executable, "-u", str(TRAIN_PY), *tiny_cli_args(out)],
                              stdout=full, stderr=subprocess.PIPE, env=env(), cwd=REPO,
                              timeout=90)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert err.splitlines() == ["train.py: warning: cannot write stdout (No space left on device);"
                                " training goes on, its lines are lost (said once)"]
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 9
    assert steps_logged(out) == list(range(1, 9))


@pytest.mark.timeout(120)
@pytest.mark.heavy  # a second trainer for the same stop; the default suite has the line-by-line one
def test_a_reader_that_goes_away_from_the_bar_gets_the_same_stop(tmp_path):
    out = tmp_path / "run"
    _, status, err = train_until_the_reader_goes(
        out, lambda stdout: stdout.read(200), "--bar")  # the Data line and some of the bar
    assert status == 141, err
    assert "Traceback" not in err and "Exception ignored" not in err, err
    state = load_checkpoint(out / "checkpoint.pt")
    assert err.splitlines()[-1].startswith(f"Stopped: stdout has no reader, before step {state['next_step']};")
