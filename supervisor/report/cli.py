"""magvit-report RUN: what happened to a supervised run, in ten seconds (SPEC 10).

RUN is a run folder (--run-dir) or an events file. The summary goes to stdout as text,
or with --json as one JSON object; --png [FILE] also draws the training curves above a
timeline of the run. Only reads the run's files, so it is safe on a live run.

Exit status: 0 when the summary was printed; 1 when --png was asked for and could not be
drawn (matplotlib missing, or the file not writable: the summary is still printed); 2 for
bad usage or a RUN that does not exist.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import textwrap
import time
from datetime import datetime

from supervisor.output.events import json_safe
from supervisor.output.lines import fmt_bytes, fmt_duration, fmt_limit, printable as _printable
from supervisor.report.plot import MatplotlibMissing, draw
from supervisor.report.summary import curves, summarize, timeline
from supervisor.report.record import read_record

PROG = "magvit-report"
PNG_NAME = "report.png"
MAX_INCIDENT_LINES = 14  # the text keeps the latest incidents; --json has them all
MAX_TROUBLE_LINES = 6
MAX_TEXT_CHARS = 200  # one terminal line-ish for a command or a progress line


def printable(value, limit: int = MAX_TEXT_CHARS) -> str:
    """Make any text from the run safe for the terminal (SPEC 3), cut to `limit` characters."""
    text = _printable(str(value))
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _clock(iso: str | None, with_date: bool = False) -> str:
    """Local wall-clock time of an event's ISO stamp: 14:03:05, or 11-28 14:03:05 across days."""
    if iso is None:
        return "?"
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone()
    return moment.strftime("%m-%d %H:%M:%S" if with_date else "%H:%M:%S")


def _date_time(iso: str) -> str:
    moment = datetime.fromisoformat(iso.replace("Z", "+00:00")).astimezone()
    return moment.strftime("%Y-%m-%d %H:%M:%S %Z")


def _ago(seconds: float | None) -> str:
    return "?" if seconds is None else fmt_duration(seconds) + " ago"


def _command(argv) -> str:
    if not isinstance(argv, list):
        return "unknown (no start event)"
    return printable(shlex.join(str(a) for a in argv))


def _state_line(s: dict) -> str:
    state, pid, progress = s["state"], s["pid"], s["progress"] or {}
    if state == "exited":
        e = s["exit"]
        cause = f", cause {printable(e['cause'], 40)}" if e.get("cause") else ""
        return f"exited with status {e['status']} ({e['reason']}{cause})"
    if state == "running":
        age = progress.get("age_s") if progress.get("written") else None
        return f"running: child pid {pid} (attempt {s['attempt']}), last progress {_ago(age) if age is not None else 'none yet'}"
    if state == "unsupervised":
        return (f"unsupervised: child pid {pid} (attempt {s['attempt']}) runs on, but its supervisor "
                f"(pid {s['supervisor_pid']}) is gone: nothing watches it any more (no stall detection, no restart)")
    if state == "between-attempts":
        r = s["restarts"][-1]
        return f"between attempts: restart {r['attempt']} after {r['reason']} due (back-off {fmt_limit(r['backoff_s'] or 0)})"
    if state == "no-exit-record":
        return (f"ended without an exit record: the child (pid {pid}) is gone and the supervisor wrote no exit "
                f"event (killed outright, or still ending, or on another machine); last event at {_clock(s['last_event'], True)}")
    if s["files"]["events"] is None:
        return "unknown: no events file (run the supervisor with --run-dir or --events)"
    return "unknown: no start event in the events file"


