"""magvit-report's reading and summary, from hand-made run folders: no processes, no sleeps.

Each test writes the files a run could leave (events, metrics, progress, log), torn and
odd ones included, and checks what a person or a script would read in the summary.
"""
import json
import os

import psutil
import pytest

from supervisor.output.events import utc_iso_ms
from supervisor.report.cli import format_text
from supervisor.report.plot import _lanes, draw
from supervisor.report.stacks import hung_frame
from supervisor.report.summary import (curves, odd_one_out, progress_rate, slow_periods, summarize,
                                       timeline)
from supervisor.report.record import read_jsonl, read_record, resolve

T0 = 1_800_000_000.0  # a fixed wall clock: the tests never read the real one
ARGV = ["python", "-u", "train.py", "--epochs", "3"]
DEAD_PID = 2 ** 22 + 17  # above the default pid_max: never a live process

PYSPY = """Process 4242: python -u train.py
Python v3.11.7 (/usr/bin/python3.11)

Thread 4250 (idle): "pt_data_worker"
    wait (threading.py:320)
Thread 4242 (idle): "MainThread"
    _injected_hang (trainer/control.py:56)
    RunControl.before_step (trainer/control.py:93)
    train_one_epoch (trainer/loop.py:87)
"""


def ev(t, name, **fields):
    return {"ts": utc_iso_ms(T0 + t), "event": name, **fields}


