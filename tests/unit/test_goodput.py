"""Goodput: where a run's time went, replayed from named histories of events (no files, no processes)."""
import pytest

from supervisor.report.goodput import BADPUT, account


def ev(t, name, **fields):
    return {"t": float(t), "event": name, **fields}


def stalled(t, age, step=None, action="restart"):
    return ev(t, "stall", kind="progress", age_s=age, limit_s=age, action=action, step=step)


CLEAN = [ev(0, "start", attempt=0), ev(10, "progress-first", step=0), ev(40, "sample", step=30),
         ev(100, "exit", status=0, runtime_s=100.0)]

# Two hangs after epoch-end checkpoints: 10 steps/s... one step a second, checkpoints at steps 50 and 120.
HUNG_TWICE = [
    ev(0, "start", attempt=0), ev(10, "progress-first", step=0), ev(70, "sample", step=60),
    stalled(74, 4, step=60), ev(76, "signal"), ev(78, "restart", attempt=1, backoff_s=1),
    ev(80, "start", attempt=1), ev(90, "progress-first", step=50), ev(170, "sample", step=130),
    stalled(174, 4, step=130), ev(178, "restart", attempt=2, backoff_s=2),
    ev(181, "start", attempt=2), ev(191, "progress-first", step=120), ev(250, "exit", status=0, runtime_s=250.0),
]

CASES = {
    "a clean run: startup until the first progress, the rest productive; hung, recovery, redone exactly 0":
        (CLEAN, 100, [], dict(startup=10, hung=0, recovery=0, redone=0), 90),
    "hung twice: 4 s hung each, stall to launch recovering, the steps after each checkpoint redone":
        (HUNG_TWICE, 250, [], dict(startup=30, hung=8, recovery=13, redone=10 + 10), 250 - 30 - 8 - 13 - 20),
    "the trainer's resume lines win over progress-first's step (a scan may see a later step)":
        ([*HUNG_TWICE[:7], ev(90, "progress-first", step=55), *HUNG_TWICE[8:]], 250, [(85, 51), (186, 121)], dict(startup=30, hung=8, recovery=13, redone=20),
         250 - 71),
    "a crash restarted: the crash's restart to the next launch is recovery; its unsaved steps are redone":
        ([ev(0, "start"), ev(5, "progress-first", step=0), ev(25, "sample", step=20),
          ev(30, "restart", attempt=1, reason="crash", backoff_s=1), ev(32, "start"),
          ev(37, "progress-first", step=10), ev(60, "exit", runtime_s=60.0)], 60, [],
         dict(startup=10, hung=0, recovery=2, redone=12.5), 35.5),  # 20 steps in 25 s: 10 steps are 12.5 s
    "an attempt that never progressed before its startup stall is all startup, then recovery":
        ([ev(0, "start"), ev(5, "progress-first", step=0), stalled(20, 5, step=15),
          ev(22, "restart", attempt=1), ev(23, "start"), stalled(53, 30, action="restart"),
          ev(55, "gave-up"), ev(56, "exit", runtime_s=56.0)], 56, [],
         dict(startup=5 + 30, hung=5, recovery=3 + 3, redone=0), 10),
    "a warn stall is hung for its age only; the child goes on and so does the work":
        ([ev(0, "start"), ev(2, "progress-first"), stalled(30, 10, action="warn"), stalled(40, 20, action="warn"),
          ev(60, "exit", runtime_s=60.0)], 60, [], dict(startup=2, hung=20, recovery=0, redone=0), 38),
    "no progress-first (an older run): the first heartbeat's progress age tells when progress began":
        ([ev(0, "start"), ev(30, "heartbeat", progress_age_s=18.0), ev(60, "heartbeat", progress_age_s=1.0),
          ev(90, "exit", runtime_s=90.0)], 90, [], dict(startup=12, hung=0, recovery=0, redone=0), 78),
    "the supervisor's own start before the first launch is startup":
        (CLEAN, 100, [], dict(startup=10.5, hung=0, recovery=0, redone=0), 90, 100.5),
    "a run still going: accounted up to now":
        (CLEAN[:3], 70, [], dict(startup=10, hung=0, recovery=0, redone=0), 60),
}


def test_steps_faster_than_the_scans_are_timed_from_the_jobs_own_step_log():
    """Tiny steps: the supervisor first sees the file when the attempt has already hung (step 6), so the
    events alone give it no working time; metrics.jsonl's step times say when it worked, and how fast."""
    events = [ev(0, "start"), ev(10.6, "progress-first", step=6), stalled(18.5, 8, step=6), ev(19, "restart"),
              ev(20, "start"), ev(30, "progress-first", step=5), ev(40, "exit", runtime_s=40.0)]
    logged = [(10.0 + 0.1 * i, float(i)) for i in range(1, 7)] + [(30.0 + 0.1 * i, 5.0 + i) for i in range(1, 11)]
    got = account(events, 40, None, [(29, 6)], logged)
    assert got.badput_s == pytest.approx(dict(startup=10.1 + 10, hung=8, recovery=1.5, redone=0.1), abs=1e-6)
    assert account(events, 40, None, [(29, 6)]).badput_s["redone"] == 0  # without them: unknown, not guessed


@pytest.mark.parametrize("name", CASES)
def test_goodput(name):
    events, end, resumes, badput, productive, *runtime = CASES[name]
    got = account(events, end, runtime[0] if runtime else None, resumes)
    assert got.badput_s == pytest.approx(badput, abs=1e-6)
    assert got.productive_s == pytest.approx(productive, abs=1e-6)
    assert got.productive_s + sum(got.badput_s.values()) == pytest.approx(got.runtime_s, abs=0.002)
    assert got.goodput == pytest.approx(productive / got.runtime_s, abs=1e-4)


def test_the_segments_tile_the_run_in_time_order():
    got = account(HUNG_TWICE, 250)
    assert got.segments[0][0] == 0 and got.segments[-1][1] == 250
    assert all(a[1] == pytest.approx(b[0]) for a, b in zip(got.segments, got.segments[1:]))
    assert [cat for _, _, cat in got.segments[:5]] == ["startup", "productive", "redone", "hung", "recovery"]


@pytest.mark.parametrize("events", [
    [],  # nothing
    [ev(0, "heartbeat")],  # no start
    [ev(0, "start"), ev(30, "heartbeat"), ev(60, "exit", runtime_s=60.0)],  # never any progress: unknown
])
def test_unknown_without_a_start_or_any_progress(events):
    assert account(events, 60) is None


@pytest.mark.parametrize("odd", [None, "7", True, float("inf"), float("nan"), -5, 10 ** 400, [1], {"a": 1}])
def test_fields_of_any_type_never_break_it(odd):
    events = [ev(0, "start"), ev(1, "progress-first", step=odd), ev(5, "sample", step=odd),
              ev(9, "stall", age_s=odd, step=odd, action="restart"), ev(10, "start"),
              ev(11, "progress-first", step=odd), ev(20, "exit")]
    got = account(events, 20, runtime_s=None, resumes=[(10.5, 10 ** 20)])
    assert set(got.badput_s) == set(BADPUT) and 0 <= got.goodput <= 1
    assert got.productive_s + sum(got.badput_s.values()) == pytest.approx(20, abs=0.002)
