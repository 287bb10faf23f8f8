"""Say what a stalled child is doing, before any signal changes it (SPEC 4).

The process facts (state, CPU, RSS, threads), GPU use per process where NVML is
available, and the Python stack of every thread of every Python process, taken
from outside with py-spy so the child needs to do nothing to allow it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import psutil

from supervisor.forensics import helpers, triage
from supervisor.output.lines import one_line

CPU_SAMPLE_S = 0.15  # long enough for a busy loop to show, short enough not to delay the kill
_PERMISSION = re.compile(r"permission denied|operation not permitted|os error (1|13)\)", re.IGNORECASE)

_STATE_LETTERS = {
    getattr(psutil, name): letter
    for name, letter in [
        ("STATUS_RUNNING", "R"), ("STATUS_SLEEPING", "S"), ("STATUS_DISK_SLEEP", "D"),
        ("STATUS_STOPPED", "T"), ("STATUS_TRACING_STOP", "t"), ("STATUS_ZOMBIE", "Z"),
        ("STATUS_DEAD", "X"), ("STATUS_WAKE_KILL", "K"), ("STATUS_WAKING", "W"),
        ("STATUS_IDLE", "I"), ("STATUS_PARKED", "P"),
    ]
    if hasattr(psutil, name)
}


@dataclass
class ProcInfo:
    pid: int
    ppid: int
    cmd: str  # the command line, space-joined
    state: str  # the kernel's letter: R, S, D, Z, T ...
    cpu_percent: float  # over CPU_SAMPLE_S; 100 = one core
    rss_bytes: int
    threads: int
    rank: int | None = None  # RANK in its environment (torchrun, Lightning): triage compares ranks


@dataclass
class Diagnosis:
    processes: list[ProcInfo]
    stacks: str  # py-spy's dumps, one after the other, and any per-process failure
    stack_method: str  # "py-spy", or why there are no stacks: "unavailable: ...", "none: ..."
    gpus: list[dict]  # {"gpu", "pid", "used_memory_bytes", "sm_util_percent"} per process
    groups: list[dict] = field(default_factory=list)  # triage.groups(): the ranks by where they are


def find_py_spy() -> str | None:
    """Return the py-spy to use: $MAGVIT_PY_SPY, beside our Python, or on PATH."""
    if "MAGVIT_PY_SPY" in os.environ:
        return os.environ["MAGVIT_PY_SPY"] or None  # "" turns stacks off (tests, policy)
    # A virtualenv that is not activated still has py-spy beside its python.
    beside = os.path.join(os.path.dirname(sys.executable), "py-spy")
    if os.access(beside, os.X_OK):
        return beside
    return shutil.which("py-spy")


def diagnose(pids: list[int], py_spy: str | None, timeout_s: float = 10.0) -> Diagnosis:
    """Take the facts, stacks and GPU use of the processes `pids`, skipping vanished ones."""
    procs = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            proc.cpu_percent(None)  # start the CPU sample of every process at once
            procs.append(proc)
        except psutil.Error:
            continue
    time.sleep(CPU_SAMPLE_S)
    # Facts first: py-spy pauses its target, which would show in the CPU figure.
    infos: list[ProcInfo] = []
    python_pids: list[int] = []
    for proc in procs:
        info = _proc_info(proc)
        if info is None:
            continue
        infos.append(info)
        if info.state != "Z" and _looks_like_python(proc):
            python_pids.append(info.pid)
    stacks, method = _stacks(python_pids, py_spy, timeout_s)
    groups = triage.groups([triage.Proc(p.pid, p.rank, p.cmd, p.ppid) for p in infos], stacks)
    return Diagnosis(processes=infos, stacks=stacks, stack_method=method, gpus=_gpu_processes(pids), groups=groups)


def gpu_memory_used_by(pids: list[int] | set[int]) -> int | None:
    """Return the GPU memory in bytes held by `pids`, None when NVML is unavailable."""
    rows = _gpu_processes(pids, none_when_unavailable=True)
    if rows is None:
        return None
    return sum(row["used_memory_bytes"] or 0 for row in rows)


def event_fields(d: Diagnosis) -> dict:
    """The fields of the `diagnosis` event (SPEC 6); lines.diagnosis_lines() renders them."""
    keys = ("pid", "ppid", "cmd", "state", "cpu_percent", "rss_bytes", "threads", "rank")
    return {"processes": [{k: getattr(p, k) for k in keys} for p in d.processes], "stacks": d.stacks,
            "stack_method": d.stack_method, "gpus": d.gpus, "groups": d.groups}


def proc_states(pids) -> list[dict]:
    """Return {"pid", "state", "wchan", "cmd"} of each process still there, read from /proc; never raises.

    For a process that survived SIGKILL: its state letter (D: stuck in the kernel)
    and wchan, the kernel function it waits in ("" when the kernel will not say).
    """
    states = []
    for pid in pids:
        stat = _read_proc(pid, "stat")
        if not stat:
            continue  # gone: not stuck
        # The command name may hold spaces and parentheses: the state follows the last ")".
        state = stat[stat.rfind(b")") + 2:][:1].decode("ascii", "replace") or "?"
        wchan = _read_proc(pid, "wchan").decode("ascii", "replace").strip()
        argv = [a.decode("utf-8", "replace") for a in _read_proc(pid, "cmdline").split(b"\0") if a]
        name = stat[stat.find(b"(") + 1:stat.rfind(b")")].decode("utf-8", "replace")
        states.append({
            "pid": pid,
            "state": state,
            "wchan": "" if wchan == "0" else wchan,  # 0: running, or hidden from us
            "cmd": " ".join(argv) if argv else f"[{name}]",
        })
    return states


def _read_proc(pid: int, name: str) -> bytes:
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _proc_info(proc: psutil.Process) -> ProcInfo | None:
    """Return the facts of one process, None when it has vanished."""
    with proc.oneshot():
        try:
            status = proc.status()
        except psutil.ZombieProcess:  # before NoSuchProcess: it is one
            status = psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return None
        except psutil.Error:
            status = "?"
        # It may still vanish from here on: each fact is then unknown, never an exception.
        cmdline = _field(proc.cmdline, [])
        return ProcInfo(
            pid=proc.pid,
            ppid=_field(proc.ppid, 0),
            cmd=" ".join(cmdline) if cmdline else f"[{_field(proc.name, '?')}]",
            state=_STATE_LETTERS.get(status, "?"),
            cpu_percent=_field(lambda: proc.cpu_percent(None), 0.0),
            rss_bytes=_field(lambda: proc.memory_info().rss, 0),
            threads=_field(proc.num_threads, 0),
            rank=_rank(_field(proc.environ, {})),
        )


def _rank(environ: dict) -> int | None:
    """RANK from a process's environment, None when unset or not a number."""
    try:
        return int(environ.get("RANK", ""))
    except ValueError:
        return None


