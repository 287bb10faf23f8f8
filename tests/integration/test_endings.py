"""Why a run ended (SPEC 4, `cause`), on real endings: an exception, a segfault, CUDA's out-of-memory
message, a SIGKILL from outside, a stall, and the kernel's OOM killer in a memory cgroup."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from helpers import PY, base_env, child_cmd, kill_tree_of, run_sup, start_sup, sup_argv, sup_lines, wait_for

from supervisor.forensics.oom import memory_cgroup_files

FAST = ("--heartbeat", "0", "--kill-grace", "1")
ALLOCATE = "x = []\nwhile True:\n    x.append(bytearray(8 << 20))  # touched: the kernel zeroes each page\n"


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ending(path: Path) -> dict:
    last = events(path)[-1]
    assert last["event"] == "exit", last
    return last


def test_an_exception_is_named_on_the_exit_event_the_restart_the_exit_line_and_the_alert(tmp_path):
    ev, said = tmp_path / "ev.jsonl", tmp_path / "alerts.txt"
    hook = f"{shlex.quote(PY)} -c 'import os,sys; open(sys.argv[1], \"a\").write(os.environ[\"SUPERVISE_MESSAGE\"] + chr(10))' {said}"
    r = run_sup(*FAST, "--events", str(ev), "--restart-on-crash", "--max-restarts", "1", "--alert-cmd", hook,
                child=[PY, "-c", "def check(n):\n    raise ValueError(f'shape mismatch {n} vs 4')\ncheck(3)"],
                cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    detail = "ValueError: shape mismatch 3 vs 4"
    (restart,) = [e for e in events(ev) if e["event"] == "restart"]
    assert (restart["cause"], restart["detail"]) == ("exception", detail)
    end = ending(ev)
    assert (end["cause"], end["detail"]) == ("exception", detail)
    lines = sup_lines(r.stderr)
    assert any(line.startswith("[supervise") and "RESTART" in line and line.endswith(f"cause=exception ({detail})")
               for line in lines), lines
    assert lines[-1].endswith(f"; cause=exception ({detail})"), lines[-1]
    assert "; report: magvit-report " in lines[-1]
    # restart, gave-up and exit alerts, each fired off the loop (in any order)
    alerts = wait_for(lambda: said.exists() and said.read_text().count("\n") >= 3 and said.read_text(), timeout_s=20)
    carried = [a for a in alerts.splitlines() if a.endswith(f"cause=exception ({detail})")]
    assert len(carried) == 2 and any("exit status=1 " in a for a in carried), alerts


def test_a_segfault_names_the_frame_faulthandler_printed(tmp_path):
    ev = tmp_path / "ev.jsonl"
    r = run_sup(*FAST, "--events", str(ev), child=[PY, "-c", "import ctypes\nctypes.string_at(0)"], cwd=tmp_path)
    assert r.returncode == 139
    end = ending(ev)
    assert end["cause"] == "segfault" and end["detail"].startswith("Segmentation fault in string_at ("), end
    assert "ctypes/__init__.py:" in end["detail"]


def test_cuda_out_of_memory_in_the_output_wins_over_the_exit_status(tmp_path):
    ev = tmp_path / "ev.jsonl"
    message = ("torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity "
               "of 79.10 GiB of which 1.06 GiB is free.")
    script = f"import sys\nprint('epoch 3', flush=True)\nsys.stderr.write({message!r} + '\\n')\nsys.exit(1)"
    r = run_sup(*FAST, "--events", str(ev), child=[PY, "-c", script], cwd=tmp_path)
    assert r.returncode == 1
    assert (ending(ev)["cause"], ending(ev)["detail"]) == ("cuda-oom", message)
    assert sup_lines(r.stderr)[-1].endswith(f"cause=cuda-oom ({message})")


def vmstat_oom_kills() -> int | None:
    for line in Path("/proc/vmstat").read_text().splitlines():
        if line.startswith("oom_kill "):
            return int(line.split()[1])
    return None


def test_a_sigkill_from_outside_is_a_signal(tmp_path):
    ev = tmp_path / "ev.jsonl"
    before = vmstat_oom_kills()
    sup = start_sup(*FAST, "--events", str(ev), child=child_cmd("silent", 600), cwd=tmp_path)
    try:
        line = sup.stdout.readline()
        pid = int(line.split(b"pid: ")[1].split(b")")[0])
        os.kill(pid, signal.SIGKILL)
        assert sup.wait(timeout=30) == 137
    finally:
        kill_tree_of(sup)
    if vmstat_oom_kills() != before:
        pytest.skip("the OOM killer killed something on this machine meanwhile: a SIGKILL is then ambiguous")
    assert (ending(ev)["cause"], ending(ev)["detail"]) == ("signal", "SIGKILL")


def test_a_stall_is_the_cause_whatever_the_child_printed_as_it_died(tmp_path):
    ev = tmp_path / "ev.jsonl"
    r = run_sup(*FAST, "--events", str(ev), "--stall-timeout", "1", child=child_cmd("hang-after-progress"),
                cwd=tmp_path, timeout_s=60)
    assert r.returncode == 124
    end = ending(ev)
    assert end["cause"] == "stall" and end["detail"].startswith("no progress for "), end
    assert "(limit 1s)" in end["detail"]


def test_a_clean_exit_has_no_cause_whatever_it_printed(tmp_path):
    ev = tmp_path / "ev.jsonl"
    script = "import sys\nsys.stderr.write('Traceback (most recent call last):\\nValueError: handled\\n')"
    r = run_sup(*FAST, "--events", str(ev), child=[PY, "-c", script], cwd=tmp_path)
    assert r.returncode == 0
    assert (ending(ev)["cause"], ending(ev)["detail"]) == (None, None)
    assert "cause=" not in sup_lines(r.stderr)[-1]


# ---- the kernel's OOM killer, for real -------------------------------------------------


class MemoryCgroup:
    """A memory cgroup of our own with a small limit (v1 below ours; v2 beside ours), or why not."""

    def __init__(self, limit_bytes: int):
        self.path: str | None = None
        self.why_not: str | None = None
        mine = memory_cgroup_files(os.getpid())
        if os.geteuid() != 0:
            self.why_not = "memory cgroups need root"
            return
        if not mine:
            self.why_not = "no memory cgroup is visible here"
            return
        _, counter = mine[-1]
        own = os.path.dirname(counter)
        name = f"mvs-test-{uuid.uuid4().hex[:8]}"
        if counter.endswith("memory.oom_control"):  # v1: any cgroup may have children
            self.path, limit_file = os.path.join(own, name), "memory.limit_in_bytes"
        else:  # v2: no processes in a cgroup that hands out memory, so beside ours
            parent = os.path.dirname(own)
            try:
                enabled = Path(parent, "cgroup.subtree_control").read_text().split()
            except OSError as e:
                self.why_not = f"cannot read {parent}/cgroup.subtree_control: {e}"
                return
            if "memory" not in enabled:
                self.why_not = f"the memory controller is not enabled below {parent}"
                return
            self.path, limit_file = os.path.join(parent, name), "memory.max"
        try:
            os.mkdir(self.path)
            Path(self.path, limit_file).write_text(str(limit_bytes))
        except OSError as e:
            self.why_not = f"cannot make a memory cgroup at {self.path}: {e}"
            self.close()
            self.path = None

    def enter_then(self, argv: list[str]) -> list[str]:
        """argv run by a shell that first moves itself into this cgroup (as cgexec does)."""
        procs = os.path.join(self.path, "cgroup.procs")
        return ["/bin/sh", "-c", f'echo $$ > {shlex.quote(procs)} && exec "$@"', "sh", *argv]

    def close(self) -> None:
        if self.path and os.path.isdir(self.path):
            wait_for(lambda: not Path(self.path, "cgroup.procs").read_text().strip(), timeout_s=20,
                     what="the cgroup to empty")
            os.rmdir(self.path)


@pytest.fixture
def small_cgroup():
    cg = MemoryCgroup(256 << 20)
    if cg.path is None:
        pytest.skip(cg.why_not)
    try:
        yield cg
    finally:
        cg.close()


@pytest.mark.timeout(120)
def test_the_oom_killer_in_the_supervisors_cgroup_is_counted_there(tmp_path, small_cgroup):
    # A job's cgroup (a container, a Slurm step) with the supervisor and its child both in it.
    ev = tmp_path / "ev.jsonl"
    argv = small_cgroup.enter_then(sup_argv(*FAST, "--events", str(ev), child=[PY, "-c", ALLOCATE]))
    r = subprocess.run(argv, env=base_env(), cwd=tmp_path, stdin=subprocess.DEVNULL, capture_output=True, timeout=100)
    assert r.returncode == 137, r.stderr
    end = ending(ev)
    assert end["cause"] == "oom-killer", end
    assert "in memory cgroup " in end["detail"] and "oom_kill 0 -> 1" in end["detail"], end
    assert sup_lines(r.stderr)[-1].endswith(f"cause=oom-killer ({end['detail']})")


@pytest.mark.timeout(120)
def test_the_oom_killer_in_a_cgroup_the_child_moved_into(tmp_path, small_cgroup):
    # The child moves itself into a small cgroup (cgexec, systemd-run --scope): the kill counts there,
    # where the supervisor's own cgroup does not see it; the machine's count does.
    ev = tmp_path / "ev.jsonl"
    r = run_sup(*FAST, "--events", str(ev), child=small_cgroup.enter_then([PY, "-c", ALLOCATE]), cwd=tmp_path,
                timeout_s=100)
    assert r.returncode == 137, r.stderr
    end = ending(ev)
    assert end["cause"] == "oom-killer", end
    assert "oom_kill" in end["detail"], end


@pytest.mark.parametrize("options", [(), ("--progress-file", "P.txt", "--startup-grace", "0")],
                         ids=["output counters on", "a progress file named: counters off"])
def test_a_traceback_on_stdout_spliced_to_a_file_is_evidence_too(tmp_path, options):
    # stdout to a regular file, stderr apart: stdout goes from pipe to file inside the kernel (splice),
    # and the end of what moved is still seen.
    ev = tmp_path / "ev.jsonl"
    script = "import sys\nprint('Traceback (most recent call last):\\nValueError: on stdout', flush=True)\nsys.exit(2)"
    with open(tmp_path / "out.txt", "wb") as out:
        r = run_sup(*FAST, "--events", str(ev), *options, child=[PY, "-c", script], cwd=tmp_path, stdout=out)
    assert r.returncode == 2
    assert (tmp_path / "out.txt").read_bytes() == b"Traceback (most recent call last):\nValueError: on stdout\n"
    assert (ending(ev)["cause"], ending(ev)["detail"]) == ("exception", "ValueError: on stdout")
