"""Every line the supervisor prints, built from the event it goes with (SPEC 3).

Pure: an event dict (the same one that goes to --events) in, a line out. Every
text that came from outside (argv, paths, file contents, stacks) goes through
printable() first, so no child can put an escape sequence on the terminal or
forge a line in the log, and printing never raises on bytes that are not UTF-8.
"""
from __future__ import annotations

import os
import shlex
import time

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str | bytes) -> str:
    """Make text safe to print on one line: invalid bytes as \\xNN, control characters escaped."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    if text.isprintable():
        return text  # the common case, in C
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8, kept by surrogateescape
        return f"\\x{code - 0xDC00:02x}"
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def fmt_duration(seconds: float) -> str:
    """Render seconds the way people read them: 45s, 5m03s, 2h04m, 3d04h."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400 * 2:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def fmt_limit(seconds: float) -> str:
    """Render a configured limit: 10m rather than 10m00s, 1.5s kept exact."""
    if seconds < 60:
        return f"{seconds:g}s"
    if seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return fmt_duration(seconds)


def fmt_bytes(n: int | None) -> str:
    """Render a byte count compactly: 512K, 2.1G."""
    if n is None:
        return "?"
    for unit, size in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= size:
            value = n / size
            return f"{value:.1f}{unit}" if value < 10 else f"{value:.0f}{unit}"
    return f"{n}B"


def os_error_text(e: OSError) -> str:
    """The reason an OS call failed, as a person reads it: 'No space left on device'."""
    return os.strerror(e.errno) if e.errno else str(e)


def one_line(text: str, limit: int) -> str:
    """Put text on one line (whitespace runs become one space), cut to limit characters with an ellipsis."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "\u2026"


def sup_line(text: str, wall: float | None = None) -> str:
    """Format a supervisor line: '[supervise HH:MM:SS] text', made printable."""
    wall = time.time() if wall is None else wall
    return f"[supervise {time.strftime('%H:%M:%S', time.localtime(wall))}] {printable(text)}"


def terminal_stamp(wall: float) -> bytes:
    """The --timestamps prefix of relayed lines: 'HH:MM:SS.mmm '."""
    ms = int(wall * 1000) % 1000
    return f"{time.strftime('%H:%M:%S', time.localtime(wall))}.{ms:03d} ".encode()


def _ago(age_s: float | None) -> str:
    return "none" if age_s is None else fmt_duration(age_s) + "-ago"


def _with_progress(text: str, progress: str | None) -> str:
    return text + (f" | {progress}" if progress else "")


# ----- one builder per event that has a line ------------------------------------------------


def start_line(ev: dict) -> str:
    """'start pid=... attempt=... argv=[...]'."""
    return f"start pid={ev['pid']} attempt={ev['attempt']} argv: {shlex.join(ev['argv'])}"


def heartbeat_line(ev: dict) -> str:
    """'heartbeat pid= up= silent= progress=..-ago cpu= rss= [expect=] [eta=] | first line'."""
    text = (f"heartbeat pid={ev['pid']} up={fmt_duration(ev.get('up_s', 0))} silent={fmt_duration(ev['silent_s'])} "
            f"progress={_ago(ev['progress_age_s'])} cpu={ev['cpu_percent']:.0f}% rss={fmt_bytes(ev['rss_bytes'])}")
    if ev.get("expect_s") is not None:
        text += f" expect={fmt_limit(ev['expect_s'])}"
    if ev.get("eta_s") is not None:
        text += f" eta={fmt_duration(ev['eta_s'])}"
    if ev.get("rate") is not None:
        text += f" rate={fmt_rate(ev['rate'])}/s"
    return _with_progress(text, ev.get("progress"))


def stall_line(ev: dict, where: str) -> str:
    """'STALL no progress for X (limit Y) in WHERE; action=A | first line' (or no output for X)."""
    if ev["kind"] == "silence":
        what = f"no output for {fmt_duration(ev['age_s'])} (limit {fmt_limit(ev['limit_s'])})"
    else:
        declared = " declared" if ev.get("declared") else ""
        what = (f"no progress for {fmt_duration(ev['age_s'])} (limit{declared} {fmt_limit(ev['limit_s'])}) "
                f"in {where}")
    return _with_progress(f"STALL {what}; action={ev['action']}", ev.get("progress"))


def stall_detail(ev: dict, where: str) -> str:
    """The stall as the evidence of an ending (SPEC 4, `cause`): the STALL line without its kind and action."""
    return stall_line(ev, where).removeprefix("STALL ").replace(f"; action={ev['action']}", "", 1)


def fmt_rate(per_s: float) -> str:
    """Render a rate the way people read it: 19.8, 2.1, 0.11, 1234."""
    if per_s >= 100:
        return f"{per_s:.0f}"
    if per_s >= 1:
        return f"{per_s:.1f}"
    return f"{per_s:.2g}"


def slow_line(ev: dict) -> str:
    """'SLOW progress rate R steps/s over the last W, 0.11x the run's typical T steps/s | line'."""
    ratio = ev["rate"] / ev["typical_rate"] if ev["typical_rate"] else 0.0
    return _with_progress(f"SLOW progress rate {fmt_rate(ev['rate'])} steps/s over the last "
                          f"{fmt_limit(ev['window_s'])}, {ratio:.2f}x the run's typical "
                          f"{fmt_rate(ev['typical_rate'])} steps/s", ev.get("progress"))


