"""Progress reporting: file path per rank, file format, atomic writes, the reporting cadence."""
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import TINY_MODEL  # noqa: E402

from trainer.atomic import write_text_atomically  # noqa: E402
from trainer.data import synthetic_loaders  # noqa: E402
from trainer.loop import train_one_epoch  # noqa: E402
from trainer.model import VideoTokenizer  # noqa: E402
from trainer.progress import BatchReporter, progress_path_for  # noqa: E402


def test_progress_path_default_env_and_ranks(tmp_path):
    assert progress_path_for(tmp_path, env={}) == tmp_path / "PROGRESS.txt"
    assert progress_path_for(tmp_path, rank=1, world_size=2, env={}) == tmp_path / "PROGRESS-rank1.txt"
    env = {"MAGVIT_PROGRESS_FILE": "/runs/x/P.txt"}
    assert progress_path_for(tmp_path, env=env) == Path("/runs/x/P.txt")
    assert progress_path_for(tmp_path, rank=3, world_size=4, env=env) == Path("/runs/x/P-rank3.txt")
    pattern = {"MAGVIT_PROGRESS_FILE": "/runs/PROGRESS-rank*.txt"}
    assert progress_path_for(tmp_path, rank=2, world_size=4, env=pattern) == Path("/runs/PROGRESS-rank2.txt")
    assert progress_path_for(tmp_path, env=pattern) == Path("/runs/PROGRESS-rank0.txt")


def test_atomic_write_replaces_and_leaves_no_temporary_file(tmp_path):
    target = tmp_path / "sub" / "PROGRESS.txt"
    write_text_atomically(target, "old\n")
    inode_before = target.stat().st_ino
    write_text_atomically(target, "new\n")
    assert target.read_text() == "new\n"
    assert target.stat().st_ino != inode_before  # replaced, never rewritten in place
    assert [p.name for p in target.parent.iterdir()] == ["PROGRESS.txt"]


def test_reporter_writes_spec_format(tmp_path, capsys):
    path = tmp_path / "PROGRESS.txt"
    reporter = BatchReporter(total_epochs=100, progress_path=path, start_time=0.0,
                             clock=lambda: 812.4)
    reporter.val_loss = 0.51
    reporter.report(epoch=2, batch=119, total_batches=400, step=920, loss=0.43214)

    assert capsys.readouterr().out == "  Batch 120/400 - Loss: 0.4321\n"
    lines = path.read_text().splitlines()
    assert lines[0] == "Epoch 3/100 - Batch 120/400 - Loss: 0.4321"
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert {k: fields[k] for k in ("epoch", "total_epochs", "batch", "total_batches", "elapsed_s")} == {
        "epoch": "3", "total_epochs": "100", "batch": "120", "total_batches": "400", "elapsed_s": "812.4"}
    assert float(fields["train_loss"]) == 0.43214 and float(fields["val_loss"]) == 0.51
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["updated"])


def test_reporter_cadence_first_last_and_every_interval():
    now = [0.0]
    reporter = BatchReporter(total_epochs=1, log_every_s=30, verbose=False, clock=lambda: now[0])
    reported = []
    for batch in range(10):
        now[0] = batch * 10.0  # a batch every 10 s
        if reporter.due(batch, 10):
            reporter.report(0, batch, 10, batch + 1, 1.0)
            reported.append(batch + 1)
    assert reported == [1, 4, 7, 10]


def test_loss_is_read_from_the_device_only_when_printed(tmp_path, capsys, monkeypatch):
    train, _, _ = synthetic_loaders(samples=40, frames=4, size=16, batch_size=4)  # 8 batches
    model = VideoTokenizer(TINY_MODEL)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    reads = []  # device-to-host reads made by the training loop itself (not by Adam)

    def counting(name):
        original = getattr(torch.Tensor, name)

        def read(self):
            if sys._getframe(1).f_code.co_filename.endswith(str(Path("trainer", "loop.py"))):
                reads.append(name)
            return original(self)
        return read

    for name in ("item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    reporter = BatchReporter(total_epochs=1, log_every_s=3600)
    train_one_epoch(model, train, optimizer, "cpu", 0, reporter=reporter)
    monkeypatch.undo()

    lines = capsys.readouterr().out.splitlines()
    assert [l.split(" - ")[0] for l in lines] == ["  Batch 1/8", "  Batch 8/8"]
    # two printed lines, one epoch mean: three reads for eight steps
    assert sorted(reads) == ["item", "tolist", "tolist"]
