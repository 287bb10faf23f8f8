"""Settings that undo each other, and a file system that never answers (issue 16, items 7, 9, 10, 12, 13).

Each test drives the real supervisor against real processes: a progress file whose
declaration is shorter than the user's limit, processes holding a stand-in GPU device,
two supervisors on one folder, and a FUSE mount whose daemon never answers.
"""
import os
import signal
import subprocess
import textwrap
import time

import pytest

from helpers import (PY, base_env, events_of, kill_tree_of, no_traceback, run_sup, start_sup, sup_lines,
                     wait_for)


def script(tmp_path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


# ----- 7. expect_next_s only ever extends the user's limits ---------------------------------------------


def test_a_short_declaration_does_not_cut_the_stall_timeout(tmp_path):
    """`expect_next_s: 1` before a 4 s step under --stall-timeout 20: was STALL at 1 s, killed, 124."""
    job = script(tmp_path, "job.py", """
        import os, time
        path = os.environ["MAGVIT_PROGRESS_FILE"]
        def write(text):
            with open(path + ".tmp", "w") as f:
                f.write(text)
            os.replace(path + ".tmp", path)
        write("starting\\nexpect_next_s: 1\\n")
        time.sleep(4)
        write("Step 1/1\\n")
        print("done", flush=True)
    """)
    r = run_sup("--progress-file", str(tmp_path / "P.txt"), "--stall-timeout", "20", "--startup-grace", "30",
                "--heartbeat", "0", "--kill-grace", "1", child=[PY, job], cwd=tmp_path, timeout_s=40)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not any("STALL" in line for line in sup_lines(r.stderr))
    assert b"done" in r.stdout


# ----- 12. an empty --progress-regex ----------------------------------------------------------------------


def test_an_empty_progress_regex_is_refused_and_an_empty_variable_is_unset(tmp_path):
    r = run_sup("--progress-regex", "", child=["true"], cwd=tmp_path, timeout_s=20)
    assert r.returncode == 125 and r.stdout == b""
    message = r.stderr.decode().strip().splitlines()
    assert len(message) == 1 and "--progress-regex ''" in message[0], message
    # From the environment, empty is unset: the run goes ahead (no progress stall for output).
    r = run_sup("--heartbeat", "0", child=[PY, "-c", "print('hello')"], cwd=tmp_path, timeout_s=20,
                env=base_env(MAGVIT_SUPERVISE_PROGRESS_REGEX="", MAGVIT_SUPERVISE_STALL_TIMEOUT=""))
    assert r.returncode == 0 and r.stdout == b"hello\n", r.stderr[-2000:]


# ----- 13. a progress path on a hung mount -----------------------------------------------------------------


@pytest.fixture
def hung(tmp_path):
    from helpers_fuse import fuse_unavailable, hung_mount

    reason = fuse_unavailable()
    if reason:
        pytest.skip(reason)
    try:
        mount = hung_mount()
        mnt = mount.__enter__()
    except RuntimeError as e:  # root without CAP_SYS_ADMIN (a container): no mount here
        pytest.skip(str(e))
    try:
        yield mnt
    finally:
        mount.__exit__(None, None, None)


def started_attempts(events_path) -> list[int]:
    if not events_path.exists():
        return []
    return [e["attempt"] for e in events_of(events_path) if e["event"] == "start"]


@pytest.mark.timeout(120)
def test_a_progress_file_on_a_hung_mount_is_a_stall_and_never_freezes_the_launch(tmp_path, hung):
    """Was: no child ever started, no heartbeat, and SIGTERM was acted on only when the mount died."""
    events = tmp_path / "events.jsonl"
    sup = start_sup("--progress-file", os.path.join(hung, "PROGRESS.txt"), "--stall-timeout", "8",
                    "--on-stall", "restart", "--max-restarts", "1", "--kill-grace", "1", "--heartbeat", "1",
                    "--events", str(events), child=["sh", "-c", "echo up >> ups; echo up; exec sleep 60"],
                    cwd=tmp_path, env=base_env(MAGVIT_PY_SPY=""))
    ups = tmp_path / "ups"
    try:
        # The first launch goes ahead after the baseline's deadline, and says why it waited.
        wait_for(lambda: started_attempts(events) == [0], timeout_s=30, what="the first launch")
        # Not answering is a stall: the child is restarted, and the second launch goes ahead too.
        wait_for(lambda: started_attempts(events) == [0, 1], timeout_s=60, what="the restart's launch")
        names = [e["event"] for e in events_of(events)]
        assert "heartbeat" in names and "progress-not-answering" in names
        stall = next(e for e in events_of(events) if e["event"] == "stall")
        assert "not answering" in stall["source"], stall
        wait_for(lambda: ups.exists() and ups.read_text() == "up\nup\n", timeout_s=20, what="the second child")
        sup.send_signal(signal.SIGTERM)  # acted on at once, whatever the mount does
        assert sup.wait(timeout=15) == 128 + signal.SIGTERM
    finally:
        kill_tree_of(sup)
    err = sup.stderr.read()
    no_traceback(err)
    shown = sup_lines(err)
    assert sum("not answering after 5s" in line and "launching without its baseline" in line
               for line in shown) == 2, shown
    assert sup.stdout.read().count(b"up\n") == 2


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["run-dir", "each"])
def test_the_run_goes_ahead_without_folders_that_do_not_answer(tmp_path, hung, where):
    """--run-dir (or --log, --events, --flight-recorder) on a hung mount: was no child, for ever."""
    if where == "run-dir":
        options = ["--run-dir", os.path.join(hung, "run")]
        expected = ["--run-dir folder", "--log file", "--events file", "flight-recorder folder", "progress file"]
    else:
        options = ["--log", os.path.join(hung, "s.log"), "--events", os.path.join(hung, "e.jsonl"),
                   "--flight-recorder", os.path.join(hung, "fr"), "--progress-file", str(tmp_path / "P.txt")]
        expected = ["--log file", "--events file", "flight-recorder folder"]
    started = time.monotonic()
    r = run_sup(*options, "--heartbeat", "0", child=["sh", "-c", "echo up"], cwd=tmp_path, timeout_s=60,
                env=base_env(MAGVIT_PY_SPY=""))
    took = time.monotonic() - started
    assert r.returncode == 0 and r.stdout == b"up\n", r.stderr[-2000:]
    no_traceback(r.stderr)
    shown = sup_lines(r.stderr)
    said = [line for line in shown if "not answering after 5s" in line]
    # One line for each thing left out, in this order, and nothing waits on the mount twice.
    assert [next(what for what in expected if what in line) for line in said] == expected, shown
    assert took < 40, f"{took:.1f}s"


