"""The progress rate and SLOW, replayed from scripted histories: no processes, no clock, no sleeps."""

import pytest

from supervisor.watch.rate import RateTracker, Slow, SlowEnded, step_of


def steady(start, stop, per_s, value0=0.0, dt=0.5, source="P.txt"):
    """Observations of a counter advancing per_s steps a second from value0, one every dt seconds."""
    out, t, v = [], float(start), value0
    while t < stop:
        out.append((t, v, source))
        t += dt
        v += per_s * dt
    return out


def replay(events, until, window=10.0, ratio=0.5, check_every=1.0):
    """Feed (t, value, source) in time order, check every check_every s; return what check() said, with t."""
    tracker = RateTracker(window, ratio)
    pending = sorted(events, key=lambda e: e[0])
    said = []
    t = 0.0
    while t <= until:
        while pending and pending[0][0] <= t:
            when, value, source = pending.pop(0)
            tracker.observe(value, when, source)
        found = tracker.check(t)
        if found is not None:
            said.append((t, found))
        t += check_every
    return tracker, said


def kinds(said):
    return [(type(x).__name__, t) for t, x in said]


def phases(*spans, source="P.txt"):
    """Counter observations through phases (seconds, steps/s), continuing the count."""
    events, t, v = [], 0.0, 0.0
    for seconds, per_s in spans:
        part = steady(t, t + seconds, per_s, v, source=source)
        events += part
        t += seconds
        v += per_s * seconds
    return events


def test_fast_slow_fast_is_one_episode_flagged_within_the_window():
    tracker, said = replay(phases((40, 20), (30, 2), (30, 20)), 100)
    assert [type(x) for _, x in said] == [Slow, SlowEnded]
    (t_slow, slow), (t_end, ended) = said
    assert 40 < t_slow <= 40 + 10  # within the window of the slowdown's start
    assert slow.typical_rate == pytest.approx(20, rel=0.01)
    assert slow.rate < 10 and slow.window_s == 10 and slow.source == "P.txt"
    assert 70 < t_end <= 80
    assert ended.duration_s == pytest.approx(t_end - t_slow)
    assert tracker.rate(100) == pytest.approx(20, rel=0.06)


CASES = [
    # id, observations, until, expected (kind, t) list
    ("steady but jittery: never slow",
     [(t, v + (3 if int(t * 2) % 3 == 0 else -2), "P.txt") for t, v, _ in steady(0, 200, 20)], 200, []),
    ("ratio 0 turns SLOW off", None, 100, []),
    ("a hang is a stall, not a slowdown", phases((40, 20), (60, 0)), 100, []),
    ("a slowdown during the first (start-up) window teaches nothing and flags nothing",
     phases((8, 2), (92, 20)), 100, []),
    ("no SLOW before a typical rate is known (the second window's end)", phases((12, 20), (40, 1)), 19, []),
    ("a long slowdown is not learned: still slow an hour later, one episode",
     phases((40, 20), (3600, 5)), 3640, [("Slow", 47.0)]),
    ("each epoch's bar back at 0 continues the count",
     [(t, (t * 20) % 400, "out") for t in [x / 2 for x in range(0, 400)]], 199, []),
]


@pytest.mark.parametrize("name, events, until, expected", CASES, ids=[c[0] for c in CASES])
def test_histories(name, events, until, expected):
    ratio = 0.5
    if events is None:
        events, ratio = phases((40, 20), (30, 2), (30, 20)), 0.0
    _, said = replay(events, until, ratio=ratio)
    assert kinds(said) == expected


def test_a_counter_that_starts_again_is_no_negative_advance():
    tracker = RateTracker(10, 0.5)
    for i, value in enumerate([0, 100, 200, 300, 400, 0, 100, 200]):
        tracker.observe(value, float(i * 5), "out")
    # 0..400, then 0..200: 600 steps in 35 s; over the last 10 s, 200 steps
    assert tracker.rate(35.0) == pytest.approx(20.0)
    tracker.observe(50, 40.0, "out")  # back to 0 and on to 50
    assert tracker.rate(40.0) == pytest.approx((100 + 50) / 10)


