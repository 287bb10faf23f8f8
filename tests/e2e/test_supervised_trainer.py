"""The supervisor over the real trainer: a hang in the loop is caught, explained and ended.

These run real torch training (tiny data, CPU), so each costs several seconds:
kept few, and each proves a whole story end to end.
"""
import json
import os
import re
import sys

import psutil
import pytest

from helpers import ROOT, run_sup, sup_lines

# 12 clips -> 9 train clips -> 5 steps an epoch at batch 2 (4 per rank under torchrun)
TRAIN_ARGS = ["--samples", "12", "--frames", "8", "--size", "16", "--batch-size", "2", "--log-every-s", "0",
              "--out", "out"]
TRAIN = [sys.executable, "-u", str(ROOT / "trainer" / "train.py"), *TRAIN_ARGS]
SUP = ("--heartbeat", "0", "--stall-timeout", "2.5", "--startup-grace", "90", "--kill-grace", "1",
       "--progress-file", "out/PROGRESS.txt")


def trainer_processes(tmp_path):
    """Trainer processes of this test still alive (matched by their working directory)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if p.info["cwd"] == str(tmp_path) and any("train" in a for a in p.info["cmdline"] or []):
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.timeout(120)
def test_hang_in_trainer_is_diagnosed_restarted_resumed_and_given_up(tmp_path):
    """hang:8 -> stall with the trainer's stack -> restart -> resume from the epoch-1 checkpoint
    -> the same hang at the same step -> GAVE-UP, not a third launch."""
    ev = tmp_path / "events"
    r = run_sup(*SUP, "--on-stall", "restart", "--events", str(ev), child=[*TRAIN, "--epochs", "3", "--fault", "hang:8"],
                cwd=tmp_path, timeout_s=110)
    out, err = r.stdout.decode(), r.stderr.decode()
    assert r.returncode == 124, err[-3000:]
    assert "[PROGRESS] Epoch 1/3" in out and "Resuming from out/checkpoint.pt at step 6" in out
    assert "[HEARTBEAT" not in out  # the trainer's own heartbeat stays quiet under the supervisor
    lines = sup_lines(r.stderr)
    stalls = [line for line in lines if "STALL" in line]
    assert len(stalls) == 2 and all("in out/PROGRESS.txt; action=restart | Epoch 2/3 - Batch 2/5" in s for s in stalls)
    assert any("GAVE-UP stalled twice at the same progress: Epoch 2/3 - Batch 2/5" in line for line in lines)
    assert "exit status=124 reason=gave-up" in lines[-1] and "restarts=1 stalls=2" in lines[-1]
    # The diagnosis points into the trainer, at the function that hangs.
    diag = [e for e in map(json.loads, ev.read_text().splitlines()) if e["event"] == "diagnosis"]
    assert diag[0]["stack_method"] == "py-spy"
    assert re.search(r"_injected_hang \(.*control.py:\d+\)", diag[0]["stacks"]), diag[0]["stacks"]
    assert trainer_processes(tmp_path) == []


@pytest.mark.timeout(120)
@pytest.mark.heavy  # torchrun and two ranks: three torch start-ups, 7 s of CPU
def test_torchrun_rank_hang_is_found_in_its_rank_file_and_every_worker_ends(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    argv = [torchrun, "--nproc-per-node", "2", TRAIN[2], *TRAIN_ARGS, "--epochs", "3", "--fault", "hang:4:1"]
    r = run_sup(*SUP, child=argv, cwd=tmp_path, timeout_s=110)
    assert r.returncode == 124, r.stderr.decode()[-3000:]
    stall = next(line for line in sup_lines(r.stderr) if "STALL" in line)
    assert "in out/PROGRESS-rank1.txt; action=kill" in stall
    assert (tmp_path / "out" / "PROGRESS-rank0.txt").exists()
    assert trainer_processes(tmp_path) == []  # torchrun and both workers, in their own sessions or not


@pytest.mark.timeout(120)
def test_clean_supervised_run_exits_zero_with_all_outputs(tmp_path):
    r = run_sup("--heartbeat", "0", "--stall-timeout", "30", "--log", "sup.log", "--progress-file",
                "out/PROGRESS.txt", child=[*TRAIN, "--epochs", "1"],
                cwd=tmp_path, timeout_s=110)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    assert "exit status=0 reason=exited" in sup_lines(r.stderr)[-1]
    for name in ("checkpoint.pt", "metrics.jsonl", "loss.png", "PROGRESS.txt"):
        assert (tmp_path / "out" / name).exists(), name
    assert (tmp_path / "out" / "PROGRESS.txt").read_text().startswith("Epoch 1/1")
    log = (tmp_path / "sup.log").read_text()
    assert "out| [PROGRESS] Epoch 1/1" in log
