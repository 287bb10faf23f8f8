"""Why a launch ended (SPEC 4, `cause`): the evidence table, on real output where it can be had here.

Real captures (tests/fixtures/endings/): faulthandler's report of ctypes.string_at(0); a DataLoader
whose worker was SIGKILLed; a 2-rank torchrun whose rank 1 raised (--fault crash:3:1). The CUDA
and NCCL lines are PyTorch's own wording (no GPU here).
"""
import signal
from pathlib import Path

import pytest

from supervisor.forensics.cause import DETAIL_MAX_CHARS, Ending, cause_of
from supervisor.output.lines import exit_line, restart_line, stall_detail

ENDINGS = Path(__file__).resolve().parents[1] / "fixtures" / "endings"
SEGFAULT = (ENDINGS / "segfault.stderr").read_bytes()
WORKER = (ENDINGS / "dataloader-worker-killed.stderr").read_bytes()
TORCHRUN = (ENDINGS / "torchrun-rank-crash.stderr").read_bytes()
TRACEBACK = b"""Traceback (most recent call last):
  File "/tmp/train.py", line 3, in <module>
    check(x)
  File "/tmp/train.py", line 2, in check
    raise ValueError("shape mismatch 3 vs 4")
ValueError: shape mismatch 3 vs 4
"""
CHAINED = TRACEBACK + b"""
During handling of the above exception, another exception occurred:

Traceback (most recent call last):
  File "/tmp/train.py", line 9, in <module>
    save()
KeyError: 'step'
"""
CUDA_OOM = TRACEBACK.replace(b"ValueError: shape mismatch 3 vs 4", (
    b"torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
    b"79.10 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process has 78.03 GiB memory in use."))
NCCL_TIMEOUT = (
    b"[rank0]:[E1206 06:30:00.123456 4242 ProcessGroupNCCL.cpp:616] [Rank 0] Watchdog caught collective operation "
    b"timeout: WorkNCCL(SeqNum=5, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for 600081 "
    b"milliseconds before timing out.\n"
    b"terminate called after throwing an instance of 'c10::DistBackendError'\n")
NCCL_ERROR = TRACEBACK.replace(b"ValueError: shape mismatch 3 vs 4", (
    b"torch.distributed.DistBackendError: NCCL error in: ../torch/csrc/distributed/c10d/NCCLUtils.hpp:275, "
    b"unhandled system error (run with NCCL_DEBUG=INFO for details), NCCL version 2.21.5\n"
    b"ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device error."))
OOM = "the OOM killer killed 1 process in memory cgroup /jobs/42 (memory.events oom_kill 0 -> 1)"
KILL, SEGV, TERM, ABRT = 128 + 9, 128 + 11, 128 + 15, 128 + 6