def test_counters_that_take_turns_are_continued_each_on_its_own():
    tracker = RateTracker(10, 0.5)
    for i in range(21):  # a bar at 20 steps a second and a log line's global step, printed in turns
        tracker.observe(i * 10, i * 0.5, "output-counters", key="bar")
        tracker.observe(5000 + i * 10, i * 0.5 + 0.1, "output-counters", key="log")
    # both advance 20 a second: 40 a second in all, never a "reset" from 5200 to 200
    assert tracker.rate(10.1) == pytest.approx(40.0, rel=0.05)


def test_a_progress_file_takes_over_from_output_counters_and_not_the_reverse():
    tracker = RateTracker(10, 0.5)
    tracker.observe(5, 0.0, "output-counters")
    tracker.observe(1000, 1.0, "/run/PROGRESS.txt")
    tracker.observe(99999, 2.0, "output-counters")  # ignored: other units
    tracker.observe(1020, 11.0, "/run/PROGRESS.txt")
    tracker.observe(7, 11.5, "/run/PROGRESS-rank1.txt")  # a second file: ignored, the first is followed
    assert tracker.source == "/run/PROGRESS.txt"
    assert tracker.value == 1020
    assert tracker.rate(11.0) == pytest.approx(2.0)


def test_no_rate_until_a_whole_window_was_seen():
    tracker = RateTracker(10, 0.5)
    tracker.observe(0, 3.0, "P")
    tracker.observe(50, 8.0, "P")
    assert tracker.rate(12.9) is None
    assert tracker.rate(13.0) == pytest.approx(5.0)


def test_memory_stays_bounded():
    tracker = RateTracker(10, 0.5)
    for i in range(100_000):
        tracker.observe(i, i / 1000, "P")  # 1000 steps a second
    tracker.rate(100.0)
    assert len(tracker._samples) <= 300


@pytest.mark.parametrize("fields, step", [
    ({"step": "1234", "epoch": "3"}, 1234),
    ({"epoch": "3", "batch": "120", "total_batches": "400"}, 920),
    ({"epoch": "3", "batch": "120"}, 120),
    ({"epoch": "3"}, 3),
    ({"step": "nan", "batch": "7"}, 7),
    ({"step": "-5"}, None),
    ({}, None),
])
def test_step_of_a_progress_file(fields, step):
    assert step_of(fields) == step


@pytest.mark.parametrize("window, ratio", [(0, 0.5), (-1, 0.5), (10, 1.0), (10, -0.1)])
def test_bad_settings_are_refused(window, ratio):
    with pytest.raises(ValueError):
        RateTracker(window, ratio)


def test_the_slow_lines_read_as_the_spec_shows():
    from supervisor.output import lines

    ev = {"rate": 2.1, "typical_rate": 19.8, "window_s": 600, "source": "PROGRESS.txt",
          "progress": "Epoch 3/100 - Batch 120/400\x1b[2J"}
    assert lines.slow_line(ev) == ("SLOW progress rate 2.1 steps/s over the last 10m, 0.11x the run's typical "
                                   "19.8 steps/s | Epoch 3/100 - Batch 120/400\x1b[2J")
    assert "\x1b" not in lines.sup_line(lines.slow_line(ev))
    ended = {"rate": 18.0, "typical_rate": 19.8, "window_s": 600, "duration_s": 3725}
    assert lines.slow_ended_line(ended) == ("slow-ended after 1h02m: progress rate 18.0 steps/s over the last 10m, "
                                            "typical 19.8 steps/s")
    beat = {"pid": 1, "up_s": 5, "silent_s": 1, "progress_age_s": 2, "cpu_percent": 99, "rss_bytes": 1 << 30,
            "rate": 19.84}
    assert " rate=19.8/s" in lines.heartbeat_line(beat)
    assert [lines.fmt_rate(r) for r in (1234.5, 19.84, 2.06, 0.114, 0.0033)] == ["1234", "19.8", "2.1", "0.11",
                                                                               "0.0033"]
