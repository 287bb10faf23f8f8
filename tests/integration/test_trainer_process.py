"""The real `python -u trainer/train.py` process: SIGTERM and resume, an injected hang,
the watchdog that ends a hung trainer on SIGTERM, hang-once, the folder lock."""
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import Child, tiny_cli_args, wait_for  # noqa: E402

from trainer.train import main  # noqa: E402


@pytest.mark.heavy  # two trainers, 10 s of CPU: by default test_trainer_signals stops them, test_trainer_resume resumes
def test_sigterm_checkpoints_exits_143_and_resume_continues(tmp_path):
    out = tmp_path / "run"
    # 10 epochs of 4 steps: far more than runs before the signal lands
    child = Child(tiny_cli_args(out, "--epochs", "10", "--heartbeat-s", "0"))
    try:
        child.wait_line("  Batch 2/4", timeout_s=40)
        os.kill(child.proc.pid, signal.SIGTERM)
        assert child.wait(timeout_s=30) == 143
    finally:
        child.kill()
    stopped = child.wait_line("Stopped on SIGTERM before step ")
    next_step = int(stopped.split("before step ")[1].split(";")[0])
    assert (out / "checkpoint.pt").is_file()
    assert "Traceback" not in "\n".join(child.err)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]  # nothing half-written

    resumed = Child(tiny_cli_args(out, "--epochs", "10", "--heartbeat-s", "0"))
    try:
        assert resumed.wait(timeout_s=60) == 0
    finally:
        resumed.kill()
    assert resumed.out[0].startswith("Data: 20 clips of 3x4x16x16 (16/2/2 train/val/test)")
    assert resumed.out[1] == f"Resuming from {out / 'checkpoint.pt'} at step {next_step}"
    epoch, batch = divmod(next_step - 1, 4)
    assert resumed.out[2] == f"Epoch {epoch + 1}/10"
    assert resumed.out[3].startswith(f"  Batch {batch + 1}/4 - Loss: ")
    assert "[PROGRESS] Epoch 10/10 - Train: " in "\n".join(resumed.out)
    assert (out / "loss.png").is_file()


def test_hang_freezes_progress_while_heartbeat_reports_the_age(tmp_path):
    out = tmp_path / "run"
    progress = out / "PROGRESS.txt"
    child = Child(tiny_cli_args(out, "--fault", "hang:3", "--heartbeat-s", "0.2"))
    try:
        child.wait_line("[fault] injected hang at step 3", timeout_s=40, stream="err")
        frozen = progress.read_text()
        assert frozen.startswith("Epoch 1/2 - Batch 2/4 - Loss: ")  # steps 1 and 2 done
        stamp = progress.stat().st_mtime_ns
        # the heartbeat goes on, and says the last step is getting old
        child.wait_line("s ago, epoch 1 batch 2", timeout_s=20)
        wait_for(lambda: [l for l in child.out if "] last step " in l
                          and int(l.split("last step ")[1].split("s")[0]) >= 1], 20,
                 what="a heartbeat reporting a step at least 1 s old")
        assert progress.stat().st_mtime_ns == stamp and progress.read_text() == frozen
        # SIGUSR2: every thread's stack, naming the function that hangs
        os.kill(child.proc.pid, signal.SIGUSR2)
        child.wait_line("_injected_hang", timeout_s=10, stream="err")
        assert child.proc.poll() is None  # still hung: SIGUSR2 only dumps stacks

        # SIGTERM: no step boundary comes, so the watchdog ends it within seconds, with stacks,
        # instead of leaving a supervisor to wait out its kill grace
        sent = time.monotonic()
        os.kill(child.proc.pid, signal.SIGTERM)
        assert child.wait(timeout_s=30) == 143
        took_s = time.monotonic() - sent
    finally:
        child.kill()
    assert took_s < 12, took_s  # at most the 2 s grace, on a busy machine
    assert "Stopped" not in "\n".join(child.out)
    err = "\n".join(child.err)
    line = re.search(r"train.py: no step boundary for ([\d.]+)s, ([\d.]+)s of them after SIGTERM: the trainer is"
                     r" stuck; every thread's stack follows; exiting with 143, no checkpoint was saved\n", err)
    assert line and float(line[1]) > float(line[2]), err  # the loop was stuck before the signal came
    after = err[line.end():]
    assert "_injected_hang" in after and "Thread 0x" in after and "Traceback" not in err


def test_hang_once_hangs_once_in_a_folder_and_holds_the_folder_meanwhile(tmp_path, capsys):
    out = tmp_path / "run"
    args = tiny_cli_args(out, "--fault", "hang-once:3", "--heartbeat-s", "0")
    child = Child(args)
    try:
        child.wait_line("[fault] injected hang at step 3", timeout_s=40, stream="err")
        assert (out / "fault-hang-once-step3-rank0.fired").is_file()  # written before hanging
        assert (out / "PROGRESS.txt").read_text().startswith("Epoch 1/2 - Batch 2/4 - Loss: ")
        # a second trainer on the same folder is refused, naming the holder
        assert main(args) == 2
        err = capsys.readouterr().err
        assert err == (f"train.py: error: --out {out} is in use by another trainer"
                       f" (pid {child.proc.pid}); wait for it to end, or use another --out\n")
        assert child.proc.poll() is None
    finally:
        child.kill()  # as a stall kill would: SIGKILL, no checkpoint

    # the lock died with the process; the same command now passes step 3 and finishes
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "[fault]" not in captured.err and "Done: 2 epochs" in captured.out
    assert "Batch 3/4" in captured.out


def watchdog_line(out, hang_at, *args):
    """Run until the hang at step `hang_at`, SIGTERM it, and return the watchdog's line."""
    child = Child(tiny_cli_args(out, "--heartbeat-s", "0", "--fault", f"hang:{hang_at}", *args))
    try:
        child.wait_line(f"[fault] injected hang at step {hang_at}", timeout_s=40, stream="err")
        os.kill(child.proc.pid, signal.SIGTERM)
        assert child.wait(timeout_s=30) == 143
    finally:
        child.kill()
    return child.wait_line("the trainer is stuck", stream="err")


def test_the_watchdog_names_a_checkpoint_by_one_step_number(tmp_path):
    """Issue 21 item 10: `at step 11` in the run that wrote it, `at step 10` after a resume."""
    out = tmp_path / "run"
    # a checkpoint after every step: the last one holds steps 1-4 and resumes at step 5
    wrote = watchdog_line(out, 5, "--checkpoint-every-s", "1e-9")
    # resumes at step 5 and hangs at 6 (a hang in the first step would get its 60 s)
    resumed = watchdog_line(out, 6)
    assert wrote.endswith("exiting with 143, the checkpoint at step 4 stands"), wrote
    assert resumed.endswith("exiting with 143, the checkpoint at step 4 stands"), resumed