def slow_ended_line(ev: dict) -> str:
    """'slow-ended after D: progress rate R steps/s over the last W, typical T steps/s'."""
    return (f"slow-ended after {fmt_duration(ev['duration_s'])}: progress rate {fmt_rate(ev['rate'])} steps/s "
            f"over the last {fmt_limit(ev['window_s'])}, typical {fmt_rate(ev['typical_rate'])} steps/s")


def restart_line(ev: dict, max_restarts: int, status: int | None) -> str:
    """'RESTART attempt K/N after why (status S) in B'."""
    cause = cause_text(ev)
    return (f"RESTART attempt {ev['attempt']}/{max_restarts} after {ev['reason']} "
            f"(status {status}) in {fmt_limit(ev['backoff_s'])}" + (f" {cause}" if cause else ""))


def gave_up_line(ev: dict) -> str:
    """'GAVE-UP why'."""
    return f"GAVE-UP {ev['reason']}"


def orphans_line(ev: dict, grace_s: float) -> str:
    """'ORPHANS n process(es) left behind by the child: [pids]; SIGTERM, SIGKILL after G'."""
    pids = ev["pids"]
    return (f"ORPHANS {len(pids)} process(es) left behind by the child: {pids}; "
            f"SIGTERM, SIGKILL after {fmt_limit(grace_s)}")


def unkillable_line(ev: dict) -> str:
    """'UNKILLABLE pid=.. state=D wchan=.. ...: survived SIGKILL'."""
    parts = [f"pid={p} state={s} wchan={w or '?'}" for p, s, w in zip(ev["pids"], ev["states"], ev["wchan"])]
    return (f"UNKILLABLE {len(parts)} process(es) survived SIGKILL (stuck in the kernel): " + ", ".join(parts)
            + "; giving up on them, no restart")


def gpu_holders_line(ev: dict, waiting: bool) -> str:
    """'GPU-HOLDERS n process(es) outside the tree hold the GPU: pid=.. cmd=..'."""
    held = ", ".join(f"pid={p} cmd={one_line(c, 120)}" for p, c in zip(ev["pids"], ev["cmds"]))
    tail = "; waiting for them before the restart" if waiting else ""
    return f"GPU-HOLDERS {len(ev['pids'])} process(es) outside the tree hold /dev/nvidia*: {held}{tail}"


MAX_CMD_CHARS = 300  # in the human lines only; the event keeps the whole command
D_STATE_NOTE = "D UNINTERRUPTIBLE (stuck in the kernel, usually I/O or a driver)"


