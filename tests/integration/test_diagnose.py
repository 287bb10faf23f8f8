"""Diagnosis of real child processes: facts, py-spy stacks, and every way stacks can be missing."""

import dataclasses
import importlib.util
import os
import selectors
import signal
import subprocess
import sys
import textwrap
import time
import types

import psutil
import pytest
from helpers import wait_for
from helpers_freezer import freezer_unavailable, frozen

from supervisor.forensics import diagnose as diagnose_mod
from supervisor.output.lines import diagnosis_lines
from supervisor.forensics.diagnose import (
    Diagnosis, ProcInfo, diagnose, event_fields, find_py_spy, gpu_memory_used_by, proc_states,
)

HANGS_IN_A_NAMED_FUNCTION = """
import threading, time

def other_thread_waits_here():
    threading.Event().wait()  # blocks forever: a hang, not a timed wait

def stuck_in_named_function():
    print("ready", flush=True)
    threading.Event().wait()

threading.Thread(target=other_thread_waits_here, daemon=True).start()
stuck_in_named_function()
"""

BUSY = """
print("ready", flush=True)
while True:
    pass
"""


def start(argv, timeout_s=10.0):
    """Start a child and wait until it prints `ready`."""
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout_s
    seen = b""
    while b"ready" not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            proc.kill()
            proc.wait()
            raise AssertionError(f"child never said ready: {seen!r}")
        if sel.select(left):
            seen += os.read(proc.stdout.fileno(), 4096)
    sel.close()
    return proc


def stop(proc):
    proc.kill()
    proc.wait()
    proc.stdout.close()


@pytest.fixture
def hung_python(tmp_path):
    script = tmp_path / "hung_child.py"
    script.write_text(HANGS_IN_A_NAMED_FUNCTION)
    proc = start([sys.executable, str(script)])
    try:
        yield proc
    finally:
        stop(proc)


def fake_py_spy(tmp_path, body):
    path = tmp_path / "fake-py-spy"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_stacks_show_the_function_every_thread_hangs_in(hung_python):
    py_spy = find_py_spy()
    assert py_spy is not None, "py-spy is a dependency: it must be found"
    d = diagnose([hung_python.pid], py_spy)
    assert d.stack_method == "py-spy"
    assert "stuck_in_named_function" in d.stacks
    assert "other_thread_waits_here" in d.stacks
    [p] = d.processes
    assert (p.pid, p.ppid, p.state) == (hung_python.pid, os.getpid(), "S")
    assert p.threads >= 2
    assert "hung_child.py" in p.cmd
    assert p.rss_bytes > 1 << 20
    lines = diagnosis_lines(event_fields(d))
    assert lines[0].startswith(f"pid={hung_python.pid} ppid={os.getpid()} state=S cpu=")
    assert any(line.startswith("  ") and "stuck_in_named_function" in line for line in lines)


def test_the_child_runs_on_after_the_dump(hung_python):
    diagnose([hung_python.pid], find_py_spy())
    assert hung_python.poll() is None


@pytest.mark.parametrize("py_spy,reason", [
    (None, "unavailable: py-spy not found"),
    ("/nonexistent/py-spy", "unavailable: py-spy not found (/nonexistent/py-spy)"),
])
def test_no_py_spy_still_gives_the_facts(hung_python, py_spy, reason):
    d = diagnose([hung_python.pid], py_spy)
    assert d.stack_method == reason
    assert d.stacks == ""
    assert [p.pid for p in d.processes] == [hung_python.pid]
    assert "faulthandler" in diagnosis_lines(event_fields(d))[-1]


def test_ptrace_refused_is_said_so(hung_python, tmp_path):
    py_spy = fake_py_spy(tmp_path, """
        echo "Error: Operation not permitted (os error 1)" >&2
        exit 1
    """)
    d = diagnose([hung_python.pid], py_spy)
    assert d.stack_method.startswith("unavailable: ptrace not permitted (")
    assert "Operation not permitted" in d.stack_method


def test_a_hanging_py_spy_is_bounded(hung_python, tmp_path):
    py_spy = fake_py_spy(tmp_path, "exec sleep 30\n")
    started = time.monotonic()
    d = diagnose([hung_python.pid], py_spy, timeout_s=0.5)
    assert time.monotonic() - started < 5
    assert d.stack_method == "unavailable: py-spy failed: timed out after 0.5s"


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_dumps_run_concurrently(tmp_path):
    script = tmp_path / "hung_child.py"
    script.write_text(HANGS_IN_A_NAMED_FUNCTION)
    procs = [start([sys.executable, str(script)]) for _ in range(3)]
    try:
        py_spy = fake_py_spy(tmp_path, "exec sleep 30\n")
        started = time.monotonic()
        d = diagnose([p.pid for p in procs], py_spy, timeout_s=0.6)
        assert time.monotonic() - started < 1.5  # not 3 x 0.6 s one after the other
        assert d.stack_method.startswith("unavailable")
    finally:
        for p in procs:
            stop(p)


