"""Issue 8, the trainer's side: a progress file that is never more than a second old while
steps run, expect_next_s around slow phases, checkpoints every --checkpoint-every-s, and
the watchdog that ends a trainer stuck after a stop signal."""
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import TINY_MODEL, tiny_config, wait_for  # noqa: E402

import trainer.epochs as run_module  # noqa: E402  (where Run finds what it calls)
import trainer.exits as exits  # noqa: E402
from trainer.checkpoint import load_checkpoint  # noqa: E402
from trainer.signals import StopSignals, Watchdog  # noqa: E402
from trainer.data import synthetic_loaders  # noqa: E402
from trainer.distributed import Dist  # noqa: E402
from trainer.loop import train_one_epoch  # noqa: E402
from trainer.model import VideoTokenizer  # noqa: E402
from trainer.progress import BatchReporter  # noqa: E402
from trainer.run import Run, run  # noqa: E402


def fields(path) -> dict:
    lines = Path(path).read_text().splitlines()
    return {"headline": lines[0], **dict(line.split(": ", 1) for line in lines[1:])}


# --- the progress file is replaced at least once a second while steps run


class SlowSteps(torch.nn.Module):
    """Wrap a model so each step 'takes' 0.3 s of a fake clock, and look at the progress
    file at the start of every step: what a supervisor polling it would see."""

    def __init__(self, model, clock, path, start):
        super().__init__()
        self.model, self.clock, self.path, self.start = model, clock, path, start
        self.ages = []  # (step start time, age of the progress file then)

    def forward(self, videos):
        if self.path.exists():
            written_at = self.start + float(fields(self.path)["elapsed_s"])
            self.ages.append((self.clock[0], self.clock[0] - written_at))
        self.clock[0] += 0.3
        return self.model(videos)


def test_progress_file_is_never_a_second_old_between_printed_lines(tmp_path, capsys):
    train, _, _ = synthetic_loaders(samples=80, frames=4, size=16, batch_size=4)  # 16 batches
    clock = [1000.0]
    path = tmp_path / "PROGRESS.txt"
    reporter = BatchReporter(total_epochs=1, log_every_s=3600, progress_path=path,
                             start_time=1000.0, clock=lambda: clock[0])
    model = SlowSteps(VideoTokenizer(TINY_MODEL), clock, path, 1000.0)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    train_one_epoch(model, train, optimizer, "cpu", 0, reporter=reporter)

    printed = capsys.readouterr().out.splitlines()
    assert [line.split(" - ")[0] for line in printed] == ["  Batch 1/16", "  Batch 16/16"]
    ages = [age for _, age in model.ages]
    assert len(ages) == 15 and max(ages) <= 1.0, model.ages  # 0.05: elapsed_s has one decimal
    assert fields(path)["step"] == "16"


# --- expect_next_s before the first step, validation, checkpoint saves and the test pass


def test_expect_next_s_is_declared_before_slow_phases_and_cleared_after(tmp_path, monkeypatch):
    seen = []  # (what was starting, the progress file's fields then)
    progress = tmp_path / "PROGRESS.txt"

    def watching(name, real):
        def wrapper(*args, **kwargs):
            seen.append((name, fields(progress)))
            return real(*args, **kwargs)
        return wrapper

    for name in ("train_one_epoch", "evaluate", "save_checkpoint"):
        monkeypatch.setattr(run_module, name, watching(name, getattr(run_module, name)))
    monkeypatch.setattr(exits, "evaluate", watching("evaluate", exits.evaluate))  # the test pass
    assert run(tiny_config(tmp_path)) == 0

    declared = [(name, f["headline"].rsplit(" - ", 1)[-1], f.get("expect_next_s"))
                for name, f in seen]
    assert declared[:3] == [("train_one_epoch", "first step", "60"),
                            ("evaluate", "validation", "60"),
                            ("save_checkpoint", "saving checkpoint", "60")]
    # epoch 2 starts with the declaration gone: the epoch's line, no expect_next_s
    assert declared[3][0] == "train_one_epoch" and declared[3][2] is None
    assert seen[3][1]["headline"].startswith("Epoch 1/2 - Train: ")
    assert declared[4:] == [("evaluate", "validation", "60"),
                            ("save_checkpoint", "saving checkpoint", "60"),
                            ("evaluate", "testing", "60")]
    assert seen[0][1]["headline"] == "Epoch 1/2 - starting at step 1 - first step"
    assert seen[1][1]["headline"].startswith("Epoch 1/2 - Batch 4/4 - Loss: ")
    final = fields(progress)
    assert "expect_next_s" not in final and final["headline"].startswith("Epoch 2/2 - Train: ")


