"""Exit statuses, environment, signals and leftovers, against real children."""
import json
import os
import re
import signal
import stat
import time

from helpers import (LineReader, alive, base_env, child_cmd, kill_tree_of, run_sup, start_sup, sup_lines, wait_for)


def test_exit_status_is_the_childs(tmp_path):
    r = run_sup("--heartbeat", "0", child=child_cmd("exit", 3), cwd=tmp_path)
    assert r.returncode == 3 and r.stdout == b"exiting\n"
    assert "exit status=3 reason=exited" in sup_lines(r.stderr)[-1]


def test_death_by_signal_is_128_plus_n(tmp_path):
    r = run_sup("--heartbeat", "0", child=child_cmd("signal", int(signal.SIGKILL)), cwd=tmp_path)
    assert r.returncode == 137
    assert "exit status=137 reason=signal" in sup_lines(r.stderr)[-1]


def test_missing_and_unexecutable_commands_like_timeout(tmp_path):
    r = run_sup(child=["/no/such/command"], cwd=tmp_path)
    assert r.returncode == 127 and b"cannot run '/no/such/command': No such file or directory" in r.stderr
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(stat.S_IRUSR)
    r = run_sup(child=[str(script)], cwd=tmp_path)
    assert r.returncode == 126 and b"Permission denied" in r.stderr
    assert b"Traceback" not in r.stderr


def test_bad_options_exit_125_with_one_line(tmp_path):
    for argv, env in ((["--heartbeat", "5x"], {}), ([], {"MAGVIT_SUPERVISE_STALL_TIMEOUT": "forever"})):
        r = run_sup(*argv, child=["true"], cwd=tmp_path, env=base_env(**env))
        assert r.returncode == 125
        assert r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"magvit-supervise: invalid --")
    r = run_sup(child=[], cwd=tmp_path)
    assert r.returncode == 125 and b"no command" in r.stderr and b"usage:" in r.stderr


def test_child_environment_session_and_stdin(tmp_path):
    r = run_sup("--heartbeat", "0", child=child_cmd("env"), cwd=tmp_path)
    out = r.stdout.decode()
    assert "PYTHONUNBUFFERED=1\n" in out and "PYTHONFAULTHANDLER=1\n" in out and "MAGVIT_SUPERVISED=1\n" in out
    assert f"MAGVIT_PROGRESS_FILE={tmp_path}/PROGRESS.txt\n" in out and "MAGVIT_RESTART_COUNT=0\n" in out
    assert "stdin=''\n" in out and "own_session=True own_group=True" in out and "stdout_tty=False" in out


def test_user_signals_are_forwarded_and_sighup_ignored(tmp_path):
    trap = tmp_path / "trap"
    p = start_sup("--heartbeat", "0", child=child_cmd("trap", trap), cwd=tmp_path)
    try:
        LineReader(p.stdout).wait_for(b"ready")
        p.send_signal(signal.SIGHUP)
        p.send_signal(signal.SIGUSR1)
        wait_for(lambda: trap.exists() and "SIGUSR1" in trap.read_text(), 5, what="USR1 at the child")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0  # the child's own status: it exits 0 on TERM
        assert trap.read_text().split() == ["SIGUSR1", "SIGTERM"]  # no SIGHUP reached it
        assert b"reason=user-signal" in p.stderr.read()
    finally:
        kill_tree_of(p)


def test_second_sigint_kills_a_child_that_ignores_it(tmp_path):
    p = start_sup("--heartbeat", "0", child=child_cmd("ignore-term"), cwd=tmp_path)
    try:
        out = LineReader(p.stdout)
        pid = int(re.search(rb"pid: (\d+)", out.wait_for(b"ready")).group(1))
        p.send_signal(signal.SIGINT)
        time.sleep(0.1)  # two presses, 0.1 s apart: well within the 2 s window
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=10) == 128 + signal.SIGKILL
        assert not alive(pid)
    finally:
        kill_tree_of(p)


def test_grandchild_holding_stdout_is_ended_and_reported(tmp_path):
    pidfile = tmp_path / "gc"
    t0 = time.monotonic()
    r = run_sup("--heartbeat", "0", "--kill-grace", "5", child=child_cmd("grandchild", pidfile), cwd=tmp_path)
    assert r.returncode == 0
    assert time.monotonic() - t0 < 5, "a grandchild that dies on SIGTERM is not waited on for the grace"
    gc = int(pidfile.read_text())
    assert not alive(gc)
    assert any(line.split("] ", 1)[1].startswith(f"ORPHANS 1 process(es) left behind by the child: [{gc}]")
               for line in sup_lines(r.stderr))
    assert r.stdout.startswith(b"left grandchild")


