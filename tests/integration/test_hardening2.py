"""The supervisor's own trouble never costs the child its run, round two (issue 16, SPEC 4 and 5).

Real supervisors, real processes: the pty into a pipe (`| cat`), a stdout nobody reads, a
stand-in NCCL rank whose flight-recorder FIFO is open, stand-in py-spy and torchfrtrace that
take their time, a leftover that ignores SIGTERM. In each: output is never lost, the child's
ending is never mislabelled, a user's signal ends the run promptly, and a healthy child is
never killed or restarted.
"""
import fcntl
import os
import signal
import struct
import subprocess
import termios
import time

import psutil
import pytest

from helpers import (PY, LineReader, alive, base_env, child_cmd, events_of, kill_tree_of, no_traceback,
                     run_sup, start_sup, sup_argv, sup_lines, wait_for)


def unread_bytes(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]


# ----- 1. --pty into a pipe: the source's end is not a dead destination -------------------------------------------


def test_pty_into_a_pipe_relays_every_attempt_and_says_nothing_of_a_dead_terminal(tmp_path):
    """The pty master's EIO (the child closed its side) was taken for our stdout dying: attempt 1 was lost."""
    code = ("import os, sys\n"
            "first = not os.path.exists('first-done')\n"
            "for i in range(3): print(f'attempt {0 if first else 1} line {i}', flush=True)\n"
            "open('first-done', 'w').close()\n"
            "sys.exit(1 if first else 0)\n")
    r = run_sup("--pty", "--restart-on-crash", "--heartbeat", "0", child=[PY, "-c", code], cwd=tmp_path,
                timeout_s=40)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [f"attempt {a} line {i}".encode() for a in (0, 1) for i in range(3)]
    assert not any("gone" in line or "failed" in line for line in sup_lines(r.stderr)), r.stderr
    no_traceback(r.stderr)


def test_pty_one_line_into_a_pipe_has_no_sink_failed_event(tmp_path):
    events = tmp_path / "ev"
    r = run_sup("--pty", "--events", str(events), child=[PY, "-c", "print('hello')"], cwd=tmp_path)
    assert (r.returncode, r.stdout) == (0, b"hello\n")
    assert not [e for e in events_of(events) if e["event"] == "sink-failed"]
    assert not any("gone" in line for line in sup_lines(r.stderr)), r.stderr


