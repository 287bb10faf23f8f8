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
from supervisor.output.lines import fmt_bytes, sink_failed_line, sink_restored_line, sup_line, terminal_stamp
from supervisor.output.sinks import EventLog, FileSink, LogFile
from supervisor.output.terminal import TerminalWriter, open_terminal

LAST_WORDS_WAIT_S = 1.0  # at close, for lines said after the terminal was already flushed (settle)


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
        return event

    def alert(self, message: str, event: dict) -> None:
        """Print an alert line and fire the hooks for its event."""
        self.say(message)
        if self.alerter:
            self.alerter.fire(event, sup_line(message), self.child_pid)

    # ----- the child's output ---------------------------------------------------------------

    def begin(self, streams, child_pid: int) -> None:
        """Start fresh line state for a new launch's streams."""
        self.child_pid = child_pid
        self._stampers = {name: Stamper() for name in streams}
        self._assemblers = {name: LineAssembler() for name in streams}

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
        """Relay the child's stdout from fd without reading it; see LoopWriter.splice_from."""
        if not self._splice or self._stopping or stream != "out":
            return None  # stopping: bytes the terminal will not take must be read, to be dropped
        splice_from = getattr(self.term["out"], "splice_from", None)
        n = splice_from(fd) if splice_from else None
        if n:
            self.last_print = now
        return n

    def child_bytes(self, stream: str, data: memoryview, now: float, regex: re.Pattern[bytes] | None) -> bool:
        """Relay a chunk of the child's output (a view, valid only during the call); True if a line matched regex."""
        self.last_print = now
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
        for term in self.term.values():
            if not term.flush(LAST_WORDS_WAIT_S, interrupted, wake_fd):
                return