def _field(getter, default):
    """Return getter(), or `default` where the kernel will not say (gone, zombie, no access)."""
    try:
        return getter()
    except psutil.Error:
        return default


def _looks_like_python(proc: psutil.Process) -> bool:
    """Say whether the process runs a Python interpreter (worth a py-spy dump)."""
    names = [_field(proc.exe, ""), (_field(proc.cmdline, []) or [""])[0]]
    return any(os.path.basename(name).startswith("python") for name in names if name)


def _stacks(pids: list[int], py_spy: str | None, timeout_s: float) -> tuple[str, str]:
    """Dump the Python stacks of `pids` concurrently; return (text, stack_method)."""
    if not pids:
        return "", "none: no Python process in the tree"
    if not py_spy:
        return "", "unavailable: py-spy not found"
    scope = _ptrace_scope()
    if scope == 3:  # yama: no process may attach to any other, not even root
        return "", "unavailable: ptrace not permitted (kernel.yama.ptrace_scope=3)"
    results = _dump_all(py_spy, pids, timeout_s)
    dumps = [text for _, text, err in results if err is None]
    failures = [(pid, err) for pid, _, err in results if err is not None]
    if dumps:
        text = "\n".join(d.rstrip("\n") + "\n" for d in dumps)
        text += "".join(f"pid {pid}: py-spy failed: {err}\n" for pid, err in failures)
        return text, "py-spy"
    err = failures[0][1]
    if err.startswith("not found"):
        return "", f"unavailable: py-spy {err}"
    if _PERMISSION.search(err):
        why = f"kernel.yama.ptrace_scope={scope}; " if scope else ""
        return "", f"unavailable: ptrace not permitted ({why}py-spy: {err})"
    return "", f"unavailable: py-spy failed: {err}"


