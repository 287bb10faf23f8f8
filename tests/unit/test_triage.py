"""Stack triage (SPEC 4): which rank of a stalled job is different, on real py-spy dumps.

The fixtures are py-spy's own output, taken once from a real 3-rank torchrun of the trainer
(gloo, CPU) with `--fault hang:6:2`: pid 9298 is torchrun, 9320/9321/9322 are ranks 0/1/2.
Rank 2 sleeps in the injected hang; rank 0, DDP's broadcast root, waits for rank 2 in the
buffer broadcast; rank 1 got its buffers and waits in the gradient all-reduce under backward.
"""
from pathlib import Path

import pytest

from supervisor.forensics.triage import Proc, groups, main_frames
from supervisor.output.lines import diagnosis_lines, triage_line

STACKS = Path(__file__).resolve().parents[1] / "fixtures" / "stacks"
NATIVE = (STACKS / "torchrun-3-ranks-hang-native.txt").read_text()
PLAIN = (STACKS / "torchrun-3-ranks-hang-plain.txt").read_text()
CMD = "/work/main/.venv/bin/python -u trainer/train.py --fault hang:6:2"
TORCHRUN = Proc(9298, None, "/work/main/.venv/bin/python -m torch.distributed.run trainer/train.py", 1)
RANKS = [Proc(9320, 0, CMD, 9298), Proc(9321, 1, CMD, 9298), Proc(9322, 2, CMD, 9298)]
HANG = "_injected_hang (trainer/control.py:42)"
BROADCAST = "DistributedDataParallel._distributed_broadcast_coalesced (torch/nn/parallel/distributed.py:2363)"
BACKWARD = "_engine_run_backward (torch/autograd/graph.py:979)"
WAITING = f"{BROADCAST}, {BACKWARD}"


def test_main_thread_innermost_python_frame_skips_native_frames():
    frames = main_frames(NATIVE)
    assert frames[9322].text == HANG and not frames[9322].collective  # clock_nanosleep, time_sleep: native
    assert frames[9320].text == BROADCAST and frames[9320].collective  # c10d::Work::wait inside it
    assert frames[9321].text == BACKWARD and frames[9321].collective  # c10d::Reducer::finalize_backward
    assert frames[9298].text.startswith("SimpleElasticAgent._invoke_run (")


def named(*procs, stacks=NATIVE):
    return groups(list(procs), stacks)


# (what, processes, expected groups as (ranks, pids, frame, collective), expected line)
CASES = [
    ("the hung rank is the odd one out; the ranks waiting for it in collectives are one group",
     [TORCHRUN, *RANKS],
     [([0, 1], [9320, 9321], WAITING, True), ([2], [9322], HANG, False)],
     f"odd one out: rank 2 (pid 9322) in {HANG}; ranks 0,1 in a collective: {WAITING}"),
    ("no RANK anywhere: processes of one command line are compared, listed by pid",
     [TORCHRUN._replace(rank=None), *[p._replace(rank=None) for p in RANKS]],
     [([], [9320, 9321], WAITING, True), ([], [9322], HANG, False)],
     f"odd one out: pid 9322 in {HANG}; pids 9320,9321 in a collective: {WAITING}"),
    ("a forked helper (DataLoader worker) inherits its rank's RANK but is not a rank",
     [TORCHRUN, *RANKS, Proc(9400, 2, CMD, 9322)],
     [([0, 1], [9320, 9321], WAITING, True), ([2], [9322], HANG, False)],
     f"odd one out: rank 2 (pid 9322) in {HANG}; ranks 0,1 in a collective: {WAITING}"),
    ("torchrun with a RANK of its own (exported by a script above it) is a launcher, not rank 0's parent",
     [TORCHRUN._replace(rank=0), *RANKS],
     [([0, 1], [9320, 9321], WAITING, True), ([2], [9322], HANG, False)],
     f"odd one out: rank 2 (pid 9322) in {HANG}; ranks 0,1 in a collective: {WAITING}"),
    ("all alike in a collective: the fault is not on this node",
     [TORCHRUN, *RANKS[:2]],
     [([0, 1], [9320, 9321], WAITING, True)],
     f"all 2 ranks in a collective: {WAITING}; a collective everyone here waits in points at the network"
     " or at a rank outside this node"),
    ("one rank on this node (one rank per node): it is named",
     [TORCHRUN, RANKS[2]],
     [([2], [9322], HANG, False)],
     f"rank 2 (pid 9322) in {HANG}"),
    ("nothing to compare: one process, no RANK", [TORCHRUN], [], None),
    ("a rank py-spy could not read has no frame, and is still named",
     [TORCHRUN, *RANKS, Proc(9500, 3, CMD, 9298)],
     [([0, 1], [9320, 9321], WAITING, True), ([2], [9322], HANG, False), ([3], [9500], None, False)],
     f"no odd one out: ranks 0,1 (pids 9320,9321) in a collective: {WAITING}; rank 2 (pid 9322) in {HANG};"
     " rank 3 (pid 9500) in no Python frame"),
]


