"""The command line: options, --fault specs, and bad input as one line with a non-zero status."""
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import write_npz  # noqa: E402

from trainer.config import Fault, parse_fault  # noqa: E402
from trainer.train import main, parse_args  # noqa: E402


@pytest.mark.parametrize("spec, fault", [
    ("hang:5", Fault("hang", 5, None)),
    ("hang-once:3:1", Fault("hang-once", 3, 1)),
    ("crash:12:1", Fault("crash", 12, 1)),
    ("nan:4", Fault("nan", 4, None)),
    (None, None),
])
def test_parse_fault(spec, fault):
    assert parse_fault(spec) == fault


def test_fault_fires_on_its_step_and_rank():
    everywhere, rank1 = Fault("hang", 3), Fault("crash", 3, 1)
    assert everywhere.fires(3, 0) and everywhere.fires(3, 5) and not everywhere.fires(4, 0)
    assert rank1.fires(3, 1) and not rank1.fires(3, 0)


def test_defaults_and_options():
    c = parse_args([], env={})
    assert (c.data, c.out, c.device, c.resume, c.log_every_s, c.heartbeat_s, c.checkpoint_every_s,
            c.bar, c.fault) == (None, "runs/magvit", "auto", "auto", 30.0, 30.0, 600.0, False, ())
    c = parse_args(["--samples", "12", "--frames", "4", "--size", "16", "--epochs", "3",
                    "--batch-size", "2", "--out", "x", "--device", "cpu", "--resume", "never",
                    "--log-every-s", "0.5", "--heartbeat-s", "0", "--checkpoint-every-s", "5",
                    "--bar", "--fault", "hang:2:0", "--fault", "hang-once:7"])
    assert (c.samples, c.frames, c.size, c.epochs, c.batch_size, c.out, c.device, c.resume,
            c.log_every_s, c.heartbeat_s, c.checkpoint_every_s, c.bar, c.fault) == (
        12, 4, 16, 3, 2, "x", "cpu", "never", 0.5, 0.0, 5.0, True, ("hang:2:0", "hang-once:7"))


def test_out_defaults_to_magvit_run_dir():
    assert parse_args([], env={"MAGVIT_RUN_DIR": "/runs/r1"}).out == "/runs/r1"
    assert parse_args(["--out", "x"], env={"MAGVIT_RUN_DIR": "/runs/r1"}).out == "x"
    assert parse_args([], env={"MAGVIT_RUN_DIR": ""}).out == "runs/magvit"


def test_help_says_which_options_may_change_on_resume_and_the_exit_statuses(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert ("only --epochs, --log-every-s, --heartbeat-s, --checkpoint-every-s, --bar, --device,"
            " --fault") in text
    assert "65 non-finite loss, 74 checkpoint not saved" in text


def bad_input(tmp_path, name, arrays=None, **kw):
    if arrays is None:
        return str(tmp_path / name)
    return str(write_npz(tmp_path / name, **arrays, **kw))


@pytest.mark.parametrize("args, message", [
    (["--fault", "hang"], "--fault: expected hang:STEP[:RANK]"),
    (["--fault", "explode:3"], "--fault: expected hang:STEP[:RANK]"),
    (["--fault", "crash:0"], "--fault: STEP is 1-based"),
    (["--fault", "hang:x:1"], "--fault: expected"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--epochs", "many"], "--epochs: invalid int value"),
    (["--device", "tpu"], "--device must be auto, cpu or cuda"),
    (["--resume", "maybe"], "--resume must be auto or never"),
    (["--log-every-s", "-1"], "--log-every-s must be a finite number >= 0"),
    (["--size", "4"], "--size must be >= 8"),
    (["--no-such-option"], "unrecognized arguments"),
])
def test_bad_options_are_one_line_and_status_2(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("train.py: error: ") and message in err, err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file"),
    ("no_labels", "missing array(s) labels"),
    ("four_dims", "videos must have shape (N, C, T, H, W)"),
    ("label_count", "labels must have shape (10,)"),
    ("not_npz", "not a readable .npz"),
    ("nan", "NaN or infinity"),
    ("strings", "videos must be uint8 or float"),
])
def test_bad_data_is_one_line_and_status_2(case, message, tmp_path, capsys):
    path = tmp_path / f"{case}.npz"
    if case == "no_labels":
        write_npz(path, labels=None)
    elif case == "four_dims":
        write_npz(path, videos=np.zeros((10, 3, 8, 8), np.float32))
    elif case == "label_count":
        write_npz(path, labels=np.zeros(7, np.int64))
    elif case == "not_npz":
        path.write_text("hello")
    elif case == "nan":
        write_npz(path, videos=np.full((10, 3, 2, 8, 8), np.nan, np.float32))
    elif case == "strings":
        write_npz(path, videos=np.full((10, 3, 2, 8, 8), "a"))
    assert main(["--data", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"train.py: error: --data {path}") and message in err, err
    assert not (tmp_path / "out" / "checkpoint.pt").exists()