# ----- 2. a user's signal bounds the wait on a stdout nobody reads -------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_users_signal_with_an_unread_stdout_ends_the_run(tmp_path, sig):
    """No --log, the reader of our stdout stopped reading, the child blocked writing: SIGTERM must end us."""
    r_fd, w_fd = os.pipe()
    p = subprocess.Popen(sup_argv(child=["sh", "-c", "exec yes"]), stdout=w_fd, stderr=subprocess.PIPE,
                         env=base_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    os.close(w_fd)
    try:
        seen = []

        def full() -> bool:  # our stdout pipe has stopped filling: the child is blocked behind it
            seen.append(unread_bytes(r_fd))
            return len(seen) > 10 and seen[-1] > 0 and seen[-1] == seen[-10]

        wait_for(full, 30, interval_s=0.1, what="our stdout to fill up")
        started = time.monotonic()
        p.send_signal(sig)
        assert p.wait(timeout=30) == 128 + sig
        assert time.monotonic() - started < 20
    finally:
        os.close(r_fd)
        if p.poll() is None:
            kill_tree_of(p)


# ----- 3, 4. a child that ends on its own while a stall's diagnosis is taken ----------------------------------------

# A stand-in rank (what ProcessGroupNCCL does with TORCH_NCCL_DEBUG_INFO_PIPE_FILE): it opens its FIFO and
# never reads it (its watchdog is busy), so the flight recorder waits its whole 20 s for a dump. It writes
# progress once, then takes 5 s over its last step and exits 0: slow, not hung.
SLOW_LAST_STEP = """
import os, sys, time
fifo = os.environ["TORCH_NCCL_DEBUG_INFO_PIPE_FILE"] + "0.pipe"
os.mkfifo(fifo)
fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
with open(os.environ["MAGVIT_PROGRESS_FILE"], "w") as f:
    f.write("step 1/2\\n")
print("ready", flush=True)
time.sleep(float(sys.argv[1]))
print("done", flush=True)
"""


def live_children(pid: int) -> list[int]:
    """The children of pid that are not zombies; one reaped between the two looks is gone, not an error."""
    found = []
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return found


@pytest.fixture(scope="module")
def slow_last_step(tmp_path_factory):
    """One run of SLOW_LAST_STEP under --on-stall restart; the supervisor's CPU while the diagnosis is pending."""
    tmp = tmp_path_factory.mktemp("slow")
    events = tmp / "ev"
    p = start_sup("--flight-recorder", str(tmp / "fr"), "--stall-timeout", "2", "--on-stall", "restart",
                  "--max-restarts", "2", "--kill-grace", "5", "--heartbeat", "0", "--events", str(events),
                  child=[PY, "-c", SLOW_LAST_STEP, "5"], cwd=tmp, env=base_env(MAGVIT_PY_SPY=""))
    out, err = LineReader(p.stdout), LineReader(p.stderr)
    try:
        out.wait_for(b"done", 30)
        wait_for(lambda: b"exit status" in err.pump() or p.poll() is not None or not live_children(p.pid),
                 10, what="the child to be gone")
        cpu_before, wall_before = sum(psutil.Process(p.pid).cpu_times()[:2]), time.monotonic()
        diagnosis_pending = p.poll() is None and b"exit status" not in err.pump()
        time.sleep(4)  # measuring the loop's appetite over a stretch of wall time: a fixed sleep is the point
        cpu_used = sum(psutil.Process(p.pid).cpu_times()[:2]) - cpu_before if p.poll() is None else 0.0
        wall = time.monotonic() - wall_before
        status = p.wait(timeout=60)
        out.pump()
        err.pump()
    finally:
        if p.poll() is None:
            kill_tree_of(p)
    return {"status": status, "stdout": out.data, "stderr": err.data, "events": events_of(events),
            "cpu_s": cpu_used, "wall_s": wall, "pending": diagnosis_pending}


@pytest.mark.timeout(120)
@pytest.mark.xdist_group("slow_last_step")  # one worker: the two share one 22 s run
def test_a_child_that_exits_0_during_the_diagnosis_keeps_its_status_and_is_not_restarted(slow_last_step):
    run = slow_last_step
    assert any("STALL" in line for line in sup_lines(run["stderr"]))
    assert run["stdout"].count(b"ready") == 1, "the job ran twice"
    assert run["status"] == 0, run["stderr"]
    names = [e["event"] for e in run["events"]]
    assert "restart" not in names and "signal" not in names
    assert run["events"][-1]["event"] == "exit" and run["events"][-1]["status"] == 0
    assert run["events"][-1]["reason"] == "exited"
    no_traceback(run["stderr"])


@pytest.mark.timeout(120)
@pytest.mark.xdist_group("slow_last_step")  # one worker: the two share one 22 s run
def test_no_busy_wait_while_a_diagnosis_is_pending_after_the_child_exited(slow_last_step):
    run = slow_last_step
    assert run["pending"], "the diagnosis was over before the measurement: nothing measured"
    assert run["cpu_s"] < 0.25 * run["wall_s"], f"{run['cpu_s']:.2f} s of CPU in {run['wall_s']:.1f} s"


def stalled_in_a_diagnosis(tmp_path, child_code: str, kill_grace: str):
    """Supervise child_code (its argument: 3600 s) under --on-stall restart until the STALL: the flight
    recorder then waits up to 20 s for a dump that never comes. Return the supervisor and its stderr."""
    p = start_sup("--flight-recorder", str(tmp_path / "fr"), "--stall-timeout", "1", "--on-stall", "restart",
                  "--kill-grace", kill_grace, "--heartbeat", "0", "--events", str(tmp_path / "ev"),
                  child=[PY, "-c", child_code, "3600"], cwd=tmp_path, env=base_env(MAGVIT_PY_SPY=""))
    err = LineReader(p.stderr)
    try:
        err.wait_for(b"STALL", 30)
    except BaseException:
        kill_tree_of(p)
        raise
    return p, err


# ----- 5. Ctrl-C during a diagnosis --------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_ctrl_c_during_a_diagnosis_ends_the_run_promptly_with_130(tmp_path):
    events = tmp_path / "ev"
    p, err = stalled_in_a_diagnosis(tmp_path, SLOW_LAST_STEP, kill_grace="5")
    try:
        started = time.monotonic()
        p.send_signal(signal.SIGINT)
        status = p.wait(timeout=30)
        took = time.monotonic() - started
        err.pump()
        assert status == 128 + signal.SIGINT, err.data
        assert took < 8, f"{took:.1f} s after Ctrl-C"
        exit_event = events_of(events)[-1]
        assert (exit_event["event"], exit_event["status"]) == ("exit", 130)
        assert "restart" not in [e["event"] for e in events_of(events)]
        assert b"internal error" not in err.data  # the child's own KeyboardInterrupt traceback is on stderr
    finally:
        if p.poll() is None:
            kill_tree_of(p)


# ----- 6. the diagnosis' own tools are not the child's leftovers ---------------------------------------------------

FAKE_TOOL = """#!/bin/sh
trap 'echo "$0 got SIGTERM" >> {marks}' TERM
touch {started}
sleep 4 & wait $!
sleep 0.1
echo "{text}"
"""

# A rank that answers the flight recorder's byte with a dump (or, with no FIFO, just hangs), then ends on
# its own once the supervisor's tool (py-spy or torchfrtrace) is running.
RANK_THAT_ENDS = """
import os, pickle, sys, time
started = sys.argv[1]
fifo = os.environ.get("TORCH_NCCL_DEBUG_INFO_PIPE_FILE")
fd = None
if fifo:
    os.mkfifo(fifo + "0.pipe")
    fd = os.open(fifo + "0.pipe", os.O_RDONLY | os.O_NONBLOCK)
with open(os.environ["MAGVIT_PROGRESS_FILE"], "w") as f:
    f.write("step 1/2\\n")
print("ready", flush=True)
while fd is not None:
    time.sleep(0.05)
    try:
        if os.read(fd, 16):
            break
    except BlockingIOError:
        pass
if fd is not None:
    with open(os.environ["TORCH_FR_DUMP_TEMP_FILE"] + "0", "wb") as f:
        f.write(pickle.dumps({"version": "2.10", "entries": []}))
while not os.path.exists(started):
    time.sleep(0.05)
print("leaving", flush=True)
"""


@pytest.mark.timeout(90)
@pytest.mark.parametrize("tool", ["py-spy", "torchfrtrace"])
def test_the_diagnosis_tools_still_running_when_the_child_exits_are_not_its_orphans(tmp_path, tool):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marks, started = tmp_path / "marks", tmp_path / "tool-started"
    text = "Thread 1 (idle): MainThread\n    fake_frame (fake.py:1)" if tool == "py-spy" else "FAKE FR SUMMARY"
    fake = bin_dir / tool
    fake.write_text(FAKE_TOOL.format(marks=marks, started=started, text=text))
    fake.chmod(0o755)
    env = base_env(PATH=f"{bin_dir}:{os.environ['PATH']}", MAGVIT_PY_SPY=str(fake) if tool == "py-spy" else "")
    options = ("--flight-recorder", str(tmp_path / "fr") if tool == "torchfrtrace" else "off")
    r = run_sup(*options, "--stall-timeout", "1", "--on-stall", "restart", "--kill-grace", "1", "--heartbeat", "0",
                "--events", str(tmp_path / "ev"), child=[PY, "-c", RANK_THAT_ENDS, str(started)], cwd=tmp_path,
                env=env, timeout_s=60)
    lines = sup_lines(r.stderr)
    assert any("STALL" in line for line in lines)
    assert not any("ORPHANS" in line for line in lines), r.stderr
    assert not marks.exists(), marks.read_text()
    names = [e["event"] for e in events_of(tmp_path / "ev")]
    assert "orphans" not in names and "signal" not in names
    expected = "fake_frame" if tool == "py-spy" else "FAKE FR SUMMARY"
    assert expected.encode() in r.stderr, r.stderr
    assert r.returncode == 0
    no_traceback(r.stderr)


# ----- 8. USR1/USR2 do not turn off --restart-on-crash --------------------------------------------------------------

CRASH_AFTER_SIGNAL = """
import os, signal, sys, threading, time
got = threading.Event()
signal.signal(getattr(signal, sys.argv[1]), lambda *_: (print("stacks on demand", flush=True), got.set()))
if os.path.exists("crashed-once"):
    print("second attempt", flush=True)
    sys.exit(0)
print("ready", flush=True)
got.wait()
time.sleep(float(sys.argv[2]))
open("crashed-once", "w").close()
sys.exit(1)
"""


@pytest.mark.timeout(60)
@pytest.mark.parametrize("sig,crash_after_s", [("SIGUSR2", 2.0), ("SIGUSR1", 3.0)])
def test_a_crash_after_usr1_or_usr2_is_still_restarted(tmp_path, sig, crash_after_s):
    """USR2 is stacks on demand; USR1 answered by carrying on past the grace is no checkpoint stop."""
    events = tmp_path / "ev"
    p = start_sup("--restart-on-crash", "--max-restarts", "1", "--kill-grace", "1", "--heartbeat", "0",
                  "--events", str(events), child=[PY, "-c", CRASH_AFTER_SIGNAL, sig, str(crash_after_s)],
                  cwd=tmp_path)
    out = LineReader(p.stdout)
    try:
        out.wait_for(b"ready", 20)
        p.send_signal(getattr(signal, sig))
        assert p.wait(timeout=30) == 0
        out.pump()
        assert b"second attempt" in out.data
        assert [e["reason"] for e in events_of(events) if e["event"] == "restart"] == ["crash"]
    finally:
        if p.poll() is None:
            kill_tree_of(p)


def test_a_crash_not_restarted_after_the_users_usr1_says_why(tmp_path):
    code = ("import os, signal, threading\n"
            "signal.signal(signal.SIGUSR1, lambda *_: os._exit(3))\n"
            "print('ready', flush=True); threading.Event().wait()\n")
    events = tmp_path / "ev"
    p = start_sup("--restart-on-crash", "--events", str(events), "--heartbeat", "0", child=[PY, "-c", code],
                  cwd=tmp_path)
    err = LineReader(p.stderr)
    try:
        LineReader(p.stdout).wait_for(b"ready", 20)
        p.send_signal(signal.SIGUSR1)
        assert p.wait(timeout=20) == 3
        err.pump()
        exit_line = [line for line in sup_lines(err.data) if "exit status=3" in line]
        assert exit_line and "not restarted" in exit_line[0] and "SIGUSR1" in exit_line[0], err.data
        assert "SIGUSR1" in events_of(events)[-1]["not_restarted"]
    finally:
        if p.poll() is None:
            kill_tree_of(p)


# ----- 11. a user's signal ends the orphan cleanup's grace ---------------------------------------------------------


@pytest.mark.timeout(60)
def test_sigterm_during_the_orphan_grace_kills_the_leftovers_and_the_record_says_143(tmp_path):
    leftover = tmp_path / "leftover"
    child = ["sh", "-c", f"sh -c 'trap \"\" TERM; echo $$ > {leftover}; exec sleep 60' & sleep 0.5; exit 0"]
    events = tmp_path / "ev"
    p = start_sup("--kill-grace", "20", "--heartbeat", "0", "--events", str(events), child=child, cwd=tmp_path)
    err = LineReader(p.stderr)
    try:
        err.wait_for(b"ORPHANS", 20)
        pid = int(leftover.read_text())
        started = time.monotonic()
        p.send_signal(signal.SIGTERM)
        status = p.wait(timeout=15)
        took = time.monotonic() - started
        err.pump()
        assert status == 128 + signal.SIGTERM
        assert took < 5, f"{took:.1f} s after SIGTERM"
        wait_for(lambda: not alive(pid), 5, what="the leftover to be killed")
        exit_event = events_of(events)[-1]
        assert (exit_event["event"], exit_event["status"]) == ("exit", 143)
        assert any("exit status=143" in line for line in sup_lines(err.data)), err.data
    finally:
        if p.poll() is None:
            kill_tree_of(p)


# ----- the rest of the class: every wait a user's signal must bound --------------------------------------------

DEAF_AND_DEAF_TO_TERM = SLOW_LAST_STEP.replace("import os, sys, time", "import os, signal, sys, time\n"
                                               "signal.signal(signal.SIGTERM, signal.SIG_IGN)")


@pytest.mark.timeout(90)
def test_sigterm_during_the_stall_ladders_grace_kills_at_once(tmp_path):
    """The stall's SIGTERM went out and the child ignores it; --kill-grace 60 must not outlive the user's SIGTERM."""
    events = tmp_path / "ev"
    p = start_sup("--flight-recorder", "off", "--stall-timeout", "1", "--on-stall", "kill", "--kill-grace", "60",
                  "--heartbeat", "0", "--events", str(events), child=[PY, "-c", DEAF_AND_DEAF_TO_TERM, "3600"],
                  cwd=tmp_path, env=base_env(MAGVIT_PY_SPY="", TORCH_NCCL_DEBUG_INFO_PIPE_FILE=str(tmp_path / "p_")))
    try:
        wait_for(lambda: events.exists() and any(e["event"] == "signal" for e in events_of(events)), 30,
                 what="the stall's SIGTERM")
        started = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=15) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 8
        evs = events_of(events)
        assert [e["signal"] for e in evs if e["event"] == "signal"][-1] == "SIGKILL"
        assert (evs[-1]["event"], evs[-1]["status"], evs[-1]["reason"]) == ("exit", 143, "user-signal")
    finally:
        if p.poll() is None:
            kill_tree_of(p)


