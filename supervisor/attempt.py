"""One launch of the child: relay, heartbeat, watch, act on a stall, clean up what it leaves.

An attempt sees the configuration, the sinks, the process tree and the signal
inbox; it knows nothing of restarts. What it counted comes back in its Outcome.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import threading
import time
from dataclasses import dataclass, field

from supervisor import child as childmod
from supervisor.output import lines
from supervisor.config import Config
from supervisor.forensics import helpers
from supervisor.forensics.oom import OomCounts
from supervisor.watch.eta import eta_s, fraction_done
from supervisor.ladder import KillLadder
from supervisor.output.router import Output
from supervisor.watch.progress_files import ProgressFiles, Scanner, declared_step, expect_next_s
from supervisor.watch.rate import RateTracker, Slow, step_of
from supervisor.signals import ENDING, FORWARDED, Inbox
from supervisor.watch.counters import SOURCE as COUNTERS, Segments, Tracker
from supervisor.watch.stall import Stall, Watch, WatchConfig

READ_BYTES = 1 << 20
READS_PER_TURN = 16  # a busy child's chunks are relayed back to back, not one per loop turn
TREE_CHECK_MIN_S = 0.05  # after the child exits: how often to look whether its leftovers are gone ...
TREE_CHECK_MAX_S = 0.5  # ... backing off to this, so a long grace does not scan /proc 20 times a second
DRAIN_AFTER_EXIT_S = 1.0  # the tree is gone but a pipe is still open: someone outside holds it
UNKILLABLE_AFTER_S = 5.0  # still there this long after SIGKILL: stuck in the kernel (state D)
DOUBLE_INT_S = 2.0  # a second Ctrl-C within this kills the tree (SPEC 5)
ETA_SAMPLES = 256  # (time, fraction) samples kept for the heartbeat's ETA
# py-spy 10 s, the flight recorder 20 + 30 s: a diagnosis not back by then is stuck (a py-spy
# in state D), and the stall's kill must not wait on it.
DIAGNOSIS_BOUND_S = 75.0
# The output counters look at the latest bytes at most this often: a flood of output costs them a
# few lines per look, never a regex per line (SPEC 1.2).
COUNT_EVERY_S = 0.05
# A `sample` event (tree RSS and CPU, the step) on a fixed cadence whatever the output, for the report's
# memory and speed: the first soon after the launch, then once a minute (about 150 bytes a minute).
SAMPLE_FIRST_S = 5.0
SAMPLE_EVERY_S = 60.0


@dataclass
class Outcome:
    """How one launch ended, and what it counted."""

    status: int
    reason: str  # exited, signal, stall, user-signal, error, unkillable
    progress: str | None = None  # first line of the progress file at the stall
    stalls: int = 0
    pids_seen: set[int] = field(default_factory=set)  # for the GPU-release wait before a restart
    user_signalled: bool = False  # it ended within its grace of the user's USR1 (Slurm: checkpoint and stop)
    user_stop: str | None = None  # how, for the exit line: why a crash is not restarted
    progressed_s: float = 0.0  # how long after the launch it last showed progress: a long one ran well
    cause: str | None = None  # why it ended (SPEC 4): forensics.cause's kind, None when unknown or status 0
    detail: str | None = None  # the evidence, one line


class Diagnosing:
    """A stall's diagnosis, taken in a thread: py-spy (up to 10 s) and the flight recorder (up to
    50 s) must not hold up the relay, the heartbeat or a user's Ctrl-C. It only gathers: the
    loop reports what it found, then starts the kill ladder."""

    def __init__(self, pids: list[int], py_spy: str | None, fr_prefixes: tuple[str, str] | None, wake):
        self.diagnosis = None  # diagnose.Diagnosis
        self.record = None  # flight_recorder.FlightRecord, when the ranks have pipes to ask
        self.done = False  # set last, by the thread
        self.started_at = time.monotonic()
        threading.Thread(target=self._run, args=(pids, py_spy, fr_prefixes, wake), name="diagnosis",
                         daemon=True).start()

    def _run(self, pids, py_spy, fr_prefixes, wake) -> None:
        from supervisor.forensics.diagnose import Diagnosis, diagnose

        try:
            self.diagnosis = diagnose(pids, py_spy)
        except Exception as e:  # our own trouble: the stall is still reported and acted on
            self.diagnosis = Diagnosis([], "", f"none: the diagnosis failed: {type(e).__name__}: {e}", [])
        if fr_prefixes is not None:
            from supervisor.forensics import flight_recorder as fr

            self.record = fr.collect(*fr_prefixes)  # never raises
        self.done = True
        wake()


class Attempt:
    """Run the child once, from spawn until it and everything it started are gone."""

    def __init__(self, cfg: Config, out: Output, tree: childmod.Tree, inbox: Inbox, kid: childmod.Child,
                 files: ProgressFiles, py_spy, env: dict[str, str], scanner: Scanner | None = None):
        self.cfg, self.out, self.tree, self.inbox, self.kid, self.files = cfg, out, tree, inbox, kid, files
        self._py_spy = py_spy  # a callable: py-spy's path, looked up at the first stall
        self._env = env  # the child's: where its ranks put their flight-recorder FIFOs and dumps
        self.launched_at = self.last_output = time.monotonic()
        self.watch = Watch(self._watch_config(), self.launched_at)
        self.scanner = scanner or Scanner(files, inbox.wake)  # the launch's, with its baseline
        self._scan_stall_at = -1e18
        self.open_fds = {fd: name for name, fd in kid.fds.items()}
        self.ladder: KillLadder | None = None
        self.stop_reason: str | None = None  # "stall" once we decided to end it
        self.stall_signalled = False  # a signal of ours went out for the stall: its ending is ours (124)
        self.diagnosing: Diagnosing | None = None  # a stall's diagnosis under way
        self.stall_progress: str | None = None
        self.stalls = 0
        self.exited_at: float | None = None
        self.tree_gone_at: float | None = None
        self.unkillable = False
        self.poll_s = self._poll_interval_s()
        self.next_poll = self.launched_at
        self.next_tree_check = 0.0
        self.next_sample = self.launched_at + SAMPLE_FIRST_S
        self._steps: dict[str, int] = {}  # each progress file's `step:`, as last read
        self.tree_check_s = TREE_CHECK_MIN_S
        self.pids_seen = {kid.pid}
        self._sigchld = False  # a child of ours exited: look for adopted zombies
        self._last_int_at = -1e9
        self._usr1_at: float | None = None  # when the user's SIGUSR1 reached the child (Slurm's warning)
        self._abort_seen = False  # the user's ending signal came with no child to take it (see _finished)
        self.forwarded: int | None = None  # the last signal of the user's passed on to the child
        self.stall_said: str | None = None  # the last STALL line, the evidence of a stall's ending
        self.oom = OomCounts(kid.pid)  # the OOM killer's counts at the launch, for the cause of the end
        self._fractions: list[tuple[float, float]] = []  # (monotonic time, fraction done) for the ETA
        self.rate = RateTracker(cfg.slow_window_s, cfg.slow_ratio)  # SPEC 1.3
        self._rate_line: str | None = None  # the line of the rate's source at its latest count
        self._stats_at = self.launched_at  # when the tree's CPU and RSS were last read (heartbeat or metrics)
        self._buf = bytearray(READ_BYTES)  # reused for every read: no fresh 1 MiB allocation per chunk
        self._view = memoryview(self._buf)
        self.out.begin(kid.fds, kid.pid)
        # Output counters (SPEC 1.2): with no progress file or regex named, until a progress file shows progress.
        self.out.counting = (cfg.output_progress and not cfg.progress_file_explicit and cfg.progress_regex is None)
        self._counters = Tracker() if self.out.counting else None
        self._segments = {name: Segments() for name in kid.fds}
        self._counter_line: str | None = None  # the last line whose counter moved
        self._next_count_at = self.launched_at

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
            self._count(now)
            self._signals(now)
            self._check_child(now)
            self._diagnosed(now)
            self._step_ladder(now)
            if self._finished(now):
                break
            self._timers(now)
            self._regex_progress(self.out.tick(now, self.cfg.progress_regex), now)
            self.out.housekeeping(now)
        self._regex_progress(self.out.tick(now, self.cfg.progress_regex, final=True), now)
        self._count(now, final=True)
        for fd in self.open_fds:
            os.close(fd)
        self.scanner.close()
        return self._outcome()

    def _outcome(self) -> Outcome:
        """How it ended: the child's own status, unless a signal of ours (a stall's) or the user's ended it."""
        outcome = Outcome(self.kid.status, "signal" if self.kid.term_signal else "exited",
                          stalls=self.stalls, pids_seen=self.pids_seen, progressed_s=self.watch.progressed_s())
        user = self.inbox.user_signal
        if self.unkillable:
            outcome.status, outcome.reason = 124, "unkillable"
        elif self.stall_signalled and user is not None:
            # Both of us asked it to end: the user's word is the last (and nothing is restarted).
            outcome.status, outcome.reason = 128 + user, "user-signal"
        elif self.stall_signalled:
            outcome.status, outcome.reason, outcome.progress = 124, "stall", self.stall_progress
        elif user is not None:
            outcome.reason = "user-signal"
        elif self._usr1_at is not None and self.exited_at is not None:
            # Only a USR1 answered by ending within the grace is a checkpoint stop; USR2 (stacks on
            # demand) never is, nor a crash long after the warning.
            after_s = self.exited_at - self._usr1_at
            if after_s <= self.cfg.kill_grace_s:
                outcome.user_signalled = True
                outcome.user_stop = f"it ended {lines.fmt_duration(after_s)} after the user's SIGUSR1, a checkpoint stop"
        outcome.cause, outcome.detail = self._cause(outcome)
        return outcome

    def _cause(self, outcome: Outcome) -> tuple[str | None, str | None]:
        """Why this launch ended, from its status, what we did, its last output and the OOM killer's counts."""
        from supervisor.forensics.cause import Ending, cause_of

        killed_at = self.ladder.killed_at if self.ladder is not None else None
        oom = self.oom.evidence() if outcome.status != 0 else None
        return cause_of(Ending(
            status=outcome.status, term_signal=self.kid.term_signal, stalled=self.stall_signalled,
            killed_by_us=killed_at is not None and (self.exited_at is None or killed_at <= self.exited_at),
            user_signal=self.forwarded,
            stderr=self.out.tail("err"), stdout=self.out.tail("out"), oom=oom, stall=self.stall_said))

    def _wait(self) -> list[int]:
        """Sleep until output, a signal, or the next timer; return the readable fds."""
        now = time.monotonic()
        deadlines = [self.next_poll, self.out.next_tick_at() or self.next_poll]
        if self.ladder is not None and self.ladder.next_at() is not None:
            deadlines.append(self.ladder.next_at())
        if self._counters is not None and self.out.has_recent():
            deadlines.append(self._next_count_at)
        if self.diagnosing is not None:  # its thread wakes us when done; past the bound we go on without it
            deadlines.append(self.diagnosing.started_at + DIAGNOSIS_BOUND_S)
        elif self.exited_at is not None:  # _finished looks at the tree only once no diagnosis is pending
            deadlines.append(self.next_tree_check)
        if self.exited_at is None:  # no heartbeats or samples once the child is gone: no wake-up for them either
            deadlines.append(self.next_sample)
            if self.cfg.heartbeat_s > 0:
                deadlines.append(self.out.last_print + self.cfg.heartbeat_s)
        poller = select.poll()
        poller.register(self.inbox.wake_fd, select.POLLIN)
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
            if fd in self.open_fds:
                self._read_chunks(fd, now, max_reads=READS_PER_TURN)

    def _read_chunks(self, fd: int, now: float, max_reads: int, final: bool = False) -> None:
        """Relay up to max_reads chunks (-1: until the pipe is empty); close the fd at end of file.

        Stops early while the terminal has no room (back-pressure), except for the
        final drain: then, without a log, it waits for the terminal as cat would,
        until a signal from the user says to stop waiting.
        """
        name = self.open_fds[fd]
        while max_reads != 0:
            max_reads -= 1
            if not self.out.may_read(name, now):
                if not final:
                    return
                if not self.out.may_drop:
                    self.out.term[name].flush(None, self.inbox.interrupted, self.inbox.wake_fd)
                    if self.inbox.interrupted():
                        return
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

    # ----- output counters (SPEC 1.2) ----------------------------------------------------------

    def _count(self, now: float, final: bool = False) -> None:
        """Read the counters in the child's latest output, at most once per COUNT_EVERY_S."""
        if self._counters is None or (now < self._next_count_at and not final) or not self.out.has_recent():
            return
        self._next_count_at = now + COUNT_EVERY_S
        for stream, data, cut in self.out.take_recent():
            for line in self._segments[stream].feed(data, cut):
                move = self._counters.feed(line, now)
                if move is not None:
                    self._counter_moved(move.value, move.line, now, finished=move.finished,
                                        previous_s=move.previous_at, key=move.key)
                    if self._counters is None:
                        return  # a progress file took over meanwhile

    def _counter_moved(self, value: float, line: str, now: float, finished: bool = False,
                       previous_s: float | None = None, key: str | None = None) -> None:
        """Every change of an output counter comes here: progress from `output-counters`, and the rate.

        value: the counter's new value (the N of N/M, the number after step/iter/...); line: where
        it moved; finished: it stands at its total; previous_s: when its previous value was seen;
        key: which counter it is (its line's shape), so counters that take turns are told apart.
        """
        if self.watch.progress(COUNTERS, now, done=finished, previous_s=previous_s):
            self.out.emit("progress-first", source=COUNTERS)
        self._counter_line = lines.printable(line)
        self._counters_off_if_file()
        if self._counters is not None:
            self._observe_rate(value, now, COUNTERS, self._counter_line, key)

    def _counters_off_if_file(self) -> None:
        """Once a progress file showed progress, the output counters are no source: stop reading them."""
        if self.watch.counters_off and self._counters is not None:
            self._counters = None
            self.out.counting = False
            self._counter_line = None

    def _regex_progress(self, matched: bool, now: float) -> None:
        if matched and self.watch.progress("output", now, label="output"):
            self.out.emit("progress-first", source="output")

    # ----- signals from the user --------------------------------------------------------------

    def _signals(self, now: float) -> None:
        """Act on the inbox: forward user signals, reap adopted orphans, note a hang-up."""
        for sig in self.inbox.take():
            if sig == signal.SIGCHLD:
                self._sigchld = True
            elif sig == signal.SIGHUP:
                self.out.say("SIGHUP ignored (the terminal is gone?): the child keeps running", terminal=False)
            elif sig in FORWARDED:
                self._forward(sig, now)
        if self._sigchld:  # scanning /proc is too dear for every turn
            self._sigchld = False
            self.tree.reap_adopted(self.kid.pid)

    def _forward(self, sig: int, now: float) -> None:
        if sig in ENDING:
            self.out.user_stop()  # a terminal that stopped reading may no longer hold up the end
        self.forwarded = sig
        if sig == signal.SIGINT:
            if now - self._last_int_at < DOUBLE_INT_S:
                self.out.say("second SIGINT: killing the whole tree")
                self.kill_now(now)
                return
            self._last_int_at = now
        if self.kid.exited():  # reaped, or a zombie not yet reaped this turn
            if sig in ENDING:
                self.inbox.abort(sig)  # nobody left to pass it to: it is for us, as for cat
                if self.ladder is not None:  # the orphans' grace ends here: the user wants the run over
                    self.ladder.kill_now(now)
            return
        # USR1/USR2 (Slurm's warning) to the processes that catch it: torchrun's ranks, not torchrun.
        wanted = "catchers" if sig in (signal.SIGUSR1, signal.SIGUSR2) else "group"
        target = self.tree.send(self.kid, sig, wanted)
        self.out.emit("signal", signal=childmod.signal_name(sig), target=target, reason="forwarded")
        if sig == signal.SIGUSR1:
            self._usr1_at = now
        elif sig in ENDING and self.stall_signalled and self.ladder is not None:
            self.kill_now(now)  # it already had our SIGTERM and is in its grace: the user says not to wait

    # ----- endings --------------------------------------------------------------------------

    def _check_child(self, now: float) -> None:
        """Reap the main child; if it left processes behind, report them and start ending them."""
        if self.exited_at is None and self.kid.reap():
            self.exited_at = now
            if self.stop_reason == "stall" and not self.stall_signalled:
                # It ended on its own before any signal of ours: its ending is its own (no 124, no restart),
                # and a ladder set up for it but not yet begun is for nobody.
                self.stop_reason, self.ladder = None, None
            self.out.publish(None, up=0)
            self._drain(now, max_reads=64)  # bounded: a grandchild may still be writing
            left = self.tree.processes()
            if left and self.ladder is None:
                event = self.out.emit("orphans", pids=[p.pid for p in left])
                self.out.alert(lines.orphans_line(event, self.cfg.kill_grace_s), event)
                # Orphans are already cut loose from the group: TERM each of them.
                self.ladder = KillLadder(now, self.cfg.kill_grace_s, abort_step=False, first_target="tree")

    def kill_now(self, now: float) -> None:
        """Second Ctrl-C: SIGKILL the whole tree on this turn."""
        if self.ladder is None:
            self.ladder = KillLadder(now, 0.0, abort_step=False)
        self.ladder.kill_now(now)

    def _step_ladder(self, now: float) -> None:
        if self.ladder is None:
            return
        reason = "stall" if self.stop_reason == "stall" else "cleanup"
        if reason == "stall" and not self.stall_signalled and self.exited_at is None and self.kid.exited():
            return  # it ended on its own a moment ago: reaped next turn, and its ending stays its own
        for step in self.ladder.due(now):
            self.stall_signalled |= reason == "stall"
            target = self.tree.send(self.kid, step.sig, step.target)
            self.out.emit("signal", signal=childmod.signal_name(step.sig), target=target, reason=reason)
            if step.sig != signal.SIGKILL:
                # A stopped process runs no handler: wake it so it can checkpoint or print its stacks.
                self.tree.send(self.kid, signal.SIGCONT, target)

    def _finished(self, now: float) -> bool:
        """True once the child is reaped, its tree gone and its pipes drained (or abandoned)."""
        if self.diagnosing is not None:  # quick once the processes it asks are gone; bounded anyway
            return False
        if self.exited_at is None and not self._unkillable(now):
            return False
        if self.inbox.aborted() is not None and not self._abort_seen:
            # The user's signal, with the leftovers just SIGKILLed: look now, and back off afresh from here.
            self._abort_seen = True
            self.next_tree_check, self.tree_check_s = now, TREE_CHECK_MIN_S
        if self.tree_gone_at is None and now >= self.next_tree_check:
            self.next_tree_check = now + self.tree_check_s
            self.tree_check_s = min(TREE_CHECK_MAX_S, self.tree_check_s * 2)
            if not self.tree.processes():
                self.tree_gone_at = now
            elif self._unkillable(now):
                return True
        if self.tree_gone_at is not None and (not self.open_fds or now - self.tree_gone_at > DRAIN_AFTER_EXIT_S):
            self._drain(now)
            return True
        return False

    def _unkillable(self, now: float) -> bool:
        """After SIGKILL, processes still there after UNKILLABLE_AFTER_S are stuck: report them once."""
        killed_at = self.ladder.killed_at if self.ladder else None
        if killed_at is None or now - killed_at < UNKILLABLE_AFTER_S:
            return False
        if not self.unkillable:
            procs = self.tree.processes()
            if not procs:
                return False
            from supervisor.forensics.diagnose import proc_states

            states = proc_states([p.pid for p in procs])
            self.unkillable = True
            event = self.out.emit("unkillable", pids=[s["pid"] for s in states],
                                  states=[s["state"] for s in states], wchan=[s["wchan"] for s in states])
            self.out.alert(lines.unkillable_line(event), event)
            self._drain(now, max_reads=64)
        return True

    # ----- timers: progress, stalls, heartbeats ---------------------------------------------

    def _timers(self, now: float) -> None:
        for path, fields, _ in self.scanner.take():
            self._file_progress(path, fields, now)
        if now >= self.next_poll:
            self.next_poll = now + self.poll_s
            self.scanner.request(now)
            if self.exited_at is None and self.stop_reason is None:
                stall = self.watch.check(now) or self._scan_hung(now)
                if stall is not None:
                    self._on_stall(stall, now)
                self._check_slow(now)
                self._publish(now)
        if self.cfg.heartbeat_s > 0 and now - self.out.last_print >= self.cfg.heartbeat_s and self.exited_at is None:
            self._heartbeat(now)
        if now >= self.next_sample and self.exited_at is None:
            self.next_sample = now + SAMPLE_EVERY_S
            self._sample(now)

    def _scan_hung(self, now: float) -> Stall | None:
        """A progress-file scan that does not answer (a dead network mount) within the limit is a stall."""
        limit = self.cfg.stall_timeout_s or self.cfg.startup_grace_s
        hung = self.scanner.hung_s(now)
        if limit <= 0 or hung < limit or now - self._scan_stall_at < limit:
            return None
        self._scan_stall_at = now  # under warn: said again once per limit, like any stall
        return Stall("progress", f"{self.cfg.progress_file} (stat not answering)", hung, limit)

    def _file_progress(self, path: str, fields: dict[str, str], now: float) -> None:
        expect = expect_next_s(fields, self.cfg.max_expect_s)
        declared = declared_step(fields)  # the events' `step`: the count the file states, for the report
        if declared is not None:
            self._steps[path] = declared
        if self.watch.progress(path, now, label=self.cfg.progress_file, expect_s=expect):
            self.out.emit("progress-first", source=path, step=declared)
        self._counters_off_if_file()
        step = step_of(fields)
        if step is not None:
            self._observe_rate(step, now, path, lambda: self.scanner.first_line(path))
        if path == self.files.latest:
            fraction = fraction_done(fields)  # SPEC 3: the ETA needs the file's epoch and batch totals
            if fraction is not None:
                self._fractions = self._fractions[-ETA_SAMPLES + 1:] + [(now, fraction)]

    def _observe_rate(self, value: float, now: float, source: str, line, key: str | None = None) -> None:
        """Feed the progress rate a count from a source (a progress file's step, an output counter).

        line: the source's line, or a callable that reads it (only when this source is followed);
        key: which of the source's counters it is.
        """
        self.rate.observe(value, now, source, key)
        if self.rate.source == source:
            self._rate_line = line() if callable(line) else line

    def _check_slow(self, now: float) -> None:
        """Say when the progress rate falls below the typical one, and when it is back (SPEC 1.3)."""
        if self.watch.declared_s() is not None:
            return  # a declared pause (a checkpoint, a validation) is slow on purpose
        found = self.rate.check(now)
        if found is None:
            return
        source = "output-counters" if found.source == "output-counters" else _shown_path(found.source)
        fields = dict(rate=round(found.rate, 4), typical_rate=round(found.typical_rate, 4),
                      window_s=found.window_s, source=source)
        if isinstance(found, Slow):
            event = self.out.emit("slow", **fields, progress=self._rate_line)
            self.out.alert(lines.slow_line(event), event)
        else:
            event = self.out.emit("slow-ended", **fields, duration_s=round(found.duration_s, 3))
            self.out.say(lines.slow_ended_line(event))

    def _publish(self, now: float) -> None:
        """Hand the metrics and the dead-man's switch what the loop knows now (a snapshot they only read)."""
        if not self.out.monitoring:
            return
        latest, stalest = self.watch.progress_times()
        eta = eta_s(self._fractions, now)
        fields = dict(progress_at=stalest, step=self.rate.value, rate=self.rate.rate(now), slow=int(self.rate.slow),
                      eta_s=eta, last_progress_wall=None if latest is None else time.time() - (now - latest))
        # A silent child's heartbeats read the tree's CPU and RSS (and the metrics take them from the
        # event); a chatty one has no heartbeats, so read them here, but never just before a heartbeat:
        # CPU % is measured since the last reading.
        if self.out.exporter is not None and now - self._stats_at >= 1.5 * (self.cfg.heartbeat_s or 30.0):
            self._stats_at = now
            cpu, rss = self.tree.stats()
            fields.update(cpu_percent=round(cpu, 1), rss_bytes=rss)
        self.out.publish(latest, **fields)

    def _heartbeat(self, now: float) -> None:
        cpu, rss = self.tree.stats()
        self._stats_at = now
        age = self.watch.progress_age_s(now)
        eta = eta_s(self._fractions, now)
        # The event first: whoever sees the line can already read it.
        event = self.out.emit(
            "heartbeat", pid=self.kid.pid, silent_s=round(now - self.last_output, 3),
            progress_age_s=None if age is None else round(age, 3), cpu_percent=round(cpu, 1), rss_bytes=rss,
            progress=self.scanner.first_line() or self._counter_line, expect_s=self.watch.declared_s(),
            eta_s=None if eta is None else round(eta), up_s=round(now - self.launched_at, 3),
            rate=None if (rate := self.rate.rate(now)) is None else round(rate, 4),
            step=self._steps.get(self.files.latest))
        self.out.say(lines.heartbeat_line(event))

    def _sample(self, now: float) -> None:
        """Record the tree's RSS and CPU and the step, for the report's memory and speed (no line)."""
        cpu, rss = self.tree.stats()
        self._stats_at = now
        age = self.watch.progress_age_s(now)
        self.out.emit("sample", pid=self.kid.pid, cpu_percent=round(cpu, 1), rss_bytes=rss,
                      step=self._steps.get(self.files.latest), progress_age_s=None if age is None else round(age, 3))

    def _on_stall(self, stall: Stall, now: float) -> None:
        """Report a stall and its diagnosis; start the kill ladder unless the action is warn."""
        cfg, out = self.cfg, self.out
        self.stalls += 1
        # The stalled file's own line: under torchrun the fresh ranks say nothing of the hung one.
        if stall.source == COUNTERS:
            own = self._counter_line  # the last line whose counter moved
        else:
            own = self.scanner.first_line(stall.source)
        self.stall_progress = progress = own or self.scanner.first_line()
        # Output counters are inferred evidence: flagged, never acted on, unless --on-stall was given (SPEC 1.2).
        action = cfg.on_stall if cfg.on_stall_explicit or stall.source != COUNTERS else "warn"
        event = out.emit("stall", kind=stall.kind, source=stall.source, age_s=round(stall.age_s, 3),
                         limit_s=stall.limit_s, progress=progress, action=action, declared=stall.declared,
                         step=self._steps.get(stall.source))
        out.alert(lines.stall_line(event, _shown_path(stall.source)), event)
        self.stall_said = lines.stall_detail(event, _shown_path(stall.source))
        if action in ("kill", "restart"):
            self.stop_reason = "stall"  # the ladder starts once the diagnosis is in
        if self.diagnosing is None:  # under warn, a repeat while the last one still runs adds nothing
            self._diagnose()

    def _diagnose(self) -> None:
        from supervisor.forensics import flight_recorder as fr

        pids = [p.pid for p in self.tree.processes()]
        self.pids_seen.update(pids)
        prefixes = None
        if self.cfg.flight_recorder:  # ask every NCCL rank for its in-flight collectives (SPEC 4.1)
            pipe_prefix, dump_prefix = fr.prefixes(self._env)
            if pipe_prefix is not None:
                prefixes = (pipe_prefix, dump_prefix)
        self.diagnosing = Diagnosing(pids, self._py_spy(), prefixes, self.inbox.wake)

    def _report_diagnosis(self, found: Diagnosing) -> None:
        from supervisor.forensics.diagnose import event_fields

        if found.diagnosis is not None:
            event = self.out.emit("diagnosis", **event_fields(found.diagnosis))
            text = lines.diagnosis_lines(event)
            self.out.say("diagnosis: " + text[0])
            for line in text[1:]:
                self.out.say("  " + line)
        record = found.record
        if record is not None and (record.pipes or record.error):  # no NCCL rank: nothing to say each time
            event = self.out.emit("flight-recorder", **record.event_fields())
            for line in lines.flight_recorder_lines(event):
                self.out.say(line)

    def _diagnosed(self, now: float) -> None:
        """Report a finished diagnosis; then, for kill and restart, set up the ladder (SPEC 4)."""
        found = self.diagnosing
        user = self.inbox.user_signal  # a user's ending signal does not wait for the diagnosis (SPEC 4)
        if found is None or not found.done and now - found.started_at < DIAGNOSIS_BOUND_S and user is None:
            return
        self.diagnosing = None
        if found.done:
            self._report_diagnosis(found)
        elif user is not None:
            self.out.say(f"diagnosis: cut short by the user's {childmod.signal_name(user)}"
                         + ("; what was gathered follows" if found.diagnosis is not None else ""))
            self._report_diagnosis(found)  # the stacks, if py-spy is done; the flight recorder's wait is dropped
            helpers.close()  # a py-spy or torchfrtrace still at it works for nobody now: the run is ending
        else:
            self.out.say(f"diagnosis: nothing back after {DIAGNOSIS_BOUND_S:g}s (py-spy stuck in the kernel?);"
                         f" going on without it")
        if self.stop_reason == "stall" and self.ladder is None and self.exited_at is None:
            # The grace counts from the SIGTERM, not from the stall: the diagnosis came first. After the
            # user's ending signal (passed on already) ours would be a second one: the grace starts now.
            self.ladder = KillLadder(now, self.cfg.kill_grace_s, abort_step=True,
                                     term_sent=user is not None)  # else SIGTERM on this turn


def _shown_path(source: str) -> str:
    """A progress path as the user wrote it, relative when that is shorter; never raises (a deleted cwd)."""
    if source == COUNTERS:
        return "output counters"
    if not source.startswith(os.sep):
        return source
    try:
        rel = os.path.relpath(source)
    except (OSError, ValueError):
        return source
    return rel if len(rel) < len(source) else source