def _incidents(s: dict, with_date: bool) -> list[str]:
    """Stalls (with the progress line, the hung frame and the restart that followed), other restarts,
    user signals, giving up: the latest that fit in MAX_INCIDENT_LINES, oldest first."""
    rows: list[tuple[str, list[str]]] = []
    restarts = list(s["restarts"])
    for st in s["stalls"]:
        if st["kind"] == "silence":
            what = f"STALL no output for {fmt_duration(st['age_s'] or 0)}"
        else:
            where = os.path.basename(str(st["source"])) if st["source"] else "?"
            what = f"STALL no progress for {fmt_duration(st['age_s'] or 0)} in {printable(where, 80)}"
        if isinstance(st["limit_s"], (int, float)):
            what += f" (limit {fmt_limit(st['limit_s'])})"
        # The restart this stall led to (the first stall restart after it) shares its row.
        restart = next((r for r in restarts if r["reason"] == "stall" and (r["time"] or "") >= (st["time"] or "")), None)
        if restart is not None:
            restarts.remove(restart)
            what += f"; RESTART attempt {restart['attempt']} after {fmt_limit(restart['backoff_s'] or 0)}"
        else:
            what += f"; action={st['action']}"
        lines = [what]
        if st["progress"]:
            lines.append(f"at: {printable(st['progress'])}")
        if st.get("odd_one_out"):
            lines.append(f"odd one out: {printable(st['odd_one_out'])}")
        if st["frame"]:
            lines.append(f"hung in: {printable(st['frame'])}")
        elif st["stack_method"] and st["stack_method"] != "py-spy":
            lines.append(f"no stacks: {printable(st['stack_method'], 120)}")
        rows.append((st["time"], lines))
    for r in restarts:
        rows.append((r["time"], [f"RESTART attempt {r['attempt']} after {r['reason']} "
                                 f"(back-off {fmt_limit(r['backoff_s'] or 0)})"]
                     + ([_cause(r)] if r.get("cause") else [])))
    for sig in s["signals"]:
        if sig["reason"] != "stall":  # the stall's own ladder is implied by its action
            rows.append((sig["time"], [f"signal {sig['signal']} to {sig['target']} ({sig['reason']})"]))
    if s["gave_up"] and s["exit"]:
        rows.append((s["last_event"], [f"GAVE-UP {printable(s['gave_up'])}"]))
    rows.sort(key=lambda row: row[0] or "")
    shown, used = 0, 0
    while shown < len(rows) and used + len(rows[-1 - shown][1]) <= MAX_INCIDENT_LINES:
        used += len(rows[-1 - shown][1])
        shown += 1
    text = [f"  ... {len(rows) - shown} earlier (--json has them all)"] if shown < len(rows) else []
    for when, lines in rows[len(rows) - shown:]:
        stamp = _clock(when, with_date)
        text.append(f"  {stamp}  {lines[0]}")
        text += [f"  {' ' * len(stamp)}    {line}" for line in lines[1:]]
    return text


def _cause(event: dict) -> str:
    """`cause: KIND (DETAIL)` of an exit or a crash's restart (SPEC 4, Why it ended)."""
    detail = f" ({printable(event['detail'], 160)})" if event.get("detail") else ""
    return f"cause: {printable(event['cause'], 40)}{detail}"


def _seconds(value: float) -> str:
    """0s, 0.3s (under a second: a step or two redone is not nothing), 16s, 2m10s."""
    return f"{value:.2g}s" if 0 < value < 0.95 else fmt_duration(value)


def goodput_line(s: dict) -> str:
    """`goodput   0.71 of 2m10s: lost 16s hung, 9s recovering, 11s starting, 6s redone`."""
    if s.get("goodput") is None:
        return "goodput   unknown (no progress seen, or no runtime)"
    b = s["badput_s"]
    lost = ", ".join(f"{_seconds(b[key])} {word}" for key, word in
                     (("hung", "hung"), ("recovery", "recovering"), ("startup", "starting"), ("redone", "redone")))
    return f"goodput   {s['goodput']:.2f} of {fmt_duration(s['runtime_s'])}: lost {lost}"


def _troubles(s: dict) -> list[str]:
    """Orphans, unkillables, GPU holders, failed hooks and sinks, flight-recorder dumps: the latest few."""
    parts = []
    for key, label in (("orphans", "ORPHANS"), ("unkillable", "UNKILLABLE"), ("gpu_holders", "GPU-HOLDERS")):
        for item in s[key]:
            parts.append(f"{label} pids {printable(item['pids'], 80)} at {_clock(item['time'])}")
    for a in s["alert_failures"]:
        parts.append(f"alert {printable(a['hook'], 60)} failed at {_clock(a['time'])}: {printable(a['error'], 80)}")
    for f in s["sink_failures"]:
        verb = "failed" if f["event"] == "sink-failed" else "restored"
        parts.append(f"sink {f['sink']} {verb} at {_clock(f['time'])}" + (f": {printable(f['error'], 80)}" if f["error"] else ""))
    for fr in s["flight_recorder"]:
        parts.append(f"flight recorder: {fr['ranks']} rank dumps in {printable(fr['dir'], 80)}")
    if len(parts) > MAX_TROUBLE_LINES:
        parts = [f"... {len(parts) - MAX_TROUBLE_LINES + 1} more (--json has them all)"] + parts[-MAX_TROUBLE_LINES + 1:]
    return parts or ["no orphans, unkillables, GPU holders, alert or sink failures"]