CASES = [
    ("status 0 has no cause, whatever the output said", Ending(0, stderr=TRACEBACK), (None, None)),
    ("the supervisor ended it for a stall", Ending(124, stalled=True, killed_by_us=True, stderr=CUDA_OOM,
                                                   stall="no progress for 12s (limit 10s) in PROGRESS.txt"),
     ("stall", "no progress for 12s (limit 10s) in PROGRESS.txt")),
    ("an exception: the last line of the traceback", Ending(1, stderr=TRACEBACK),
     ("exception", "ValueError: shape mismatch 3 vs 4")),
    ("chained exceptions: the last traceback's", Ending(1, stderr=CHAINED), ("exception", "KeyError: 'step'")),
    ("with --pty the traceback arrives on stdout", Ending(1, stdout=b"epoch 1\r\n" + TRACEBACK.replace(b"\n", b"\r\n")),
     ("exception", "ValueError: shape mismatch 3 vs 4")),
    ("torchrun: the root cause rank's exception, not torchrun's ChildFailedError nor the peer's",
     Ending(1, stderr=TORCHRUN), ("exception", "RuntimeError: injected crash at step 3 (--fault crash)")),
    ("CUDA out of memory wins over the exception it raised", Ending(1, stderr=CUDA_OOM),
     ("cuda-oom", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
                  "capacity of 79.10 GiB of which 1.06 GiB is free. Including non-PyTorch memory, this process "
                  "has 78.03 GiB memory in use.")),
    ("the NCCL watchdog's timeout wins over its abort", Ending(ABRT, term_signal=signal.SIGABRT, stderr=NCCL_TIMEOUT),
     ("nccl-timeout", "WorkNCCL(SeqNum=5, OpType=ALLREDUCE, NumelIn=1, NumelOut=1, Timeout(ms)=600000) ran for "
                      "600081 milliseconds before timing out.")),
    ("an NCCL error", Ending(1, stderr=NCCL_ERROR),
     ("nccl-error", "ncclSystemError: System call (e.g. socket, malloc) or external library call failed or device "
                    "error.")),
    ("a DataLoader worker killed: how it died", Ending(1, stderr=WORKER),
     ("dataloader-worker", "RuntimeError: DataLoader worker (pid 15893) is killed by signal: Killed.")),
    ("a DataLoader worker killed by the OOM killer says so",
     Ending(1, stderr=WORKER, oom=OOM),
     ("dataloader-worker", f"RuntimeError: DataLoader worker (pid 15893) is killed by signal: Killed. ({OOM})")),
    ("a segfault: faulthandler's innermost frame", Ending(SEGV, term_signal=signal.SIGSEGV, stderr=SEGFAULT),
     ("segfault", "Segmentation fault in string_at (/root/.pyenv/versions/3.11.7/lib/python3.11/ctypes/__init__.py:519)")),
    ("a segfault with nothing printed", Ending(SEGV, term_signal=signal.SIGSEGV), ("segfault", "SIGSEGV")),
    ("SIGBUS is a segfault too", Ending(128 + 7, term_signal=signal.SIGBUS), ("segfault", "SIGBUS")),
    ("the OOM killer: a SIGKILL we did not send, and the kill counted",
     Ending(KILL, term_signal=signal.SIGKILL, oom=OOM, stderr=TRACEBACK), ("oom-killer", f"SIGKILL; {OOM}")),
    ("a SIGKILL with no OOM kill counted is a signal from outside", Ending(KILL, term_signal=signal.SIGKILL),
     ("signal", "SIGKILL")),
    ("our own SIGKILL (the user's second Ctrl-C) is no OOM kill, even with one counted",
     Ending(KILL, term_signal=signal.SIGKILL, killed_by_us=True, user_signal=signal.SIGINT, oom=OOM),
     ("signal", "SIGKILL; the user's SIGINT, passed on by the supervisor")),
    ("a traceback before a death by signal was not the end: the signal is",
     Ending(TERM, term_signal=signal.SIGTERM, stderr=TRACEBACK), ("signal", "SIGTERM")),
    ("the user's SIGTERM, handled by the child (exit 143)", Ending(143, user_signal=signal.SIGTERM),
     ("signal", "the user's SIGTERM, passed on by the supervisor; the child exited 143")),
    ("an exit status and nothing to say why", Ending(3, stderr=b"bye\n"), (None, None)),
]


@pytest.mark.parametrize("what, end, expected", CASES, ids=[c[0] for c in CASES])
def test_cause(what, end, expected):
    assert cause_of(end) == expected


def test_detail_is_one_printable_line_of_at_most_300_characters():
    evil = b"Traceback (most recent call last):\n  File \"x\", line 1\nValueError: \x1b[31mred\x1b[0m " + b"\xff" * 500
    cause, detail = cause_of(Ending(1, stderr=evil))
    assert cause == "exception" and len(detail) <= DETAIL_MAX_CHARS and detail.isprintable()
    assert "\x1b" not in detail and detail.startswith("ValueError: \\x1b[31mred")


def test_exit_and_restart_lines_end_with_the_cause():
    ev = {"status": 1, "reason": "exited", "runtime_s": 3, "restarts": 0, "stalls": 0,
          "cause": "exception", "detail": "ValueError: shape mismatch 3 vs 4"}
    assert exit_line(ev) == ("exit status=1 reason=exited runtime=3s restarts=0 stalls=0 "
                             "cause=exception (ValueError: shape mismatch 3 vs 4)")
    assert exit_line(ev, report="magvit-report run").endswith(
        "stalls=0; report: magvit-report run; cause=exception (ValueError: shape mismatch 3 vs 4)")
    assert exit_line({**ev, "status": 0, "cause": None, "detail": None}).endswith("stalls=0")
    restart = {"attempt": 1, "backoff_s": 1, "reason": "crash", "cause": "segfault", "detail": "SIGSEGV"}
    assert restart_line(restart, 3, 139) == "RESTART attempt 1/3 after crash (status 139) in 1s cause=segfault (SIGSEGV)"


def test_a_stall_as_evidence_is_its_line_without_kind_and_action():
    ev = {"kind": "progress", "age_s": 12.2, "limit_s": 10, "progress": "Epoch 2/5 - Batch 2/3", "action": "kill"}
    assert stall_detail(ev, "PROGRESS.txt") == "no progress for 12s (limit 10s) in PROGRESS.txt | Epoch 2/5 - Batch 2/3"