@pytest.mark.timeout(90)
def test_a_diagnosis_cut_short_by_the_user_gives_the_grace_from_the_users_signal(tmp_path):
    """The child ignores the user's SIGTERM: the stall's ladder follows (ABRT, KILL after the grace), with no
    second SIGTERM of ours on top of the user's."""
    events = tmp_path / "ev"
    p, err = stalled_in_a_diagnosis(tmp_path, DEAF_AND_DEAF_TO_TERM, kill_grace="2")
    try:
        started = time.monotonic()
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 128 + signal.SIGTERM
        assert time.monotonic() - started < 12
        signals = [(e["signal"], e["reason"]) for e in events_of(events) if e["event"] == "signal"]
        assert signals[0] == ("SIGTERM", "forwarded") and ("SIGTERM", "stall") not in signals
        assert ("SIGABRT", "stall") in signals  # the grace ran from the user's SIGTERM
        err.pump()
        assert b"cut short by the user's SIGTERM" in err.data
        assert "restart" not in [e["event"] for e in events_of(events)]
    finally:
        if p.poll() is None:
            kill_tree_of(p)


CHECKPOINT_ON_TERM = """
import os, signal, sys
def term(*_):
    os.write(1, b"saving a checkpoint\\n" * 5000)  # blocks for as long as nobody takes our output
    open(sys.argv[1], "w").write("saved")
    os._exit(0)
signal.signal(signal.SIGTERM, term)
while True:
    os.write(1, b"x" * 65536)
"""


