"""Deadlines a child declares, NCCL flight-recorder dumps collected on a stall, run folders (issues 8, 9).

Real supervisor, real children: a stand-in NCCL rank that speaks torch's dump-pipe
protocol, progress files that declare `expect_next_s`, and a --run-dir run.
"""
import os
import signal
import subprocess
import threading
import time
from datetime import datetime, timezone

from helpers import (PY, ROOT, LineReader, base_env, events_of, kill_tree_of, run_sup, start_sup, sup_lines,
                     wait_for)
from supervisor.attempt import Diagnosing

FR_RANK = str(ROOT / "tests" / "fixtures" / "fr_rank.py")


def declaring_child(progress, expect_s: float, then_sleep_s: float) -> list[str]:
    """A child that writes one progress update declaring expect_next_s, then goes quiet."""
    code = ("import os, sys, time; p = sys.argv[1]; tmp = p + '.tmp'\n"
            "open(tmp, 'w').write(f'Saving checkpoint\\nexpect_next_s: {sys.argv[2]}\\n'); os.replace(tmp, p)\n"
            "time.sleep(float(sys.argv[3]))\n")
    return [PY, "-c", code, str(progress), str(expect_s), str(then_sleep_s)]


def test_a_declared_deadline_longer_than_the_timeout_is_no_stall(tmp_path):
    progress = tmp_path / "P.txt"
    r = run_sup("--progress-file", str(progress), "--stall-timeout", "2", "--heartbeat", "1",
                child=declaring_child(progress, 8, 5), cwd=tmp_path, timeout_s=30)
    assert r.returncode == 0, r.stderr
    said = sup_lines(r.stderr)
    assert not any("STALL" in line for line in said)
    assert any("heartbeat" in line and "expect=8s" in line for line in said)


