"""The supervisor's own trouble never costs the child its run (issue 7, SPEC 4).

Each test drives the real supervisor against a real child and a hostile machine:
full disks, non-UTF-8 and escape bytes, a vanished working directory, pid reuse,
stopped and unkillable children, signals at exit. In each: the child's fate is what
it would be without the supervisor, nothing is left running, no traceback.
"""
import json
import os
import re
import resource
import signal
import subprocess
import sys
import time

import psutil
import pytest

from helpers import (PY, LineReader, alive, base_env, events_of, kill_tree_of, no_traceback, run_sup,
                     start_sup, sup_argv, sup_lines, wait_for)


# ----- 1. only new output is progress --------------------------------------------------------------------


def test_a_frozen_progress_bar_is_a_stall(tmp_path):
    """A bar drawn once and never again was re-fed to --progress-regex every 5 s: the hang went unseen."""
    r = run_sup("--progress-regex", "Batch [0-9]+", "--startup-grace", "10", "--stall-timeout", "3",
                "--kill-grace", "1", "--heartbeat", "0",
                child=["sh", "-c", 'printf "\\rBatch 5/100"; exec sleep 40'], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124
    assert any("STALL no progress" in line for line in sup_lines(r.stderr))
    no_traceback(r.stderr)


# ----- 2. a full disk turns a sink off; the child runs on --------------------------------------------------


CHILD_3 = ["sh", "-c", "echo one; sleep 0.3; echo two >&2; sleep 0.3; echo three; exit 3"]


def test_log_on_a_full_disk_is_turned_off_and_the_child_runs_on(tmp_path):
    events = tmp_path / "ev"
    r = run_sup("--log", "/dev/full", "--events", str(events), child=CHILD_3, cwd=tmp_path)
    assert r.returncode == 3 and r.stdout == b"one\nthree\n"
    assert sum("--log file /dev/full failed: No space left on device" in line for line in sup_lines(r.stderr)) == 1
    evs = events_of(events)
    failed = [e for e in evs if e["event"] == "sink-failed"]
    assert [(e["sink"], e["error"]) for e in failed] == [("log", "No space left on device")]
    assert evs[-1]["event"] == "exit" and evs[-1]["status"] == 3
    no_traceback(r.stderr)


def test_events_on_a_full_disk_are_turned_off_and_the_log_says_so(tmp_path):
    log = tmp_path / "log"
    r = run_sup("--events", "/dev/full", "--log", str(log), child=CHILD_3, cwd=tmp_path)
    assert r.returncode == 3
    said = [line for line in sup_lines(r.stderr) if "--events file /dev/full failed" in line]
    assert len(said) == 1
    assert b"sup| [supervise" in log.read_bytes() and b"--events file /dev/full failed" in log.read_bytes()
    assert b"exit status=3" in log.read_bytes()
    no_traceback(r.stderr)


def test_stdout_on_a_full_disk_is_reported_on_stderr_and_the_child_runs_on(tmp_path):
    with open("/dev/full", "wb") as full:
        r = run_sup("--log", str(tmp_path / "log"), child=CHILD_3, cwd=tmp_path, stdout=full)
    assert r.returncode == 3
    assert any("terminal stdout failed: No space left on device" in line for line in sup_lines(r.stderr))
    assert b"out| three" in (tmp_path / "log").read_bytes()  # the log still has everything
    no_traceback(r.stderr)


def test_a_file_size_limit_mid_run_stops_the_log_not_the_run(tmp_path):
    """ulimit -f: the log's writes fail with EFBIG (and SIGXFSZ, which must not kill the supervisor)."""
    log, events = tmp_path / "log", tmp_path / "ev"

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))

    r = run_sup("--log", str(log), "--events", str(events),
                child=["sh", "-c", "i=0; while [ $i -lt 3000 ]; do echo line-$i-padded-to-be-a-bit-longer; "
                       "i=$((i+1)); done; exit 0"], cwd=tmp_path, preexec_fn=limit)
    assert r.returncode == 0
    assert r.stdout.count(b"\n") == 3000  # the terminal got every line
    assert any("--log file" in line and "File too large" in line for line in sup_lines(r.stderr)), r.stderr
    no_traceback(r.stderr)