# ----- 10. one supervisor per run folder; a progress file shared with another --------------------------------


@pytest.mark.timeout(90)
def test_a_second_supervisor_on_a_run_folder_in_use_exits_125_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = start_sup("--run-dir", str(run), "--heartbeat", "0", "--stall-timeout", "0",
                      child=["sh", "-c", "echo up; exec sleep 60"], cwd=tmp_path)
    try:
        wait_for(lambda: (run / "events.jsonl").exists() and "start" in (run / "events.jsonl").read_text(),
                 timeout_s=30, what="the first supervisor's start")
        r = run_sup("--run-dir", str(run), child=["sh", "-c", "echo second >> ran"], cwd=tmp_path, timeout_s=30)
        assert r.returncode == 125 and r.stdout == b""
        message = r.stderr.decode().strip().splitlines()
        assert len(message) == 1 and f"in use by supervisor pid {first.pid}" in message[0], message
        assert not (tmp_path / "ran").exists()  # the second job never ran
        # The kernel lets go of the lock however the holder ends, SIGKILL included.
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
    finally:
        kill_tree_of(first)
    r = run_sup("--run-dir", str(run), "--heartbeat", "0", child=["sh", "-c", "echo third"], cwd=tmp_path,
                timeout_s=30)
    assert r.returncode == 0 and r.stdout == b"third\n", r.stderr[-2000:]


@pytest.mark.timeout(90)
def test_the_nodes_of_one_job_share_a_run_folder_each_with_its_own_events(tmp_path):
    """SPEC 11: one supervisor per node, all on the shared run folder, each writing its own
    --events (and --log): they run side by side; a third on a node's events file is refused."""
    run = tmp_path / "run"

    def node(name: str, child: list[str], **kw):
        return ("--run-dir", str(run), "--heartbeat", "0", "--stall-timeout", "0",
                "--events", str(run / f"events-{name}.jsonl"), "--log", str(run / f"supervise-{name}.log")), child

    opts, child = node("a", ["sh", "-c", "echo up; exec sleep 60"])
    first = start_sup(*opts, child=child, cwd=tmp_path)
    try:
        wait_for(lambda: first.stdout.readline() == b"up\n", timeout_s=30, what="node a's child")
        opts, child = node("b", ["sh", "-c", "echo node b"])
        r = run_sup(*opts, child=child, cwd=tmp_path, timeout_s=30)
        assert r.returncode == 0 and r.stdout == b"node b\n", r.stderr[-2000:]
        opts, child = node("a", ["sh", "-c", "echo again"])
        r = run_sup(*opts, child=child, cwd=tmp_path, timeout_s=30)
        assert r.returncode == 125 and f"in use by supervisor pid {first.pid}" in r.stderr.decode()
    finally:
        kill_tree_of(first)