@pytest.mark.timeout(60)
def test_after_the_users_sigterm_an_unread_stdout_never_blocks_the_childs_checkpoint(tmp_path):
    """No --log and nobody reads our stdout: once the user said stop, what the terminal does not take is
    dropped (cat would be gone too), so the child can write its last words and checkpoint."""
    saved = tmp_path / "saved"
    r_fd, w_fd = os.pipe()
    p = subprocess.Popen(sup_argv(child=[PY, "-c", CHECKPOINT_ON_TERM, str(saved)]), stdout=w_fd,
                         stderr=subprocess.PIPE, env=base_env(), cwd=tmp_path, stdin=subprocess.DEVNULL)
    os.close(w_fd)
    try:
        seen = []

        def full() -> bool:
            seen.append(unread_bytes(r_fd))
            return len(seen) > 10 and seen[-1] > 0 and seen[-1] == seen[-10]

        wait_for(full, 30, interval_s=0.1, what="our stdout to fill up")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=30) == 128 + signal.SIGTERM  # output was lost on the user's word: as cat would
        assert saved.read_text() == "saved"
    finally:
        os.close(r_fd)
        if p.poll() is None:
            kill_tree_of(p)


@pytest.mark.timeout(60)
def test_a_py_spy_still_running_when_the_user_ends_the_run_does_not_outlive_it(tmp_path):
    spy, pid_file = tmp_path / "py-spy", tmp_path / "spy.pid"
    spy.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 60\n")
    spy.chmod(0o755)
    p = start_sup("--flight-recorder", "off", "--progress-file", str(tmp_path / "never"), "--stall-timeout", "1",
                  "--kill-grace", "2", "--heartbeat", "0",
                  child=[PY, "-c", "import time; print('ready', flush=True); time.sleep(3600)"], cwd=tmp_path,
                  env=base_env(MAGVIT_PY_SPY=str(spy)))
    try:
        pid = int(wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 30, what="py-spy to start"))
        started = time.monotonic()
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=15) == 128 + signal.SIGINT
        assert time.monotonic() - started < 5, "the exit waited for py-spy's own 10 s bound"
        wait_for(lambda: not alive(pid), 5, what="our py-spy to be ended with the run")
    finally:
        if p.poll() is None:
            kill_tree_of(p)