@pytest.mark.parametrize("what, procs, expected, line", CASES, ids=[c[0] for c in CASES])
def test_groups_and_line(what, procs, expected, line):
    got = named(*procs)
    assert [(g["ranks"], g["pids"], g["frame"], g["collective"]) for g in got] == expected
    assert triage_line(got) == line


def test_plain_dump_without_native_frames_cannot_see_the_all_reduce_under_backward():
    # py-spy's fallback without --native: backward() hides DDP's all-reduce, so rank 1 looks
    # different from rank 0 too, and there is no odd one out to name.
    got = groups([TORCHRUN, *RANKS], PLAIN)
    assert [(g["ranks"], g["frame"]) for g in got] == [([0], BROADCAST), ([1], BACKWARD), ([2], HANG)]
    assert triage_line(got).startswith("no odd one out: rank 0 (pid 9320) in a collective: ")


def eight_ranks(*hung: int) -> tuple[list[Proc], str]:
    """Eight ranks made of the real dumps: rank 2's stack for the `hung` ones, rank 0's for the rest."""
    blocks = {int(b.split(":", 1)[0]): "Process " + b for b in NATIVE.split("Process ")[1:]}
    procs, text = [], ""
    for rank in range(8):
        pid = 10000 + rank
        source = 9322 if rank in hung else 9320
        text += blocks[source].replace(f"Process {source}:", f"Process {pid}:", 1).replace(
            f"Thread {source} ", f"Thread {pid} ", 1)
        procs.append(Proc(pid, rank, CMD, 1))
    return procs, text


def test_one_of_eight_is_named_and_seven_are_grouped():
    procs, text = eight_ranks(5)
    got = groups(procs, text)
    assert [(g["ranks"], g["collective"]) for g in got] == [([0, 1, 2, 3, 4, 6, 7], True), ([5], False)]
    assert triage_line(got) == f"odd one out: rank 5 (pid 10005) in {HANG}; ranks 0,1,2,3,4,6,7 in a collective: {BROADCAST}"


def test_two_hung_of_eight_are_named_together():
    got = groups(*eight_ranks(3, 6))
    assert triage_line(got) == (f"odd one out: ranks 3,6 (pids 10003,10006) in {HANG}; ranks 0,1,2,4,5,7 in a "
                                f"collective: {BROADCAST}")


def test_all_eight_in_one_collective_points_at_the_network():
    line = triage_line(groups(*eight_ranks()))
    assert line.startswith(f"all 8 ranks in a collective: {BROADCAST}; ") and "outside this node" in line


def test_two_equal_groups_have_no_odd_one_out():
    line = triage_line(groups(*eight_ranks(4, 5, 6, 7)))
    assert line == (f"no odd one out: ranks 0,1,2,3 (pids 10000,10001,10002,10003) in a collective: {BROADCAST}; "
                    f"ranks 4,5,6,7 (pids 10004,10005,10006,10007) in {HANG}")


def test_threads_named_otherwise_and_locals_lines():
    text = ("Process 7: python x.py\nPython v3.12.3 (/usr/bin/python3)\n\n"
            "Thread 0x7F01 (active+gil): \"worker\"\n    spin (x.py:3)\n"
            "Thread 7 (idle)\n    wait (x.py:9)\n        Arguments:\n            n: 3\n    <module> (x.py:12)\n")
    frames = main_frames(text)
    assert frames[7].text == "wait (x.py:9)"  # no thread named MainThread: the one whose id is the pid


def test_diagnosis_lines_put_the_verdict_before_the_stacks():
    got = named(TORCHRUN, *RANKS)
    event = {"processes": [], "gpus": [], "stack_method": "py-spy", "stacks": NATIVE, "groups": got}
    out = diagnosis_lines(event)
    verdict = out.index(triage_line(got))
    assert verdict < out.index("python stacks (py-spy):")
