"""Where a run's time went: goodput, and the badput split by cause (SPEC 10). Pure: events in, seconds out.

Each attempt's time, from its launch to the next launch (or the run's end), is cut into:

  startup   launch to the attempt's first progress (imports, data, compilation, a resume)
  hung      a stall's last progress to the stall: the job was dead before anyone knew
  recovery  the stall (or the crash's restart) to the next launch: diagnosis, kill, GPU release, back-off
  redone    the last stretch of an attempt's progress that the next attempt did again: the steps from
            the checkpoint it resumed at to the furthest step reached, at the rate this attempt ran
  productive  the rest

so that productive + the four badputs == the run's runtime (the time before the first launch counts as
startup). Goodput is productive / runtime; None when no progress was ever seen (nothing tells working
from waiting then). Time after a `warn` stall until progress resumes is not known to be hung: it counts
as productive.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from supervisor.report.record import as_number

BADPUT = ("startup", "hung", "recovery", "redone")
_STEP_EVENTS = ("progress-first", "heartbeat", "sample", "stall")


@dataclass
class Account:
    """The run's time by category; `segments` are (begin, end, category) in Unix seconds, for the picture."""

    runtime_s: float
    productive_s: float
    badput_s: dict[str, float]
    segments: list[tuple[float, float, str]] = field(default_factory=list)

    @property
    def goodput(self) -> float | None:
        return round(self.productive_s / self.runtime_s, 4) if self.runtime_s > 0 else None


@dataclass
class _Attempt:
    launched: float
    until: float  # the next launch, or the run's end
    events: list[dict] = field(default_factory=list)
    first_progress: float | None = None
    stop: float | None = None  # when the attempt's useful life ended: a killing stall, a crash's restart
    resumed_step: int | None = None  # steps done before this attempt's first step (its checkpoint)
    steps: list[tuple[float, float]] = field(default_factory=list)  # (time, step) the job logged in this attempt
    segments: list[list] = field(default_factory=list)  # [begin, end, category]


def account(events: list[dict], end: float, runtime_s: float | None = None,
            resumes: list[tuple[float, int]] = (), step_times: list[tuple[float, float]] = ()) -> Account | None:
    """Account for the run's time from its session's events (each with "t"), the run's end (the exit's time,
    or now while it runs), the recorded runtime, the trainer's resume lines ((time, step resumed at)) and
    its logged steps ((time, step), from metrics.jsonl: steps faster than the supervisor's scans)."""
    attempts = _attempts(events, end)
    for a in attempts:
        a.steps = [(t, step) for t, step in step_times if a.launched <= t < a.until]
        if a.steps and (a.first_progress is None or a.steps[0][0] < a.first_progress):
            a.first_progress = a.steps[0][0]  # a step logged before the supervisor's scan saw the file change
    if not attempts or not any(a.first_progress is not None for a in attempts):
        return None
    for a in attempts:
        inside = [step for t, step in resumes if a.launched - 1 <= t < a.until]
        first_step = next((as_number(e.get("step")) for e in a.events if e["event"] == "progress-first"), None)
        known = [s for s in (first_step, a.steps[0][1] - 1 if a.steps else None) if s is not None]
        a.resumed_step = inside[0] - 1 if inside else (int(min(known)) if known else None)
        _cut(a)
    for before, after in zip(attempts, attempts[1:]):
        _carve_redone(before, after)
    segments = [(b, e, cat) for a in attempts for b, e, cat in a.segments if e > b]
    totals = {cat: 0.0 for cat in ("productive", *BADPUT)}
    for b, e, cat in segments:
        totals[cat] += e - b
    span = attempts[-1].until - attempts[0].launched
    runtime = runtime_s if runtime_s is not None and runtime_s > 0 else span
    totals["startup"] += max(0.0, runtime - span)  # the supervisor's own start, before the first launch
    badput = {cat: totals[cat] for cat in BADPUT}
    lost = sum(badput.values())
    if lost > runtime:  # clocks that disagree: never more lost than the run lasted
        badput = {cat: v * runtime / lost for cat, v in badput.items()}
    badput = {cat: round(v, 3) for cat, v in badput.items()}
    productive = round(max(0.0, runtime - sum(badput.values())), 3)
    return Account(round(runtime, 3), productive, badput, segments)


