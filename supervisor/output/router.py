"""Where everything the supervisor shows goes: the terminal, --log, --events, alert hooks.

Every sink may fail (a dead SSH link, a full disk, a file-size limit): a failed
sink is turned off and reported once on whatever still works, never raised, so
the supervisor's own trouble never costs the child its run (SPEC 4).
"""
from __future__ import annotations

import os
import re
import select
import stat
import threading
import time
from typing import Callable

from supervisor.output.assemble import LineAssembler, Run, Stamper
from supervisor.config import Config
from supervisor.output.events import make_event
from supervisor.output.lines import fmt_bytes, metrics_file_failed_line, sink_failed_line, sink_restored_line, sup_line, terminal_stamp
from supervisor.output.sinks import EventLog, FileSink, LogFile
from supervisor.output.tail import Tail
from supervisor.output.terminal import SideCopy, TerminalWriter, open_terminal

# The child's latest bytes kept per stream for the output counters (SPEC 1.2) between two looks:
# counters need only the latest lines, so a flood of output costs them no more than this.
RECENT_BYTES = 4096
SIDE_KEEP_BYTES = 1 << 16  # of spliced stdout, the end of each chunk that Python sees (a whole Tail)

LAST_WORDS_WAIT_S = 1.0  # at close, for lines said after the terminal was already flushed (settle)
DEFAULT_MONITOR_S = 30.0  # metrics file and heartbeat pings when --heartbeat is 0 (off)
PING_CLOSE_S = 20.0  # at exit: the ping in flight and the final one, 10 s each