def test_a_phase_is_allowed_three_times_its_last_duration_at_least_60_s(tmp_path):
    job = Run(tiny_config(tmp_path), Dist(), torch.device("cpu"), data_id={})
    assert job.expect_s("validation") == 60  # nothing measured yet
    job.phase_s.update({"validation": 45.0, "saving checkpoint": 2.0})
    assert job.expect_s("validation") == 135 and job.expect_s("saving checkpoint") == 60


# --- --checkpoint-every-s


def test_checkpoint_every_s_saves_mid_epoch_and_resume_stays_exact(tmp_path, capsys):
    assert run(tiny_config(tmp_path / "straight")) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")

    out = tmp_path / "crashed"
    # a checkpoint after every step (the time is always up): the crash at step 3 loses nothing
    with pytest.raises(RuntimeError, match="injected crash at step 3"):
        run(tiny_config(out, fault="crash:3", checkpoint_every_s=1e-9))
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == 3
    capsys.readouterr()
    assert run(tiny_config(out, checkpoint_every_s=1e-9)) == 0
    assert (f"Resuming from {out / 'checkpoint.pt'} at step 3; changed since the checkpoint:"
            " --fault crash:3 -> none\n") in capsys.readouterr().out
    resumed = load_checkpoint(out / "checkpoint.pt")
    assert resumed["next_step"] == straight["next_step"] == 9
    for name, tensor in straight["model"].items():
        torch.testing.assert_close(resumed["model"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)


# --- the watchdog: a stop signal with no step boundary after it ends the process


class Exits:
    def __init__(self):
        self.status = None
        self.at = None

    def __call__(self, status):
        self.status, self.at = status, time.monotonic()


def started(grace_s):
    exits = Exits()
    dog = Watchdog(grace_s=grace_s, exit_fn=exits)
    wakeup_fd = dog.start()
    return dog, exits, wakeup_fd


def test_watchdog_ends_a_stuck_trainer_with_stacks(capfd):
    dog, exits, wakeup_fd = started(grace_s=0.2)
    try:
        os.write(wakeup_fd, bytes([signal.SIGTERM]))  # what the C handler writes on SIGTERM
        wait_for(lambda: exits.status is not None, 10, what="the watchdog to fire")
    finally:
        dog.stop()
    assert exits.status == 143
    err = capfd.readouterr().err
    assert re.match(r"train.py: no step boundary for \d+\.\ds, 0\.[1-9]s of them after SIGTERM: the trainer is stuck;"
                    r" every thread's stack follows; exiting with 143, no checkpoint was saved\n", err), err
    assert "Thread 0x" in err and "test_watchdog_ends_a_stuck_trainer_with_stacks" in err


def test_watchdog_ends_at_once_a_loop_already_overdue_by_the_grace(capfd):
    """A stall kill comes 10 s or more after the last step: no point waiting the grace again."""
    dog, exits, wakeup_fd = started(grace_s=30)
    try:
        dog.deadline = time.monotonic() - 30  # the next boundary was due 30 s ago
        sent = time.monotonic()
        os.write(wakeup_fd, bytes([signal.SIGTERM]))
        wait_for(lambda: exits.status is not None, 10, what="the watchdog to fire")
    finally:
        dog.stop()
    assert exits.status == 143 and exits.at - sent < 10  # not the 30 s grace
    assert ", 0.0s of them after SIGTERM: the trainer is stuck" in capfd.readouterr().err


@pytest.mark.parametrize("deadline,signalled,fires", [
    (10.0, 5.0, 10.0),  # a declared phase: its deadline, however long after the signal
    (10.0, 9.5, 11.5),  # the deadline is near: the grace from the signal
    (10.0, 11.0, 12.0),  # overdue by less than the grace: the rest of the grace
    (10.0, 25.0, 12.0),  # overdue by more (a hang a stall kill found): at once
])
def test_watchdog_fire_time(deadline, signalled, fires):
    dog = Watchdog(grace_s=2.0, clock=lambda: 0.0)
    dog.deadline = deadline
    assert dog.fire_at(signalled) == fires


def test_watchdog_spares_a_trainer_that_reaches_step_boundaries():
    dog, exits, wakeup_fd = started(grace_s=0.2)
    try:
        os.write(wakeup_fd, bytes([signal.SIGINT]))
        until = time.monotonic() + 0.8  # four graces of steady steps
        while time.monotonic() < until:
            dog.boundary(0.01)
            time.sleep(0.02)  # a step's work
        assert exits.status is None
    finally:
        dog.stop()
    assert exits.status is None


def test_watchdog_gives_a_declared_phase_its_time(capfd):
    dog, exits, wakeup_fd = started(grace_s=0.1)
    try:
        declared = time.monotonic()
        dog.expect(0.8)  # a checkpoint save that may take 0.8 s
        os.write(wakeup_fd, bytes([signal.SIGTERM]))
        wait_for(lambda: exits.status is not None, 10, what="the watchdog to fire")
    finally:
        dog.stop()
    assert exits.at - declared >= 0.75
    capfd.readouterr()


def test_watchdog_ignores_other_signals_and_stops_quietly():
    dog, exits, wakeup_fd = started(grace_s=0.05)
    os.write(wakeup_fd, bytes([signal.SIGCHLD]))
    dog.stop()  # returns: the thread was not waiting to fire
    assert exits.status is None and dog._thread is None


# --- issue 21 item 4: the first step after a declared phase keeps its 3 step times


def test_the_step_after_a_phase_gets_three_step_times_not_the_grace(tmp_path):
    clock = [100.0]
    dog = Watchdog(grace_s=2.0, clock=lambda: clock[0])
    control = run_module.RunControl(Dist(), torch.device("cpu"), StopSignals(dog),
                                    clock=lambda: clock[0])
    job = Run(tiny_config(tmp_path), Dist(), torch.device("cpu"), data_id={})
    job.control = control
    job.reporter = BatchReporter(total_epochs=2, clock=lambda: clock[0])
    clock[0] += 4.5  # a healthy 4.5 s step
    control.after_step(step=4, epoch=1, batch=4, last_of_epoch=True)
    assert dog.deadline == clock[0] + 13.5
    with job.phase("validation"):
        clock[0] += 10.0
    with job.phase("saving checkpoint"):
        clock[0] += 0.5
    # epoch 2's first step, like any other, is stuck only after 3 step times
    assert dog.deadline == clock[0] + 13.5
    # with no step measured yet in this process, the grace stands
    fresh = Watchdog(grace_s=2.0, clock=lambda: clock[0])
    job.control = run_module.RunControl(Dist(), torch.device("cpu"), StopSignals(fresh),
                                        clock=lambda: clock[0])
    with job.phase("testing"):
        clock[0] += 1.0
    assert fresh.deadline == clock[0] + 2.0


# --- issue 21 item 7: phase writes never leave an old step in the progress file


def test_frequent_saves_never_leave_an_old_step_in_the_progress_file(tmp_path, monkeypatch):
    progress = tmp_path / "PROGRESS.txt"
    shown = []  # (next_step of each save, the step the progress file showed then)
    real_save = run_module.save_checkpoint

    def save(path, state):
        shown.append((state["next_step"], int(fields(progress)["step"])))
        real_save(path, state)

    monkeypatch.setattr(run_module, "save_checkpoint", save)
    # a save after every step: the phase writes keep the file fresh, so tick() never writes
    assert run(tiny_config(tmp_path, checkpoint_every_s=1e-9, log_every_s=3600)) == 0
    assert shown == [(n, n - 1) for n in range(2, 10)]
    final = fields(progress)
    assert final["step"] == "8" and final["headline"].startswith("Epoch 2/2 - Train: ")
