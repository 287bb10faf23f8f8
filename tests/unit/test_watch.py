"""Stall detection, replayed from scripted histories: no processes, no clock, no sleeps."""

import pytest

from supervisor.watch.stall import Stall, Watch, WatchConfig


def cfg(stall=10.0, auto=False, grace=0.0, silence=0.0, required=()):
    return WatchConfig(
        stall_timeout_s=stall,
        auto=auto,
        startup_grace_s=grace,
        silence_timeout_s=silence,
        required=tuple(required),
    )


def replay(config, events, until):
    """Feed `events` in time order and check once a second from 0 to `until`.

    An event is (t, "p", source), (t, "p", source, label) or (t, "o"). Return the
    stalls as (t, kind, source, limit_s) tuples.
    """
    watch = Watch(config, started_at=0.0)
    pending = sorted(events, key=lambda e: e[0])
    stalls = []
    for t in range(until + 1):
        while pending and pending[0][0] <= t:
            ev = pending.pop(0)
            if ev[1] == "p":
                watch.progress(ev[2], ev[0], label=ev[3] if len(ev) > 3 else None)
            else:
                watch.output(ev[0])
        stall = watch.check(float(t))
        if stall is not None:
            stalls.append((t, stall.kind, stall.source, stall.limit_s))
    return stalls


def every(start, stop, step, *event):
    return [(t, *event) for t in range(start, stop, step)]


CASES = [
    # id, config, events, until, expected stalls
    ("fixed: stall once limit passed, repeated once per limit",
     cfg(stall=10), [(1, "p", "P.txt"), (5, "p", "P.txt")], 27,
     [(15, "progress", "P.txt", 10), (25, "progress", "P.txt", 10)]),
    ("progress from the stalled source ends the stall",
     cfg(stall=10), [(1, "p", "P.txt"), (12, "p", "P.txt")], 22,
     [(11, "progress", "P.txt", 10), (22, "progress", "P.txt", 10)]),
    ("output is not progress (a heartbeat thread cannot hide a hang)",
     cfg(stall=10), [(1, "p", "P.txt")] + every(2, 30, 1, "o"), 12,
     [(11, "progress", "P.txt", 10)]),
    ("a default progress file that never appears is no stall",
     cfg(stall=10, grace=10), every(0, 100, 1, "o"), 100, []),
    ("a required file that never appears is due by the startup grace",
     cfg(stall=10, grace=20, required=["P.txt"]), every(0, 100, 1, "o"), 41,
     [(20, "progress", "P.txt", 20), (40, "progress", "P.txt", 20)]),
    ("a required pattern is satisfied by a path labelled with it",
     cfg(stall=10, grace=20, required=["runs/P-*.txt"]),
     every(5, 41, 1, "p", "runs/P-0.txt", "runs/P-*.txt"), 40, []),
    ("a required --progress-regex is satisfied by matching output",
     cfg(stall=10, grace=20, required=["output"]), [(3, "p", "output")], 20,
     [(13, "progress", "output", 10)]),
    ("a required --progress-regex that never matches is a stall",
     cfg(stall=10, grace=20, required=["output"]), every(0, 30, 1, "o"), 25,
     [(20, "progress", "output", 20)]),
    ("startup grace 0: no deadline for the first progress",
     cfg(stall=10, grace=0, required=["P.txt"]), [], 100, []),
    ("stall timeout 0 turns progress stalls off, required sources included",
     cfg(stall=0, grace=5, required=["P.txt"]), [(1, "p", "Q.txt")] + every(0, 100, 1, "o"), 100, []),
    ("silence: no output for the limit, repeated once per limit",
     cfg(stall=0, silence=5), [(1, "o"), (2, "o")], 12,
     [(7, "silence", "output", 5), (12, "silence", "output", 5)]),
    ("silence counts from the launch",
     cfg(stall=0, silence=5), [], 6, [(5, "silence", "output", 5)]),
    ("output ends a silence stall",
     cfg(stall=0, silence=5), [(6, "o")], 11, [(5, "silence", "output", 5), (11, "silence", "output", 5)]),
    ("the stalest source decides",
     cfg(stall=10), every(0, 40, 1, "p", "rank0") + [(3, "p", "rank1")], 20,
     [(13, "progress", "rank1", 10)]),
    ("a source tracked only once it showed progress",
     cfg(stall=10), every(0, 40, 1, "p", "rank0") + [(25, "p", "rank1")], 36,
     [(35, "progress", "rank1", 10)]),
    ("when the reported stall ends, another overdue source is reported at once",
     cfg(stall=10), [(0, "p", "a"), (1, "p", "b"), (12, "p", "a")], 13,
     [(10, "progress", "a", 10), (12, "progress", "b", 10)]),
    ("auto: learned limit 5x the longest gap, at least 60 s",
     cfg(stall=0, auto=True, grace=30), every(0, 41, 10, "p", "P.txt"), 101,
     [(100, "progress", "P.txt", 60)]),
    ("auto: learned limit above the floor",
     cfg(stall=0, auto=True, grace=30), every(0, 81, 20, "p", "P.txt"), 181,
     [(180, "progress", "P.txt", 100)]),
    ("auto: while learning, each gap may last the startup grace",
     cfg(stall=0, auto=True, grace=30), [(0, "p", "P.txt"), (10, "p", "P.txt")], 45,
     [(40, "progress", "P.txt", 30)]),
    ("auto: a gap longer than the grace while learning is a stall",
     cfg(stall=0, auto=True, grace=30), [(0, "p", "P.txt"), (35, "p", "P.txt")], 36,
     [(30, "progress", "P.txt", 30)]),
    ("auto with no startup grace: no limit until learned",
     cfg(stall=0, auto=True, grace=0), [(0, "p", "P.txt"), (10, "p", "P.txt")], 500, []),
    ("auto: required source still due by the grace",
     cfg(stall=0, auto=True, grace=30, required=["P.txt"]), [], 31, [(30, "progress", "P.txt", 30)]),
]


