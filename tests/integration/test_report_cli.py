"""magvit-report driven as a user runs it (python -m supervisor.report), on real and hand-made runs.

The real runs are the supervisor over the trainer (tiny data) and over a fixture child; the
hand-made ones are what a real run cannot give in a test's time: three days, twenty restarts.
"""
import json
import math
import os
import struct
import subprocess
import sys

import psutil
import pytest

from helpers import PY, ROOT, base_env, child_cmd, run_sup
from supervisor.output.events import utc_iso_ms

PNG_SIZE = (1200, 800)
TRAIN = [PY, "-u", str(ROOT / "trainer" / "train.py"), "--samples", "12", "--frames", "4", "--size", "16",
         "--batch-size", "2", "--epochs", "2", "--log-every-s", "0", "--out", "run"]
RUN_FILES = ("--run-dir", "run")  # supervise.log, events.jsonl and PROGRESS.txt in run/, as the trainer's files


def report(*args, cwd=None, env=None):
    """Run magvit-report; return the CompletedProcess with text output."""
    return subprocess.run([PY, "-m", "supervisor.report", *map(str, args)], cwd=cwd, env=env or base_env(),
                          capture_output=True, text=True, timeout=50, stdin=subprocess.DEVNULL)


def png_size(path):
    """Width and height from a PNG's IHDR chunk, after checking the signature."""
    head = open(path, "rb").read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    return struct.unpack(">II", head[16:24])


def write_events(path, events, tail=b""):
    with open(path, "wb") as f:
        f.write(b"".join(json.dumps(e).encode() + b"\n" for e in events) + tail)