def test_some_dumps_failing_are_reported_beside_the_others(hung_python, tmp_path):
    real = find_py_spy()
    py_spy = fake_py_spy(tmp_path, f"""
        if [ "$3" = "{hung_python.pid}" ]; then exec {real} "$@"; fi
        echo "Error: Failed to find python version" >&2
        exit 1
    """)
    other = start([sys.executable, "-c", "import threading; print('ready', flush=True); threading.Event().wait()"])
    try:
        d = diagnose([hung_python.pid, other.pid], py_spy)
    finally:
        stop(other)
    assert d.stack_method == "py-spy"
    assert "stuck_in_named_function" in d.stacks
    assert f"pid {other.pid}: py-spy failed: Error: Failed to find python version" in d.stacks


def test_only_python_processes_are_dumped(tmp_path):
    proc = start(["sh", "-c", "echo ready; exec sleep 60"])
    try:
        py_spy = fake_py_spy(tmp_path, "echo must not run >&2; exit 1\n")
        d = diagnose([proc.pid], py_spy)
    finally:
        stop(proc)
    assert d.stack_method == "none: no Python process in the tree"
    assert [p.cmd for p in d.processes] == ["sleep 60"]


def test_vanished_processes_are_skipped(hung_python):
    gone = subprocess.Popen(["true"])
    gone.wait()
    d = diagnose([gone.pid, hung_python.pid, 2**22 + 1], None)
    assert [p.pid for p in d.processes] == [hung_python.pid]


def test_zombie_is_reported_not_skipped():
    zombie = subprocess.Popen(["true"])
    try:
        deadline = time.monotonic() + 5
        while diagnose_mod.psutil.Process(zombie.pid).status() != "zombie":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        d = diagnose([zombie.pid], find_py_spy())
        assert [(p.pid, p.state) for p in d.processes] == [(zombie.pid, "Z")]
    finally:
        zombie.wait()


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_cpu_is_sampled():
    """A busy loop's CPU % is what it really got: on a loaded machine that may be a sixth of a
    core, so the figure is checked against the process's own CPU time over the same call."""
    proc = start([sys.executable, "-c", BUSY])
    try:
        ps = psutil.Process(proc.pid)
        cpu_before, started = sum(ps.cpu_times()[:2]), time.monotonic()
        d = diagnose([proc.pid], None)
        share = 100 * (sum(ps.cpu_times()[:2]) - cpu_before) / (time.monotonic() - started)
    finally:
        stop(proc)
    assert share > 1  # it ran
    assert d.processes[0].cpu_percent > share / 3, (d.processes[0].cpu_percent, share)


def test_no_nvml_means_no_gpu_facts(hung_python):
    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("nvidia-ml-py is installed: this test is for machines without it")
    d = diagnose([hung_python.pid], None)
    assert d.gpus == []
    assert gpu_memory_used_by([hung_python.pid]) is None


