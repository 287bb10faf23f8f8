"""magvit-report driven as a user runs it (python -m supervisor.report), on real and hand-made runs.

The real runs are the supervisor over the trainer (tiny data) and over a fixture child; the
hand-made ones are what a real run cannot give in a test's time: three days, twenty restarts.
"""
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile

import psutil
import pytest

from helpers import PY, ROOT, base_env, child_cmd, run_sup, start_sup, wait_for, LineReader, kill_tree_of, wait_tracking_peak_rss
from supervisor.output.events import utc_iso_ms
from supervisor.output.lines import fmt_duration

PNG_SIZE = (1200, 800)
TRAIN = [PY, "-u", str(ROOT / "trainer" / "train.py"), "--samples", "12", "--frames", "4", "--size", "16",
         "--batch-size", "2", "--epochs", "2", "--log-every-s", "0", "--out", "run"]
TEARDOWN_S = "8"  # the stall timeout over the trainer: longer than its teardown after the last update, under load
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
@pytest.mark.heavy  # the real trainer twice (18 s, 9 s of CPU); the default suite reports fake and supervisor-only runs
def test_report_of_a_real_supervised_trainer_run_that_hung_once_and_finished(tmp_path):
    """The supervisor over the real trainer with a hang-once fault (issue 8), then the report of its folder
    (issue 9): the hang is caught, the trainer leaves on SIGTERM through its watchdog (no SIGABRT needed),
    resumes from its checkpoint, finishes with exit 0, and metrics.jsonl stays one clean history."""
    # TEARDOWN_S: after its last progress update a finished trainer still tears torch down (over 4 s with
    # the machine's load at 11 on 2 cores), and that must not pass for a second hang.
    r = run_sup("--heartbeat", "1", "--stall-timeout", TEARDOWN_S, "--startup-grace", "90", "--kill-grace", "30",
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


# ----- hostile and huge input (issue 16, items 14-17) --------------------------------------------

def strict_json(text):
    """Parse as strict JSON: Infinity and NaN are not JSON."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def _strict(obj):
    """JSON with infinities written as 1e999: strict JSON, read back as an infinity."""
    return json.dumps(obj).replace("-Infinity", "-1e999").replace("Infinity", "1e999")


def hostile_runs(root):
    """Valid files with hostile numbers, digit strings and timestamps: each a run folder."""
    t0 = 1_800_000_000.0
    start = {"ts": utc_iso_ms(t0), "event": "start", "argv": ["python", "x.py"], "pid": 2 ** 22 + 17, "attempt": 0}
    runs = {
        "infinite-numbers": ([start,
                              {"ts": utc_iso_ms(t0 + 1), "event": "heartbeat", "pid": 1, "silent_s": 1e999,
                               "progress_age_s": 1e999, "rss_bytes": 1e999, "cpu_percent": -1e999},
                              {"ts": utc_iso_ms(t0 + 2), "event": "stall", "kind": "progress", "source": "x",
                               "age_s": 1e999, "limit_s": 1e999, "action": "restart"},
                              {"ts": utc_iso_ms(t0 + 3), "event": "restart", "attempt": 1, "backoff_s": 1e999,
                               "reason": "stall"},
                              {"ts": utc_iso_ms(t0 + 4), "event": "exit", "status": 0, "reason": "exited",
                               "runtime_s": 1e999, "restarts": 1e999, "stalls": 1}],
                             [{"kind": "step", "step": 1e999, "epoch": 1, "loss": 1e999, "time": 1e999},
                              {"kind": "step", "step": 2, "epoch": 1, "loss": 0.5, "time": 1e300}]),
        "huge-integers": ([start,
                           {"ts": utc_iso_ms(t0 + 1), "event": "heartbeat", "pid": 1, "silent_s": 10 ** 400,
                            "progress_age_s": 10 ** 400, "rss_bytes": 10 ** 400, "progress": "x"},
                           {"ts": utc_iso_ms(t0 + 4), "event": "exit", "status": 10 ** 400, "reason": "exited",
                            "runtime_s": 10 ** 400}],
                          [{"kind": "step", "step": 10 ** 400, "epoch": 1, "loss": 0.5, "time": t0 + 1}]),
        "digit-headline": ([start], [], "Step " + "9" * 400 + "/10\nstep: " + "9" * 5000 + "\n"),
        "digit-headline-5000": ([start], [], "Step " + "7" * 5000 + "/10 Batch 3/" + "8" * 400 + "\n"),
        "year-9999": ([{**start, "ts": "9999-12-31T23:59:59.999Z"},
                       {"ts": "9999-12-31T23:59:59.999Z", "event": "heartbeat", "pid": 1, "silent_s": 1.0,
                        "progress_age_s": 1.0, "progress": "Epoch 1/2"},
                       {"ts": "9999-12-31T23:59:59.999Z", "event": "exit", "status": 0, "reason": "exited",
                        "runtime_s": 5.0}],
                      [{"kind": "step", "step": 1, "epoch": 1, "loss": 0.5, "time": 253402300799.0}]),
        "year-0001": ([{**start, "ts": "0001-01-01T00:00:00.000Z"},
                       {"ts": "0001-01-01T00:00:01.000Z", "event": "exit", "status": 0, "reason": "exited",
                        "runtime_s": 1.0}],
                      [{"kind": "step", "step": 1, "epoch": 1, "loss": 0.5, "time": -62135596800.0}]),
        "mixed-years": ([start, {"ts": "9999-12-31T23:59:59.999Z", "event": "heartbeat", "pid": 1, "silent_s": 5.0},
                         {"ts": "0001-01-01T00:00:00.000Z", "event": "stall", "kind": "silence", "age_s": 3.0}], []),
    }
    for name, spec in runs.items():
        events, metrics, progress = (*spec, None) if len(spec) == 2 else spec
        folder = root / name
        folder.mkdir()
        (folder / "events.jsonl").write_text("".join(_strict(e) + "\n" for e in events))
        if metrics:
            (folder / "metrics.jsonl").write_text("".join(_strict(m) + "\n" for m in metrics))
        if progress is not None:
            (folder / "PROGRESS.txt").write_text(progress)
        yield name, folder
    odd_mtime = root / "year-9999" / "PROGRESS.txt"
    odd_mtime.write_text("Epoch 1/2\nepoch: 1\ntotal_epochs: 2\n")
    os.utime(odd_mtime, (253402300799.0, 253402300799.0))


@pytest.mark.timeout(240)
def test_hostile_numbers_digit_strings_and_timestamps_never_give_a_traceback(tmp_path):
    """Issue 16 item 14: strict JSON that holds 1e999, 400- and 5000-digit numbers, years 9999 and 1,
    read under TZ=Asia/Tokyo: a summary every time, exit 0, and --json that is strict JSON."""
    env = base_env(TZ="Asia/Tokyo")
    for name, folder in list(hostile_runs(tmp_path)):
        text = report(folder, "--png", env=env)
        assert text.returncode == 0 and "Traceback" not in text.stderr, (name, text.stderr[-2000:])
        assert text.stdout.startswith("run "), (name, text.stdout)
        assert png_size(folder / "report.png") == PNG_SIZE, name
        js = report(folder, "--json", env=env)
        assert js.returncode == 0 and "Traceback" not in js.stderr, (name, js.stderr[-2000:])
        summary = strict_json(js.stdout)
        if name == "infinite-numbers":  # a non-finite number reads as absent
            assert summary["runtime_s"] is None and summary["peak_rss_bytes"] is None
            assert summary["stalls"][0]["age_s"] is None and summary["exit"]["restarts"] is None


def _unreadable_events(tmp_path):
    folder = tempfile.mkdtemp(prefix="report-unreadable-")  # not under root's 0700 pytest folder
    os.chmod(folder, 0o755)
    events = os.path.join(folder, "events.jsonl")
    write_events(events, [{"ts": utc_iso_ms(1.8e9), "event": "start", "argv": ["x"], "pid": 1, "attempt": 0}])
    os.chmod(events, 0)
    return folder, events


def test_an_unreadable_events_file_is_an_error_not_an_empty_run(tmp_path):
    """Issue 16 item 15: as an ordinary user (nobody) a file without read permission; as root a
    directory or a symlink loop where the events file should be: one line, exit 2."""
    folder, events = _unreadable_events(tmp_path)
    try:
        # The report's code is imported first, then the privileges are dropped: nobody may not read the venv.
        as_nobody = ("import gettext, locale, os, shutil, sys; from supervisor.report.cli import main\n"
                     "if os.getuid() == 0: os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
                     "sys.exit(main(sys.argv[1:]))")
        for run in (folder, events):
            r = subprocess.run([PY, "-c", as_nobody, run], env=base_env(), capture_output=True, text=True,
                               timeout=50, stdin=subprocess.DEVNULL)
            assert r.returncode == 2, (r.stdout, r.stderr)
            assert r.stderr.strip() == f"magvit-report: cannot read {events}: Permission denied", r.stderr
            assert r.stdout == ""
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    (tmp_path / "dir" / "events.jsonl").mkdir(parents=True)
    r = report(tmp_path / "dir")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"magvit-report: cannot read {tmp_path / 'dir' / 'events.jsonl'}: Is a directory"), r.stderr
    (tmp_path / "loop").mkdir()
    os.symlink("events.jsonl", tmp_path / "loop" / "events.jsonl")
    r = report(tmp_path / "loop")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"magvit-report: cannot read {tmp_path / 'loop' / 'events.jsonl'}: Too many levels of symbolic links"), r.stderr


def _month_of_heartbeats(path, megabytes):
    """An events file of about `megabytes` MB: a start, then heartbeats every 30 s (a month is ~30 MB), and
    every 15 minutes a `warn` stall with its diagnosis (8 KB of stacks), as a job stuck under --on-stall warn leaves."""
    t0 = 1_800_000_000.0
    pid = 2 ** 22 + 17
    target = megabytes << 20
    stacks = f'Process {pid}: python train.py\nThread {pid} (idle): "MainThread"\n    wait (train.py:1)\n' * 90
    with open(path, "w") as f:
        f.write(json.dumps({"ts": utc_iso_ms(t0), "event": "start", "argv": ["python", "train.py"], "pid": pid,
                            "attempt": 0}) + "\n")
        i, written = 0, 0
        while written < target:
            i += 1
            line = json.dumps({"ts": utc_iso_ms(t0 + 30 * i), "event": "heartbeat", "pid": pid, "silent_s": 30.0,
                               "progress_age_s": 3.5, "cpu_percent": 99.5, "rss_bytes": (1 << 30) + i,
                               "progress": f"Epoch {i // 400 + 1}/100000 - Batch {i % 400}/400 - Loss: 0.4321",
                               "expect_s": None, "eta_s": 86400, "up_s": 30.0 * i}) + "\n"
            if i % 30 == 0:
                line += json.dumps({"ts": utc_iso_ms(t0 + 30 * i), "event": "stall", "kind": "progress",
                                    "source": "/runs/PROGRESS.txt", "age_s": 600.0, "limit_s": 600, "action": "warn",
                                    "progress": "Epoch 1/2"}) + "\n"
                line += json.dumps({"ts": utc_iso_ms(t0 + 30 * i), "event": "diagnosis", "stacks": stacks,
                                    "stack_method": "py-spy", "gpus": [],
                                    "processes": [{"pid": pid, "cmd": "python train.py", "state": "S",
                                                   "cpu_percent": 0.0, "rss_bytes": 1 << 30, "threads": 9}]}) + "\n"
            f.write(line)
            written += len(line)
    return i


@pytest.mark.timeout(120)
def test_memory_stays_bounded_whatever_the_size_of_the_events_file(tmp_path):
    """Issue 16 item 16: the events file is streamed. Peak RSS for 8 MB and for 32 MB of heartbeats
    differs by far less than the file grew (it was 8x the file), so 100 MB reads in well under 250 MB."""
    peaks = {}
    for mb in (8, 32):
        path = tmp_path / f"events-{mb}.jsonl"
        beats = _month_of_heartbeats(path, mb)
        with open(tmp_path / "out.json", "w+") as out:  # a file, not a pipe: nobody reads it until the end
            proc = subprocess.Popen([PY, "-m", "supervisor.report", str(path), "--json"], env=base_env(),
                                    stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            peaks[mb] = wait_tracking_peak_rss(proc, timeout_s=100) << 10
            _, err = proc.communicate()
            assert proc.returncode == 0, err
            out.seek(0)
            summary = json.load(out)
        assert summary["peak_rss_bytes"] == (1 << 30) + beats  # every heartbeat was read
        assert len(summary["stalls"]) == beats // 30 and summary["stalls"][-1]["frame"] == "wait (train.py:1)"
        path.unlink()
    grew = peaks[32] - peaks[8]
    assert grew < 12 << 20, peaks  # 24 MB more file, under 12 MB more memory (before: ~200 MB more)
    assert peaks[32] < 150 << 20, peaks


@pytest.mark.timeout(60)
def test_a_child_whose_supervisor_was_killed_is_unsupervised(tmp_path):
    """Issue 16 item 17: SIGKILL the supervisor; its child ignores the SIGTERM the kernel sends it and runs
    on. The report says `unsupervised`, and that nothing watches the child any more."""
    sup = start_sup("--events", "events.jsonl", "--heartbeat", "0", child=child_cmd("ignore-term"), cwd=tmp_path)
    child_pid = None
    try:
        def started():
            path = tmp_path / "events.jsonl"
            starts = [json.loads(x) for x in path.read_text().splitlines() if '"start"' in x] if path.exists() else []
            return starts[0]["pid"] if starts else None
        child_pid = wait_for(started, timeout_s=30, what="the start event")
        LineReader(sup.stdout).wait_for(b"ready", timeout_s=30)  # its SIGTERM handler is set
        sup.kill()
        sup.wait()
        wait_for(lambda: psutil.Process(child_pid).ppid() != sup.pid, timeout_s=10, what="the child reparented")
        assert psutil.pid_exists(child_pid)
        text = report(tmp_path / "events.jsonl")
        assert text.returncode == 0, text.stderr
        assert f"state     unsupervised: child pid {child_pid}" in text.stdout, text.stdout
        assert "nothing watches it any more" in text.stdout
        summary = strict_json(report(tmp_path / "events.jsonl", "--json").stdout)
        assert summary["state"] == "unsupervised" and summary["pid"] == child_pid
    finally:
        if child_pid is not None:
            try:
                os.kill(child_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if sup.poll() is None:
            sup.kill()
            sup.wait()


if __name__ == "__main__":  # draw the hand-made 3-day run somewhere to look at it
    from pathlib import Path

    print(three_day_run(Path(sys.argv[1])))


# ----- sampling and steps (issue 18 section 3) ---------------------------------------------------

@pytest.mark.timeout(60)
def test_a_job_that_prints_is_sampled_and_its_events_carry_the_step(tmp_path):
    """A job that prints all the time gets no heartbeat, yet the events get a `sample` (RSS, CPU, step) soon
    after the launch, small; progress-first and the samples carry the progress file's `step`; and the
    report knows the peak RSS (before: `peak RSS unknown`)."""
    r = run_sup("--run-dir", "run", "--heartbeat", "30", "--progress-file", "run/PROGRESS.txt",
                child=child_cmd("progress", "run/PROGRESS.txt", "45", "0.2"), cwd=tmp_path, timeout_s=50)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    lines = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in lines]
    samples = [(line, e) for line, e in zip(lines, events) if e["event"] == "sample"]
    assert len(samples) == 1 and not [e for e in events if e["event"] == "heartbeat"], events
    line, sample = samples[0]
    assert sample["rss_bytes"] > 1 << 20 and sample["cpu_percent"] >= 0 and 1 <= sample["step"] <= 45, sample
    assert len(line) < 300, line  # once a minute: well under 1 KB a minute
    (first,) = [e for e in events if e["event"] == "progress-first"]
    assert 1 <= first["step"] <= sample["step"]  # the step at the first scan that saw the file change
    summary = strict_json(report(tmp_path / "run", "--json").stdout)
    assert summary["peak_rss_bytes"] == sample["rss_bytes"]


# ----- goodput on the real trainer (issue 18 section 2) ------------------------------------------

def _start_supervised_trainer(cwd, *faults):
    """The trainer (3 epochs of 5 steps, a checkpoint at each epoch end) under --on-stall restart, started."""
    cwd.mkdir()
    return start_sup("--heartbeat", "30", "--stall-timeout", TEARDOWN_S, "--startup-grace", "90", "--kill-grace", "30",
                     "--on-stall", "restart", *RUN_FILES,
                     child=[*TRAIN, "--epochs", "3", "--checkpoint-every-s", "0", *faults], cwd=cwd,
                     stdout=subprocess.DEVNULL)


def _summary_when_done(sup, cwd):
    _, err = sup.communicate(timeout=200)
    assert sup.returncode == 0, err.decode()[-3000:]
    text = report(cwd / "run")
    assert text.returncode == 0, text.stderr
    return strict_json(report(cwd / "run", "--json").stdout), text.stdout


@pytest.mark.timeout(300)
@pytest.mark.heavy  # the real trainer, twice or three ranks: bin/test -m heavy and CI run it
def test_goodput_of_the_real_trainer_clean_and_hung_twice_after_epoch_end_checkpoints(tmp_path):
    """A clean run loses nothing but its startup; the same run with two hang-once faults after epoch-end
    checkpoints (steps 7 and 12) loses the two stall timeouts hung, at least the back-offs recovering and the
    steps after each checkpoint redone, and its goodput is below the clean one's."""
    # Side by side: the test takes as long as the hung run alone.
    sups = [_start_supervised_trainer(tmp_path / "clean"),
            _start_supervised_trainer(tmp_path / "hung", "--fault", "hang-once:7", "--fault", "hang-once:12")]
    try:
        (clean, clean_text), (hung, hung_text) = [_summary_when_done(sup, tmp_path / name)
                                                  for sup, name in zip(sups, ("clean", "hung"))]
    finally:
        for sup in sups:
            if sup.poll() is None:
                kill_tree_of(sup)
    for s in (clean, hung):
        assert s["productive_s"] + sum(s["badput_s"].values()) == pytest.approx(s["runtime_s"], abs=0.01)
        assert 0 < s["goodput"] < 1 and s["badput_s"]["startup"] > 0
    assert clean["badput_s"]["hung"] == clean["badput_s"]["recovery"] == clean["badput_s"]["redone"] == 0
    (line,) = [line for line in clean_text.splitlines() if line.startswith("goodput")]
    assert re.fullmatch(rf"goodput   {clean['goodput']:.2f} of {fmt_duration(clean['runtime_s'])}: lost 0s hung, "
                        r"0s recovering, \S+ starting, 0s redone", line), line
    limits = [st["limit_s"] for st in hung["stalls"]]
    assert len(limits) == 2 and [st["action"] for st in hung["stalls"]] == ["restart", "restart"]
    assert sum(limits) <= hung["badput_s"]["hung"] <= sum(limits) + 3
    assert hung["badput_s"]["recovery"] >= sum(r["backoff_s"] for r in hung["restarts"])  # 1 s + 2 s
    assert hung["badput_s"]["redone"] > 0
    assert hung["goodput"] < clean["goodput"]
    (line,) = [line for line in hung_text.splitlines() if line.startswith("goodput")]
    assert re.fullmatch(r"goodput   0\.\d\d of \S+: lost \d+s hung, \S+ recovering, \S+ starting, \S+ redone", line), line