def three_day_run(folder, restarts=20, start=1_800_000_000.0):
    """A 3-day training run with `restarts` stall restarts: heartbeats, metrics, a diagnosis per stall."""
    folder.mkdir()
    argv = ["python", "-u", "train.py", "--epochs", "300"]
    events, metrics = [], []
    span = 3 * 86400.0
    per_attempt = span / (restarts + 1)
    step, t = 0, start
    for attempt in range(restarts + 1):
        pid = 10_000_000 + attempt  # beyond any pid_max: never alive
        events.append({"ts": utc_iso_ms(t), "event": "start", "argv": argv, "pid": pid, "attempt": attempt})
        end = start + span if attempt == restarts else t + per_attempt - 1200
        beat = t + 300
        while beat < end:
            step += 25
            loss = 0.2 * math.exp(-step / 20000) + 0.01
            metrics.append({"kind": "step", "step": step, "epoch": step // 500 + 1, "loss": loss, "time": beat})
            if step % 500 == 0:
                metrics.append({"kind": "epoch", "epoch": step // 500, "train_loss": loss, "val_loss": loss * 1.1,
                                "time": beat})
            events.append({"ts": utc_iso_ms(beat), "event": "heartbeat", "pid": pid, "silent_s": 300.0,
                           "progress_age_s": 12.0, "cpu_percent": 99.0, "rss_bytes": 2 << 30,
                           "progress": f"Epoch {step // 500 + 1}/300 - Batch {step % 500}/500"})
            beat += 300
        if attempt == restarts:
            events.append({"ts": utc_iso_ms(end), "event": "exit", "status": 0, "reason": "exited",
                           "runtime_s": end - start, "restarts": restarts, "stalls": restarts})
            break
        stall_t = end + 600
        events += [
            {"ts": utc_iso_ms(stall_t), "event": "stall", "kind": "progress", "source": "/runs/PROGRESS.txt",
             "age_s": 600.5, "limit_s": 600, "progress": f"Epoch {step // 500 + 1}/300", "action": "restart"},
            {"ts": utc_iso_ms(stall_t + 1), "event": "diagnosis", "processes": [], "stack_method": "py-spy", "gpus": [],
             "stacks": f'Thread {pid} (idle): "MainThread"\n    all_reduce (torch/distributed/c10d.py:{attempt})\n'},
            {"ts": utc_iso_ms(stall_t + 1), "event": "signal", "signal": "SIGTERM", "target": "group", "reason": "stall"},
            {"ts": utc_iso_ms(stall_t + 31), "event": "signal", "signal": "SIGABRT", "target": "tree", "reason": "stall"},
            {"ts": utc_iso_ms(stall_t + 33), "event": "signal", "signal": "SIGKILL", "target": "tree", "reason": "stall"},
            {"ts": utc_iso_ms(stall_t + 34), "event": "restart", "attempt": attempt + 1, "backoff_s": 60.0,
             "reason": "stall"},
        ]
        t = stall_t + 94
    write_events(folder / "events.jsonl", events)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    return folder


# ----- real runs ---------------------------------------------------------------------------------

@pytest.mark.timeout(150)
def test_report_of_a_real_supervised_trainer_run_that_hung_once_and_finished(tmp_path):
    """The supervisor over the real trainer with a hang-once fault (issue 8), then the report of its folder
    (issue 9): the hang is caught, the trainer leaves on SIGTERM through its watchdog (no SIGABRT needed),
    resumes from its checkpoint, finishes with exit 0, and metrics.jsonl stays one clean history."""
    # 4 s, not less: after its last progress update a finished trainer still tears torch down (a second
    # or two on a loaded machine), and that must not pass for a second hang.
    r = run_sup("--heartbeat", "1", "--stall-timeout", "4", "--startup-grace", "90", "--kill-grace", "30",
                "--on-stall", "restart", *RUN_FILES,
                child=[*TRAIN, "--checkpoint-every-s", "0", "--fault", "hang-once:7"], cwd=tmp_path, timeout_s=120)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    run = tmp_path / "run"
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] == "signal" and e["signal"] in ("SIGABRT", "SIGKILL")]
    steps = [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if m["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 10  # no step twice, none backwards

    text = report(run, "--png")
    assert text.returncode == 0, text.stderr
    out = text.stdout
    assert "exited with status 0 (exited)" in out and "restarts  1, stalls 1" in out
    assert out.count("hung in: _injected_hang (trainer/control.py:") == 1 and "at: Epoch 2/2" in out
    assert "train.py --samples 12" in out and "peak RSS " in out and "terminal  nothing dropped" in out
    assert f"wrote {run / 'report.png'}" in text.stderr
    assert png_size(run / "report.png") == PNG_SIZE

    summary = json.loads(report(run, "--json").stdout)
    assert summary["state"] == "exited" and summary["exit"]["status"] == 0 and summary["exit"]["reason"] == "exited"
    assert [s["action"] for s in summary["stalls"]] == ["restart"]
    assert summary["stalls"][0]["frame"].startswith("_injected_hang (trainer/control.py:")
    assert summary["restarts"][0]["attempt"] == 1 and summary["progress"]["fraction"] == pytest.approx(1.0)
    assert summary["metrics"]["last_epoch"] == 2 and summary["peak_rss_bytes"] > 50 << 20


@pytest.mark.timeout(60)
def test_report_of_a_supervisor_only_job_has_no_curves_but_a_picture(tmp_path):
    r = run_sup("--heartbeat", "0.3", "--stall-timeout", "1", "--kill-grace", "1", "--on-stall", "restart",
                "--max-restarts", "1", "--events", "events.jsonl", "--log", "supervise.log",
                child=child_cmd("hang-at-same-step"), cwd=tmp_path)
    assert r.returncode == 124
    text = report(tmp_path / "events.jsonl", "--png", tmp_path / "picture.png")
    assert text.returncode == 0, text.stderr
    assert "hung in: deadlocked_in_named_function" in text.stdout and "metrics" not in text.stdout
    assert png_size(tmp_path / "picture.png") == PNG_SIZE


# ----- hand-made runs ----------------------------------------------------------------------------

def test_a_three_day_run_with_twenty_restarts(tmp_path):
    run = three_day_run(tmp_path / "run")
    text = report(run, "--png")
    assert text.returncode == 0, text.stderr
    assert "runtime 3d00h" in text.stdout and "restarts  20, stalls 20" in text.stdout
    assert png_size(run / "report.png") == PNG_SIZE
    summary = json.loads(report(run, "--json").stdout)
    assert len(summary["restarts"]) == 20 and summary["stalls"][-1]["frame"] == "all_reduce (torch/distributed/c10d.py:19)"


def test_a_run_still_in_progress_with_a_live_pid(tmp_path):
    child = subprocess.Popen([PY, "-c", "import threading; threading.Event().wait(60)"], stdin=subprocess.DEVNULL)
    try:
        started = psutil.Process(child.pid).create_time()
        (tmp_path / "PROGRESS.txt").write_text("Epoch 2/4 - Batch 5/10\nepoch: 2\ntotal_epochs: 4\nbatch: 5\n"
                                               "total_batches: 10\n")
        events = [{"ts": utc_iso_ms(started), "event": "start", "argv": ["python", "train.py"], "pid": child.pid,
                   "attempt": 0}]
        events += [{"ts": utc_iso_ms(started + 0.05 * i), "event": "heartbeat", "pid": child.pid, "silent_s": 1.0,
                    "progress_age_s": 0.5, "cpu_percent": 50.0, "rss_bytes": 1 << 20,
                    "progress": f"Epoch 1/4 - Batch {i}/10"} for i in range(1, 6)]
        write_events(tmp_path / "events.jsonl", events, tail=b'{"ts": "2026')  # the supervisor is mid-write
        text = report(tmp_path, "--png")
        assert text.returncode == 0, text.stderr
        assert f"running: child pid {child.pid} (attempt 0), last progress" in text.stdout
        assert "Epoch 2/4 - Batch 5/10  (38% done" in text.stdout
        assert png_size(tmp_path / "report.png") == PNG_SIZE
        summary = json.loads(report(tmp_path, "--json").stdout)
        assert summary["state"] == "running" and summary["pid"] == child.pid
        assert summary["skipped_lines"] == {"events.jsonl": 1}
    finally:
        child.kill()
        child.wait()


def test_edge_cases_never_give_a_traceback(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one").mkdir()
    write_events(tmp_path / "one" / "events.jsonl", [{"ts": utc_iso_ms(1.8e9), "event": "heartbeat", "pid": 1}])
    (tmp_path / "torn").mkdir()
    write_events(tmp_path / "torn" / "events.jsonl", [], tail=b'{"ts": "2027-01-15T08:00:00.000Z", "ev')
    (tmp_path / "torn" / "metrics.jsonl").write_bytes(b'{"kind": "step", "step": 1, "loss": 0.5, "time": 1.8e9}\n{"ki')
    for name in ("empty", "one", "torn"):
        text = report(tmp_path / name, "--png")
        assert text.returncode == 0 and "Traceback" not in text.stderr, (name, text.stderr)
        assert png_size(tmp_path / name / "report.png") == PNG_SIZE
        assert json.loads(report(tmp_path / name, "--json").stdout)["run"] == str(tmp_path / name)
    assert "no events file" in report(tmp_path / "empty").stdout


def test_bad_usage_and_a_missing_run_exit_2_with_one_line(tmp_path):
    missing = report(tmp_path / "nope")
    assert missing.returncode == 2 and missing.stderr.strip() == f"magvit-report: {tmp_path / 'nope'}: no such run folder or events file"
    assert report().returncode == 2


def test_png_without_matplotlib_still_prints_the_summary_and_says_what_to_install(tmp_path):
    run = three_day_run(tmp_path / "run", restarts=1)
    blocker = tmp_path / "no_matplotlib"
    blocker.mkdir()
    (blocker / "matplotlib.py").write_text("raise ImportError('No module named matplotlib')\n")
    env = base_env(PYTHONPATH=f"{blocker}{os.pathsep}{ROOT}")
    text = report(run, "--png", env=env)
    assert text.returncode == 1 and "restarts  1, stalls 1" in text.stdout
    assert text.stderr.strip() == "magvit-report: --png needs matplotlib: pip install 'magvit-supervise[report]'"
    assert report(run, env=env).returncode == 0  # no picture asked for: nothing missing
    assert not (run / "report.png").exists()


def test_the_report_only_reads(tmp_path):
    run = three_day_run(tmp_path / "run", restarts=2)
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.iterdir()}
    assert report(run).returncode == 0 and report(run, "--json").returncode == 0
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in run.iterdir()} == before


if __name__ == "__main__":  # draw the hand-made 3-day run somewhere to look at it
    from pathlib import Path

    print(three_day_run(Path(sys.argv[1])))