# ----- 3, 4, 10. text from outside never crashes or forges a line -----------------------------------------


def test_non_utf8_argument_is_shown_escaped_and_the_stall_path_works(tmp_path):
    events = tmp_path / "ev"
    argv = [sys.executable, "-m", "supervisor", "--events", str(events), "--progress-file", str(tmp_path / "P"),
            "--stall-timeout", "1", "--kill-grace", "1", "--", "sh", "-c", "exec sleep 20", b"x\xff\x1b[2J".decode(
                "utf-8", "surrogateescape")]
    r = subprocess.run(argv, env=base_env(), cwd=tmp_path, capture_output=True, timeout=30)
    assert r.returncode == 124, r.stderr
    start = next(e for e in events_of(events) if e["event"] == "start")
    assert start["argv"][-1] == "x\\xff\x1b[2J"  # the event keeps the text; JSON escapes ESC itself
    assert b"\x1b" not in r.stderr
    no_traceback(r.stderr)


def test_hostile_progress_file_names_are_escaped_in_every_line(tmp_path):
    """Names with ESC, BEL, a newline and a non-UTF-8 byte: nothing raw reaches the terminal or the log."""
    bad = os.fsencode(tmp_path) + b"/P\x1b]0;owned\x07\n[supervise 00:00:00] exit status=0 \xff.txt"
    log = tmp_path / "log"
    code = ("import os, sys, threading; p = sys.argv[1].encode('utf-8', 'surrogateescape'); "
            "open(p, 'w').write('Epoch 1\\x1b[2J\\n'); threading.Event().wait()")
    r = run_sup("--progress-file", str(tmp_path) + "/P*", "--stall-timeout", "1.5", "--kill-grace", "1",
                "--log", str(log), child=[PY, "-c", code, os.fsdecode(bad)], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124
    stall = next(line for line in sup_lines(r.stderr) if "STALL" in line)
    assert "\\x1b]0;owned\\x07\\n[supervise 00:00:00] exit status=0 \\xff.txt" in stall
    assert b"\x1b" not in r.stderr and b"\x07" not in r.stderr
    forged = [ln for ln in log.read_bytes().splitlines() if re.match(rb"^\S+ sup\| \[supervise 00:00:00\]", ln)]
    assert forged == []
    no_traceback(r.stderr)


def test_a_deleted_working_directory_does_not_crash_the_stall_path(tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    r = run_sup("--progress-file", str(tmp_path / "never.txt"), "--stall-timeout", "1.5", "--kill-grace", "1",
                child=["sh", "-c", 'cd / && rmdir "$0" && exec sleep 30', str(work)], cwd=work, timeout_s=30)
    assert r.returncode == 124 and not work.exists()
    assert any("STALL no progress" in line for line in sup_lines(r.stderr))
    no_traceback(r.stderr)


# ----- 5. never a reaped child's group -------------------------------------------------------------------


@pytest.mark.heavy  # rewinds the machine's next pid: beside other tests it hands out their dead pids again
def test_a_reaped_childs_group_id_given_to_another_process_is_never_signalled(tmp_path):
    """Reproduce pid reuse for real: hand the reaped child's pid to an unrelated session leader."""
    from supervisor import child as childmod

    try:
        with open("/proc/sys/kernel/ns_last_pid", "w"):
            pass
    except OSError:
        pytest.skip("cannot set the next pid here (/proc/sys/kernel/ns_last_pid)")
    for _ in range(20):
        kid = childmod.spawn(["true"], dict(os.environ))
        wait_for(kid.reap, 10, what="child exit")
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(kid.pid - 1))
        stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
        if stranger.pid == kid.pid:
            break
        stranger.kill()
        stranger.wait()
    else:
        pytest.skip("another process took the pid every time")
    try:
        assert os.getpgid(stranger.pid) == kid.pid  # the number is now another process's group
        assert kid.signal_group(signal.SIGTERM) is False
        time.sleep(0.2)  # give a wrongly sent signal time to land
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


# ----- 6. the supervisor's own files are never progress --------------------------------------------------


def test_own_log_and_events_matched_by_the_glob_are_not_progress(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    r = run_sup("--progress-file", str(d) + "/*", "--log", str(d / "sup.log"), "--events", str(d / "ev.jsonl"),
                "--heartbeat", "0.2", "--stall-timeout", "2", "--kill-grace", "1",
                child=["sh", "-c", "echo work > $0/P.txt; exec sleep 30", str(d)], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124
    assert any("STALL no progress" in line and "P.txt" in line for line in sup_lines(r.stderr))


# ----- 7. responsive to signals at the exit flush ---------------------------------------------------------


def test_sigterm_ends_a_supervisor_waiting_on_a_stalled_terminal_at_exit(tmp_path):
    """No --log, nobody reads our stdout: after the child ends, SIGTERM must end us as it ends cat."""
    r_fd, w_fd = os.pipe()
    done = tmp_path / "done"
    child = ["sh", "-c", f"head -c 1500000 /dev/zero; echo $$ > {done}"]  # more than our stdout pipe holds
    p = subprocess.Popen(sup_argv(child=child), stdout=w_fd, stderr=subprocess.PIPE,
                         env=base_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    os.close(w_fd)
    try:
        # The child has written everything into its pipe and exited; we are stuck relaying it.
        pid = int(wait_for(lambda: done.exists() and done.read_text().strip(), 20, what="the child's last write"))
        wait_for(lambda: not alive(pid), 20, what="the child to exit")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        os.close(r_fd)
        if p.poll() is None:
            kill_tree_of(p)


def test_sigterm_right_after_the_child_ended_but_before_we_reaped_it_is_for_us(tmp_path):
    """The child is a zombie when our SIGTERM is read: it is no longer the child's to take, but ours, as
    for cat. It used to go to the dead group and be lost: the run exited 0, or, with the terminal full,
    waited on it for ever (the loaded run that found this). Stopping the supervisor makes the window
    certain instead of a race."""
    r_fd, w_fd = os.pipe()
    wrote, go = tmp_path / "wrote", tmp_path / "go"
    # About what our stdout pipe holds (nobody reads it), and less than that plus the child's pipe:
    # the child can still end while we are stopped.
    child = ["sh", "-c", f"head -c 100000 /dev/zero; touch {wrote}; while [ ! -e {go} ]; do sleep 0.02; done"]
    p = subprocess.Popen(sup_argv(child=child), stdout=w_fd, stderr=subprocess.PIPE,
                         env=base_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    os.close(w_fd)
    try:
        wait_for(wrote.exists, 20, what="the child's output")
        kid = psutil.Process(p.pid).children()[0]
        os.kill(p.pid, signal.SIGSTOP)
        go.touch()
        wait_for(lambda: kid.status() == psutil.STATUS_ZOMBIE, 20, what="the child to end")
        os.kill(p.pid, signal.SIGTERM)
        os.kill(p.pid, signal.SIGCONT)
        assert p.wait(timeout=10) == 128 + signal.SIGTERM
    finally:
        os.close(r_fd)
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)
            kill_tree_of(p)


# ----- 8. a stopped child is woken to run its handlers ----------------------------------------------------


def test_a_stopped_child_gets_sigcont_and_checkpoints_on_sigterm(tmp_path):
    mark = tmp_path / "checkpointed"
    code = ("import os, signal, sys, threading\n"
            "def term(*_):\n    open(sys.argv[1], 'w').write('saved'); os._exit(143)\n"
            "signal.signal(signal.SIGTERM, term)\nprint('ready', flush=True)\nos.kill(os.getpid(), signal.SIGSTOP)\n"
            "threading.Event().wait()\n")
    r = run_sup("--progress-file", str(tmp_path / "never"), "--stall-timeout", "1", "--kill-grace", "20",
                child=[PY, "-c", code, str(mark)], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124
    assert mark.read_text() == "saved"  # its SIGTERM handler ran: it was not left stopped for 20 s


# ----- 11, 12. hooks are ours, and they know the child's pid ------------------------------------------------


def test_an_escaped_alert_hook_is_not_the_childs(tmp_path):
    events = tmp_path / "ev"
    r = run_sup("--alert-cmd", "setsid sleep 4", "--on-stall", "warn", "--progress-file", str(tmp_path / "P"),
                "--stall-timeout", "0.5", "--events", str(events),
                child=["sh", "-c", "sleep 2.5; exit 0"], cwd=tmp_path, timeout_s=40)
    assert r.returncode == 0
    evs = events_of(events)
    assert not [e for e in evs if e["event"] == "orphans"]
    for diag in (e for e in evs if e["event"] == "diagnosis"):
        assert all("sleep 4" not in p["cmd"] for p in diag["processes"])


def test_alert_command_gets_the_childs_pid(tmp_path):
    out, events = tmp_path / "pid", tmp_path / "ev"
    r = run_sup("--alert-cmd", f"sh -c 'echo $SUPERVISE_PID >> {out}'", "--events", str(events),
                child=["sh", "-c", "exit 4"], cwd=tmp_path, timeout_s=40)
    assert r.returncode == 4
    start = next(e for e in events_of(events) if e["event"] == "start")
    assert out.read_text().split() == [str(start["pid"])]


# ----- 14. secrets stay secret ------------------------------------------------------------------------------


def test_supervise_variables_never_reach_the_child(tmp_path):
    env = base_env(MAGVIT_SUPERVISE_ALERT_WEBHOOK="http://bot:SECRET@127.0.0.1:9/x", MAGVIT_SUPERVISE_HEARTBEAT="0")
    r = run_sup(child=["sh", "-c", "env"], cwd=tmp_path, env=env, timeout_s=40)
    assert b"SECRET" not in r.stdout and b"MAGVIT_SUPERVISE_" not in r.stdout
    assert b"SECRET" not in r.stderr


# ----- 15. our lines never glue onto the child's ------------------------------------------------------------


@pytest.mark.parametrize("into", ["file", "pipe"])
def test_a_heartbeat_after_a_partial_stdout_line_starts_on_its_own_line(tmp_path, into):
    child = ["sh", "-c", "printf Loading...; sleep 1.2; echo done"]
    if into == "file":
        with open(tmp_path / "both", "wb") as f:
            r = run_sup("--heartbeat", "0.5", child=child, cwd=tmp_path, stdout=f, stderr=subprocess.STDOUT)
        data = (tmp_path / "both").read_bytes()
    else:
        r = run_sup("--heartbeat", "0.5", child=child, cwd=tmp_path, stderr=subprocess.STDOUT)
        data = r.stdout
    assert r.returncode == 0
    assert data.startswith(b"Loading...\n[supervise "), data
    assert b"...[supervise" not in data


# ----- 16. bad input is one line, never a traceback or a hang ----------------------------------------------


@pytest.mark.parametrize("argv,env,needle", [
    (["--max-restarts", "\u00b2"], {}, "--max-restarts '\u00b2'"),
    ([], {"MAGVIT_SUPERVISE_MAX_RESTARTS": "\u00b2"}, "MAGVIT_SUPERVISE_MAX_RESTARTS"),
    (["--max-restarts", "99999999999999999999999"], {}, "--max-restarts"),
    (["--alert-webhook", "ftp://bot:TOKEN@host/x"], {}, "ftp://host"),
])
def test_bad_option_values_are_one_line(tmp_path, argv, env, needle):
    r = run_sup(*argv, child=["true"], cwd=tmp_path, env=base_env(**env))
    assert r.returncode == 125
    assert needle in r.stderr.decode() and r.stderr.count(b"\n") == 1 and b"TOKEN" not in r.stderr


def test_a_log_fifo_with_no_reader_is_refused_at_once(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    r = run_sup("--log", str(fifo), child=["true"], cwd=tmp_path, timeout_s=10)
    assert r.returncode == 125 and b"no reader" in r.stderr


def test_a_script_without_shebang_runs_with_sh_and_a_busy_binary_is_126(tmp_path):
    script = tmp_path / "script"
    script.write_text("echo from sh $1\n")
    script.chmod(0o755)
    r = run_sup(child=[str(script), "arg"], cwd=tmp_path)
    assert r.returncode == 0 and r.stdout == b"from sh arg\n"
    busy = tmp_path / "busy"
    busy.write_bytes(open("/bin/true", "rb").read())
    busy.chmod(0o755)
    with open(busy, "r+b"):  # open for writing: execve fails with ETXTBSY
        r = run_sup(child=[str(busy)], cwd=tmp_path)
    assert r.returncode == 126, r.stderr


# ----- suspected: a process that survives SIGKILL -----------------------------------------------------------


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_a_process_that_survives_sigkill_is_reported_unkillable_and_we_exit_124(tmp_path):
    from helpers_freezer import frozen

    pidfile = tmp_path / "pid"
    events = tmp_path / "ev"
    p = start_sup("--progress-file", str(tmp_path / "never"), "--stall-timeout", "1", "--kill-grace", "0.5",
                  "--on-stall", "restart", "--events", str(events),
                  child=["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"], cwd=tmp_path)
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 10, what="pid"))
        with frozen(pid):
            assert p.wait(timeout=30) == 124
            evs = events_of(events)
            unk = [e for e in evs if e["event"] == "unkillable"]
            assert len(unk) == 1 and unk[0]["pids"] == [pid] and unk[0]["states"] == ["D"]
            assert not [e for e in evs if e["event"] == "restart"]  # never a restart on top of it
            assert evs[-1]["event"] == "exit" and evs[-1]["reason"] == "unkillable"
        wait_for(lambda: not alive(pid), 10, what="the thawed process to die")
    finally:
        if p.poll() is None:
            kill_tree_of(p)


def test_sigterm_while_an_exit_hook_runs_ends_us_promptly_and_the_hook_too(tmp_path):
    """The exit alert's command may take its 30 s; a user's SIGTERM does not wait for it."""
    mark = tmp_path / "hook"
    p = start_sup("--alert-cmd", f"sh -c 'echo $$ > {mark}; exec sleep 60'", "--events", str(tmp_path / "ev"),
                  child=["sh", "-c", "exit 3"], cwd=tmp_path)
    try:
        hook = int(wait_for(lambda: mark.exists() and mark.read_text().strip(), 20, what="the exit hook"))
        started = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 5
        wait_for(lambda: not alive(hook), 5, what="the hook to be ended")
        assert any(e["event"] == "alert-failed" for e in events_of(tmp_path / "ev"))
    finally:
        if p.poll() is None:
            kill_tree_of(p)


# ----- a signal in each phase ----------------------------------------------------------------------------------


def left_running(token: str) -> list[int]:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if token in " ".join(proc.info["cmdline"] or []) and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            pass
    return found


@pytest.mark.parametrize("phase", ["start", "relay", "diagnosis", "back-off"])
def test_sigterm_in_each_phase_ends_the_run_promptly_and_leaves_nothing(tmp_path, phase):
    token = f"phase-token-{phase}-{os.getpid()}"
    events = tmp_path / "ev"
    if phase == "relay":
        child = ["sh", "-c", f"while :; do echo {token}; sleep 0.01; done"]
        opts = ()
    elif phase == "back-off":
        child = ["sh", "-c", f"exit 3 # {token}"]
        opts = ("--restart-on-crash", "--max-restarts", "5")
    else:
        child = [PY, "-c", "import sys, threading; print('ready', flush=True); threading.Event().wait()", token]
        opts = ("--progress-file", str(tmp_path / "never"), "--stall-timeout", "1", "--kill-grace", "30")
    p = start_sup("--events", str(events), *opts, child=child, cwd=tmp_path)
    err = LineReader(p.stderr)
    try:
        if phase == "relay":
            LineReader(p.stdout).wait_for(token.encode())
        elif phase == "diagnosis":
            err.wait_for(b"STALL", 20)  # the diagnosis (py-spy) is under way now
        elif phase == "back-off":
            err.wait_for(b"RESTART attempt 3/5", 30)  # now in a 4 s back-off
        p.send_signal(signal.SIGTERM)
        status = p.wait(timeout=15)
        err.pump()
        assert b"Traceback" not in err.data and b"internal error" not in err.data
        wait_for(lambda: not left_running(token), 10, what="nothing left running")
        if phase == "relay":
            assert status == 128 + signal.SIGTERM  # the child died of the forwarded SIGTERM
        elif phase == "back-off":
            assert status == 128 + signal.SIGTERM
            assert not any("attempt 4" in line for line in sup_lines(err.data))
        elif phase == "diagnosis":
            assert status == 128 + signal.SIGTERM  # the user's signal, not the stall's 124 (SPEC 4, issue 16)
    finally:
        if p.poll() is None:
            kill_tree_of(p)


def test_spawning_while_our_threads_are_busy_never_deadlocks_the_fork():
    """preexec_fn runs Python between fork and exec; with threads alive that can deadlock on a lock
    a thread held at fork time. Ours only calls prctl through a prepared ctypes function (no
    import, no allocation, no lock), so spawns go through while writer- and hook-like threads churn."""
    import threading

    from supervisor import child as childmod

    stop = threading.Event()

    def churn():
        lock = threading.Lock()
        while not stop.is_set():
            with lock:
                data = [bytes(4096) for _ in range(64)]  # malloc under a lock
            json.dumps({"x": len(data)})
            os.write(devnull, b"x" * 512)

    devnull = os.open(os.devnull, os.O_WRONLY)
    threads = [threading.Thread(target=churn, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(15):
            kid = childmod.spawn(["true"], dict(os.environ))
            wait_for(kid.reap, 10, what="the spawned child to exit (a deadlocked fork never would)")
            assert kid.status == 0
            for fd in kid.fds.values():
                os.close(fd)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
        os.close(devnull)


@pytest.mark.parametrize("stream", ["stdout", "stderr", "both"])
def test_a_closed_reader_on_either_stream_costs_the_child_nothing(tmp_path, stream):
    """EPIPE on our stdout or stderr (the reader went away): that sink is off, the log has everything."""
    log = tmp_path / "log"
    pipes = {}
    for name in ("stdout", "stderr"):
        if stream in (name, "both"):
            r_fd, w_fd = os.pipe()
            os.close(r_fd)  # nobody will ever read: every write gets EPIPE
            pipes[name] = w_fd
    try:
        r = run_sup("--log", str(log), "--heartbeat", "0.2",
                    child=["sh", "-c", "echo out; echo err >&2; sleep 0.5; echo more; exit 3"], cwd=tmp_path,
                    **pipes)
    finally:
        for fd in pipes.values():
            os.close(fd)
    assert r.returncode == 3
    data = log.read_bytes()
    assert b"out| out" in data and b"err| err" in data and b"out| more" in data
    assert b"exit status=3" in data
    assert b"Traceback" not in data


def test_a_progress_write_in_the_childs_first_milliseconds_is_progress(tmp_path):
    """The baseline is taken before the spawn: a write the child makes at once is not mistaken for old."""
    progress = tmp_path / "P.txt"
    r = run_sup("--progress-file", str(progress), "--startup-grace", "2", "--stall-timeout", "60",
                child=["sh", "-c", f"echo step > {progress}; sleep 3"], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("kind", ["fifo", "dangling-symlink", "directory"])
def test_a_progress_path_that_is_no_file_never_hangs_or_counts(tmp_path, kind):
    path = tmp_path / "P.txt"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dangling-symlink":
        path.symlink_to(tmp_path / "gone")
    else:
        path.mkdir()
    started = time.monotonic()
    r = run_sup("--progress-file", str(path), "--stall-timeout", "1.5", "--kill-grace", "1", "--heartbeat", "0.3",
                child=["sh", "-c", "exec sleep 30"], cwd=tmp_path, timeout_s=30)
    assert r.returncode == 124 and time.monotonic() - started < 15
    assert any("heartbeat" in line and "progress=none" in line for line in sup_lines(r.stderr))
    no_traceback(r.stderr)


def test_a_child_that_stops_on_the_users_sigusr1_is_not_restarted_as_a_crash(tmp_path):
    """Slurm's warning: the job checkpoints and stops (non-zero) on USR1; --restart-on-crash must not undo that."""
    code = ("import os, signal, sys, threading\n"
            "signal.signal(signal.SIGUSR1, lambda *_: os._exit(128 + signal.SIGUSR1))\n"
            "print('ready', flush=True); threading.Event().wait()\n")
    events = tmp_path / "ev"
    p = start_sup("--restart-on-crash", "--events", str(events), "--heartbeat", "0", child=[PY, "-c", code],
                  cwd=tmp_path)
    try:
        LineReader(p.stdout).wait_for(b"ready", 20)
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=20) == 128 + signal.SIGUSR1
        assert not [e for e in events_of(events) if e["event"] == "restart"]
    finally:
        if p.poll() is None:
            kill_tree_of(p)