@pytest.mark.timeout(90)
def test_a_progress_file_watched_by_another_live_supervisor_is_said_once_at_start(tmp_path):
    """Two jobs started from one folder: one's updates hid the other's hang, and their events mixed."""
    events = str(tmp_path / "events.jsonl")
    first = start_sup("--heartbeat", "0", "--stall-timeout", "0", "--events", events,
                      child=["sh", "-c", "echo up; exec sleep 60"], cwd=tmp_path)
    try:
        wait_for(lambda: first.stdout.readline() == b"up\n", timeout_s=30, what="the first child")
        second = start_sup("--heartbeat", "0", "--stall-timeout", "0", "--events", events,
                           child=["sh", "-c", "exec sleep 2"], cwd=tmp_path)
        try:
            assert second.wait(timeout=30) == 0
        finally:
            kill_tree_of(second)
    finally:
        kill_tree_of(first)
    shown = sup_lines(second.stderr.read())
    watched = [line for line in shown if "also watched" in line]
    assert len(watched) == 1 and f"supervisor pid {first.pid}" in watched[0] and f"pid {second.pid}" in watched[0]
    written = [line for line in shown if "also written" in line]
    assert len(written) == 1 and "--events file" in written[0] and f"pid {first.pid}" in written[0], shown
    assert not any("also" in line for line in sup_lines(first.stderr.read()))


@pytest.mark.timeout(90)
def test_a_progress_file_outside_the_run_folder_can_still_be_shared(tmp_path):
    """--run-dir locks the folder, not a --progress-file elsewhere: that is still said."""
    shared = str(tmp_path / "P.txt")
    first = start_sup("--run-dir", str(tmp_path / "a"), "--progress-file", shared, "--heartbeat", "0",
                      "--stall-timeout", "0", child=["sh", "-c", "echo up; exec sleep 60"], cwd=tmp_path)
    try:
        wait_for(lambda: first.stdout.readline() == b"up\n", timeout_s=30, what="the first child")
        r = run_sup("--run-dir", str(tmp_path / "b"), "--progress-file", shared, "--heartbeat", "0",
                    "--stall-timeout", "0", child=["true"], cwd=tmp_path, timeout_s=30)
    finally:
        kill_tree_of(first)
    assert r.returncode == 0
    assert sum(f"also watched by supervisor pid {first.pid}" in line for line in sup_lines(r.stderr)) == 1


def test_a_log_fifo_with_a_reader_keeps_its_reader(tmp_path):
    """Looking whether another supervisor writes the --log must never open a FIFO: its reader would see an end."""
    fifo, copy = tmp_path / "log.fifo", tmp_path / "copy"
    os.mkfifo(fifo)
    with open(copy, "wb") as out:
        reader = subprocess.Popen(["cat", str(fifo)], stdout=out)
    try:
        r = run_sup("--log", str(fifo), "--heartbeat", "0", child=["sh", "-c", "echo one; echo two"], cwd=tmp_path,
                    timeout_s=30)
        assert r.returncode == 0 and r.stdout == b"one\ntwo\n", r.stderr[-2000:]
        assert reader.wait(timeout=10) == 0
    finally:
        reader.kill()
        reader.wait()
    logged = copy.read_bytes()
    assert b"one" in logged and b"two" in logged and b"exit status=0" in logged, logged


@pytest.mark.timeout(120)
def test_a_log_whose_reader_stopped_never_freezes_the_run(tmp_path):
    """`--log fifo` read by a `tee` that was suspended: the loop blocked in write(2), no relay, no heartbeat,
    no Ctrl-C. Now the log is off after 5 s with one line, and back with everything it lost counted."""
    fifo = tmp_path / "log.fifo"
    os.mkfifo(fifo)
    reader = subprocess.Popen([PY, "-c", "import sys, time\n"
                               "f = open(sys.argv[1], 'rb')\n"
                               "f.read(1)\n"
                               "print('stopping', flush=True)\n"
                               "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)\n"
                               "while f.read(1 << 16): pass\n", str(fifo)], stdout=subprocess.PIPE)
    sup = start_sup("--log", str(fifo), "--heartbeat", "1", "--stall-timeout", "0",
                    child=["sh", "-c", "i=0; while [ $i -lt 20000 ]; do echo line $i; i=$((i+1)); done; "
                                       "echo done >&2; exec sleep 8"], cwd=tmp_path)
    try:
        assert reader.stdout.readline() == b"stopping\n"
        # Every line reaches the terminal though the log's reader sleeps, and heartbeats go on.
        out = b""
        while b"line 19999\n" not in out:
            chunk = sup.stdout.read1(1 << 16)
            assert chunk, "stdout ended early"
            out += chunk
        os.kill(reader.pid, signal.SIGCONT)  # the reader takes the log again
        assert sup.wait(timeout=60) == 0
    finally:
        os.kill(reader.pid, signal.SIGCONT)
        kill_tree_of(sup)
        reader.kill()
        reader.wait()
    err = sup.stderr.read()
    no_traceback(err)
    shown = sup_lines(err)
    assert sum("--log file" in line and "not answering after 5s" in line for line in shown) == 1, shown
    assert any("heartbeat" in line for line in shown), shown
    assert any("--log file" in line and "works again" in line and "lost" in line for line in shown), shown
    assert out.count(b"\n") == 20000


