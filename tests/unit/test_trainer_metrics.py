"""Issue 21 items 8, 9 and 11: metrics.jsonl's cut-back drops only later records and torn
lines, saying which; `Done:` names it only when it was written; each step's lr is the one
it trained with."""
import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import tiny_config  # noqa: E402

from trainer.epochs import lr_schedule  # noqa: E402
from trainer.metrics import MetricsLog  # noqa: E402
from trainer.run import run  # noqa: E402


@pytest.mark.parametrize("line, kept", [
    ({"kind": "step", "step": 3}, True),
    ({"kind": "step", "step": 4}, False),  # the step the checkpoint resumes at: made again
    ({"kind": "step", "step": 3.0}, True),  # a float, but not a later step
    ({"kind": "step", "step": 7.0}, False),
    ({"kind": "epoch", "epoch": 0}, True),
    ({"kind": "epoch", "epoch": 1}, False),  # 4 steps per epoch: epoch 1 ends at step 4
    ({"kind": "note", "text": "a record of another kind"}, True),
    ({"kind": "step", "step": "x"}, True),  # not a step number: not known to be later
    ({"kind": "step", "step": True}, True),
    ({"step": 9}, True),  # no kind: not ours to judge
    ([1, 2], True),  # JSON, but not a record: left alone
])
def test_cut_back_drops_only_records_of_later_steps(tmp_path, line, kept):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    text = json.dumps(line) + "\n"
    log.path.write_text(text)
    assert log.cut_back(next_step=4, steps_per_epoch=4) == ((0, 0) if kept else (1, 0))
    assert log.path.read_text() == (text if kept else "")


def test_cut_back_counts_later_records_and_torn_lines_apart(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(tiny_config(out, max_steps=3)) == 0
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "note", "text": "kept"}) + "\n")
        f.write(json.dumps({"kind": "step", "step": 4, "epoch": 1, "loss": 0.1}) + "\n")
        f.write('{"kind": "step", "st' + "\n")  # two records glued by a torn write
        f.write('{"kind": "step", "st')
    capsys.readouterr()
    assert run(tiny_config(out)) == 0
    assert (f"Cut {out / 'metrics.jsonl'} back to step 3: dropped 1 record(s) of later steps"
            " and 2 torn line(s)") in capsys.readouterr().out
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {"kind": "note", "text": "kept"} in records


def test_done_names_metrics_only_when_they_were_written(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").symlink_to("/dev/full")  # every append fails with ENOSPC
    assert run(tiny_config(out, epochs=1)) == 0
    done = capsys.readouterr().out.splitlines()[-1]
    assert done.startswith("Done: 1 epochs in ")
    assert done.endswith(f"wrote {out}/checkpoint.pt, loss.png; metrics.jsonl could not be written")


def test_each_step_records_the_lr_it_trained_with(tmp_path):
    config = tiny_config(tmp_path, lr=1e-3, warmup_steps=2)
    assert run(config) == 0
    factor = lr_schedule(config.warmup_steps, 8)
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if '"kind": "step"' in line]
    assert steps[0]["lr"] == pytest.approx(5e-4)  # step 1: half the lr, in warm-up
    for record in steps:
        assert math.isclose(record["lr"], 1e-3 * factor(record["step"] - 1), rel_tol=1e-12), record