def _dump_all(py_spy: str, pids: list[int], timeout_s: float) -> list[tuple[int, str, str | None]]:
    """Run _dump on each pid, 8 at a time, in daemon threads; return the results in the order of pids.

    Not a ThreadPoolExecutor: the interpreter joins its workers at exit, so a py-spy
    stuck in the kernel (unkillable, waited on for ever) would hold up our exit.
    """
    todo, results, lock = list(pids), {}, threading.Lock()

    def work() -> None:
        while True:
            with lock:
                if not todo:
                    return
                pid = todo.pop(0)
            results[pid] = _dump(py_spy, pid, timeout_s)

    workers = [threading.Thread(target=work, name="py-spy", daemon=True) for _ in range(min(len(pids), 8))]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return [results[pid] for pid in pids]


def _dump(py_spy: str, pid: int, timeout_s: float) -> tuple[int, str, str | None]:
    """Run `py-spy dump --native` on one process (else a plain dump); return (pid, stdout, one-line error or None).

    Native frames name what a thread waits for below Python: a rank stuck in backward()
    shows `_engine_run_backward` in Python, and `c10d::Reducer` or `Work::wait` natively.
    Unwinding native code can fail (a platform or binary py-spy cannot unwind): then a
    plain Python dump, in the time that is left. A timeout is not retried: the bound holds.
    """
    started = time.monotonic()
    pid_, out, err = _run_py_spy(py_spy, pid, timeout_s, native=True)
    if err is None or err.startswith(("not found", "not executable", "timed out")) or _PERMISSION.search(err):
        return pid_, out, err
    left = timeout_s - (time.monotonic() - started)
    return _run_py_spy(py_spy, pid, left, native=False) if left > 0 else (pid_, out, err)


def _run_py_spy(py_spy: str, pid: int, timeout_s: float, native: bool) -> tuple[int, str, str | None]:
    env = dict(os.environ, RUST_BACKTRACE="0", RUST_LIB_BACKTRACE="0")  # one error line, not a trace
    try:
        returncode, stdout, stderr = helpers.run(
            [py_spy, "dump", *(["--native"] if native else []), "--pid", str(pid)],
            timeout_s, stdin=subprocess.DEVNULL, env=env,
        )
    except FileNotFoundError:
        return pid, "", f"not found ({py_spy})"
    except PermissionError:
        return pid, "", f"not executable ({py_spy})"
    except subprocess.TimeoutExpired:
        return pid, "", f"timed out after {timeout_s:g}s"
    except OSError as e:
        return pid, "", f"could not run ({e})"
    out = stdout.decode("utf-8", errors="replace")
    if returncode != 0:
        err = stderr.decode("utf-8", errors="replace")
        return pid, out, _first_line(err, 300) or f"exit status {returncode}"
    return pid, out, None


def _ptrace_scope() -> int | None:
    """Return Yama's ptrace_scope (0 classic, 1 descendants only, 2 admin, 3 none), None without Yama."""
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _first_line(text: str, limit: int) -> str:
    """Return the first non-empty line of `text`, cut to `limit` characters."""
    return one_line(next((ln for ln in text.splitlines() if ln.strip()), ""), limit)


def _gpu_processes(pids, none_when_unavailable: bool = False) -> list[dict] | None:
    """Return GPU memory and utilisation per process of `pids` via NVML ([] or None without it)."""
    unavailable = None if none_when_unavailable else []
    try:
        import pynvml  # nvidia-ml-py: optional, only where there is a GPU
    except Exception:
        return unavailable
    try:
        pynvml.nvmlInit()
    except Exception:  # no driver, no GPU, a container without the library
        return unavailable
    wanted = set(pids)
    rows: list[dict] = []
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            util = {}
            try:
                util = {s.pid: s.smUtil for s in pynvml.nvmlDeviceGetProcessUtilization(handle, 0)}
            except pynvml.NVMLError:
                pass  # not supported on every GPU, or no samples yet
            seen = set()
            for getter in (pynvml.nvmlDeviceGetComputeRunningProcesses, pynvml.nvmlDeviceGetGraphicsRunningProcesses):
                try:
                    running = getter(handle)
                except pynvml.NVMLError:
                    continue
                for proc in running:
                    if proc.pid in wanted and proc.pid not in seen:
                        seen.add(proc.pid)
                        rows.append({
                            "gpu": index,
                            "pid": proc.pid,
                            "used_memory_bytes": proc.usedGpuMemory,  # None where NVML cannot tell
                            "sm_util_percent": util.get(proc.pid),
                        })
    except Exception:
        return unavailable
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass
    return rows
