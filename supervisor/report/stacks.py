"""The hung thread in a diagnosis' stacks (py-spy or faulthandler text): pure, no files.

Read once per diagnosis as the events stream by, so the stacks themselves need not be kept.
"""
from __future__ import annotations

import re
from typing import Any

# Frames of the interpreter and libraries: a hung thread's innermost frame there says less than user code.
_LIBRARY = re.compile(r"site-packages|dist-packages|/lib/python\d|<frozen|^threading\.py|\(threading\.py")
_LAUNCHER = re.compile(r"torchrun|torch[./]distributed[./](run|launch)\b|elastic[./]agent")
_PYSPY_THREAD = re.compile(r'^Thread \S+ \([^)]*\)(?::\s*"(?P<name>.*)")?\s*$')
_PYSPY_FRAME = re.compile(r"^\s+(?P<frame>\S.*\(.*:\d+\))\s*$")
_FAULT_THREAD = re.compile(r"^(?:(?P<current>Current t)|T)hread 0x[0-9a-fA-F]+ .*\(most recent call first\):")
_FAULT_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.*)$')


def innermost_frames(stacks: str) -> list[list[tuple[str, str]]]:
    """Return, per process, the (thread name, innermost frame) of each thread in py-spy or faulthandler text."""
    return [threads for _, threads in _processes(stacks)]


def _processes(stacks: str) -> list[tuple[str, list[tuple[str, str]]]]:
    """Return (py-spy's "Process PID: command" header or "", [(thread name, innermost frame)]) per process."""
    processes: list[tuple[str, list[tuple[str, str]]]] = [("", [])]
    thread: str | None = None  # a thread header was read: its first frame, the innermost, comes next
    for line in stacks.splitlines():
        if line.startswith("Process "):
            if processes[-1][1]:
                processes.append((line, []))
            else:
                processes[-1] = (line, [])
            thread = None
        elif m := _PYSPY_THREAD.match(line):
            thread = m.group("name") or ""
        elif m := _FAULT_THREAD.match(line):
            # faulthandler names no thread; its "Current thread" took the signal: the main one, for SIGABRT
            thread = "MainThread" if m.group("current") else ""
        elif thread is not None and (m := _PYSPY_FRAME.match(line)):
            processes[-1][1].append((thread, m.group("frame").strip()))
            thread = None
        elif thread is not None and (m := _FAULT_FRAME.match(line)):
            processes[-1][1].append((thread, f"{m.group('func')} ({m.group('file')}:{m.group('line')})"))
            thread = None
    return [(header, threads) for header, threads in processes if threads]


def hung_frame(stacks: Any) -> str | None:
    """Return the innermost frame of the hung thread: each process's MainThread (else its first
    thread); among several processes the ranks before their launcher (torchrun, whose agent only
    waits for them), and among those the first in user code, else the last."""
    if not isinstance(stacks, str):
        return None
    processes = _processes(stacks)
    workers = [threads for header, threads in processes if not _LAUNCHER.search(header)]
    chosen = [next((frame for name, frame in threads if name == "MainThread"), threads[0][1])
              for threads in (workers or [threads for _, threads in processes])]
    return next((f for f in chosen if not _LIBRARY.search(f)), chosen[-1] if chosen else None)