def test_a_declared_deadline_is_a_stall_at_that_deadline(tmp_path):
    progress, events = tmp_path / "P.txt", tmp_path / "ev"
    started = time.monotonic()
    r = run_sup("--progress-file", str(progress), "--stall-timeout", "1", "--kill-grace", "1",
                "--events", str(events), child=declaring_child(progress, 3, 20), cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124
    assert time.monotonic() - started < 15
    stall = next(e for e in events_of(events) if e["event"] == "stall")
    assert stall["limit_s"] == 3 and stall["declared"] is True and 3 <= stall["age_s"] < 6
    assert any("(limit declared 3s)" in line for line in sup_lines(r.stderr))


def test_a_declared_deadline_is_capped_by_max_expect(tmp_path):
    progress = tmp_path / "P.txt"
    r = run_sup("--progress-file", str(progress), "--stall-timeout", "1", "--max-expect", "2", "--kill-grace", "1",
                child=declaring_child(progress, 3600, 20), cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124
    assert any("(limit declared 2s)" in line for line in sup_lines(r.stderr))


def test_a_stall_collects_every_ranks_flight_recorder_dump_before_any_signal(tmp_path):
    """The stand-in rank reads its pipe under the prefixes the supervisor exported, as torch would."""
    events = tmp_path / "events.jsonl"
    code = ("import os, subprocess, sys\n"
            "pipe, dump = os.environ['TORCH_NCCL_DEBUG_INFO_PIPE_FILE'], os.environ['TORCH_FR_DUMP_TEMP_FILE']\n"
            "assert os.environ['TORCH_NCCL_DEBUG_INFO_TEMP_FILE'] == dump\n"
            "assert os.environ['TORCH_FR_BUFFER_SIZE'] == os.environ['TORCH_NCCL_TRACE_BUFFER_SIZE'] == '2000'\n"
            "ranks = [subprocess.Popen([sys.executable, sys.argv[1], pipe, dump, str(r)]) for r in (0, 1)]\n"
            "[r.wait() for r in ranks]\n")
    r = run_sup("--events", str(events), "--progress-file", str(tmp_path / "never"), "--stall-timeout", "2",
                "--kill-grace", "1", child=[PY, "-c", code, FR_RANK], cwd=tmp_path, timeout_s=50)
    assert r.returncode == 124, r.stderr
    evs = events_of(events)
    names = [e["event"] for e in evs]
    assert names.index("flight-recorder") < names.index("signal")  # collected before any signal
    fr = next(e for e in evs if e["event"] == "flight-recorder")
    assert fr["ranks"] == [0, 1] and fr["dir"] == str(tmp_path / "flight-recorder" / "attempt-0")
    assert [os.path.basename(f) for f in fr["files"]] == ["rank_0", "rank_1"]
    assert all(os.path.getsize(f) > 4096 for f in fr["files"])
    assert any(f"flight recorder: 2 rank dumps in {tmp_path}/flight-recorder/attempt-0" in line
               for line in sup_lines(r.stderr))


def test_the_loop_goes_on_while_a_slow_diagnosis_runs(tmp_path):
    """A rank whose dump never stops growing holds the flight recorder for its whole 20 s: meanwhile
    the child's output is relayed, and the user's SIGTERM reaches the child at once."""
    events = tmp_path / "events.jsonl"
    code = ("import os, subprocess, sys, time\n"
            "pipe, dump = os.environ['TORCH_NCCL_DEBUG_INFO_PIPE_FILE'], os.environ['TORCH_FR_DUMP_TEMP_FILE']\n"
            "subprocess.Popen([sys.executable, sys.argv[1], pipe, dump, '0', 'grow'])\n"
            "n = 0\n"
            "while True:\n"
            "    n += 1; print(f'tick {n}', flush=True); time.sleep(0.1)\n")
    # No torchfrtrace on PATH: it would import torch for seconds once the dump is in.
    sup = start_sup("--events", str(events), "--progress-file", str(tmp_path / "never"), "--stall-timeout", "3",
                    "--kill-grace", "1", "--heartbeat", "0", child=[PY, "-c", code, FR_RANK], cwd=tmp_path,
                    env=base_env(PATH="/usr/bin:/bin"), stderr=subprocess.STDOUT)
    try:
        out = LineReader(sup.stdout)
        ticks_at_stall = out.wait_for(b"STALL", 30).count(b"tick ")
        wait_for(lambda: out.pump().count(b"tick ") >= ticks_at_stall + 10, 15, what="ticks relayed meanwhile")
        assert b"diagnosis:" not in out.data and b"ready (pid:" in out.data  # the rank is still being waited on
        sent = time.time()
        sup.send_signal(signal.SIGTERM)
        # The user's signal ends the run promptly, the flight recorder's wait cut short (SPEC 4, issue 16).
        assert sup.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.time() - sent < 10
    finally:
        kill_tree_of(sup)
    evs = events_of(events)
    names = [e["event"] for e in evs]
    assert names.index("stall") < names.index("signal")
    assert "flight-recorder" not in names  # dropped: the rank's dump was still growing
    forwarded = next(e for e in evs if e["event"] == "signal")
    assert (forwarded["signal"], forwarded["reason"]) == ("SIGTERM", "forwarded")
    at = datetime.strptime(forwarded["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
    assert at - sent < 5  # not after the 20 s the dump holds the diagnosis
    assert evs[-1]["event"] == "exit" and (evs[-1]["status"], evs[-1]["reason"]) == (143, "user-signal")


def test_a_diagnosis_that_fails_still_comes_back():
    """Our own trouble in the diagnosis thread must not leave the loop waiting for it (and the stall unkilled)."""
    woke = threading.Event()
    found = Diagnosing([-5], None, None, woke.set)  # psutil raises ValueError for pid -5
    assert woke.wait(10) and found.done
    assert found.diagnosis.stack_method == "none: the diagnosis failed: ValueError: pid must be a positive integer (got -5)"


def test_flight_recorder_off_and_a_user_setting_wins(tmp_path):
    code = "import os; print(os.environ.get('TORCH_FR_BUFFER_SIZE'), os.environ.get('TORCH_NCCL_DEBUG_INFO_PIPE_FILE'))"
    r = run_sup("--events", str(tmp_path / "ev"), "--flight-recorder", "off", child=[PY, "-c", code], cwd=tmp_path)
    assert r.stdout == b"None None\n"
    env = dict(os.environ, TORCH_FR_BUFFER_SIZE="50")
    env.pop("MAGVIT_SUPERVISE_FLIGHT_RECORDER", None)
    from helpers import base_env
    r = run_sup("--events", str(tmp_path / "ev"), child=[PY, "-c", code], cwd=tmp_path,
                env=base_env(TORCH_FR_BUFFER_SIZE="50"))
    assert r.stdout.decode().split()[0] == "50"
    assert not (tmp_path / "flight-recorder").exists() or (tmp_path / "flight-recorder" / "attempt-0").is_dir()


def test_an_unwritable_flight_recorder_folder_is_a_failed_sink_not_a_failed_run(tmp_path):
    events = tmp_path / "ev"
    r = run_sup("--events", str(events), "--flight-recorder", "/dev/null/fr", child=["sh", "-c", "exit 5"],
                cwd=tmp_path)
    assert r.returncode == 5
    failed = [e for e in events_of(events) if e["event"] == "sink-failed"]
    assert [e["sink"] for e in failed] == ["flight-recorder"]


def test_run_dir_makes_the_run_a_folder(tmp_path):
    run = tmp_path / "runs" / "one"
    code = ("import os; d = os.environ['MAGVIT_RUN_DIR']; p = os.environ['MAGVIT_PROGRESS_FILE'];"
            "open(p, 'w').write('Epoch 1/1\\n'); print(d)")
    r = run_sup("--run-dir", str(run), child=[PY, "-c", code], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout.decode().strip() == str(run)
    assert (run / "PROGRESS.txt").read_text() == "Epoch 1/1\n"
    assert b"sup| [supervise" in (run / "supervise.log").read_bytes()
    assert [e["event"] for e in events_of(run / "events.jsonl")][0] == "start"


def test_heartbeat_shows_an_eta_when_the_progress_file_carries_the_totals(tmp_path):
    progress, events = tmp_path / "P.txt", tmp_path / "ev"
    code = ("import os, sys, time; p = sys.argv[1]\n"
            "for b in range(1, 31):\n"
            "    open(p + '.tmp', 'w').write(f'Epoch 1/2 - Batch {b}/40\\nepoch: 1\\ntotal_epochs: 2\\n'\n"
            "                                 f'batch: {b}\\ntotal_batches: 40\\n'); os.replace(p + '.tmp', p)\n"
            "    time.sleep(0.1)\n")
    r = run_sup("--progress-file", str(progress), "--heartbeat", "0.5", "--events", str(events),
                child=[PY, "-c", code, str(progress)], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 0
    beats = [e for e in events_of(events) if e["event"] == "heartbeat" and e["eta_s"] is not None]
    assert beats, "no heartbeat carried an ETA"
    # 80 batches at ~0.1 s each: the ETA is a few seconds, not minutes.
    assert all(0 <= b["eta_s"] < 30 for b in beats)
    assert any(" eta=" in line for line in sup_lines(r.stderr))
