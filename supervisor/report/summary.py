"""Turn a run's record into its summary and its timeline: pure, the clock passed in (SPEC 10).

The summary is a JSON-ready dict (what `magvit-report --json` prints, and what the text
and the picture are drawn from). Only what the files say is reported: a figure no event
carries is None ("unknown"), never a guess.
"""
from __future__ import annotations

import bisect
import math
from typing import Any

from supervisor.watch.eta import eta_s, fraction_done, fraction_from_line
from supervisor.output.events import utc_iso_ms
from supervisor.report.goodput import account
from supervisor.report.record import MAX_NUMBER, RunRecord, as_number, wall_time

RESTART_PENDING_S = 120.0  # beyond its back-off, how long a restart may take to show its start event


def _as_int(value) -> int | None:
    number = as_number(value)
    return int(number) if number is not None and number.is_integer() else None


def _as_text(value) -> str | None:
    return value if isinstance(value, str) else None


def _as_list(value) -> list:
    return value if isinstance(value, list) else []


# Each field the summary shows, read as its SPEC 6 type; a field of another type reads as absent.
_FIELD_TYPES = {
    "age_s": as_number, "limit_s": as_number, "backoff_s": as_number, "runtime_s": as_number,
    "status": _as_int, "attempt": _as_int, "restarts": _as_int, "stalls": _as_int, "pid": _as_int, "ranks": _as_int,
    "pids": _as_list, "states": _as_list, "wchan": _as_list, "cmds": _as_list, "files": _as_list,
    "target": lambda v: str(v) if isinstance(v, (str, int)) and not isinstance(v, bool) else None,
}


def _fields(event: dict, *keys: str) -> dict[str, Any]:
    """The event's time and `keys`, each of its expected type or None (text by default)."""
    return {"time": _stamp(event["t"]), **{k: _FIELD_TYPES.get(k, _as_text)(event.get(k)) for k in keys}}


def _named(events: list[dict], *names: str) -> list[dict]:
    return [e for e in events if e["event"] in names]


def _stamp(t: float | None) -> str | None:
    t = wall_time(t)
    return None if t is None else utc_iso_ms(t)


def odd_one_out(groups: Any) -> str | None:
    """From a diagnosis' `groups` (largest first, SPEC 4 Triage): the group smaller than every other, said as
    `rank 2 (pid 4242) in FRAME; ranks 0,1 in FRAME`; None when there is none."""
    rows = []
    for g in _as_list(groups):
        if not isinstance(g, dict):
            continue
        ranks = [r for r in _as_list(g.get("ranks")) if _as_int(r) is not None]
        pids = [p for p in _as_list(g.get("pids")) if _as_int(p) is not None]
        frame = _as_text(g.get("frame")) or "no Python frame"
        if ranks or pids:
            rows.append((len(ranks) or len(pids), ranks, pids, frame))
    if len(rows) < 2:
        return None
    rows.sort(key=lambda row: row[0])
    if rows[0][0] >= rows[1][0]:
        return None  # no group smaller than every other

    def who(ranks: list, pids: list) -> str:
        if not ranks:
            return ("pid " if len(pids) == 1 else "pids ") + ",".join(str(int(p)) for p in pids[:8])
        text = ("rank " if len(ranks) == 1 else "ranks ") + ",".join(str(int(r)) for r in ranks[:16])
        return text + (f" (pid {int(pids[0])})" if len(ranks) == 1 and len(pids) == 1 else "")

    return "; ".join(f"{who(ranks, pids)} in {frame}" for _, ranks, pids, frame in rows[:4])


# ----- the summary ------------------------------------------------------------------------------

