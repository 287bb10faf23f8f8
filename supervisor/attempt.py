"""One launch of the child: relay, heartbeat, watch, act on a stall, clean up what it leaves."""
from __future__ import annotations

import errno
import os
import select
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import child as childmod
from .events import fmt_bytes, fmt_duration, fmt_limit
from .ladder import KillLadder
from .progress_files import ProgressFiles, read_first_line
from .watch import Stall, Watch, WatchConfig

if TYPE_CHECKING:
    from .supervise import Supervisor

READ_BYTES = 1 << 20
READS_PER_TURN = 16  # a busy child's chunks are relayed back to back, not one per loop turn
TREE_CHECK_S = 0.05  # after the child exits: how often to look whether its leftovers are gone
DRAIN_AFTER_EXIT_S = 1.0  # the tree is gone but a pipe is still open: someone outside holds it


@dataclass
class Outcome:
    """How one launch ended."""

    status: int
    reason: str  # exited, signal, stall, user-signal, error
    progress: str | None = None  # first line of the progress file at the stall


class Attempt:
    """Run the child once, from spawn until it and everything it started are gone."""

    def __init__(self, sup: Supervisor, kid: childmod.Child, number: int):
        self.sup = sup
        self.cfg = sup.cfg
        self.out = sup.out
        self.kid = kid
        self.number = number
        self.launched_at = self.last_output = time.monotonic()
        self.watch = Watch(self._watch_config(), self.launched_at)
        self.files = ProgressFiles(self.cfg.progress_file)
        self.files.baseline()
        self.open_fds = {fd: name for name, fd in kid.fds.items()}
        self.ladder: KillLadder | None = None
        self.stop_reason: str | None = None  # "stall" once we decided to end it
        self.stall_progress: str | None = None
        self.exited_at: float | None = None
        self.tree_gone_at: float | None = None
        self.poll_s = self._poll_interval_s()
        self.next_poll = self.launched_at
        self.pids_seen = {kid.pid}  # for the GPU-release wait before a restart
        self._buf = bytearray(READ_BYTES)  # reused for every read: no fresh 1 MiB allocation per chunk
        self._view = memoryview(self._buf)
        self.out.begin(kid.fds)

    def _watch_config(self) -> WatchConfig:
        cfg = self.cfg
        required = [cfg.progress_file] if cfg.progress_file_explicit else []
        if cfg.progress_regex is not None:
            required.append("output")
        return WatchConfig(stall_timeout_s=cfg.stall_timeout_s, auto=cfg.stall_auto,
                           startup_grace_s=cfg.startup_grace_s, silence_timeout_s=cfg.silence_timeout_s,
                           required=tuple(required))

    def _poll_interval_s(self) -> float:
        # A twentieth of the tightest limit, so a stall is seen within 5 % of it; at most 1 s.
        cfg = self.cfg
        limits = [x for x in (cfg.stall_timeout_s, cfg.startup_grace_s, cfg.silence_timeout_s) if x > 0]
        return min(1.0, max(0.05, min(limits) / 20)) if limits else 1.0

    # ----- the loop -------------------------------------------------------------------------

    def run(self) -> Outcome:
        """Loop until the child and its tree are gone and its output is relayed."""
        while True:
            ready = self._wait()
            now = time.monotonic()
            self._read(ready, now)
            self.sup.handle_signals(self)
            self._check_child(now)
            self._step_ladder(now)
            if self._finished(now):
                break
            self._timers(now)
            self._regex_progress(self.out.tick(now, self.cfg.progress_regex), now)
            self.out.housekeeping()
        self._regex_progress(self.out.tick(now, self.cfg.progress_regex, final=True), now)
        for fd in self.open_fds:
            os.close(fd)
        if self.stop_reason == "stall":
            return Outcome(124, "stall", self.stall_progress)
        if self.sup.user_signal is not None:
            return Outcome(self.kid.status, "user-signal")
        return Outcome(self.kid.status, "signal" if self.kid.term_signal else "exited")

    def _wait(self) -> list[int]:
        """Sleep until output, a signal, or the next timer; return the readable fds."""
        now = time.monotonic()
        deadlines = [self.next_poll, self.out.next_tick_at() or self.next_poll]
        if self.ladder is not None and self.ladder.next_at() is not None:
            deadlines.append(self.ladder.next_at())
        if self.exited_at is not None:
            deadlines.append(now + TREE_CHECK_S)
        elif self.cfg.heartbeat_s > 0:  # no heartbeats once the child is gone: no wake-up for one either
            deadlines.append(self.out.last_print + self.cfg.heartbeat_s)
        poller = select.poll()
        poller.register(self.sup.wake_fd, select.POLLIN)
        for fd, name in self.open_fds.items():
            if self.out.may_read(name, now):
                poller.register(fd, select.POLLIN)
            else:
                deadlines.append(self.out.wake_at(name, now) or self.next_poll)
        writers = self.out.poll_fds()
        for fd in writers:
            poller.register(fd, select.POLLOUT)
        try:
            ready = poller.poll(max(0.0, min(deadlines) - now) * 1000)
        except InterruptedError:
            return []
        for fd, _ in ready:
            if fd in writers:
                writers[fd].pump()
        return [fd for fd, _ in ready if fd not in writers]

    def _read(self, ready: list[int], now: float) -> None:
        for fd in ready:
            if fd == self.sup.wake_fd:
                self.sup.drain_wakeups()
            elif fd in self.open_fds:
                self._read_chunks(fd, now, max_reads=READS_PER_TURN)

    def _read_chunks(self, fd: int, now: float, max_reads: int, final: bool = False) -> None:
        """Relay up to max_reads chunks (-1: until the pipe is empty); close the fd at end of file.

        Stops early while the terminal has no room (back-pressure), except for the
        final drain: then, without a log, it waits for the terminal as cat would.
        """
        name = self.open_fds[fd]
        while max_reads != 0:
            max_reads -= 1
            if not self.out.may_read(name, now):
                if not final:
                    return
                if self.cfg.log_path is None:
                    self.out.term[name].flush(None)
            n = self._relay_chunk(fd, name, now)
            if n == 0:
                os.close(fd)
                del self.open_fds[fd]
                return
            if n is None:
                if final and not self.out.may_read(name, now):
                    continue  # the last drain, and the terminal is full: wait for it, above
                return
            self.last_output = now
            self.watch.output(now)

    def _relay_chunk(self, fd: int, name: str, now: float) -> int | None:
        """Move one chunk from the child to the terminal; its size, 0 at end of file, None if nothing moved."""
        moved = self.out.splice(name, fd, now)
        if moved is not None:
            return moved if moved >= 0 else None
        try:
            n = os.readv(fd, [self._buf])
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno != errno.EIO:
                raise
            return 0  # EIO: a pty whose last writer closed it
        if n:
            self._regex_progress(self.out.child_bytes(name, self._view[:n], now, self.cfg.progress_regex), now)
        return n

    def _drain(self, now: float, max_reads: int = -1) -> None:
        """Relay what is already in the pipes, without waiting for more (-1: all of it, the last time)."""
        for fd in list(self.open_fds):
            self._read_chunks(fd, now, max_reads, final=max_reads < 0)

    def _regex_progress(self, matched: bool, now: float) -> None:
        if matched and self.watch.progress("output", now, label="output"):
            self.out.emit("progress-first", source="output")

    # ----- endings --------------------------------------------------------------------------

    def _check_child(self, now: float) -> None:
        """Reap the main child; if it left processes behind, report them and start ending them."""
        if self.exited_at is None and self.kid.reap():
            self.exited_at = now
            self._drain(now, max_reads=64)  # bounded: a grandchild may still be writing
            left = self.sup.tree()
            if left and self.ladder is None:
                pids = [p.pid for p in left]
                self.out.alert(
                    f"ORPHANS {len(pids)} process(es) left behind by the child: {pids}; "
                    f"SIGTERM, SIGKILL after {fmt_limit(self.cfg.kill_grace_s)}",
                    self.out.emit("orphans", pids=pids),
                )
                # Orphans are already cut loose from the group: TERM each of them.
                self.ladder = KillLadder(now, self.cfg.kill_grace_s, abort_step=False, first_target="tree")
        self.sup.reap_adopted(self.kid.pid)

    def kill_now(self, now: float) -> None:
        """Second Ctrl-C: SIGKILL the whole tree on this turn."""
        if self.ladder is None:
            self.ladder = KillLadder(now, 0.0, abort_step=False)
        self.ladder.kill_now(now)

    def _step_ladder(self, now: float) -> None:
        if self.ladder is not None:
            reason = "stall" if self.stop_reason == "stall" else "cleanup"
            for step in self.ladder.due(now):
                self.sup.send(self.kid, step.sig, step.target, reason)

    def _finished(self, now: float) -> bool:
        """True once the child is reaped, its tree gone and its pipes drained (or abandoned)."""
        if self.exited_at is None:
            return False
        if self.tree_gone_at is None and not self.sup.tree():
            self.tree_gone_at = now
        if self.tree_gone_at is not None and (not self.open_fds or now - self.tree_gone_at > DRAIN_AFTER_EXIT_S):
            self._drain(now)
            return True
        return False

    # ----- timers: progress, stalls, heartbeats ---------------------------------------------

    def _timers(self, now: float) -> None:
        if now >= self.next_poll:
            self.next_poll = now + self.poll_s
            for path in self.files.poll():
                if self.watch.progress(path, now, label=self.cfg.progress_file):
                    self.out.emit("progress-first", source=path)
            if self.exited_at is None and self.stop_reason is None:
                stall = self.watch.check(now)
                if stall is not None:
                    self._on_stall(stall, now)
        if self.cfg.heartbeat_s > 0 and now - self.out.last_print >= self.cfg.heartbeat_s and self.exited_at is None:
            self._heartbeat(now)

    def _heartbeat(self, now: float) -> None:
        cpu, rss = self.sup.tree_stats()
        age = self.watch.progress_age_s(now)
        first = self.files.first_line()
        text = (
            f"heartbeat pid={self.kid.pid} up={fmt_duration(now - self.launched_at)} "
            f"silent={fmt_duration(now - self.last_output)} "
            f"progress={fmt_duration(age) + '-ago' if age is not None else 'none'} cpu={cpu:.0f}% rss={fmt_bytes(rss)}"
        )
        # The event first: whoever sees the line can already read it.
        self.out.emit("heartbeat", pid=self.kid.pid, silent_s=round(now - self.last_output, 3),
                      progress_age_s=None if age is None else round(age, 3), cpu_percent=round(cpu, 1),
                      rss_bytes=rss, progress=first)
        self.out.say(text + (f" | {first}" if first else ""))

    def _on_stall(self, stall: Stall, now: float) -> None:
        """Report a stall and its diagnosis; start the kill ladder unless the action is warn."""
        cfg, out = self.cfg, self.out
        self.sup.stalls += 1
        # The stalled file's own line: under torchrun the fresh ranks say nothing of the hung one.
        own = read_first_line(stall.source) if stall.source.startswith(os.sep) else None
        self.stall_progress = progress = own or self.files.first_line()
        if stall.kind == "silence":
            what = f"no output for {fmt_duration(stall.age_s)} (limit {fmt_limit(stall.limit_s)})"
        else:
            where = os.path.relpath(stall.source) if stall.source.startswith(os.sep) else stall.source
            what = f"no progress for {fmt_duration(stall.age_s)} (limit {fmt_limit(stall.limit_s)}) in {where}"
        event = out.emit("stall", kind=stall.kind, source=stall.source, age_s=round(stall.age_s, 3),
                         limit_s=stall.limit_s, progress=progress, action=cfg.on_stall)
        out.alert(f"STALL {what}; action={cfg.on_stall}" + (f" | {progress}" if progress else ""), event)
        self._diagnose()
        if cfg.on_stall in ("kill", "restart"):
            self.stop_reason = "stall"
            sent_at = time.monotonic()  # the grace counts from the SIGTERM, not from before the diagnosis
            self.ladder = KillLadder(sent_at, cfg.kill_grace_s, abort_step=True)
            self._step_ladder(sent_at)

    def _diagnose(self) -> None:
        from .diagnose import diagnose, format_diagnosis  # py-spy and thread pools only once a stall comes

        pids = [p.pid for p in self.sup.tree()]
        self.pids_seen.update(pids)
        diag = diagnose(pids, self.sup.py_spy)
        lines = format_diagnosis(diag)
        self.out.say("diagnosis: " + (lines[0] if lines else "nothing left to diagnose"))
        for line in lines[1:]:
            self.out.say("  " + line)
        fields = ("pid", "cmd", "state", "cpu_percent", "rss_bytes", "threads")
        self.out.emit("diagnosis", processes=[{k: getattr(p, k) for k in fields} for p in diag.processes],
                      stacks=diag.stacks, stack_method=diag.stack_method, gpus=diag.gpus)