@pytest.mark.timeout(60)
def test_a_users_sigterm_during_a_stall_kill_under_restart_is_never_restarted(tmp_path):
    """SPEC 4: a child ended because the user signalled the supervisor is never restarted, even
    when the stall's own ladder was under way (its outcome reads 'stall'): the user's word wins."""
    events = tmp_path / "ev"
    p = start_sup("--stall-timeout", "1", "--on-stall", "restart", "--max-restarts", "3", "--kill-grace", "30",
                  "--heartbeat", "0", "--events", str(events), "--progress-file", str(tmp_path / "PROGRESS.txt"),
                  child=child_cmd("hang_after_progress", "ignore-term"), cwd=tmp_path,
                  env=base_env(MAGVIT_PY_SPY=""))
    try:
        # the stall's SIGTERM is out, and ignored: the ladder waits out its 30 s grace
        wait_for(lambda: events.exists() and any(e["event"] == "signal" and e["reason"] != "forwarded"
                                                 for e in events_of(events)), 30, what="the stall's SIGTERM")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=20) == 128 + signal.SIGTERM
    finally:
        kill_tree_of(p)
    seen = [e["event"] for e in events_of(events)]
    assert seen.count("start") == 1 and "restart" not in seen, seen
    assert events_of(events)[-1]["status"] == 128 + signal.SIGTERM
