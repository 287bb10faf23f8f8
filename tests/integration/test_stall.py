"""Stalls against real children: a heartbeat thread cannot hide a hang; kill, restart, warn."""
import json
import re
import time

import pytest

from helpers import (alive, base_env, child_cmd, run_sup, sup_lines,
                     strip_sup_lines, wait_for)

FAST = ("--heartbeat", "0", "--kill-grace", "1")


def events(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_hang_behind_a_chatty_heartbeat_is_a_stall_with_stacks(tmp_path):
    ev, log = tmp_path / "events", tmp_path / "log"
    t0 = time.monotonic()
    # A long grace: the child dies on SIGTERM, so the supervisor must not wait it out.
    r = run_sup("--heartbeat", "0", "--kill-grace", "30", "--stall-timeout", "1.5", "--events", str(ev),
                "--log", str(log), child=child_cmd("hang-after-progress"), cwd=tmp_path)
    elapsed = time.monotonic() - t0
    assert r.returncode == 124
    assert r.stdout.count(b"[HEARTBEAT] training active") > 5  # it kept printing the whole time
    lines = sup_lines(r.stderr)
    stall = next(line for line in lines if "STALL" in line)
    assert re.search(r"STALL no progress for \d+s \(limit 1.5s\) in PROGRESS.txt; action=kill \| Epoch 1/1 - Batch 3/10",
                     stall), stall
    text = r.stderr.decode()
    assert "deadlocked_in_named_function" in text and "diagnosis:" in text
    assert "exit status=124 reason=stall" in lines[-1] and "stalls=1" in lines[-1]
    assert elapsed < 1.5 + 1 + 5  # timeout + detection slack + start-up on a loaded machine, never the 30 s grace
    names = [e["event"] for e in events(ev)]
    assert names[0] == "start" and "progress-first" in names and names[-1] == "exit"
    assert names.index("stall") < names.index("diagnosis") < names.index("signal")
    diag = next(e for e in events(ev) if e["event"] == "diagnosis")
    assert diag["stack_method"] == "py-spy" and "deadlocked_in_named_function" in diag["stacks"]
    assert {"pid", "cmd", "state", "cpu_percent", "rss_bytes", "threads"} <= set(diag["processes"][0])
    sig = next(e for e in events(ev) if e["event"] == "signal")
    assert (sig["signal"], sig["target"], sig["reason"]) == ("SIGTERM", "group", "stall")
    assert events(ev)[-1]["status"] == 124 and events(ev)[-1]["reason"] == "stall"
    assert b"sup| [supervise" in log.read_bytes() and b"STALL" in log.read_bytes()


def test_without_ptrace_stacks_come_from_the_kill_ladder(tmp_path):
    env = base_env(MAGVIT_PY_SPY="")  # as where ptrace is not allowed: no py-spy stacks
    t0 = time.monotonic()
    r = run_sup(*FAST, "--stall-timeout", "1", child=child_cmd("hang-after-progress", "ignore-term"),
                cwd=tmp_path, env=env)
    assert r.returncode == 124
    text = r.stderr.decode()
    assert "unavailable" in text
    # SIGTERM is ignored; after the 1 s grace SIGABRT makes faulthandler print every thread's stack.
    child_err = strip_sup_lines(r.stderr).decode()
    assert "Fatal Python error: Aborted" in child_err and "deadlocked_in_named_function" in child_err
    assert time.monotonic() - t0 < 1 + 1 + 1 + 2 + 3


def test_stall_kill_reaches_workers_in_their_own_session(tmp_path):
    pidfile = tmp_path / "pid"
    r = run_sup(*FAST, "--stall-timeout", "1", child=child_cmd("escaping-grandchild", pidfile), cwd=tmp_path)
    assert r.returncode == 124
    # The worker ignored SIGTERM and was outside the group: the tree ladder must still end it.
    assert not alive(int(pidfile.read_text()))


def test_restart_succeeds_on_second_attempt(tmp_path):
    ev = tmp_path / "events"
    r = run_sup(*FAST, "--stall-timeout", "1", "--on-stall", "restart", "--events", str(ev),
                child=child_cmd("restart-then-ok"), cwd=tmp_path)
    assert r.returncode == 0
    assert r.stdout == b"attempt 0\nattempt 1\n"
    lines = sup_lines(r.stderr)
    assert any("RESTART attempt 1/3 after stall" in line for line in lines)
    assert "exit status=0 reason=exited" in lines[-1] and "restarts=1 stalls=1" in lines[-1]
    starts = [e for e in events(ev) if e["event"] == "start"]
    assert [s["attempt"] for s in starts] == [0, 1]
    restart = next(e for e in events(ev) if e["event"] == "restart")
    assert restart["attempt"] == 1 and restart["backoff_s"] == 1 and restart["reason"] == "stall"


@pytest.mark.heavy  # 16 s: one attempt must run well for 10 s
def test_backoff_starts_over_after_an_attempt_that_ran_well(tmp_path):
    ev = tmp_path / "events"
    r = run_sup(*FAST, "--restart-on-crash", "--events", str(ev), child=child_cmd("progress-then-crash", "0,10.5,0"),
                cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == b"attempt 0\nattempt 1\nattempt 2\nattempt 3\n"
    restarts = [e for e in events(ev) if e["event"] == "restart"]
    # 1 s; attempt 1 made progress for 10 s, so 1 s again, not 2; attempt 2 failed at once: doubled
    assert [(e["attempt"], e["backoff_s"]) for e in restarts] == [(1, 1), (2, 1), (3, 2)]


def test_hang_at_the_same_step_twice_gives_up_early(tmp_path):
    r = run_sup(*FAST, "--stall-timeout", "1", "--on-stall", "restart", "--max-restarts", "5",
                child=child_cmd("hang-at-same-step"), cwd=tmp_path)
    assert r.returncode == 124
    assert r.stdout == b"attempt 0\nattempt 1\n"
    lines = sup_lines(r.stderr)
    assert any("GAVE-UP" in line and "Epoch 1/1 - Batch 5/10" in line for line in lines)
    assert "reason=gave-up" in lines[-1] and "restarts=1 stalls=2" in lines[-1]


def test_crash_restarts_then_succeeds_and_running_out_keeps_childs_status(tmp_path):
    r = run_sup(*FAST, "--restart-on-crash", child=child_cmd("crash-until", 2), cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == b"attempt 0\nattempt 1\nattempt 2\n"
    r = run_sup(*FAST, "--restart-on-crash", "--max-restarts", "1", child=child_cmd("crash-until", 5), cwd=tmp_path)
    assert r.returncode == 3 and r.stdout == b"attempt 0\nattempt 1\n"
    assert "reason=gave-up" in sup_lines(r.stderr)[-1]


def test_explicit_progress_file_that_never_appears_is_a_stall(tmp_path):
    r = run_sup(*FAST, "--stall-timeout", "1", "--progress-file", "never.txt", child=child_cmd("silent", 30),
                cwd=tmp_path)
    assert r.returncode == 124 and b"STALL no progress" in r.stderr and b"never.txt" in r.stderr


def test_default_progress_file_that_never_appears_is_no_stall(tmp_path):
    r = run_sup(*FAST, "--stall-timeout", "0.5", child=child_cmd("silent", 1.5), cwd=tmp_path)
    assert r.returncode == 0 and b"STALL" not in r.stderr


def test_silence_timeout_catches_a_quiet_child(tmp_path):
    r = run_sup(*FAST, "--silence-timeout", "1", child=child_cmd("silent", 30), cwd=tmp_path)
    assert r.returncode == 124 and re.search(rb"STALL no output for \d+s \(limit 1s\); action=kill", r.stderr)


def test_progress_regex_counts_matching_lines_only(tmp_path):
    # Lines "step N" match; the stall comes once they stop, heartbeats from the thread notwithstanding.
    r = run_sup(*FAST, "--stall-timeout", "1", "--progress-regex", r"^step \d+", "--progress-file", "p.txt",
                child=child_cmd("progress", tmp_path / "p.txt", 3, 0.3), cwd=tmp_path)
    assert r.returncode == 0 and b"STALL" not in r.stderr
    r = run_sup(*FAST, "--stall-timeout", "1", "--progress-regex", r"^never matches",
                child=child_cmd("progress", tmp_path / "p.txt", 30, 0.1), cwd=tmp_path)
    assert r.returncode == 124 and b"STALL" in r.stderr and b"in output" in r.stderr


def test_garbage_progress_file_is_survived(tmp_path):
    r = run_sup("--heartbeat", "0.2", "--stall-timeout", "5", child=child_cmd("garbage-progress"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert b"Traceback" not in r.stderr
    beats = [line for line in sup_lines(r.stderr) if "heartbeat" in line]
    assert beats and all(len(line) < 400 for line in beats)
    assert not any("\x1b" in line or "\x00" in line for line in beats)


def test_warn_repeats_and_leaves_the_child_alone(tmp_path):
    alert_file = tmp_path / "alerts"
    cmd = f"sh -c 'echo $SUPERVISE_EVENT >> {alert_file}'"
    r = run_sup(*FAST, "--stall-timeout", "0.6", "--on-stall", "warn", "--alert-cmd", cmd,
                child=child_cmd("progress", tmp_path / "PROGRESS.txt", 2, 2.0), cwd=tmp_path)
    assert r.returncode == 0  # the child finished on its own
    stalls = [line for line in sup_lines(r.stderr) if "STALL" in line]
    assert len(stalls) >= 2 and all("action=warn" in line for line in stalls)
    wait_for(lambda: alert_file.exists() and alert_file.read_text().split().count("stall") >= 2, 10)


def test_alert_command_gets_the_event_and_failures_are_not_fatal(tmp_path):
    ev = tmp_path / "events"
    out = tmp_path / "alert.json"
    cmd = f"sh -c 'printf %s \"$SUPERVISE_EVENT_JSON\" > {out}; exit 1'"
    r = run_sup(*FAST, "--events", str(ev), "--alert-cmd", cmd, child=child_cmd("exit", 4), cwd=tmp_path)
    assert r.returncode == 4
    assert json.loads(out.read_text())["event"] == "exit"
    failed = [e for e in events(ev) if e["event"] == "alert-failed"]
    assert failed and failed[0]["hook"] == "cmd"


def test_per_rank_files_beside_the_default_are_tracked_and_the_stalest_decides(tmp_path):
    r = run_sup(*FAST, "--stall-timeout", "1", child=child_cmd("ranks"), cwd=tmp_path)
    assert r.returncode == 124
    assert re.search(rb"STALL no progress for \d+s \(limit 1s\) in PROGRESS-rank1.txt; action=kill \| rank 1 step 1",
                     r.stderr), r.stderr


def test_glob_progress_file(tmp_path):
    (tmp_path / "runs").mkdir()
    r = run_sup(*FAST, "--stall-timeout", "1", "--progress-file", "runs/P-*.txt", child=child_cmd("ranks"),
                cwd=tmp_path)
    assert r.returncode == 124 and b"in runs/P-1.txt" in r.stderr


def test_auto_timeout_learns_from_gaps(tmp_path):
    """With auto, the gaps before 5 updates may last the startup grace; a child that stops before then stalls."""
    ev = tmp_path / "events"
    r = run_sup(*FAST, "--stall-timeout", "auto", "--startup-grace", "1.5", "--events", str(ev),
                child=child_cmd("hang-after-progress"), cwd=tmp_path)
    assert r.returncode == 124
    stall = next(e for e in events(ev) if e["event"] == "stall")
    assert stall["limit_s"] == 1.5 and stall["kind"] == "progress"


def test_webhook_receives_alerts(tmp_path):
    import http.server
    import threading

    got = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        r = run_sup(*FAST, "--alert-webhook", f"http://127.0.0.1:{server.server_port}/hook",
                    child=child_cmd("exit", 2), cwd=tmp_path)
        assert r.returncode == 2
        wait_for(lambda: got, 5, what="webhook POST")
        assert got[0]["event"]["event"] == "exit" and "exit status=2" in got[0]["text"]
    finally:
        server.shutdown()