def summarize(record: RunRecord, now: float) -> dict[str, Any]:
    """Return the run's summary as a JSON-ready dict; `now` is wall-clock Unix seconds."""
    events = record.events
    starts = _named(events, "start")
    exits = _named(events, "exit")
    first_t = starts[0]["t"] if starts else (events[0]["t"] if events else None)
    last_start = starts[-1] if starts else None
    exit_event = exits[-1] if exits else None
    state = _state(record, exit_event, now)
    if exit_event is not None:
        runtime = as_number(exit_event.get("runtime_s"))
    elif first_t is not None:
        runtime = (now if state in ("running", "between-attempts", "unsupervised") else events[-1]["t"]) - first_t
    else:
        runtime = None
    progress = _progress(record, state, now)
    argv = _as_list(last_start.get("argv")) if last_start else []
    goodput = _account(record, runtime, exit_event, state, now)
    return {
        "run": record.run,
        "files": {"events": record.events_path, "log": record.log_path, "metrics": record.metrics_path,
                  "progress": record.progress.path if record.progress else None},
        "command": [str(a) for a in argv] if last_start and "argv" in last_start else None,
        "started": _stamp(first_t),
        "state": state,
        "pid": _as_int(last_start.get("pid")) if last_start else None,
        "attempt": _as_int(last_start.get("attempt")) if last_start else None,
        "supervisor_pid": _as_int(last_start.get("supervisor_pid")) if last_start else None,
        "exit": None if exit_event is None else _fields(exit_event, "status", "reason", "runtime_s", "restarts", "stalls",
                                                        "cause", "detail"),
        "runtime_s": None if runtime is None else round(runtime, 3),
        "goodput": goodput.goodput if goodput else None,
        "productive_s": goodput.productive_s if goodput else None,
        "badput_s": goodput.badput_s if goodput else None,
        "last_event": _stamp(events[-1]["t"]) if events else None,
        "stalls": _stalls(events),
        "restarts": [_fields(e, "attempt", "backoff_s", "reason", "cause", "detail") for e in _named(events, "restart")],
        "gave_up": next((_as_text(e.get("reason")) for e in reversed(_named(events, "gave-up"))), None),
        "signals": [_fields(e, "signal", "target", "reason") for e in _named(events, "signal")],
        "orphans": [_fields(e, "pids") for e in _named(events, "orphans")],
        "unkillable": [_fields(e, "pids", "states", "wchan") for e in _named(events, "unkillable")],
        "alert_failures": [_fields(e, "hook", "error") for e in _named(events, "alert-failed")],
        "sink_failures": [{**_fields(e, "sink", "error"), "event": e["event"]}
                          for e in _named(events, "sink-failed", "sink-restored")],
        "gpu_holders": [_fields(e, "pids", "cmds") for e in _named(events, "gpu-holders")],
        "flight_recorder": [_fields(e, "dir", "ranks", "files", "summary") for e in _named(events, "flight-recorder")],
        "dropped_terminal_bytes": record.dropped_terminal_bytes,
        "peak_rss_bytes": _peak_rss(record),
        "gpu_memory_bytes": _gpu_memory(events),
        "progress": progress,
        "metrics": _metrics(record.metrics),
        "earlier_sessions": [_session_line(s) for s in record.earlier_sessions if s],
        "skipped_lines": {k: v for k, v in record.skipped_lines.items() if v},
    }


def _account(record: RunRecord, runtime: float | None, exit_event: dict | None, state: str, now: float):
    """Where the run's time went (goodput.py); None when unknown (no start, no progress, no runtime)."""
    events = record.events
    if runtime is None or not events:
        return None
    end = exit_event["t"] if exit_event else (now if state in ("running", "between-attempts", "unsupervised")
                                              else events[-1]["t"])
    return account(events, end, runtime, record.resumes, logged_steps(record))


def run_account(record: RunRecord, summary: dict, now: float):
    """The same account, for the picture's segments."""
    exits = _named(record.events, "exit")
    return _account(record, summary["runtime_s"], exits[-1] if exits else None, summary["state"], now)


def _state(record: RunRecord, exit_event: dict | None, now: float) -> str:
    """running, unsupervised (the child runs, its supervisor is gone), exited, between-attempts (a restart
    is due), no-exit-record, or unknown (no start)."""
    if exit_event is not None:
        return "exited"
    if record.child_alive is None:
        return "unknown"
    if record.child_alive:
        return "unsupervised" if record.supervisor_alive is False else "running"
    if record.supervisor_alive is not None:  # recorded: no guessing from the restart's back-off
        return "between-attempts" if record.supervisor_alive else "no-exit-record"
    last = record.events[-1]
    backoff = as_number(last.get("backoff_s")) or 0.0
    if last["event"] == "restart" and now - last["t"] <= backoff + RESTART_PENDING_S:
        return "between-attempts"
    return "no-exit-record"