def diagnosis_lines(ev: dict) -> list[str]:
    """The diagnosis as human lines: one per process, GPU use, then every Python stack."""
    out = []
    for p in ev["processes"]:
        state = D_STATE_NOTE if p["state"] == "D" else p["state"]
        out.append(f"pid={p['pid']} ppid={p.get('ppid', '?')} state={state} cpu={p['cpu_percent']:.0f}% "
                   f"rss={p['rss_bytes'] / 2**20:.0f}M threads={p['threads']} cmd={one_line(p['cmd'], MAX_CMD_CHARS)}")
    if not ev["processes"]:
        out.append("no process left to diagnose")
    for g in ev["gpus"]:
        mem = "?" if g.get("used_memory_bytes") is None else f"{g['used_memory_bytes'] / 2**20:.0f}M"
        util = "?" if g.get("sm_util_percent") is None else f"{g['sm_util_percent']}%"
        out.append(f"gpu={g.get('gpu')} pid={g.get('pid')} mem={mem} util={util}")
    triage = triage_line(ev.get("groups") or [])
    if triage:
        out.append(triage)
    method = ev["stack_method"]
    if method == "py-spy":
        out.append("python stacks (py-spy):")
        out.extend("  " + line for line in ev["stacks"].splitlines())
    elif method.startswith("none"):
        out.append(f"python stacks: {method}")
    else:
        out.append(f"python stacks {method}; SIGABRT after the kill grace will make "
                   "faulthandler print them (PYTHONFAULTHANDLER=1)")
    return out


COLLECTIVE_NOTE = "a collective everyone here waits in points at the network or at a rank outside this node"


def triage_line(groups: list[dict]) -> str | None:
    """The diagnosis's verdict on its ranks (SPEC 4): 'odd one out: rank 2 (pid P) in F; ranks 0,1 in G'.

    With one place for all: 'all 8 ranks in F' (and, for a collective, where to look instead).
    None when there is nothing to compare.
    """
    if not groups:
        return None

    def where(g: dict) -> str:
        frame = g.get("frame") or "no Python frame"
        return f"a collective: {frame}" if g.get("collective") else frame

    def who(g: dict, with_pids: bool) -> str:
        ranks, pids = g["ranks"], g["pids"]
        joined = ",".join(map(str, pids))
        if not ranks:
            return f"pid {joined}" if len(pids) == 1 else f"pids {joined}"
        text = f"rank {ranks[0]}" if len(ranks) == 1 else "ranks " + ",".join(map(str, ranks))
        if with_pids:
            text += f" (pid {joined})" if len(pids) == 1 else f" (pids {joined})"
        return text

    if len(groups) == 1:
        g = groups[0]
        n = len(g["pids"])
        kind = "ranks" if g["ranks"] else "processes of one command"
        head = f"{who(g, True)} in {where(g)}" if n == 1 else f"all {n} {kind} in {where(g)}"
        return head + (f"; {COLLECTIVE_NOTE}" if g.get("collective") else "")
    sizes = sorted(len(g["pids"]) for g in groups)
    if sizes[0] < sizes[1]:
        odd = min(groups, key=lambda g: len(g["pids"]))
        rest = [g for g in groups if g is not odd]
        return "; ".join([f"odd one out: {who(odd, True)} in {where(odd)}"]
                         + [f"{who(g, False)} in {where(g)}" for g in rest])
    return "no odd one out: " + "; ".join(f"{who(g, True)} in {where(g)}" for g in groups)