def test_double_forked_daemon_is_found_and_ended(tmp_path):
    pidfile = tmp_path / "daemon"
    r = run_sup("--heartbeat", "0", "--kill-grace", "1", child=child_cmd("daemon", pidfile), cwd=tmp_path)
    assert r.returncode == 5
    daemon = int(pidfile.read_text())
    wait_for(lambda: not alive(daemon), 3, what="daemon gone")
    assert b"ORPHANS" in r.stderr


def test_child_that_ignores_term_is_killed_after_the_grace(tmp_path):
    """Orphans that ignore SIGTERM: SIGKILL after --kill-grace."""
    script = ("import os,signal,threading\n"
              "if os.fork()==0:\n signal.signal(signal.SIGTERM, signal.SIG_IGN); threading.Event().wait()\n"
              "print('parent out', flush=True)")
    t0 = time.monotonic()
    r = run_sup("--heartbeat", "0", "--kill-grace", "0.5", child=["python3", "-c", script], cwd=tmp_path)
    assert r.returncode == 0 and b"ORPHANS" in r.stderr
    assert 0.4 < time.monotonic() - t0 < 6


def test_supervisor_killed_outright_sends_child_sigterm(tmp_path):
    trap = tmp_path / "trap"
    p = start_sup("--heartbeat", "0", child=child_cmd("trap", trap), cwd=tmp_path)
    try:
        LineReader(p.stdout).wait_for(b"ready")
        p.kill()
        p.wait()
        wait_for(lambda: trap.exists() and "SIGTERM" in trap.read_text(), 5, what="SIGTERM at the orphaned child")
    finally:
        kill_tree_of(p)


def test_heartbeat_while_silent_with_progress_line(tmp_path):
    progress = tmp_path / "PROGRESS.txt"
    progress.write_text("Epoch 1/1 - left over from an old run\n")  # no progress, and never shown
    events = tmp_path / "events"
    p = start_sup("--heartbeat", "0.3", "--events", str(events), child=child_cmd("progress", progress, 1, 30),
                  cwd=tmp_path)
    try:
        err = LineReader(p.stderr)
        line = wait_for(lambda: re.search(rb"\[supervise [^\n]*heartbeat [^\n]*Step[^\n]*\n", err.pump()), 10)
        line = line.group().decode()
        assert b"left over" not in err.data
        assert re.match(r"\[supervise \d\d:\d\d:\d\d\] heartbeat pid=\d+ up=\d+s silent=\d+s progress=\d+s-ago "
                        r"cpu=\d+% rss=[\d.]+[KMG] \| Step 1/1$", line.strip()), line
        beats = [e for e in map(json.loads, events.read_text().splitlines()) if e["event"] == "heartbeat"]
        last = beats[-1]
        assert set(last) == {"ts", "event", "pid", "silent_s", "progress_age_s", "cpu_percent", "rss_bytes", "progress",
                             "expect_s", "eta_s", "up_s", "rate", "step"}
        assert last["progress"] == "Step 1/1" and last["progress_age_s"] >= 0 and last["rss_bytes"] > 1 << 20
        assert beats[0]["progress_age_s"] is None or beats[0]["progress"] is not None
    finally:
        kill_tree_of(p)


def test_ssh_drop_terminal_hangs_up_child_keeps_running_log_keeps_everything(tmp_path):
    """The SSH session dies: the pty goes away (EIO on write) and SIGHUP arrives."""
    import pty

    log = tmp_path / "log"
    script = "import time\nfor i in range(40):\n    print(f'tick {i}', flush=True); time.sleep(0.03)\n"
    master, slave = pty.openpty()
    p = start_sup("--heartbeat", "0", "--log", str(log), child=["python3", "-c", script], cwd=tmp_path,
                  stdout=slave, stderr=slave)
    os.close(slave)
    try:
        wait_for(lambda: b"tick 1" in os.read(master, 4096), 10, what="first ticks on the terminal")
        os.close(master)  # the terminal is gone: writes now fail with EIO
        p.send_signal(signal.SIGHUP)
        assert p.wait(timeout=20) == 0
        text = log.read_bytes()
        assert all(b" out| tick %d\n" % i in text for i in range(40))
        assert b"exit status=0 reason=exited" in text
    finally:
        kill_tree_of(p)


def test_unwritable_log_is_a_one_line_error(tmp_path):
    r = run_sup("--log", str(tmp_path / "no" / "such" / "dir" / "log"), child=["true"], cwd=tmp_path)
    assert r.returncode == 125 and r.stderr.count(b"\n") == 1 and b"No such file or directory" in r.stderr