def _stalls(events: list[dict]) -> list[dict]:
    """Each stall with the innermost frame of the diagnosis that followed it."""
    stalls = []
    for i, e in enumerate(events):
        if e["event"] != "stall":
            continue
        diagnosis = None
        for later in events[i + 1:]:
            if later["event"] in ("stall", "start"):
                break
            if later["event"] == "diagnosis":
                diagnosis = later
                break
        stalls.append({
            **_fields(e, "kind", "source", "age_s", "limit_s", "progress", "action"),
            "frame": _as_text(diagnosis.get("hung_frame")) if diagnosis else None,  # found as it was read
            "odd_one_out": odd_one_out(diagnosis.get("groups")) if diagnosis else None,
            "stack_method": _as_text(diagnosis.get("stack_method")) if diagnosis else None,
        })
    return stalls


def _peak_rss(record: RunRecord) -> int | None:
    """The largest tree RSS a heartbeat, a sample or a diagnosis saw (samples: the true peak may be higher)."""
    seen = [record.peak_rss_bytes or 0]
    for e in _named(record.events, "diagnosis"):
        procs = _as_list(e.get("processes"))
        seen.append(int(sum(as_number(p.get("rss_bytes")) or 0 for p in procs if isinstance(p, dict))))
    peak = max(seen)
    return peak if 0 < peak <= MAX_NUMBER else None


def _gpu_memory(events: list[dict]) -> int | None:
    """The most GPU memory the tree held in a diagnosis (NVML), None when no diagnosis saw a GPU."""
    totals = []
    for e in _named(events, "diagnosis"):
        rows = [r for r in _as_list(e.get("gpus")) if isinstance(r, dict) and as_number(r.get("used_memory_bytes")) is not None]
        if rows:
            totals.append(int(sum(as_number(r["used_memory_bytes"]) for r in rows)))
    return max(totals) if totals else None


def progress_samples(record: RunRecord) -> list[tuple[float, float]]:
    """(time, fraction done) points: heartbeats' progress lines, the trainer's step records, the file."""
    samples = []
    for e in _named(record.events, "heartbeat"):
        age = as_number(e.get("progress_age_s"))
        fraction = fraction_from_line(e.get("progress") if isinstance(e.get("progress"), str) else None)
        if age is not None and fraction is not None:
            samples.append((e["t"] - age, fraction))
    snap = record.progress
    if snap is not None:
        fields = snap.fields
        try:
            total_steps = int(fields["total_epochs"]) * int(fields["total_batches"])
        except (KeyError, ValueError):
            total_steps = 0
        if total_steps > 0:
            samples += [(m["time"], min(1.0, m["step"] / total_steps)) for m in record.metrics
                        if m.get("kind") == "step" and as_number(m.get("time")) and as_number(m.get("step"))]
        fraction = fraction_done(fields) if fraction_done(fields) is not None else fraction_from_line(snap.headline)
        if fraction is not None:
            samples.append((snap.mtime, fraction))
    return samples


def _progress(record: RunRecord, state: str, now: float) -> dict | None:
    """The last progress line, its age, the fraction done and, while the run goes on, the ETA."""
    snap = record.progress
    beats = [e for e in _named(record.events, "heartbeat", "stall") if isinstance(e.get("progress"), str)]
    if snap is not None and snap.headline:
        line, written, source, fraction = snap.headline, snap.mtime, snap.path, fraction_done(snap.fields)
    elif beats:
        last = beats[-1]
        age = as_number(last.get("progress_age_s", last.get("age_s")))
        line, written, source, fraction = last["progress"], (None if age is None else last["t"] - age), "events", None
    else:
        return None
    if fraction is None:
        fraction = fraction_from_line(line)
    eta = None
    if state in ("running", "between-attempts", "unsupervised"):
        eta = eta_s(progress_samples(record), now)
        hinted = [e for e in _named(record.events, "heartbeat") if as_number(e.get("eta_s")) is not None]
        if eta is None and hinted:  # the supervisor's own estimate, aged since it was made
            eta = max(0.0, hinted[-1]["eta_s"] - (now - hinted[-1]["t"]))
    return {"line": line, "source": source, "written": _stamp(written),
            "age_s": None if written is None else round(max(0.0, now - written), 3),
            "fraction": None if fraction is None else round(fraction, 4),
            "eta_s": None if eta is None else round(eta, 1)}