def write_run(folder, events, tail=b"", metrics=None, progress=None, log=None):
    """Write a run folder the way --run-dir lays it out; `tail` is appended unterminated."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "events.jsonl", "wb") as f:
        f.write(b"".join(json.dumps(e).encode() + b"\n" for e in events) + tail)
    if metrics is not None:
        (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    if progress is not None:
        text, mtime = progress
        (folder / "PROGRESS.txt").write_text(text)
        os.utime(folder / "PROGRESS.txt", (T0 + mtime, T0 + mtime))
    if log is not None:
        (folder / "supervise.log").write_bytes(log)
    return folder


def stalled_and_restarted(pid=DEAD_PID):
    return [
        ev(0, "start", argv=ARGV, pid=pid, attempt=0),
        ev(5, "progress-first", source="/run/PROGRESS.txt"),
        ev(30, "heartbeat", pid=pid, silent_s=30.0, progress_age_s=2.0, cpu_percent=99.0, rss_bytes=300 << 20,
           progress="Epoch 1/3 - Batch 5/10"),
        ev(610, "stall", kind="progress", source="/run/PROGRESS.txt", age_s=600.2, limit_s=600,
           progress="Epoch 1/3 - Batch 6/10", action="restart"),
        ev(611, "diagnosis", processes=[{"pid": pid, "cmd": "python", "state": "S", "cpu_percent": 0.0,
                                        "rss_bytes": 500 << 20, "threads": 3}],
           stacks=PYSPY, stack_method="py-spy", gpus=[]),
        ev(611, "signal", signal="SIGTERM", target="group", reason="stall"),
        ev(615, "restart", attempt=1, backoff_s=1.0, reason="stall"),
        ev(616, "start", argv=ARGV, pid=pid + 1, attempt=1),
    ]


def summary_of(folder, now):
    record = read_record(str(folder))
    return record, summarize(record, now)


# ----- reading ---------------------------------------------------------------------------------

def test_a_torn_last_line_and_garbage_lines_are_skipped_and_counted(tmp_path):
    path = tmp_path / "e.jsonl"
    path.write_bytes(b'{"a": 1}\nnot json\n[1, 2]\n\xff\xfe\n\n{"b": 2}\n{"c": 3, "half')
    objects, skipped = read_jsonl(str(path))
    assert objects == [{"a": 1}, {"b": 2}]
    assert skipped == 4  # "not json", a list, invalid UTF-8, the unterminated tail


def test_a_run_is_a_folder_or_an_events_file_and_nothing_else(tmp_path):
    write_run(tmp_path / "run", [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0)])
    assert resolve(str(tmp_path / "run")) == (str(tmp_path / "run"), str(tmp_path / "run" / "events.jsonl"))
    assert resolve(str(tmp_path / "run" / "events.jsonl"))[0] == str(tmp_path / "run")
    with pytest.raises(ValueError, match="no such run folder or events file"):
        resolve(str(tmp_path / "missing"))


def test_sessions_appended_to_one_file_report_the_latest(tmp_path):
    first = [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0), ev(9, "exit", status=130, reason="user-signal",
                                                                      runtime_s=9.0, restarts=0, stalls=0)]
    second = [ev(100, "start", argv=ARGV + ["--resume"], pid=DEAD_PID, attempt=0),
              ev(160, "exit", status=0, reason="exited", runtime_s=60.0, restarts=0, stalls=0)]
    _, s = summary_of(write_run(tmp_path, first + second), now=T0 + 200)
    assert s["command"][-1] == "--resume" and s["exit"]["status"] == 0 and s["runtime_s"] == 60.0
    assert s["earlier_sessions"] == [{"started": utc_iso_ms(T0), "status": 130, "reason": "user-signal"}]


# ----- the edge cases of the issue ----------------------------------------------------------------

def test_no_events_file_still_reports_progress_and_metrics(tmp_path):
    tmp_path.mkdir(exist_ok=True)
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"kind": "step", "step": 3, "epoch": 1, "loss": 0.5,
                                                        "time": T0}) + "\n")
    (tmp_path / "PROGRESS.txt").write_text("Epoch 1/2 - Batch 3/4\nepoch: 1\ntotal_epochs: 2\n")
    _, s = summary_of(tmp_path, now=T0 + 10)
    assert s["state"] == "unknown" and s["files"]["events"] is None and s["command"] is None
    assert s["progress"]["line"] == "Epoch 1/2 - Batch 3/4" and s["metrics"]["last_step"] == 3
    text = format_text(s)
    assert "no events file" in text and "Epoch 1/2 - Batch 3/4" in text


def test_one_event(tmp_path):
    record, s = summary_of(write_run(tmp_path, [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0)]), now=T0 + 5)
    assert s["state"] == "no-exit-record" and s["pid"] == DEAD_PID and s["runtime_s"] == 0.0
    assert s["stalls"] == [] and s["restarts"] == [] and s["progress"] is None
    assert "ended without an exit record" in format_text(s)
    assert timeline(record, s, T0 + 5)["attempts"] == [(T0, T0 + 1.0, 0)]


def test_a_truncated_last_line_is_skipped(tmp_path):
    events = stalled_and_restarted()[:4]
    record, s = summary_of(write_run(tmp_path, events, tail=b'{"ts": "2027-01-15T08:00:00.000Z", "event": "diag'),
                           now=T0 + 700)
    assert [e["event"] for e in record.events] == ["start", "progress-first", "heartbeat", "stall"]
    assert s["skipped_lines"] == {"events.jsonl": 1} and "1 unreadable line(s) in events.jsonl" in format_text(s)
    assert s["stalls"][0]["frame"] is None  # its diagnosis was the torn line


def test_three_restarts_each_stall_with_its_progress_and_hung_frame(tmp_path):
    events, t, pid = [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0)], 0, DEAD_PID
    for attempt in range(1, 4):
        t += 100
        events += [ev(t, "stall", kind="progress", source="/r/PROGRESS.txt", age_s=60.0, limit_s=60,
                      progress=f"Epoch {attempt}/9 - Batch 1/10", action="restart"),
                   ev(t + 1, "diagnosis", processes=[], stacks=PYSPY.replace("_injected_hang", f"hang_{attempt}"),
                      stack_method="py-spy", gpus=[]),
                   ev(t + 1, "signal", signal="SIGTERM", target="group", reason="stall"),
                   ev(t + 3, "restart", attempt=attempt, backoff_s=2.0 ** (attempt - 1), reason="stall"),
                   ev(t + 5, "start", argv=ARGV, pid=pid + attempt, attempt=attempt)]
    events.append(ev(t + 50, "exit", status=0, reason="exited", runtime_s=t + 50.0, restarts=3, stalls=3))
    record, s = summary_of(write_run(tmp_path, events), now=T0 + 1000)
    assert s["state"] == "exited" and s["exit"]["restarts"] == 3
    assert [r["attempt"] for r in s["restarts"]] == [1, 2, 3]
    assert [st["progress"] for st in s["stalls"]] == [f"Epoch {a}/9 - Batch 1/10" for a in (1, 2, 3)]
    assert [st["frame"] for st in s["stalls"]] == [f"hang_{a} (trainer/control.py:56)" for a in (1, 2, 3)]
    text = format_text(s)
    assert "restarts  3, stalls 3" in text and text.count("hung in: hang_") == 3 and text.count("RESTART attempt") == 3
    tl = timeline(record, s, T0 + 1000)
    assert [a[2] for a in tl["attempts"]] == [0, 1, 2, 3] and len(tl["stalls"]) == 3 and tl["exit"][1] == 0


def test_a_run_in_progress_shows_its_live_pid_progress_age_and_eta(tmp_path):
    me = psutil.Process()  # this test's own process stands in for the live child
    started = me.create_time()
    events = [ev(started - T0, "start", argv=ARGV, pid=me.pid, attempt=0)]
    for i in range(1, 6):  # 10 % a minute
        events.append(ev(started - T0 + 60 * i, "heartbeat", pid=me.pid, silent_s=30.0, progress_age_s=0.0,
                         cpu_percent=100.0, rss_bytes=i << 20, progress=f"Step {i}/10"))
    now = started + 300 + 20
    progress = ("Step 5/10\nstep: 5\n", started - T0 + 300)
    record, s = summary_of(write_run(tmp_path, events, progress=progress), now=now)
    assert s["state"] == "running" and s["pid"] == me.pid and s["exit"] is None
    assert s["progress"]["age_s"] == pytest.approx(20.0, abs=0.01)
    assert s["progress"]["fraction"] == 0.5
    assert s["progress"]["eta_s"] == pytest.approx(300.0 - 20.0, abs=1.0)
    assert s["peak_rss_bytes"] == 5 << 20
    text = format_text(s)
    assert f"running: child pid {me.pid} (attempt 0), last progress 20s ago" in text and "eta 4m40s" in text
    assert timeline(record, s, now)["now"] == now


def test_a_reused_pid_is_not_a_running_child(tmp_path):
    me = psutil.Process()
    events = [ev(me.create_time() - T0 - 3600, "start", argv=ARGV, pid=me.pid, attempt=0)]  # started an hour earlier
    _, s = summary_of(write_run(tmp_path, events), now=me.create_time() + 10)
    assert s["state"] == "no-exit-record"


def test_between_attempts_while_a_restart_waits_out_its_backoff(tmp_path):
    events = stalled_and_restarted()[:-1]  # the restart is logged, the next start not yet
    _, s = summary_of(write_run(tmp_path, events), now=T0 + 620)
    assert s["state"] == "between-attempts"
    assert "between attempts: restart 1 after stall due" in format_text(s)


def test_a_three_day_run_lists_its_latest_incidents_with_dates(tmp_path):
    events, t = [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0)], 0.0
    for attempt in range(1, 21):
        t += 3 * 86400 / 21
        events += [ev(t, "stall", kind="silence", source="output", age_s=900.0, limit_s=900, progress=None,
                      action="restart"),
                   ev(t + 2, "restart", attempt=attempt, backoff_s=60.0, reason="stall"),
                   ev(t + 62, "start", argv=ARGV, pid=DEAD_PID, attempt=attempt)]
    events.append(ev(3 * 86400, "exit", status=124, reason="gave-up", runtime_s=3 * 86400.0, restarts=20, stalls=20))
    events.insert(-1, ev(3 * 86400 - 1, "gave-up", reason="restarts ran out (20)"))
    _, s = summary_of(write_run(tmp_path, events), now=T0 + 4 * 86400)
    text = format_text(s)
    assert "runtime 3d00h" in text and "restarts  20, stalls 20" in text
    assert "... 7 earlier (--json has them all)" in text  # 20 stalls with their restarts, and giving up
    assert "GAVE-UP restarts ran out (20)" in text
    assert len(text.splitlines()) < 30  # still a ten-second read


# ----- the figures no single event holds --------------------------------------------------------

def test_peak_rss_gpu_memory_and_terminal_drops(tmp_path):
    events = stalled_and_restarted()
    events[4]["gpus"] = [{"gpu": 0, "pid": DEAD_PID, "used_memory_bytes": 3 << 30, "sm_util_percent": 0},
                         {"gpu": 1, "pid": DEAD_PID, "used_memory_bytes": 1 << 30, "sm_util_percent": 0}]
    log = (b"2027-01-15T08:00:00.000Z out| dropped 5M of output is just text from the child\n"
           b"2027-01-15T08:00:01.000Z sup| [supervise 08:00:01] terminal was not reading: dropped 1.5M of output "
           b"from it (the log run.log has everything)\n"
           b"2027-01-15T08:00:09.000Z sup| [supervise 08:00:09] terminal was not reading: dropped 512B of output "
           b"from it (the log run.log has everything)\n")
    _, s = summary_of(write_run(tmp_path, events, log=log), now=T0 + 700)
    assert s["peak_rss_bytes"] == 500 << 20  # the diagnosis saw more than the heartbeat
    assert s["gpu_memory_bytes"] == 4 << 30
    assert s["dropped_terminal_bytes"] == int(1.5 * (1 << 20)) + 512
    text = format_text(s)
    assert "peak RSS 500M" in text and "GPU 4.0G" in text and "dropped about 1.5M" in text


def test_unknown_figures_are_said_to_be_unknown_not_guessed(tmp_path):
    _, s = summary_of(write_run(tmp_path, [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0)]), now=T0 + 5)
    assert s["peak_rss_bytes"] is None and s["gpu_memory_bytes"] is None and s["dropped_terminal_bytes"] is None
    text = format_text(s)
    assert "peak RSS unknown" in text and "GPU unknown" in text and "terminal  unknown (no supervise.log" in text


def test_troubles_are_listed_and_unknown_events_and_fields_ignored(tmp_path):
    events = [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0, future_field=1),
              ev(1, "something-new", x=1),
              ev(2, "alert-failed", hook="webhook https://hooks.example", error="timed out after 10s"),
              ev(3, "sink-failed", sink="log", error="No space left on device"),
              ev(4, "orphans", pids=[11, 12]),
              ev(5, "unkillable", pids=[13], states=["D"], wchan=["nfs_wait"]),
              ev(6, "exit", status=1, reason="exited", runtime_s=6.0, restarts=0, stalls=0)]
    _, s = summary_of(write_run(tmp_path, events), now=T0 + 10)
    assert s["orphans"][0]["pids"] == [11, 12] and s["unkillable"][0]["wchan"] == ["nfs_wait"]
    text = format_text(s)
    assert "\ntrouble   ORPHANS pids [11, 12] at " in text and "\n          UNKILLABLE pids [13] at " in text
    for needle in ("\n          alert webhook https://hooks.example failed", "\n          sink log failed",
                   "exited with status 1 (exited)"):
        assert needle in text


def test_text_from_the_run_cannot_put_escapes_on_the_terminal(tmp_path):
    events = [ev(0, "start", argv=["python", "evil\x1b[31m\n[supervise 00:00:00] forged"], pid=DEAD_PID, attempt=0)]
    _, s = summary_of(write_run(tmp_path, events, progress=("Epoch \x1b]0;title\x07 1/2\n", 0)), now=T0 + 5)
    text = format_text(s)
    assert "\x1b" not in text and "\x07" not in text and "\n[supervise" not in text


# ----- the hung thread -------------------------------------------------------------------------

def test_the_hung_frame_is_the_main_threads_innermost():
    assert hung_frame(PYSPY) == "_injected_hang (trainer/control.py:56)"


def test_without_a_main_thread_the_first_threads_innermost_frame():
    stacks = 'Thread 7 (active): "worker"\n    spin (job.py:3)\n    run (job.py:9)\n'
    assert hung_frame(stacks) == "spin (job.py:3)"


def test_under_torchrun_the_rank_in_user_code_not_the_launchers_wait():
    launcher = ('Process 100: torchrun --nproc-per-node 2 train.py\nPython v3.11.7\n\n'
                'Thread 100 (idle): "MainThread"\n'
                '    _invoke_run (/venv/lib/python3.11/site-packages/torch/distributed/elastic/agent/server/api.py:883)\n')
    rank = ('\nProcess 101: python train.py\nPython v3.11.7\n\nThread 101 (idle): "MainThread"\n'
            '    _injected_hang (trainer/control.py:56)\n')
    assert hung_frame(launcher + rank) == "_injected_hang (trainer/control.py:56)"
    both_in_library = launcher + rank.replace("trainer/control.py", "/venv/lib/python3.11/site-packages/torch/x.py")
    assert hung_frame(both_in_library).endswith("site-packages/torch/x.py:56)")  # the rank, not torchrun


def test_faulthandler_stacks_are_read_too():
    stacks = ('Thread 0x00007f0000000001 (most recent call first):\n  File "/usr/lib/python3.11/threading.py", '
              'line 320 in wait\n\nCurrent thread 0x00007f0000000002 (most recent call first):\n'
              '  File "train.py", line 88 in hang\n  File "train.py", line 99 in <module>\n')
    assert hung_frame(stacks) == "hang (train.py:88)"


@pytest.mark.parametrize("stacks", [None, "", "py-spy failed: permission denied", 42])
def test_no_frame_from_no_stacks(stacks):
    assert hung_frame(stacks) is None


@pytest.mark.parametrize("odd", [None, "x", [], {"a": 1}, 1e308, -1, True, "\x1b[2J"])
def test_fields_of_any_type_never_break_the_summary_or_its_text(tmp_path, odd):
    events = stalled_and_restarted() + [ev(700, "exit", status=0, reason="exited", runtime_s=700.0, restarts=1,
                                           stalls=1)]
    events[4]["gpus"] = [{"gpu": 0, "pid": 1, "used_memory_bytes": 1}]
    for i, event in enumerate(events):
        for key in event:
            if key in ("ts", "event"):
                continue
            broken = [dict(e) for e in events]
            broken[i][key] = odd
            record, s = summary_of(write_run(tmp_path / f"{i}-{key}", broken,
                                             progress=("Epoch 1/3\nepoch: 1\n", 10)), now=T0 + 800)
            text = format_text(s)
            assert "\x1b" not in text, (i, key)
            timeline(record, s, T0 + 800)
            json.dumps(s)


# ----- the loss curves -------------------------------------------------------------------------

def test_curves_train_per_step_val_at_each_epochs_last_step_and_where_restarts_resumed():
    metrics = [{"kind": "step", "step": s, "epoch": 1 + (s - 1) // 5, "loss": 1.0 / s, "time": T0 + s}
               for s in range(1, 11)]
    metrics += [{"kind": "epoch", "epoch": 1, "train_loss": 0.3, "val_loss": 0.4, "time": T0 + 5},
                {"kind": "epoch", "epoch": 2, "train_loss": 0.1, "val_loss": 0.2, "time": T0 + 10}]
    metrics.append({"kind": "step", "step": 7, "epoch": 2, "loss": 0.5, "time": T0 + 12})  # logged again after a resume
    c = curves(metrics, restarts=[T0 + 8.5, T0 + 0.5])
    assert [s for s, _ in c["train"]] == list(range(1, 11)) and dict(c["train"])[7] == 0.5
    assert c["val"] == [(5, 0.4), (10, 0.2)]
    assert c["restart_steps"] == [8]  # the restart before the first step had reached none


@pytest.mark.parametrize("odd", [None, "x", [], {"a": 1}, True, float("nan"), float("inf")])
def test_curves_skip_records_with_fields_of_any_type(odd):
    good = {"kind": "step", "step": 1, "epoch": 1, "loss": 0.5, "time": T0}
    broken = [dict(good, **{key: odd}) for key in ("step", "epoch", "loss", "time")]
    broken.append({"kind": "epoch", "epoch": odd, "val_loss": odd})
    c = curves([good, *broken], restarts=[T0 + 1])
    assert (1, 0.5) in c["train"] or (1.0, 0.5) in c["train"]
    assert all(isinstance(v, float) and v == v for _, v in c["train"] + c["val"])


def test_recorded_supervisor_pid_and_exact_drops_are_used(tmp_path):
    """Events from this supervisor carry supervisor_pid and terminal-dropped: the report reads them as they are."""
    import json
    import os
    import subprocess

    from supervisor.report.record import read_record

    dead = subprocess.Popen(["true"])
    dead.wait()
    now = "2026-12-01T00:00:00.000Z"
    lines = [
        {"ts": now, "event": "start", "argv": ["x"], "pid": dead.pid, "attempt": 0, "supervisor_pid": os.getpid()},
        {"ts": now, "event": "terminal-dropped", "stream": "stdout", "bytes": 1234567},
        {"ts": now, "event": "terminal-dropped", "stream": "stdout", "bytes": 3},
    ]
    (tmp_path / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    record = read_record(str(tmp_path))
    assert record.dropped_terminal_bytes == 1234570
    assert record.child_alive is False and record.supervisor_alive is True


def test_under_torchrun_the_hung_frame_is_the_ranks_not_the_launchers():
    from supervisor.report.stacks import hung_frame

    stacks = (
        "Process 100: /venv/bin/python /venv/bin/torchrun --nproc-per-node 2 train.py\n"
        "Python v3.11.7 (/venv/bin/python3.11)\n\n"
        'Thread 100 (idle): "MainThread"\n'
        "    _invoke_run (torch/distributed/elastic/agent/server/api.py:912)\n"
        "    run (torch/distributed/elastic/agent/server/api.py:700)\n\n"
        "Process 101: /venv/bin/python -u train.py\n"
        "Python v3.11.7 (/venv/bin/python3.11)\n\n"
        'Thread 101 (idle): "MainThread"\n'
        "    _injected_hang (trainer/control.py:42)\n"
        "    train_one_epoch (trainer/loop.py:88)\n"
    )
    assert hung_frame(stacks) == "_injected_hang (trainer/control.py:42)"
    launcher_only = stacks.split("Process 101")[0]
    assert hung_frame(launcher_only) == "_invoke_run (torch/distributed/elastic/agent/server/api.py:912)"


# ----- triage, causes, speed, SLOW, lanes (issue 18) ---------------------------------------------

GROUPS = [{"ranks": [0, 1], "pids": [11, 12], "frame": "backward (torch/_tensor.py:647)"},
          {"ranks": [2], "pids": [4242], "frame": "_injected_hang (trainer/control.py:191)"}]


@pytest.mark.parametrize("groups, said", [
    (GROUPS, "rank 2 (pid 4242) in _injected_hang (trainer/control.py:191); ranks 0,1 in backward (torch/_tensor.py:647)"),
    ([{"ranks": [], "pids": [7, 8], "frame": "f (a.py:1)"}, {"ranks": [], "pids": [9], "frame": "g (b.py:2)"}],
     "pid 9 in g (b.py:2); pids 7,8 in f (a.py:1)"),
    ([{"ranks": [0, 1, 2], "pids": [1, 2, 3], "frame": "all_reduce (c10d.py:1)"}], None),  # all alike
    ([GROUPS[1], {**GROUPS[1], "ranks": [3], "pids": [5]}], None),  # no group smaller than every other
    ("nonsense", None), ([1, None, {"ranks": "x"}], None), (None, None),
])
def test_the_odd_one_out_comes_from_the_diagnosis_groups(groups, said):
    assert odd_one_out(groups) == said


def test_the_stall_shows_the_odd_one_out_and_endings_their_cause(tmp_path):
    events = stalled_and_restarted()
    events[4]["groups"] = GROUPS
    events += [ev(700, "restart", attempt=2, backoff_s=2.0, reason="crash", cause="cuda-oom",
                  detail="torch.OutOfMemoryError: CUDA out of memory"),
               ev(703, "start", argv=ARGV, pid=DEAD_PID + 2, attempt=2),
               ev(800, "exit", status=1, reason="exited", runtime_s=800.0, restarts=2, stalls=1, cause="exception",
                  detail="ValueError: bad batch")]
    _, s = summary_of(write_run(tmp_path / "run", events), now=T0 + 900)
    text = format_text(s)
    assert "odd one out: rank 2 (pid 4242) in _injected_hang (trainer/control.py:191); ranks 0,1 in" in text
    assert "cause: cuda-oom (torch.OutOfMemoryError: CUDA out of memory)" in text
    assert "exited with status 1 (exited, cause exception)" in text and "exit cause: exception (ValueError: bad batch)" in text
    assert s["restarts"][-1]["cause"] == "cuda-oom" and s["exit"]["detail"] == "ValueError: bad batch"
    assert s["stalls"][0]["odd_one_out"].startswith("rank 2 (pid 4242)")


def test_slow_periods_from_slow_and_slow_ended():
    events = [ev(10, "slow", rate=0.1, typical_rate=1.0, window_s=60, source="x"),
              ev(100, "slow-ended", duration_s=80.0), ev(200, "slow", rate=0.1), ev(210, "slow-ended"),
              ev(300, "slow"), ev(301, "slow")]
    timed = [{**e, "t": T0 + t} for e, t in zip(events, (10, 100, 200, 210, 300, 301))]
    assert slow_periods(timed, T0 + 400) == [(T0 + 20, T0 + 100), (T0 + 200, T0 + 210), (T0 + 300, T0 + 400)]


def test_the_progress_rate_is_steps_per_second_with_hangs_at_zero_and_resumes_broken():
    points = [(T0 + t, t * 2.0) for t in range(0, 100)]  # 2 steps/s for 100 s
    points += [(T0 + 160 + t, 150.0 + t * 2.0) for t in range(0, 40)]  # a 60 s hang, then a resume from 150
    rates = progress_rate(points)
    steady = [r for t, r in rates if T0 + 5 < t < T0 + 99]
    assert steady and all(r == pytest.approx(2.0) for r in steady)
    assert (T0 + 160, None) in rates  # resumed from an earlier step: the line breaks
    assert any(r == 0.0 for t, r in rates if T0 + 99 < t < T0 + 160)
    assert progress_rate(points[:1]) == []


def test_a_default_run_draws_only_lanes_with_something_in_them(tmp_path):
    """bin/run's own run prints all the time: no heartbeats, no silences; those lanes are left out."""
    events = [ev(0, "start", argv=ARGV, pid=DEAD_PID, attempt=0, supervisor_pid=DEAD_PID + 1),
              ev(4, "progress-first", source="/run/PROGRESS.txt", step=0),
              ev(5, "sample", pid=DEAD_PID, cpu_percent=180.0, rss_bytes=400 << 20, step=3, progress_age_s=0.2),
              ev(65, "sample", pid=DEAD_PID, cpu_percent=190.0, rss_bytes=420 << 20, step=200, progress_age_s=0.1),
              ev(90, "exit", status=0, reason="exited", runtime_s=90.0, restarts=0, stalls=0)]
    metrics = [{"kind": "step", "step": i, "epoch": 1, "loss": 1.0 / i, "time": T0 + 4 + i * 0.4} for i in range(1, 200)]
    record, s = summary_of(write_run(tmp_path / "run", events, metrics=metrics), now=T0 + 100)
    tl = timeline(record, s, T0 + 100)
    assert _lanes(tl) == ["supervisor", "progress", "attempts"]
    assert tl["memory"] == [(T0 + 5, 400 << 20), (T0 + 65, 420 << 20)] and s["peak_rss_bytes"] == 420 << 20
    assert [cat for _, _, cat in tl["segments"]] == ["startup", "productive"] and s["goodput"] == pytest.approx(86 / 90, abs=1e-4)
    assert all(r == pytest.approx(2.5) for _, r in tl["rate"])


def test_the_picture_draws_memory_speed_slow_and_coloured_attempts(tmp_path):
    events = stalled_and_restarted() + [
        ev(640, "sample", pid=DEAD_PID + 1, cpu_percent=99.0, rss_bytes=600 << 20, step=40, progress_age_s=1.0),
        ev(650, "slow", rate=0.1, typical_rate=1.0, window_s=60, source="x"), ev(700, "slow-ended", duration_s=50.0),
        ev(760, "exit", status=0, reason="exited", runtime_s=760.0, restarts=1, stalls=1)]
    metrics = [{"kind": "step", "step": i, "epoch": 1, "loss": 1.0 / i, "time": T0 + 5 + i * 10} for i in range(1, 60)]
    record, s = summary_of(write_run(tmp_path / "run", events, metrics=metrics), now=T0 + 800)
    tl = timeline(record, s, T0 + 800)
    assert tl["slow"] == [(T0 + 650, T0 + 700)] and {cat for _, _, cat in tl["segments"]} >= {"hung", "recovery"}
    draw(str(tmp_path / "r.png"), "title", format_text(s), tl, curves(record.metrics, tl["restarts"]))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