def _identity(fd: int) -> tuple[int, int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino, st.st_mode


class Output:
    """The supervisor's sinks, shared by every launch of the child."""

    def __init__(self, config: Config, wake: Callable[[], None], stdout_fd: int = 1, stderr_fd: int = 2):
        self.cfg = config
        self.exporter = None  # --metrics-port / --metrics-file; first: a port in use fails before anything opens
        if config.metrics_addr is not None or config.metrics_file:
            from supervisor.output.metrics import Exporter, run_label  # prometheus-client only when asked for

            self.exporter = Exporter(run_label(config.run_dir, config.command), config.metrics_addr,
                                     config.metrics_file, config.heartbeat_s or DEFAULT_MONITOR_S)
        self.pinger = None
        if config.ping_url:
            from supervisor.output.ping import Pinger

            self.pinger = Pinger(config.ping_url)
        self._stall_open_at: float | None = None  # no heartbeat pings while a stall is open
        self._next_beat: float | None = None
        self._metrics_error: str | None = None
        self.term = {"out": open_terminal(stdout_fd, wake), "err": open_terminal(stderr_fd, wake)}
        self.log: LogFile | None = LogFile(config.log_path) if config.log_path else None
        self.events: EventLog | None = EventLog(config.events_path) if config.events_path else None
        self.alerter = None
        if config.alert_cmd or config.alert_webhook:
            from supervisor.output.alerts import Alerter  # urllib and threads only when asked for

            self.alerter = Alerter(list(config.alert_cmd) or None, config.alert_webhook)
        self.child_pid: int | None = None  # the main child of the current launch: SUPERVISE_PID for hooks
        self.last_print = time.monotonic()  # anything printed, ours or the child's: the heartbeat's clock
        out_id, err_id = _identity(stdout_fd), _identity(stderr_fd)
        # 2>&1: our lines and the child's stdout land in one file, so a partial stdout line counts too.
        self._shared = out_id is not None and out_id[:2] == err_id[:2] if err_id else False
        self._peek_fd = None  # 2>&1 into a regular file: read its last byte, since spliced bytes pass unseen
        if self._shared and stat.S_ISCHR(out_id[2]) and not os.isatty(stdout_fd):
            self._shared = False  # /dev/null: nobody reads it, so no line can look glued
        if self._shared and stat.S_ISREG(out_id[2]):
            try:
                self._peek_fd = os.open(f"/proc/self/fd/{stdout_fd}", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                pass
        self._mid_line = False  # the child's last byte on our stderr's file was not a newline
        self._failed_reported: set[str] = set()
        # The user's ending signal came: a terminal that stops reading may now drop, as with a log.
        # Without one, nothing is dropped and the child waits, as with cat; but cat would be gone by now.
        self._stopping = False
        self._dropped_unlogged = False  # output dropped from the terminal with no log to keep it
        # Nothing to see in the bytes: stdout can go from pipe to terminal inside the kernel. Not when
        # stdout is the same pipe or tty as stderr: then our lines must see where the child's line ended.
        self._splice = (self.log is None and config.progress_regex is None and not config.timestamps
                        and (not self._shared or self._peek_fd is not None))
        self._stampers: dict[str, Stamper] = {}
        self._assemblers: dict[str, LineAssembler] = {}
        # Output counters (SPEC 1.2): on unless a progress file or regex was named; the loop turns it
        # off once a progress file shows progress. Spliced stdout is then teed so its end is seen too.
        self.counting = (config.output_progress and not config.progress_file_explicit
                         and config.progress_regex is None)
        self._side: SideCopy | None | bool = None  # None: not made yet; False: cannot (read instead)
        self._recent: dict[str, bytearray] = {}
        self._recent_cut: dict[str, bool] = {}
        self._tails: dict[str, Tail] = {}  # each stream's last bytes in this launch: why it ended (SPEC 4)
        if self.exporter is not None and self.exporter.address is not None:
            host, port = self.exporter.address
            self.say(f"metrics at http://{f'[{host}]' if ':' in host else host}:{port}/metrics")

    # ----- the supervisor's own output ------------------------------------------------------

    def say(self, text: str, terminal: bool = True, log: bool = True) -> None:
        """Print a supervisor line to stderr and the log; never raises."""
        wall = time.time()
        line = sup_line(text, wall).encode("utf-8", "replace")
        if terminal:
            # Our line starts on a line of its own even after a partial line of the child's.
            head = b"\n" if self._ends_mid_line() else b""
            self.term["err"].write(head + line + b"\n", droppable=self.may_drop)
            self._mid_line = False
            self.last_print = time.monotonic()
        if log and self.log:
            self.log.write_lines(wall, "sup", [line])

    def _ends_mid_line(self) -> bool:
        if self._peek_fd is not None and self._splice:
            # Spliced bytes pass us unseen: ask the file for its last byte.
            try:
                end = os.fstat(self._peek_fd).st_size
                return end > 0 and os.pread(self._peek_fd, 1, end - 1) != b"\n"
            except OSError:
                return False
        return self._mid_line

    def emit(self, name: str, **fields) -> dict:
        """Append an event to --events and return it."""
        return self.record(make_event(name, **fields))

    def record(self, event: dict) -> dict:
        """Append an event built earlier (make_event) to --events and return it."""
        if self.events:
            self.events.emit(event)
        if self.monitoring:
            self._monitor(event)
        return event

    def alert(self, message: str, event: dict) -> None:
        """Print an alert line and fire the hooks for its event."""
        self.say(message)
        if self.alerter:
            self.alerter.fire(event, sup_line(message), self.child_pid)
        if self.pinger and event["event"] == "stall":
            self.pinger.fail(message)

    # ----- metrics and the dead-man's switch (SPEC 12) ----------------------------------------

    @property
    def monitoring(self) -> bool:
        """Say whether metrics or pings are on."""
        return self.exporter is not None or self.pinger is not None

    def _monitor(self, ev: dict) -> None:
        """Count an event into the metrics; a launch pings /start."""
        name = ev["event"]
        x = self.exporter
        if x is not None:
            snap = x.snapshot
            if name == "start":
                x.publish(up=1, slow=0)
            elif name == "stall":
                x.publish(stalls=snap.stalls + 1)
            elif name == "restart":
                x.publish(restarts=snap.restarts + 1, up=0)
            elif name in ("heartbeat", "sample"):
                x.publish(cpu_percent=ev["cpu_percent"], rss_bytes=ev["rss_bytes"])
            elif name in ("slow", "slow-ended"):
                x.publish(slow=int(name == "slow"))
            elif name in ("gave-up", "exit"):
                x.publish(up=0, **({"exit_status": ev["status"]} if name == "exit" else {}))
        if name == "start":
            self._stall_open_at = None
            self._next_beat = time.monotonic() + (self.cfg.heartbeat_s or DEFAULT_MONITOR_S)
            if self.pinger:
                self.pinger.start()
        elif name == "stall":
            self._stall_open_at = time.monotonic()

    def publish(self, latest_progress: float | None, **fields) -> None:
        """Take what the loop knows now: the freshest progress (monotonic) and metrics fields."""
        if self._stall_open_at is not None and latest_progress is not None and latest_progress > self._stall_open_at:
            self._stall_open_at = None  # progress again (under warn): the stall is over, pings resume
        if self.exporter is not None and fields:
            self.exporter.publish(**fields)

    def ended(self, message: str, event: dict) -> None:
        """The run's end: the last ping and the metrics' last write carry the exit status (sent by settle())."""
        self._next_beat = None
        if self.pinger:
            self.pinger.finish(event["status"], message)
        if self.exporter is not None:  # the exit event itself is recorded last, after settle()
            self.exporter.publish(up=0, exit_status=event["status"])

    def _monitor_housekeeping(self, now: float) -> None:
        """Heartbeat pings while no stall is open; one line per ping outage or metrics-file failure."""
        if self.pinger:
            if self._next_beat is not None and now >= self._next_beat:
                self._next_beat = now + (self.cfg.heartbeat_s or DEFAULT_MONITOR_S)
                if self._stall_open_at is None:
                    self.pinger.beat()
            for hook, error in self.pinger.failures():
                self.say(f"alert {hook} failed: {error}")
                self.emit("alert-failed", hook=hook, error=error)
        if self.exporter is not None and self.exporter.error != self._metrics_error:
            error = self._metrics_error = self.exporter.error
            if error is not None:
                event = self.emit("sink-failed", sink="metrics-file", path=self.cfg.metrics_file, error=error)
                self.say(metrics_file_failed_line(event))
            else:
                event = self.emit("sink-restored", sink="metrics-file", path=self.cfg.metrics_file)
                self.say(sink_restored_line(event))

    # ----- the child's output ---------------------------------------------------------------

    def begin(self, streams, child_pid: int) -> None:
        """Start fresh line state for a new launch's streams."""
        self.child_pid = child_pid
        self._stampers = {name: Stamper() for name in streams}
        self._assemblers = {name: LineAssembler() for name in streams}
        self._recent = {name: bytearray() for name in streams}
        self._recent_cut = {name: False for name in streams}
        self._tails = {name: Tail() for name in streams}

    def user_stop(self) -> None:
        """The user's ending signal came: from now on a terminal that stops reading never holds up the end."""
        self._stopping = True

    @property
    def may_drop(self) -> bool:
        """Whether a terminal that stopped reading may drop output: with a log, or once the user said stop."""
        return self.log is not None or self._stopping

    def lost_output(self) -> bool:
        """Whether some of the child's output reached neither the terminal nor a log (dropped once the user said stop)."""
        return self.log is None and (self._dropped_unlogged or any(t.dropped_bytes for t in self.term.values()))

    def may_read(self, stream: str, now: float) -> bool:
        """Back-pressure while the terminal keeps up; when it may drop, read on (and drop) once it is stuck."""
        term = self.term[stream]
        return term.room() or (self.may_drop and term.stuck(now))

    def wake_at(self, stream: str, now: float) -> float | None:
        """When may_read() could turn true by itself (a terminal becoming stuck), if ever."""
        return (self.term[stream].stuck_at() or now) if self.may_drop else None

    def splice(self, stream: str, fd: int, now: float) -> int | None:
        """Relay the child's stdout from fd without reading it; see LoopWriter.splice_from.

        While counting, the bytes are first teed into a side pipe, and the end of what moved is seen.
        """
        if not self._splice or self._stopping or stream != "out":
            return None  # stopping: bytes the terminal will not take must be read, to be dropped
        splice_from = getattr(self.term["out"], "splice_from", None)
        if splice_from is None:
            return None
        if not self.counting:
            n = splice_from(fd)
        else:
            side = self._side_copy()
            room = self.term["out"].splice_room()
            if room == 0:
                return -1  # the terminal is full: wait for POLLOUT
            copied = side.copy(fd, room) if side else None
            if copied is None:  # not a pipe (a pty), or no tee here: read and write instead
                if side is not None:
                    side.close()
                self._side = False
                return None
            if copied <= 0:
                return copied  # -1: nothing waits; 0: end of file
            n = splice_from(fd, copied)
            seen = side.settle(copied, n if n is not None and n > 0 else 0)
            if seen:
                self._seen("out", seen)
        if n:
            self.last_print = now
        return n

    def _side_copy(self) -> SideCopy | None:
        if self._side is None:
            try:
                self._side = SideCopy(SIDE_KEEP_BYTES)
            except (OSError, AttributeError, ImportError):  # no libc tee (not Linux): read instead
                self._side = False
        return self._side or None

    def _seen(self, stream: str, data: memoryview) -> None:
        """Every byte of the child's that reaches Python passes here (the end of spliced chunks included)."""
        self._tails[stream].feed(data)
        if self.counting:
            recent = self._recent[stream]
            if len(data) >= RECENT_BYTES:
                recent[:] = data[-RECENT_BYTES:]
                self._recent_cut[stream] = True
            else:
                recent += data
                if len(recent) > 2 * RECENT_BYTES:
                    del recent[:-RECENT_BYTES]
                    self._recent_cut[stream] = True

    def take_recent(self) -> list[tuple[str, bytes, bool]]:
        """The child's bytes since the last call, per stream: (stream, bytes, cut: earlier ones were skipped)."""
        taken = []
        for name, recent in self._recent.items():
            if recent:
                taken.append((name, bytes(recent), self._recent_cut[name]))
                recent.clear()
                self._recent_cut[name] = False
        return taken

    def has_recent(self) -> bool:
        """Say whether bytes wait for take_recent()."""
        return any(self._recent.values())

    def child_bytes(self, stream: str, data: memoryview, now: float, regex: re.Pattern[bytes] | None) -> bool:
        """Relay a chunk of the child's output (a view, valid only during the call); True if a line matched regex."""
        self.last_print = now
        self._seen(stream, data)
        if stream == "err" or self._shared:
            self._mid_line = data[-1] != 0x0A
        if self.log is None and regex is None and not self.cfg.timestamps:
            self.term[stream].write(data, droppable=self._stopping)  # the fast path: no copy, no line assembly
            return False
        wall = time.time()
        chunk = bytes(data)
        payload = self._stampers[stream].stamp(chunk, terminal_stamp(wall)) if self.cfg.timestamps else chunk
        self.term[stream].write(payload, droppable=self.may_drop)
        if self.log is None and regex is None:
            return False
        return self._lines(stream, self._assemblers[stream].feed(chunk, now), wall, regex)

    def tail(self, stream: str) -> bytes:
        """The last bytes of a stream of this launch that passed through child_bytes (spliced ones do not)."""
        tail = self._tails.get(stream)
        return tail.value() if tail is not None else b""

    def tick(self, now: float, regex: re.Pattern[bytes] | None, final: bool = False) -> bool:
        """Log lines still being redrawn (or, when final, what is left of them); True on a regex match."""
        matched = False
        for name, asm in self._assemblers.items():
            lines = asm.close() if final else asm.tick(now)
            matched |= self._lines(name, lines, time.time(), regex)
        return matched

    def next_tick_at(self) -> float | None:
        """When tick() will next have a redrawn line to log."""
        times = [t for t in (a.next_tick_at() for a in self._assemblers.values()) if t is not None]
        return min(times) if times else None

    def _lines(self, stream: str, runs: list[Run], wall: float, regex) -> bool:
        """Log runs of lines; True if regex (compiled MULTILINE) matches any of them."""
        matched = False
        for continued, lines in runs:
            if self.log:
                self.log.write_lines(wall, stream + ("+" if continued else ""), lines)
            if regex is not None and not matched:
                matched = regex.search(b"\n".join(lines)) is not None
        return matched

    # ----- housekeeping ---------------------------------------------------------------------

    def housekeeping(self, now: float | None = None) -> None:
        """Report terminal drops, failed and restored sinks, failed hooks; flush the log. Once per loop turn."""
        now = time.monotonic() if now is None else now
        if self.log:
            self.log.flush()  # first, so a write that fails now is reported below, not a turn later
        for name, term in self.term.items():
            dropped = term.take_dropped()
            if dropped:
                self._dropped_unlogged |= self.log is None
                self.emit("terminal-dropped", stream="std" + name, bytes=dropped)
                where = (f"the log {self.cfg.log_path} has everything" if self.log
                         else "the run is ending on the user's signal")
                self.say(f"terminal was not reading: dropped {fmt_bytes(dropped)} of output from it ({where})")
            if term.dead and name not in self._failed_reported:
                self._failed_reported.add(name)
                self._terminal_failed("std" + name, term)
        for sink in (self.log, self.events):
            if sink is not None:
                sink.retry(now)
                for kind, detail in sink.news():
                    self._file_news(sink, kind, detail)
        if self.alerter:
            for hook, error in self.alerter.failures():
                self.say(f"alert {hook} failed: {error}")
                self.emit("alert-failed", hook=hook, error=error)
        if self.monitoring:
            self._monitor_housekeeping(now)
        if self.log:
            self.log.flush()

    def _terminal_failed(self, sink: str, term: TerminalWriter) -> None:
        error = term.error or "not open"
        event = self.emit("sink-failed", sink=sink, error=error)
        if term.gone:
            text = f"terminal {sink} is gone (SSH dropped?): {error}; the child keeps running"
            text += ", output goes on to the log only" if self.log else ", its output is dropped"
        else:
            text = sink_failed_line(event, retry=False)
        self.say(text, terminal=sink == "stdout")

    def _file_news(self, sink: FileSink, kind: str, detail) -> None:
        """Say that a file sink failed or works again, on the other sinks (and on itself once restored)."""
        if kind == "failed":
            event = self.emit("sink-failed", sink=sink.name, path=sink.path, error=detail)
            self.say(sink_failed_line(event, retry=True), log=sink is not self.log)
        else:
            event = self.emit("sink-restored", sink=sink.name, path=sink.path, lost=detail)
            self.say(sink_restored_line(event))

    def poll_fds(self) -> dict[int, TerminalWriter]:
        """Terminal fds with bytes waiting, to poll for writability."""
        return {fd: t for t in self.term.values() if (fd := t.poll_fd()) is not None}

    def is_hook(self, pid: int) -> bool:
        """Say whether pid is one of the alert hooks' processes (never part of the child's tree)."""
        return self.alerter.is_hook(pid) if self.alerter else False

    def _close_hooks(self, interrupted: Callable[[], bool], wake_fd: int | None) -> None:
        """Give hooks in flight their own time bounds, but end them at once on a user's signal."""
        closing = threading.Thread(target=self.alerter.close, name="alert-close", daemon=True)
        closing.start()
        while closing.is_alive():
            if interrupted():
                self.alerter.stop()
                break
            if wake_fd is not None:
                select.select([wake_fd], [], [], 0.1)
            closing.join(0.01 if wake_fd is not None else 0.1)
        closing.join(1.0)

    def settle(self, terminal_wait_s: float | None, interrupted: Callable[[], bool] = lambda: False,
               wake_fd: int | None = None) -> bool:
        """Let hooks finish (within their bounds), give the terminal up to terminal_wait_s; True if it took it all.

        The files stay open: the exit record goes in last, once it is known whether a
        user's signal cut this wait short.
        """
        if self.alerter:
            self._close_hooks(interrupted, wake_fd)
        if self.pinger:
            self.pinger.wait(PING_CLOSE_S, interrupted)
        if self.exporter is not None:
            self.exporter.close()  # the textfile's last write, with the exit status
        self.housekeeping()
        self.housekeeping()  # what the first one said may itself have failed to reach the log
        deadline = None if terminal_wait_s is None else time.monotonic() + terminal_wait_s
        for term in self.term.values():
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not term.flush(left, interrupted, wake_fd):
                return False
        return True

    def close(self, interrupted: Callable[[], bool] = lambda: False, wake_fd: int | None = None) -> None:
        """Close the log and events files (after settle()); give the terminal a moment for what came since."""
        self.housekeeping()
        if self.log:
            self.log.close()
        if self.events:
            self.events.close()
        if self._side:
            self._side.close()
            self._side = False
        for term in self.term.values():
            if not term.flush(LAST_WORDS_WAIT_S, interrupted, wake_fd):
                return