def flight_recorder_lines(ev: dict) -> list[str]:
    """The flight-recorder collection as human lines: how many dumps where, who did not answer, the summary."""
    import re

    out = [f"flight recorder: {len(ev['files'])} rank dumps in {ev['dir']}"]
    if not ev.get("pipes"):
        out.append("  no rank has a dump FIFO (no NCCL process group, or its variables were changed)")
    elif not ev["ranks"]:
        out.append(f"  {len(ev['pipes'])} dump FIFOs, none with a reader")
    dumped = {int(m.group(1)) for path in ev["files"] if (m := re.search(r"([0-9]+)$", path))}
    silent = [rank for rank in ev["ranks"] if rank not in dumped]
    if silent:
        out.append("  asked but no dump from rank " + ", ".join(map(str, silent)))
    out.extend(f"  {path}" for path in ev["files"])
    if ev.get("summary"):
        out.append("torchfrtrace:")
        out.extend("  " + line for line in ev["summary"].splitlines())
    if ev.get("error"):
        out.append(f"  flight recorder failed: {ev['error']}")
    return out


def exit_line(ev: dict, report: str | None = None) -> str:
    """'exit status=S reason=R runtime=T restarts=N stalls=M[ (not restarted: WHY)][; report: CMD][; ]cause=KIND (DETAIL)'."""
    text = (f"exit status={ev['status']} reason={ev['reason']} runtime={fmt_duration(ev['runtime_s'])} "
            f"restarts={ev['restarts']} stalls={ev['stalls']}")
    if ev.get("not_restarted"):  # why --restart-on-crash did not restart it: the user's signal
        text += f" (not restarted: {printable(ev['not_restarted'])})"
    if report:
        text += f"; report: {report}"
    cause = cause_text(ev)
    return text + (("; " if report else " ") + cause if cause else "")


def cause_text(ev: dict) -> str | None:
    """'cause=KIND (DETAIL)' of an exit or restart event (SPEC 4), None when it has none."""
    if not ev.get("cause"):
        return None
    return f"cause={ev['cause']}" + (f" ({ev['detail']})" if ev.get("detail") else "")


SINK_NAMES = {"log": "--log file", "events": "--events file", "stdout": "terminal stdout", "metrics-file": "--metrics-file",
              "stderr": "terminal stderr", "flight-recorder": "flight-recorder folder", "run-dir": "--run-dir folder"}


def sink_failed_line(ev: dict, retry: bool) -> str:
    """'SINK-FAILED --log file PATH: error; turned off, the child runs on'."""
    where = SINK_NAMES.get(ev["sink"], ev["sink"])
    path = f" {ev['path']}" if ev.get("path") else ""
    again = "; retrying once a minute" if retry else ""
    return f"{where}{path} failed: {ev['error']}; turned off, the child runs on{again}"


def progress_not_answering_line(ev: dict) -> str:
    """'progress file PATH not answering after 5s (a hung file system?): launching without its baseline'."""
    return (f"progress file {printable(ev['path'])} not answering after {fmt_limit(ev['waited_s'])} (a hung file "
            f"system?): launching without its baseline; if it stays silent, that is a stall")


def shared_line(ev: dict) -> str:
    """'progress file PATH is also watched by supervisor pid P (this one is pid Q): ...'."""
    others = ", ".join(str(pid) for pid in ev["pids"])
    if ev["what"] == "progress-file":
        what, verb, harm = "progress file", "watched", "one job's updates can hide the other's hang"
    else:
        what, verb, harm = SINK_NAMES.get(ev["what"], ev["what"]), "written", "the two runs' records mix"
    return (f"{what} {printable(ev['path'])} is also {verb} by supervisor pid {others} (this one is pid "
            f"{ev['pid']}): {harm}; give each job its own --run-dir")


def sink_restored_line(ev: dict) -> str:
    """'--log file PATH works again (N lines lost)'."""
    where = SINK_NAMES.get(ev["sink"], ev["sink"])
    lost = f" ({ev['lost']} lines lost while it failed)" if ev.get("lost") else ""
    return f"{where} {ev.get('path', '')} works again{lost}"


def metrics_file_failed_line(ev: dict) -> str:
    """'--metrics-file PATH failed: error; tried again at each heartbeat interval, the child runs on'."""
    return f"--metrics-file {ev['path']} failed: {ev['error']}; tried again at each heartbeat interval, the child runs on"
