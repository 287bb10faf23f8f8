"""Which rank is different: group the ranks of a stalled job by where their main thread is (SPEC 4).

A hung job has one rank in the fault (an injected sleep, a dead data loader, a deadlock) and
the others waiting for it in a collective. Grouping the ranks by the innermost Python frame of
their main thread, as py-spy shows it, puts the odd one out in a group of its own.

Ranks that wait in a collective form one group whatever their frame: where a rank waits
depends on the collective's algorithm, not on the fault (a broadcast's root waits for every
receiver while a receiver that got its data goes on to the gradient all-reduce), so frames
alone would split the waiting ranks and hide the one that is different. Native frames name
the wait (c10d::Work::wait, Reducer::finalize_backward) but never group: their addresses and
names differ per process and per build.

Pure: process facts and py-spy's text in, groups out; output/lines.py renders them.
"""
from __future__ import annotations

import re
from typing import NamedTuple


class Proc(NamedTuple):
    """What triage needs of one diagnosed process."""

    pid: int
    rank: int | None  # RANK from its environment, None when unset or unreadable
    cmd: str
    ppid: int = 0


class Frame(NamedTuple):
    """Where one process's main thread is."""

    text: str | None  # innermost Python frame, 'function (file:line)' as py-spy shows it; None: none seen
    collective: bool  # it waits in a collective (native c10d/gloo/NCCL frames or a torch.distributed call)


_PROCESS = re.compile(r"^Process (\d+): ", re.M)
_THREAD = re.compile(r'^Thread (\S+)(?: \(([^)]*)\))?(?:: "(.*)")?\s*$')
_FRAME = re.compile(r"^    (\S.*) \(([^()]*)\)\s*$")
_PY_LOCATION = re.compile(r"^(.*\.pyw?|<[^>]*>):\d+$")
_NATIVE_COLLECTIVE = re.compile(r"c10d::|gloo::|nccl|ProcessGroup|Reducer::|Work::wait", re.IGNORECASE)
_COLLECTIVE_FILES = ("torch/distributed/distributed_c10d.py", "torch/distributed/c10d_logger.py",
                     "torch/nn/parallel/distributed.py")
_COLLECTIVE_CALLS = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "broadcast",
                     "broadcast_object_list", "barrier", "monitored_barrier", "reduce", "reduce_scatter",
                     "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send",
                     "recv", "isend", "irecv", "batch_isend_irecv"}


def main_frames(stacks: str) -> dict[int, Frame]:
    """Return, per pid dumped in `stacks` (py-spy dumps one after the other), where its main thread is."""
    found: dict[int, Frame] = {}
    starts = list(_PROCESS.finditer(stacks))
    for i, m in enumerate(starts):
        end = starts[i + 1].start() if i + 1 < len(starts) else len(stacks)
        pid = int(m.group(1))
        found[pid] = _main_thread_frame(pid, stacks[m.end():end])
    return found


def _main_thread_frame(pid: int, dump: str) -> Frame:
    """The innermost Python frame of the main thread: the one named MainThread, else the one whose id is the pid."""
    threads: list[tuple[str, str | None, list[str]]] = []  # (id, name, frame lines)
    for line in dump.splitlines():
        t = _THREAD.match(line)
        if t:
            threads.append((t.group(1), t.group(3), []))
        elif threads and line.startswith("    ") and not line.startswith("     "):
            threads[-1][2].append(line)  # deeper lines are --locals, not frames
    main = (next((t for t in threads if t[1] == "MainThread"), None)
            or next((t for t in threads if t[0] in (str(pid), hex(pid))), None)
            or (threads[0] if threads else None))
    if main is None:
        return Frame(None, False)
    native_inside: list[str] = []  # native frames inside (below) the innermost Python frame
    for line in main[2]:
        f = _FRAME.match(line)
        if not f:
            continue
        function, location = f.group(1), f.group(2)
        if _PY_LOCATION.match(location):
            text = f"{function} ({location})"
            return Frame(text, _is_collective(function, location, native_inside))
        native_inside.append(function)
    return Frame(None, any(_NATIVE_COLLECTIVE.search(n) for n in native_inside))


def _is_collective(function: str, location: str, native_inside: list[str]) -> bool:
    if any(_NATIVE_COLLECTIVE.search(n) for n in native_inside):
        return True
    return location.rsplit(":", 1)[0].endswith(_COLLECTIVE_FILES) or function.rsplit(".", 1)[-1] in _COLLECTIVE_CALLS


def members(procs: list[Proc], dumped: set[int]) -> list[Proc]:
    """The processes to compare: the ranks (RANK set), else the largest set of dumped ones sharing a command line.

    A process under another of the same rank or command (a DataLoader worker, forked with the
    rank's environment) is that rank's helper, not a rank of its own.
    """
    by_pid = {p.pid: p for p in procs}
    ranked = [p for p in procs if p.rank is not None]
    if ranked:
        # A launcher that inherited a RANK of its own (torchrun under a script that exports RANK)
        # is above ranks of other numbers: it is no rank, and theirs are no helpers of it.
        launchers = {a.pid for p in ranked for a in _ancestors(p, by_pid) if a.rank is not None and a.rank != p.rank}
        kept = {pid: p for pid, p in by_pid.items() if pid not in launchers}
        return [p for p in ranked
                if p.pid in kept and not any(a.rank == p.rank for a in _ancestors(p, kept))]
    by_cmd: dict[str, list[Proc]] = {}
    for p in procs:
        if p.pid in dumped and not any(a.cmd == p.cmd for a in _ancestors(p, by_pid)):
            by_cmd.setdefault(p.cmd, []).append(p)
    best = max(by_cmd.values(), key=len, default=[])
    return best if len(best) >= 2 else []


def _ancestors(p: Proc, by_pid: dict[int, Proc]) -> list[Proc]:
    """p's ancestors among the diagnosed processes, nearest first."""
    found, seen, parent = [], {p.pid}, by_pid.get(p.ppid)
    while parent is not None and parent.pid not in seen:
        found.append(parent)
        seen.add(parent.pid)
        parent = by_pid.get(parent.ppid)
    return found


def groups(procs: list[Proc], stacks: str) -> list[dict]:
    """Group the ranks by their main thread's innermost Python frame: the `groups` of the diagnosis event.

    Each group is {"ranks", "pids", "frame", "collective"}, largest first; `ranks` sorted (empty
    for processes without RANK, listed by pid); `frame` None where no Python frame was seen (py-spy
    failed, or only native frames); for the ranks waiting in a collective, one group whose frame
    lists their distinct frames.
    """
    frames = main_frames(stacks)
    chosen = members(procs, set(frames))
    if not chosen:
        return []
    buckets: dict[tuple, list[Proc]] = {}
    for p in chosen:
        frame = frames.get(p.pid, Frame(None, False))
        key = ("collective",) if frame.collective else ("frame", frame.text)
        buckets.setdefault(key, []).append(p)
    out = []
    for key, procs_in in buckets.items():
        procs_in.sort(key=lambda p: (p.rank is None, p.rank if p.rank is not None else 0, p.pid))
        if key[0] == "collective":
            texts = list(dict.fromkeys(t for p in procs_in if (t := frames[p.pid].text)))
            frame = ", ".join(texts) or None
        else:
            frame = key[1]
        out.append({"ranks": [p.rank for p in procs_in if p.rank is not None], "pids": [p.pid for p in procs_in],
                    "frame": frame, "collective": key[0] == "collective"})
    out.sort(key=lambda g: (-len(g["pids"]), g["ranks"][:1] or [1 << 30], g["pids"][0]))
    return out