# ----- 9. GPU-HOLDERS: only the job's processes --------------------------------------------------------------

HOLDER = """
    import os, sys, time
    device, ready, release, most_s = sys.argv[1:5]
    with open(device, "ab"):  # holds the stand-in device open, as a rank holds /dev/nvidia0
        open(ready, "w").close()
        end = time.monotonic() + float(most_s)
        while time.monotonic() < end and not os.path.exists(release):
            time.sleep(0.05)
"""
# A process outside the supervisor's tree started on the job's behalf (a launcher daemon, a
# forkserver, ssh): it gets the job's environment. Another user's job starts beside it.
DAEMON = """
    import os, subprocess, sys, time
    holder, device, d = sys.argv[1:4]
    while not os.path.exists(f"{d}/request"):
        time.sleep(0.05)
    pid = int(open(f"{d}/request").read())
    env = dict(e.split("=", 1) for e in open(f"/proc/{pid}/environ").read().split("\\0") if "=" in e)
    job = subprocess.Popen([sys.executable, holder, device, f"{d}/job.ready", f"{d}/release", "60"], env=env,
                           start_new_session=True)
    stranger = subprocess.Popen([sys.executable, holder, device, f"{d}/stranger.ready", f"{d}/never", "60"],
                                start_new_session=True)
    open(f"{d}/pids", "w").write(f"{job.pid} {stranger.pid}")
    job.wait()
    stranger.wait()
"""
JOB = """
    import os, sys, time
    d = sys.argv[1]
    if os.environ["MAGVIT_RESTART_COUNT"] != "0":
        sys.exit(0)
    open(f"{d}/request.tmp", "w").write(str(os.getpid()))
    os.replace(f"{d}/request.tmp", f"{d}/request")
    while not (os.path.exists(f"{d}/job.ready") and os.path.exists(f"{d}/stranger.ready")):
        time.sleep(0.05)
    print("holders up", flush=True)
    time.sleep(60)  # no progress: a stall, then the restart that looks for GPU holders
"""


@pytest.mark.timeout(120)
def test_gpu_holders_are_only_the_jobs_processes(tmp_path):
    """Our alert hook and another user's job held the device too: both were reported and waited on."""
    holder = script(tmp_path, "holder.py", HOLDER)
    device = tmp_path / "nvidia0"
    device.write_bytes(b"")
    events = tmp_path / "events.jsonl"
    daemon = subprocess.Popen([PY, script(tmp_path, "daemon.py", DAEMON), holder, str(device), str(tmp_path)])
    # The hook holds the device for a while from the STALL on, as nvidia-smi in a hook does.
    hook = f"{PY} {holder} {device} {tmp_path}/hook.ready {tmp_path}/never 8"
    sup = start_sup("--progress-file", str(tmp_path / "P.txt"), "--stall-timeout", "4", "--on-stall", "restart",
                    "--max-restarts", "1", "--kill-grace", "1", "--heartbeat", "0", "--events", str(events),
                    "--alert-cmd", hook, child=[PY, script(tmp_path, "job.py", JOB), str(tmp_path)], cwd=tmp_path,
                    env=base_env(MAGVIT_PY_SPY="", MAGVIT_GPU_DEVICE_PREFIX=str(tmp_path / "nvidia")))
    try:
        wait_for(lambda: events.exists() and '"gpu-holders"' in events.read_text(), timeout_s=60,
                 what="the gpu-holders event")
        assert (tmp_path / "hook.ready").exists()  # the hook did hold it when the holders were looked for
        job_pid, stranger_pid = map(int, (tmp_path / "pids").read_text().split())
        (tmp_path / "release").touch()  # the job's leftover lets go: the restart goes ahead
        assert sup.wait(timeout=60) == 0
    finally:
        kill_tree_of(sup)
        kill_tree_of(daemon)
        for pid in (tmp_path / "pids").read_text().split() if (tmp_path / "pids").exists() else ():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    no_traceback(sup.stderr.read())
    found = [e for e in events_of(events) if e["event"] == "gpu-holders"]
    assert [e["pids"] for e in found] == [[job_pid]], found
    assert stranger_pid != job_pid

