"""examples/slurm/train.sbatch on a real Slurm: SIGUSR1 before the time limit, requeue, resume.

A one-node cluster (slurmctld + slurmd on localhost, Debian's slurm-wlm and munge) is
installed when missing, started for this module and stopped after it, by
examples/slurm/local-cluster.sh. The example runs unchanged with `sbatch --nodes 1`.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers import ROOT, base_env, wait_for

EXAMPLE = ROOT / "examples" / "slurm" / "train.sbatch"
CLUSTER = ROOT / "examples" / "slurm" / "local-cluster.sh"
# 84 clips -> 68 training clips -> 34 steps an epoch at batch 2 on one rank: a few seconds
# of training, so the warning lands mid-run.
TRAIN_ARGS = ["--samples", "84", "--frames", "4", "--size", "16", "--batch-size", "2",
              "--epochs", "4", "--log-every-s", "0", "--heartbeat-s", "0"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_unavailable() -> str | None:
    """Why a Slurm cluster cannot be made here, or None."""
    if os.geteuid() != 0:
        return "the one-node cluster runs its daemons as root"
    have = all(shutil.which(c) for c in ("slurmctld", "slurmd", "sbatch", "munged"))
    if not have and not shutil.which("apt-get"):
        return "Slurm is not installed and there is no apt-get to install it"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running one-node cluster; yields the environment for sbatch, scontrol and scancel."""
    reason = slurm_unavailable()
    if reason:
        pytest.skip(reason)
    folder = tmp_path_factory.mktemp("slurm")
    env = dict(os.environ, SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(free_port()))
    try:
        started = subprocess.run([str(CLUSTER), "start", str(folder)], capture_output=True, text=True,
                                 env=env, timeout=480, stdin=subprocess.DEVNULL)
        assert started.returncode == 0, f"{started.stderr}\n{logs(folder)}"
        yield {"SLURM_CONF": started.stdout.strip().splitlines()[-1]}
    finally:
        subprocess.run([str(CLUSTER), "stop", str(folder)], timeout=60, env=env)


def logs(folder: Path) -> str:
    return "".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(folder.glob("log/*.log")))


def job_fields(jobid: str, env: dict) -> dict[str, str]:
    """scontrol's view of a job as a dict (JobState, Restarts, ...)."""
    r = subprocess.run(["scontrol", "-o", "show", "job", jobid], capture_output=True, text=True, env=env,
                       timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", r.stdout))


def node_state(env: dict) -> str:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True, env=env, timeout=30)
    return r.stdout.strip()


def metrics_steps(run: Path) -> int:
    try:
        return len(re.findall(r'"kind": "step"', (run / "metrics.jsonl").read_text()))
    except FileNotFoundError:
        return 0


def processes_of(run: Path) -> list[str]:
    left = []
    for p in psutil.process_iter(["cmdline", "status", "environ"]):
        try:
            text = " ".join(p.info["cmdline"] or [])
            if p.info["status"] != psutil.STATUS_ZOMBIE and str(run) in text:
                left.append(f"{p.pid} {text[:200]}")
        except psutil.Error:
            pass
    return left


@pytest.mark.heavy
@pytest.mark.timeout(600)
def test_sbatch_example_checkpoints_on_usr1_requeues_and_the_requeued_job_resumes(slurm, tmp_path):
    run = tmp_path / "run"
    out = tmp_path / "job.out"
    env = base_env(**slurm, RUN=str(run), MASTER_PORT=str(free_port()), STALL_TIMEOUT="2m")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # magvit-supervise, torchrun
    submitted = subprocess.run(["sbatch", "--parsable", "--nodes", "1", "--output", str(out), str(EXAMPLE),
                                *TRAIN_ARGS], capture_output=True, text=True, env=env, cwd=ROOT, timeout=30)
    assert submitted.returncode == 0, submitted.stderr
    jobid = submitted.stdout.strip().split(";")[0]
    job_out = lambda: out.read_text(errors="replace") if out.exists() else ""  # noqa: E731
    try:
        # Once training runs, the warning Slurm sends before the time limit.
        wait_for(lambda: metrics_steps(run) >= 3, timeout_s=180, interval_s=0.05, what="training steps")
        signalled = subprocess.run(["scancel", "--signal=USR1", "--full", jobid], capture_output=True,
                                   text=True, env=env, timeout=30)
        assert signalled.returncode == 0, signalled.stderr

        # The ranks checkpoint and exit; the batch script requeues the job.
        wait_for(lambda: job_fields(jobid, env).get("Restarts") == "1"
                 and job_fields(jobid, env).get("JobState") == "PENDING",
                 timeout_s=120, interval_s=0.2, what=f"job {jobid} requeued\n{job_out()[-3000:]}")
        first = job_out()
        stopped = re.search(r"Stopped on SIGUSR1 before step (\d+); checkpoint saved", first)
        assert stopped, first[-4000:]
        assert "train.sbatch: requeueing job" in first
        assert "Done:" not in first
        next_step = int(stopped.group(1))
        assert (run / "checkpoint.pt").exists()
        assert processes_of(run) == [], "a process of the first start outlived it"

        # Released at once (a requeued job waits for its begin time), it resumes and completes.
        # Not within the second of the kill: slurmd revokes the old start's credential with
        # a one-second resolution and would refuse the new start ("Job credential revoked").
        requeued_at = time.time()
        wait_for(lambda: node_state(env) == "idle" and time.time() > requeued_at + 2, timeout_s=60,
                 what="the node idle again")
        released = subprocess.run(["scontrol", "update", f"JobId={jobid}", "StartTime=now"],
                                  capture_output=True, text=True, env=env, timeout=30)
        assert released.returncode == 0, released.stderr
        wait_for(lambda: job_fields(jobid, env).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"),
                 timeout_s=240, interval_s=0.2, what=f"job {jobid} done\n{job_out()[-3000:]}")
    finally:
        if job_fields(jobid, env).get("JobState") not in ("COMPLETED", "FAILED", "CANCELLED", None):
            subprocess.run(["scancel", jobid], env=env, timeout=30)
    fields = job_fields(jobid, env)
    second = job_out()[len(first):]
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (fields, second[-4000:])
    assert f"Resuming from {run}/checkpoint.pt at step {next_step}" in second, second[-4000:]
    assert "Done: 4 epochs" in second
    assert "requeueing" not in second
    # every supervisor and rank of both starts is gone (proctrack/linuxproc would not see escapees)
    assert wait_for(lambda: processes_of(run) == [], timeout_s=10, what="no process left") is True
