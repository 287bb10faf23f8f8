"""Where everything the supervisor shows goes: the terminal, --log, --events, alert hooks."""
from __future__ import annotations

import re
import time
from typing import Callable

from .config import Config
from .events import EventLog, LogFile, fmt_bytes, make_event, sup_line, terminal_stamp
from .assemble import LineAssembler, Run, Stamper
from .terminal import TerminalWriter, open_terminal


class Output:
    """The supervisor's sinks, shared by every launch of the child."""

    def __init__(self, config: Config, wake: Callable[[], None], stdout_fd: int = 1, stderr_fd: int = 2):
        self.cfg = config
        self.term = {"out": open_terminal(stdout_fd, wake), "err": open_terminal(stderr_fd, wake)}
        self.log: LogFile | None = None
        self.events: EventLog | None = None
        self.alerter = None
        if config.log_path:
            self.log = LogFile(config.log_path)
        if config.events_path:
            self.events = EventLog(config.events_path)
        if config.alert_cmd or config.alert_webhook:
            from .alerts import Alerter  # urllib and threads only when asked for

            self.alerter = Alerter(list(config.alert_cmd) or None, config.alert_webhook)
        self.last_print = time.monotonic()  # anything printed, ours or the child's: the heartbeat's clock
        self._err_mid_line = False  # the child's stderr ends in a partial line
        self._dead_reported: set[str] = set()
        # Nothing to see in the bytes: stdout can go from pipe to terminal inside the kernel.
        # (Not stderr: our own lines there must know whether the child's last line ended.)
        self._splice = self.log is None and config.progress_regex is None and not config.timestamps
        self._stampers: dict[str, Stamper] = {}
        self._assemblers: dict[str, LineAssembler] = {}

    # ----- the supervisor's own output ------------------------------------------------------

    def say(self, text: str, terminal: bool = True) -> None:
        """Print a supervisor line to stderr and the log."""
        wall = time.time()
        line = sup_line(text, wall)
        if terminal:
            # Our line starts on a line of its own even after a partial line of the child's.
            head = b"\n" if self._err_mid_line else b""
            self.term["err"].write(head + line.encode() + b"\n", droppable=self.log is not None)
            self._err_mid_line = False
            self.last_print = time.monotonic()
        if self.log:
            self.log.write_lines(wall, "sup", [line.encode()])

    def emit(self, name: str, **fields) -> dict:
        """Append an event to --events and return it."""
        event = make_event(name, **fields)
        if self.events:
            self.events.emit(event)
        return event

    def alert(self, message: str, event: dict) -> None:
        """Print an alert line and fire the hooks for its event."""
        self.say(message)
        if self.alerter:
            self.alerter.fire(event, sup_line(message))

    # ----- the child's output ---------------------------------------------------------------

    def begin(self, streams) -> None:
        """Start fresh line state for a new launch's streams."""
        self._stampers = {name: Stamper() for name in streams}
        self._assemblers = {name: LineAssembler() for name in streams}

    def may_read(self, stream: str, now: float) -> bool:
        """Back-pressure while the terminal keeps up; with a log, read on (and drop) once it is stuck."""
        term = self.term[stream]
        return term.room() or (self.log is not None and term.stuck(now))

    def wake_at(self, stream: str, now: float) -> float | None:
        """When may_read() could turn true by itself (a terminal becoming stuck), if ever."""
        return (self.term[stream].stuck_at() or now) if self.log is not None else None

    def splice(self, stream: str, fd: int, now: float) -> int | None:
        """Relay the child's stdout from fd without reading it; see LoopWriter.splice_from."""
        if not self._splice or stream != "out":
            return None
        splice_from = getattr(self.term["out"], "splice_from", None)
        n = splice_from(fd) if splice_from else None
        if n:
            self.last_print = now
        return n

    def child_bytes(self, stream: str, data: memoryview, now: float, regex: re.Pattern[bytes] | None) -> bool:
        """Relay a chunk of the child's output (a view, valid only during the call); True if a line matched regex."""
        self.last_print = now
        if stream == "err":
            self._err_mid_line = data[-1] != 0x0A
        if self.log is None and regex is None and not self.cfg.timestamps:
            self.term[stream].write(data)  # the fast path: no copy, no line assembly
            return False
        wall = time.time()
        chunk = bytes(data)
        payload = self._stampers[stream].stamp(chunk, terminal_stamp(wall)) if self.cfg.timestamps else chunk
        self.term[stream].write(payload, droppable=self.log is not None)
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

    def housekeeping(self) -> None:
        """Report terminal drops and deaths and failed hooks; flush the log. Once per loop turn."""
        for name, term in self.term.items():
            dropped = term.take_dropped()
            if dropped:
                self.say(f"terminal was not reading: dropped {fmt_bytes(dropped)} of output from it "
                         f"(the log {self.cfg.log_path} has everything)")
            if term.dead and name not in self._dead_reported:
                self._dead_reported.add(name)
                self.say(f"terminal std{name} is gone (SSH dropped?): the child keeps running, "
                         "output goes on to the log only", terminal=False)
        if self.alerter:
            for hook, error in self.alerter.failures():
                self.say(f"alert {hook} failed: {error}")
                self.emit("alert-failed", hook=hook, error=error)
        if self.log:
            self.log.flush()

    def poll_fds(self) -> dict[int, TerminalWriter]:
        """Terminal fds with bytes waiting, to poll for writability."""
        return {fd: t for t in self.term.values() if (fd := t.poll_fd()) is not None}

    def hook_pids(self) -> set[int]:
        """Live alert-hook processes: not part of the child's tree."""
        return self.alerter.hook_pids() if self.alerter else set()

    def close(self, terminal_wait_s: float | None) -> None:
        """Let hooks finish, close the files, and give the terminal up to terminal_wait_s."""
        if self.alerter:
            self.alerter.close(timeout_s=10.0)
        self.housekeeping()
        if self.log:
            self.log.close()
        if self.events:
            self.events.close()
        for term in self.term.values():
            term.flush(terminal_wait_s)