@pytest.mark.parametrize("config,events,until,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_replay(config, events, until, expected):
    assert replay(config, events, until) == expected


def test_stall_reports_age_and_limit():
    watch = Watch(cfg(stall=10), started_at=100.0)
    watch.progress("P.txt", 101.0)
    assert watch.check(110.5) is None
    assert watch.check(112.5) == Stall("progress", "P.txt", 11.5, 10)


def test_progress_returns_true_only_on_first_progress_of_each_source():
    watch = Watch(cfg(), started_at=0.0)
    assert [watch.progress(s, t) for t, s in [(1, "a"), (2, "a"), (3, "b"), (4, "a"), (5, "b")]] == [
        True, False, True, False, False,
    ]


@pytest.mark.parametrize("history,now,expected", [
    ([], 5.0, None),
    ([(2.0, "a")], 5.0, 3.0),
    ([(2.0, "a"), (4.0, "b")], 5.0, 1.0),  # the freshest source
    ([(4.0, "a"), (2.0, "b")], 5.0, 1.0),
])
def test_progress_age(history, now, expected):
    watch = Watch(cfg(), started_at=0.0)
    for t, source in history:
        watch.progress(source, t)
    assert watch.progress_age_s(now) == expected


@pytest.mark.parametrize("history,expected", [
    ([], 0.0),  # nothing at all: it never ran well
    ([(3.0, "o")], 3.0),  # no progress source: its output is all we know
    ([(4.0, "p", "a"), (12.0, "p", "b"), (30.0, "o")], 12.0),  # a heartbeat on stdout is no progress
    ([(12.0, "p", "a"), (4.0, "p", "a")], 12.0),  # a late report of an older time does not go back
])
def test_progressed_s_is_how_long_after_the_launch_progress_last_came(history, expected):
    watch = Watch(cfg(), started_at=100.0)
    for t, kind, *source in history:
        if kind == "p":
            watch.progress(source[0], 100.0 + t)
        else:
            watch.output(100.0 + t)
    assert watch.progressed_s() == expected


def test_limit_of_a_source():
    watch = Watch(cfg(stall=0, auto=True, grace=30), started_at=0.0)
    assert watch.limit_s("P.txt") is None  # not tracked yet
    for t in (0, 10, 20, 30):
        watch.progress("P.txt", t)
    assert watch.limit_s("P.txt") == 30  # learning: the grace
    watch.progress("P.txt", 50)
    assert watch.limit_s("P.txt") == 100  # 5 x 20


@pytest.mark.parametrize("field", ["stall_timeout_s", "startup_grace_s", "silence_timeout_s"])
def test_negative_durations_are_rejected(field):
    values = dict(stall_timeout_s=1, auto=False, startup_grace_s=1, silence_timeout_s=1)
    values[field] = -1
    with pytest.raises(ValueError, match=field):
        WatchConfig(**values)


def test_a_declared_deadline_replaces_the_timeout_until_the_source_changes_again():
    w = Watch(WatchConfig(stall_timeout_s=2, auto=False, startup_grace_s=0, silence_timeout_s=0), 0.0)
    w.progress("/P", 1.0, expect_s=8.0)  # "expect_next_s: 8" (a checkpoint save)
    assert w.check(6.0) is None and w.declared_s() == 8.0
    stall = w.check(9.5)
    assert stall == Stall("progress", "/P", 8.5, 8.0, declared=True)
    w.progress("/P", 10.0)  # the next update clears it: back to the stall timeout
    assert w.declared_s() is None and w.check(12.5).limit_s == 2


def test_auto_does_not_learn_from_a_declared_gap():
    w = Watch(WatchConfig(stall_timeout_s=600, auto=True, startup_grace_s=600, silence_timeout_s=0), 0.0)
    t = 0.0
    for _ in range(6):
        t += 10
        w.progress("/P", t)
    w.progress("/P", t + 10, expect_s=3000.0)  # validation: declared
    w.progress("/P", t + 2000)  # a long, declared gap
    assert w.limit_s("/P") == 60.0  # still 5 x the longest undeclared gap (10 s), at least 60 s


def counters_watch(stall=10.0, auto=False, grace=0.0):
    return Watch(WatchConfig(stall_timeout_s=stall, auto=auto, startup_grace_s=grace, silence_timeout_s=0), 0.0)


def first_stall(watch, start, stop):
    """The first second from start to stop at which the watch reports a stall, or None."""
    for t in range(start, stop + 1):
        stall = watch.check(float(t))
        if stall is not None:
            return t, stall.source, stall.limit_s
    return None


COUNTER_CASES = [
    # id, moves as (t, done), check from, check until, first stall
    ("a bar moving every second stalls at the stall timeout",
     [(t, False) for t in range(1, 21)], 21, 40, (30, "output-counters", 10)),
    ("its limit learns 5 x the longest gap between its changes",
     [(0, False), (15, False), (30, False)], 31, 200, (105, "output-counters", 75)),
    ("the first gap counts from when the counter's previous value was seen",
     [(40, False)], 41, 300, (240, "output-counters", 200)),
    ("a bar at its total has no deadline",
     [(1, False), (2, False), (3, True)], 4, 500, None),
    ("the wait after a finished bar is not learned; moving again restores the deadline",
     [(1, False), (2, False), (3, True), (400, False)], 401, 500, (410, "output-counters", 10)),
]


@pytest.mark.parametrize("moves,start,stop,expected", [c[1:] for c in COUNTER_CASES], ids=[c[0] for c in COUNTER_CASES])
def test_output_counters(moves, start, stop, expected):
    watch = counters_watch()
    for t, done in moves:
        watch.progress("output-counters", float(t), done=done, previous_s=0.0)
    assert first_stall(watch, start, stop) == expected


def test_output_counters_are_no_source_once_a_progress_file_showed_progress():
    watch = counters_watch()
    assert watch.progress("output-counters", 1.0, previous_s=0.0)
    watch.progress("output-counters", 2.0)
    assert watch.check(12.5).source == "output-counters"
    watch.progress("/run/PROGRESS.txt", 13.0)
    assert watch.counters_off and watch.limit_s("output-counters") is None
    assert not watch.progress("output-counters", 14.0)  # ignored from now on
    assert watch.check(20.0) is None and watch.check(23.5).source == "/run/PROGRESS.txt"


def test_output_regex_leaves_counters_on():
    watch = counters_watch()
    watch.progress("output", 1.0)
    assert not watch.counters_off
def replay_declared(config, updates, until):
    """Replay (t, expect_s or None) updates of one file "/P"; return the stalls as (t, limit_s, declared)."""
    watch = Watch(config, started_at=0.0)
    pending = sorted(updates)
    stalls = []
    for t in range(until + 1):
        while pending and pending[0][0] <= t:
            at, expect = pending.pop(0)
            watch.progress("/P", at, label="/P", expect_s=expect)
        stall = watch.check(float(t))
        if stall is not None:
            stalls.append((t, stall.limit_s, stall.declared))
    return stalls


# A declaration only ever extends the limit that applies without it (systemd's EXTEND_TIMEOUT_USEC):
# the deadline is the larger of the two.
DECLARED = [
    ("a short declaration never shortens the stall timeout (the review's 3 s before a 6 s first step)",
     cfg(stall=30, grace=60, required=["/P"]), [(0, 3.0), (6, None)], 40, [(36, 30, False)]),
    ("the trainer's 60 s before its first step does not cut a 10 min stall timeout",
     cfg(stall=600, grace=1800, required=["/P"]), [(1, 60.0), (121, None)], 200, []),
    ("a checkpoint save declared below the stall timeout is not killed at the declaration",
     cfg(stall=600), [(0, None), (10, 61.0), (80, None)], 100, []),
    ("a longer declaration extends the stall timeout, and says it decided",
     cfg(stall=10), [(0, None), (5, 30.0)], 40, [(35, 30.0, True)]),
    ("the next update without a declaration is back to the stall timeout",
     cfg(stall=10), [(0, 30.0), (20, None)], 31, [(30, 10, False)]),
    ("auto, learned: a short declaration never shortens the learned limit",
     cfg(stall=0, auto=True, grace=30), [(t, None) for t in range(0, 41, 10)] + [(45, 3.0)], 110,
     [(105, 60, False)]),
    ("auto, still learning: a short declaration never shortens the grace",
     cfg(stall=0, auto=True, grace=30), [(0, 5.0)], 31, [(30, 30, False)]),
    ("auto with no grace, still learning: no limit, and a declaration adds none",
     cfg(stall=0, auto=True, grace=0), [(0, 5.0)], 100, []),
]


@pytest.mark.parametrize("config,updates,until,expected", [c[1:] for c in DECLARED], ids=[c[0] for c in DECLARED])
def test_a_declaration_only_extends(config, updates, until, expected):
    assert replay_declared(config, updates, until) == expected