def _metrics(metrics: list[dict]) -> dict | None:
    steps = [m for m in metrics if m.get("kind") == "step" and as_number(m.get("step")) is not None]
    epochs = [m for m in metrics if m.get("kind") == "epoch"]
    if not steps and not epochs:
        return None
    last_epoch = epochs[-1] if epochs else {}
    return {"steps_logged": len({m["step"] for m in steps}), "last_step": int(max(m["step"] for m in steps)) if steps else None,
            "last_loss": as_number(steps[-1].get("loss")) if steps else None,
            "epochs": len(epochs), "last_epoch": last_epoch.get("epoch"),
            "train_loss": as_number(last_epoch.get("train_loss")), "val_loss": as_number(last_epoch.get("val_loss"))}


def _session_line(events: list[dict]) -> dict:
    end = next((e for e in reversed(events) if e["event"] == "exit"), None)
    return {"started": _stamp(events[0]["t"]), "status": _as_int(end.get("status")) if end else None,
            "reason": _as_text(end.get("reason")) if end else None}


# ----- the timeline -----------------------------------------------------------------------------

def curves(metrics: list[dict], restarts: list[float]) -> dict[str, list]:
    """Return the loss curves to draw: train loss per logged step, val loss at each epoch's last step,
    and the step each restart (Unix time) had reached, where the curve resumes from a checkpoint."""
    steps: dict[float, tuple[float, int | None, float | None]] = {}
    for m in metrics:
        step, loss = as_number(m.get("step")), as_number(m.get("loss"))
        if m.get("kind") == "step" and step is not None and loss is not None and math.isfinite(loss):
            steps[step] = (loss, _as_int(m.get("epoch")), as_number(m.get("time")))  # a step logged twice: the latest
    last_step_of: dict[int, float] = {}
    for step, (_, epoch, _) in steps.items():
        if epoch is not None:
            last_step_of[epoch] = max(step, last_step_of.get(epoch, step))
    val = []
    for m in metrics:
        epoch, loss = _as_int(m.get("epoch")), as_number(m.get("val_loss"))
        if m.get("kind") == "epoch" and epoch in last_step_of and loss is not None and math.isfinite(loss):
            val.append((last_step_of[epoch], loss))
    by_time = sorted((t, step) for step, (_, _, t) in steps.items() if t is not None)
    times = [t for t, _ in by_time]
    reached = [by_time[i - 1][1] for t in restarts if (i := bisect.bisect_right(times, t)) > 0]
    return {"train": sorted((step, v[0]) for step, v in steps.items()), "val": sorted(val), "restart_steps": reached}


RATE_POINTS = 2000  # the speed curve is drawn with at most this many points


def logged_steps(record: RunRecord) -> list[tuple[float, float]]:
    """(time, step) of each step record in metrics.jsonl, in time order."""
    return sorted((t, step) for m in record.metrics if m.get("kind") == "step"
                  and (t := wall_time(m.get("time"))) is not None and (step := as_number(m.get("step"))) is not None)


def step_points(record: RunRecord) -> list[tuple[float, float]]:
    """(time, steps done) pairs: the trainer's logged steps when there are any, else the events' `step`
    (sample, heartbeat, stall: at the time of the progress they report)."""
    points = logged_steps(record)
    if points:
        return points
    for e in _named(record.events, "progress-first", "heartbeat", "sample", "stall"):
        step = as_number(e.get("step"))
        age = as_number(e.get("progress_age_s", e.get("age_s"))) if e["event"] != "progress-first" else 0.0
        if step is not None:
            points.append((e["t"] - max(0.0, age or 0.0), step))
    return sorted(points)