def format_text(s: dict) -> str:
    """Render the summary for a person: a dozen lines, the worst news first."""
    with_date = bool(s["started"] and s["last_event"] and s["started"][:10] != s["last_event"][:10])
    lines = [f"run       {printable(s['run'])}",
             f"command   {_command(s['command'])}",
             f"started   {_date_time(s['started']) if s['started'] else '?'}"
             + (f", runtime {fmt_duration(s['runtime_s'])}" if s["runtime_s"] is not None else ""),
             f"state     {_state_line(s)}"]
    p = s["progress"]
    if p:
        done = f"{p['fraction'] * 100:.0f}% done" if p["fraction"] is not None else None
        when = _ago(p["age_s"]) if s["state"] in ("running", "between-attempts", "unsupervised") else f"at {_clock(p['written'], with_date)}"
        eta = f"eta {fmt_duration(p['eta_s'])}" if p["eta_s"] is not None else None
        extra = ", ".join(x for x in (done, f"written {when}" if p["written"] else None, eta) if x)
        lines.append(f"progress  {printable(p['line'])}" + (f"  ({extra})" if extra else ""))
    else:
        lines.append("progress  none seen")
    lines.append(f"restarts  {len(s['restarts'])}, stalls {len(s['stalls'])}")
    lines.append(goodput_line(s))
    lines += _incidents(s, with_date)
    if s["exit"] and s["exit"].get("cause") and s["exit"].get("detail"):
        lines.append(f"  {' ' * 8}  exit {_cause(s['exit'])}")
    lines += [f"{'trouble' if i == 0 else '':10}{part}" for i, part in enumerate(_troubles(s))]
    rss = fmt_bytes(s["peak_rss_bytes"]) if s["peak_rss_bytes"] else "unknown"
    gpu = fmt_bytes(s["gpu_memory_bytes"]) if s["gpu_memory_bytes"] is not None else "unknown (no diagnosis saw a GPU)"
    lines.append(f"memory    peak RSS {rss} (process tree, sampled once a minute); GPU {gpu}")
    dropped = s["dropped_terminal_bytes"]
    lines.append("terminal  " + ("unknown (no supervise.log beside the events)" if dropped is None else
                                 "nothing dropped" if dropped == 0 else
                                 f"dropped about {fmt_bytes(dropped)} of output (the log has it all)"))
    m = s["metrics"]
    if m:
        parts = [f"{m['steps_logged']} steps logged" + (f", last step {m['last_step']}" if m["last_step"] else "")]
        if m["last_epoch"] is not None:
            losses = ", ".join(f"{k} {m[k + '_loss']:.4g}" for k in ("train", "val") if m[k + "_loss"] is not None)
            parts.append(f"epoch {m['last_epoch']}" + (f": {losses}" if losses else ""))
        lines.append("metrics   " + "; ".join(parts))
    if s["earlier_sessions"]:
        last = s["earlier_sessions"][-1]
        lines.append(f"earlier   {len(s['earlier_sessions'])} supervisor session(s) before this one in the events file "
                     f"(the last: started {_clock(last['started'], True)}, exit {last['status']} {last['reason'] or ''})".rstrip())
    if s["skipped_lines"]:
        lines.append("skipped   " + ", ".join(f"{n} unreadable line(s) in {name}" for name, n in s["skipped_lines"].items()))
    # Every field shown went through printable() where it was cut; this pass covers the rest.
    return "\n".join(_printable(line) for line in lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Summarise a supervised run: state, restarts, stalls, progress, ETA.",
        epilog="Exit status: 0 summary printed; 1 --png could not be drawn (the summary is still printed); 2 bad usage.")
    parser.add_argument("run", nargs="?", metavar="RUN", help="a run folder (--run-dir) or an events file")
    parser.add_argument("--json", action="store_true", help="print the summary as one JSON object")
    parser.add_argument("--png", nargs="?", const="", default=None, metavar="FILE",
                        help=f"draw curves and timeline to FILE (default: RUN/{PNG_NAME}, beside an events file)")
    args = parser.parse_args(argv)
    # `--png RUN` (no FILE): argparse gave RUN to --png; a folder or a .jsonl is the run, not an image.
    if args.run is None and args.png and (os.path.isdir(args.png) or args.png.endswith(".jsonl")):
        args.run, args.png = args.png, ""
    if args.run is None:
        parser.error("RUN is required: a run folder or an events file")
    return args


def main(argv: list[str] | None = None) -> int:
    """Print the summary of a run (and draw it with --png); return the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        record = read_record(args.run)
    except ValueError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    now = time.time()
    summary = summarize(record, now)
    try:
        # json_safe: a number no check caught still never prints as Infinity, which is not JSON.
        print(json.dumps(json_safe(summary), allow_nan=False) if args.json else format_text(summary), flush=True)
    except BrokenPipeError:  # `magvit-report RUN | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # and no second error at exit
    if args.png is None:
        return 0
    return write_png(args.png or os.path.join(record.folder, PNG_NAME), record, summary, now)


def write_png(path: str, record, summary: dict, now: float) -> int:
    """Draw the run's picture to path; return 0, or 1 with one line on stderr when it cannot be drawn."""
    try:
        title = "\n".join(textwrap.wrap(_command(summary["command"]), 140, break_on_hyphens=False)[:2] + [_state_line(summary)[:150]]
                          + [goodput_line(summary).replace("goodput   ", "goodput ", 1)[:150]])
        tl = timeline(record, summary, now)
        draw(path, title, format_text(summary), tl, curves(record.metrics, tl.get("restarts", [])))
    except MatplotlibMissing:
        print(f"{PROG}: --png needs matplotlib: pip install 'magvit-supervise[report]'", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{PROG}: cannot write {path}: {e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:  # a plotting bug must not hide the summary already printed behind a traceback
        print(f"{PROG}: could not draw {path}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"{PROG}: wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