def test_gpu_facts_through_a_fake_nvml(monkeypatch):
    """The NVML calls, against a stand-in module: no GPU needed to check the wiring."""
    class NVMLError(Exception):
        pass

    proc = types.SimpleNamespace
    fake = types.SimpleNamespace(
        NVMLError=NVMLError,
        nvmlInit=lambda: None,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetProcessUtilization=lambda h, since: [proc(pid=10, smUtil=97)] if h == 0 else [],
        nvmlDeviceGetComputeRunningProcesses=lambda h: [proc(pid=10 + h, usedGpuMemory=(h + 1) << 30), proc(pid=99, usedGpuMemory=1)],
        nvmlDeviceGetGraphicsRunningProcesses=lambda h: (_ for _ in ()).throw(NVMLError("not supported")),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert diagnose_mod._gpu_processes([10, 11]) == [
        {"gpu": 0, "pid": 10, "used_memory_bytes": 1 << 30, "sm_util_percent": 97},
        {"gpu": 1, "pid": 11, "used_memory_bytes": 2 << 30, "sm_util_percent": None},
    ]
    assert gpu_memory_used_by([10, 11]) == 3 << 30
    assert gpu_memory_used_by([12]) == 0
    monkeypatch.setattr(fake, "nvmlInit", lambda: (_ for _ in ()).throw(NVMLError("no driver")))
    assert gpu_memory_used_by([10]) is None


@pytest.mark.parametrize("env,expected", [
    ("", None),
    ("/opt/py-spy", "/opt/py-spy"),
])
def test_find_py_spy_from_the_environment(monkeypatch, env, expected):
    monkeypatch.setenv("MAGVIT_PY_SPY", env)
    assert find_py_spy() == expected


def test_find_py_spy_beside_our_python(monkeypatch):
    monkeypatch.delenv("MAGVIT_PY_SPY", raising=False)
    monkeypatch.setenv("PATH", "/nonexistent")
    assert find_py_spy() == os.path.join(os.path.dirname(sys.executable), "py-spy")


def test_proc_info_fields_are_the_event_fields():
    info = ProcInfo(pid=1, ppid=0, cmd="x", state="S", cpu_percent=0.0, rss_bytes=0, threads=1)
    assert set(dataclasses.asdict(info)) == {"pid", "ppid", "cmd", "state", "cpu_percent", "rss_bytes", "threads",
                                             "rank"}


def test_format_calls_out_uninterruptible_sleep_and_gpus():
    d = Diagnosis(
        processes=[
            ProcInfo(pid=42, ppid=1, cmd="python train.py\n--x", state="D", cpu_percent=0.4, rss_bytes=3 << 30, threads=7),
            ProcInfo(pid=43, ppid=42, cmd="python worker.py", state="R", cpu_percent=99.6, rss_bytes=5 << 20, threads=1),
        ],
        stacks="Thread 42 (idle)\n    wait (train.py:10)\n",
        stack_method="py-spy",
        gpus=[{"gpu": 0, "pid": 42, "used_memory_bytes": 2 << 30, "sm_util_percent": 0},
              {"gpu": 1, "pid": 43, "used_memory_bytes": None, "sm_util_percent": None}],
    )
    assert diagnosis_lines(event_fields(d)) == [
        "pid=42 ppid=1 state=D UNINTERRUPTIBLE (stuck in the kernel, usually I/O or a driver) cpu=0% rss=3072M "
        "threads=7 cmd=python train.py --x",
        "pid=43 ppid=42 state=R cpu=100% rss=5M threads=1 cmd=python worker.py",
        "gpu=0 pid=42 mem=2048M util=0%",
        "gpu=1 pid=43 mem=? util=?",
        "python stacks (py-spy):",
        "  Thread 42 (idle)",
        "      wait (train.py:10)",
    ]


def vanished_process():
    """A psutil handle on a real process that has exited and been reaped since."""
    proc = subprocess.Popen([sys.executable, "-c", "import threading; threading.Event().wait(60)"])
    handle = psutil.Process(proc.pid)
    handle.cmdline()  # a live handle first: the process was really there
    proc.kill()
    proc.wait()
    return handle


def test_a_process_that_vanishes_mid_diagnosis_is_unknown_not_a_crash():
    """Issue 7: proc.exe() raised NoSuchProcess out of _looks_like_python and ended the stall path."""
    handle = vanished_process()
    assert diagnose_mod._looks_like_python(handle) is False
    assert diagnose_mod._field(handle.exe, "unknown") == "unknown"
    assert diagnose_mod._proc_info(handle) is None


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_proc_states_of_a_process_that_survives_sigkill():
    reason = freezer_unavailable()
    if reason:
        pytest.skip(reason)
    # Busy when frozen, so it waits in __refrigerator (frozen asleep, it would keep its old wchan).
    proc = subprocess.Popen(["sh", "-c", "while :; do :; done"])
    try:
        with frozen(proc.pid):
            os.kill(proc.pid, signal.SIGKILL)
            wait_for(lambda: proc_states([proc.pid])[0]["state"] == "D", what="state D")
            assert proc_states([proc.pid]) == [
                {"pid": proc.pid, "state": "D", "wchan": "__refrigerator", "cmd": "sh -c while :; do :; done"},
            ]
        assert proc.wait(timeout=10) == -signal.SIGKILL  # thawed, it dies at last
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.xdist_group("serial")  # a gone pid stays gone only while no test churns through the pid space
def test_proc_states_skips_the_gone_and_names_a_zombie():
    sleeper = subprocess.Popen(["sleep", "60"])
    zombie = subprocess.Popen(["sh", "-c", "exit 0"])
    gone = subprocess.Popen(["true"])
    gone.wait()
    try:
        wait_for(lambda: proc_states([zombie.pid])[0]["state"] == "Z", what="the zombie")
        wait_for(lambda: proc_states([sleeper.pid])[0]["state"] == "S", what="the sleeper to sleep")
        sleeping, dead = proc_states([sleeper.pid, gone.pid, 2**22 + 1, zombie.pid])
        # Some kernels (CI's among them) answer "0" for every wchan; then we say "".
        kernel_says = open(f"/proc/{sleeper.pid}/wchan").read().strip()
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()
    assert (sleeping["pid"], sleeping["state"], sleeping["cmd"]) == (sleeper.pid, "S", "sleep 60")
    assert sleeping["wchan"] == ("" if kernel_says == "0" else kernel_says)
    assert kernel_says == "0" or sleeping["wchan"].isidentifier()  # a kernel function's name
    assert dead == {"pid": zombie.pid, "state": "Z", "wchan": "", "cmd": "[sh]"}