def progress_rate(points: list[tuple[float, float]]) -> list[tuple[float, float | None]]:
    """Steps per second over time: at each point, the steps of the last window (1/80 of the run, 1 s at least)
    over its length. A step that goes back (a resume) starts afresh (None: a break in the line); a gap
    longer than two windows (a hang) is drawn as zero."""
    if len(points) < 2:
        return []
    gaps = sorted(b[0] - a[0] for a, b in zip(points, points[1:]))
    # 1/80 of the run, and at least 3 of its usual gaps between logged steps, so the line is not all noise
    window = max((points[-1][0] - points[0][0]) / 80, 3 * gaps[len(gaps) // 2], 1.0)
    rates: list[tuple[float, float | None]] = []
    j = 0
    for i, (t, step) in enumerate(points):
        if i and t - points[i - 1][0] > 2 * window:  # a hang: no steps, drawn as such
            rates += [(points[i - 1][0] + window, 0.0), (t - window, 0.0)]
            j = i
        if i and step < points[i - 1][1]:  # resumed from an earlier checkpoint
            rates.append((t, None))
            j = i
            continue
        while t - points[j][0] > window:
            j += 1
        if j < i and t > points[j][0]:
            rates.append((t, (step - points[j][1]) / (t - points[j][0])))
    if len(rates) > RATE_POINTS:
        rates = rates[:: len(rates) // RATE_POINTS + 1]
    return rates


def memory_points(record: RunRecord) -> list[tuple[float, int]]:
    """(time, tree RSS) from samples, heartbeats and diagnoses."""
    points = [(e["t"], int(v)) for e in _named(record.events, "sample", "heartbeat")
              if (v := as_number(e.get("rss_bytes"))) and v > 0]
    for e in _named(record.events, "diagnosis"):
        total = sum(as_number(p.get("rss_bytes")) or 0 for p in _as_list(e.get("processes")) if isinstance(p, dict))
        if 0 < total <= MAX_NUMBER:
            points.append((e["t"], int(total)))
    return sorted(points)


def slow_periods(events: list[dict], end: float) -> list[tuple[float, float]]:
    """SLOW episodes (SPEC 1.3): from each `slow` to its `slow-ended` (its duration_s back from then), or to the end."""
    periods, since = [], None
    for e in _named(events, "slow", "slow-ended"):
        if e["event"] == "slow":
            since = e["t"] if since is None else since
        else:
            duration = as_number(e.get("duration_s"))
            begin = e["t"] - duration if duration is not None and duration >= 0 else since
            if begin is not None:
                periods.append((begin, e["t"]))
            since = None
    if since is not None:
        periods.append((since, end))
    return periods


def timeline(record: RunRecord, summary: dict, now: float) -> dict[str, Any]:
    """Return what the picture's timeline shows, in Unix seconds: attempts, progress, silences, events."""
    events = record.events
    if not events:
        return {}
    t0 = next((e["t"] for e in events if e["event"] == "start"), events[0]["t"])
    ongoing = summary["state"] in ("running", "between-attempts", "unsupervised")
    end = max(now if ongoing else events[-1]["t"], events[-1]["t"])  # a skewed clock may put events past now
    attempts, current = [], None
    for e in events:
        if e["event"] == "start":
            if current:
                attempts.append((current[0], e["t"], current[1]))
            current = (e["t"], _as_int(e.get("attempt")))
        elif e["event"] in ("restart", "exit", "gave-up") and current:
            attempts.append((current[0], e["t"], current[1]))
            current = None
    if current:  # still running (until now), or ended unrecorded: drawn to the axis' end, a second at least
        attempts.append((current[0], end if ongoing else max(end, t0 + 1.0), current[1]))
    progress = {e["t"] - age for e in _named(events, "heartbeat")
                if (age := as_number(e.get("progress_age_s"))) is not None}
    progress |= {e["t"] for e in _named(events, "progress-first")}
    progress |= {t for m in record.metrics if m.get("kind") == "step" and (t := as_number(m.get("time"))) is not None}
    if record.progress is not None:
        progress.add(record.progress.mtime)
    exit_event = next((e for e in reversed(events) if e["event"] == "exit"), None)
    spent = run_account(record, summary, now)
    return {
        "segments": spent.segments if spent else [],
        "memory": memory_points(record),
        "rate": progress_rate(step_points(record)),
        "slow": slow_periods(events, end),
        "start": t0, "end": max(end, t0 + 1.0), "now": now if ongoing else None,  # the axis spans a second at least
        "attempts": attempts,
        "progress": sorted(t for t in progress if t0 - 1 <= t <= end + 1),
        "heartbeats": [e["t"] for e in _named(events, "heartbeat")],
        "silences": [tuple(s) for s in record.silences],
        "stalls": [e["t"] for e in _named(events, "stall")],
        "signals": [(e["t"], _as_text(e.get("signal"))) for e in _named(events, "signal")],
        "restarts": [e["t"] for e in _named(events, "restart")],
        "troubles": [(e["t"], e["event"]) for e in _named(events, "orphans", "unkillable", "gpu-holders",
                                                             "alert-failed", "sink-failed")],
        "exit": None if exit_event is None else (exit_event["t"], _as_int(exit_event.get("status")),
                                                 _as_text(exit_event.get("reason"))),
    }