def _attempts(events: list[dict], end: float) -> list[_Attempt]:
    """Split the events by launch; find each attempt's first progress and the end of its useful life."""
    attempts: list[_Attempt] = []
    for e in events:
        if e["event"] == "start":
            if attempts:
                attempts[-1].until = max(e["t"], attempts[-1].launched)
            attempts.append(_Attempt(e["t"], max(end, e["t"])))
        elif attempts:
            attempts[-1].events.append(e)
    for a in attempts:
        for e in a.events:
            t = min(max(e["t"], a.launched), a.until)
            if e["event"] == "progress-first" and a.first_progress is None:
                a.first_progress = t
            elif e["event"] in ("heartbeat", "sample") and (age := as_number(e.get("progress_age_s"))) is not None:
                seen = e["t"] - age  # an events file without progress-first (older runs): its first sign of progress
                if a.launched <= seen and (a.first_progress is None or seen < a.first_progress):
                    a.first_progress = seen
            if a.stop is None and (e["event"] in ("restart", "gave-up")
                                   or e["event"] == "stall" and e.get("action") in ("kill", "restart")):
                a.stop = t
    return attempts


def _cut(a: _Attempt) -> None:
    """Cut the attempt into startup, productive, hung and recovery segments, in time order."""
    live_end = a.until if a.stop is None else a.stop
    p = a.first_progress
    if p is None or p >= live_end:
        a.segments = [[a.launched, live_end, "startup"]]
    else:
        a.segments = [[a.launched, p, "startup"]]
        hung = []
        for e in a.events:
            age = as_number(e.get("age_s"))
            if e["event"] == "stall" and age is not None and p < e["t"] <= live_end:
                begin = max(p, e["t"] - max(age, 0.0))
                if hung and begin <= hung[-1][1]:
                    hung[-1][1] = max(hung[-1][1], e["t"])
                else:
                    hung.append([begin, e["t"]])
        at = p
        for begin, stop in hung:
            a.segments += [[at, begin, "productive"], [begin, stop, "hung"]]
            at = stop
        a.segments.append([at, live_end, "productive"])
    if a.stop is not None:
        a.segments.append([a.stop, a.until, "recovery"])


def _furthest_step(a: _Attempt) -> float | None:
    steps = [s for e in a.events if e["event"] in _STEP_EVENTS and (s := as_number(e.get("step"))) is not None]
    steps += [step for _, step in a.steps]
    return max(steps) if steps else None


def _seconds_per_step(a: _Attempt, worked_s: float, began: float, furthest: float) -> float | None:
    """How long a step took in this attempt: from its logged steps, else its progress time over its steps."""
    if len(a.steps) >= 2 and a.steps[-1][1] > a.steps[0][1] and a.steps[-1][0] > a.steps[0][0]:
        return (a.steps[-1][0] - a.steps[0][0]) / (a.steps[-1][1] - a.steps[0][1])
    if worked_s > 0 and furthest > began:
        return worked_s / (furthest - began)
    return None


def _carve_redone(before: _Attempt, after: _Attempt) -> None:
    """Mark the end of `before`'s productive time that `after` did again, at the rate `before` ran."""
    furthest, resumed = _furthest_step(before), after.resumed_step
    if furthest is None or resumed is None or furthest <= resumed:
        return
    productive = [s for s in before.segments if s[2] == "productive"]
    worked_s = sum(s[1] - s[0] for s in productive)
    began = before.resumed_step if before.resumed_step is not None else 0
    per_step = _seconds_per_step(before, worked_s, began, furthest)
    if worked_s <= 0 or per_step is None:
        return
    if resumed <= began:
        redone_s = worked_s  # resumed from before this attempt began: all of its work is done again
    else:
        redone_s = min(worked_s, (furthest - resumed) * per_step)
    # The redone work is the last the attempt did: take it from the end of its productive time.
    for seg in reversed(productive):
        if redone_s <= 0:
            break
        take = min(redone_s, seg[1] - seg[0])
        index = before.segments.index(seg)
        before.segments[index:index + 1] = [[seg[0], seg[1] - take, "productive"], [seg[1] - take, seg[1], "redone"]]
        redone_s -= take
