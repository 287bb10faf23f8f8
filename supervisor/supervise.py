"""The loop: launch the child, relay its output, watch for stalls, act, and report.

One thread runs the loop (poll on the child's fds and a wake-up pipe); the
terminal writers run in their own threads so a frozen SSH link never stops
heartbeats, stall detection or the log.
"""
from __future__ import annotations

import errno
import os
import select
import signal
import time
from dataclasses import dataclass

import psutil

from . import child as childmod
from .config import Config
from .diagnose import diagnose, find_py_spy, format_diagnosis, gpu_memory_used_by
from .events import EventLog, LogFile, fmt_bytes, fmt_duration, fmt_limit, make_event, sup_line, terminal_stamp
from .ladder import KillLadder
from .policy import RestartBudget, RestartPolicy
from .progress_files import ProgressFiles, read_first_line
from .relay import LineAssembler, Stamper, TerminalWriter
from .watch import Stall, Watch, WatchConfig

READ_BYTES = 1 << 20
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
DOUBLE_INT_S = 2.0  # a second Ctrl-C within this kills the tree (SPEC 5)
DRAIN_AFTER_EXIT_S = 1.0  # the tree is gone but a pipe is still open: someone outside holds it
TERMINAL_EXIT_WAIT_S = 5.0  # SPEC 5: with --log, wait at most this for a frozen terminal at exit
GPU_RELEASE_WAIT_S = 60.0
BACKOFF_MAX_S = 60.0


@dataclass
class Outcome:
    """How one launch ended."""

    status: int
    reason: str  # exited, signal, stall, user-signal, error
    progress: str | None = None  # first line of the progress file at the stall


class Supervisor:
    """Run one command under supervision; run() returns the exit status."""

    def __init__(self, config: Config, stdout_fd: int = 1, stderr_fd: int = 2):
        self.cfg = config
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.term = {
            "out": TerminalWriter(stdout_fd, self._wake),
            "err": TerminalWriter(stderr_fd, self._wake),
        }
        self._dead_reported: set[str] = set()
        self.log = LogFile(config.log_path) if config.log_path else None
        self.events = EventLog(config.events_path) if config.events_path else None
        self.alerter = None
        if config.alert_cmd or config.alert_webhook:
            from .alerts import Alerter  # urllib and threads only when asked for

            self.alerter = Alerter(list(config.alert_cmd) or None, config.alert_webhook)
        self._lines_wanted = self.log is not None or config.progress_regex is not None
        self.py_spy = find_py_spy()
        self.started_at = time.monotonic()
        self.last_print = self.started_at  # for the heartbeat: anything printed, ours or the child's
        self.restarts = 0
        self.stalls = 0
        self._signals: list[int] = []
        self._last_int_at = -1e9
        self.user_signal: int | None = None
        self._err_mid_line = False  # the child's stderr ends in a partial line
        self._procs: dict[int, psutil.Process] = {}  # cached, so cpu_percent measures between heartbeats
        self._attempt_pids: list[int] = []  # the tree of the last launch, for the GPU-release wait
        self._child_exited_signal = False  # SIGCHLD came: look for adopted zombies

    # ----- output -------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass  # the pipe is full: the loop is waking anyway

    def say(self, text: str, terminal: bool = True) -> None:
        """Print a supervisor line to stderr and the log."""
        wall = time.time()
        line = sup_line(text, wall)
        if terminal:
            head = b"\n" if self._err_mid_line and not self.cfg.pty else b""
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

    def _relay(self, stream: str, data: bytes, now: float, watch: Watch, asm: dict) -> None:
        wall = time.time()
        payload = data
        if self.cfg.timestamps:
            payload = self._stampers[stream].stamp(data, terminal_stamp(wall))
        self.term[stream].write(payload, droppable=self.log is not None)
        if stream == "err":
            self._err_mid_line = not data.endswith(b"\n")
        self.last_print = now
        watch.output(now)
        if self._lines_wanted:
            self._lines(stream, asm[stream].feed(data, now), wall, now, watch)

    def _lines(self, stream: str, lines: list[tuple[bool, bytes]], wall: float, now: float, watch: Watch) -> None:
        if not lines:
            return
        if self.log:
            run: list[bytes] = []
            run_cont = lines[0][0]
            for cont, text in lines:
                if cont != run_cont:
                    self.log.write_lines(wall, stream + ("+" if run_cont else ""), run)
                    run, run_cont = [], cont
                run.append(text)
            self.log.write_lines(wall, stream + ("+" if run_cont else ""), run)
        regex = self.cfg.progress_regex
        if regex is not None and any(regex.search(text) for _, text in lines):
            if watch.progress("output", now, label="output"):
                self.emit("progress-first", source="output")

    def _check_terminals(self) -> None:
        for name, term in self.term.items():
            dropped = term.take_dropped()
            if dropped:
                self.say(f"terminal was not reading: dropped {fmt_bytes(dropped)} of output from it "
                         f"(the log {self.cfg.log_path} has everything)")
            if term.dead and name not in self._dead_reported:
                self._dead_reported.add(name)
                self.say(f"terminal std{name} is gone (SSH dropped?): the child keeps running, "
                         "output goes on to the log only", terminal=False)

    def _report_alert_failures(self) -> None:
        if self.alerter:
            for hook, error in self.alerter.failures():
                self.say(f"alert {hook} failed: {error}")
                self.emit("alert-failed", hook=hook, error=error)

    # ----- signals ------------------------------------------------------------------------

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for sig in (*FORWARDED, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def _handle_signals(self, kid: childmod.Child | None, ladder_box: list) -> None:
        """Forward user signals; a second SIGINT within 2 s kills the tree; SIGHUP is ignored."""
        pending, self._signals = self._signals, []
        for sig in pending:
            if sig == signal.SIGCHLD:
                self._child_exited_signal = True
                continue
            if sig == signal.SIGHUP:
                self.say("SIGHUP ignored (the terminal is gone?): the child keeps running", terminal=False)
                continue
            now = time.monotonic()
            if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
                self.user_signal = sig
            if sig == signal.SIGINT and now - self._last_int_at < DOUBLE_INT_S:
                self.say("second SIGINT: killing the whole tree")
                if ladder_box[0] is None:
                    ladder_box[0] = KillLadder(now, 0.0, abort_step=False)
                ladder_box[0].kill_now(now)
                continue
            if sig == signal.SIGINT:
                self._last_int_at = now
            if kid is not None and kid.status is None:
                kid.signal_group(sig)
                self.emit("signal", signal=childmod.signal_name(sig), target="group", reason="forwarded")

    # ----- the child's tree ---------------------------------------------------------------

    def _tree(self) -> list[psutil.Process]:
        return childmod.descendants(self.alerter.hook_pids() if self.alerter else set())

    def _tree_stats(self) -> tuple[float, int]:
        """CPU % (since the last call) and RSS summed over the tree."""
        cpu, rss, seen = 0.0, 0, {}
        for p in self._tree():
            p = self._procs.get(p.pid, p)
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
                seen[p.pid] = p
            except psutil.Error:
                pass
        self._procs = seen
        return cpu, rss

    def _send(self, kid: childmod.Child, sig: int, target: str, reason: str) -> None:
        if target == "group":
            if not kid.signal_group(sig):
                target = "tree"
        if target == "tree":
            kid.signal_group(sig)  # members not yet seen by psutil
            childmod.signal_processes(self._tree(), sig)
        self.emit("signal", signal=childmod.signal_name(sig), target=target, reason=reason)

    # ----- one launch ---------------------------------------------------------------------

    def _child_env(self, attempt: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            PYTHONUNBUFFERED="1",
            PYTHONFAULTHANDLER="1",
            MAGVIT_PROGRESS_FILE=self.cfg.progress_file,
            MAGVIT_SUPERVISED="1",
            MAGVIT_RESTART_COUNT=str(attempt),
        )
        return env

    def _watch_config(self) -> WatchConfig:
        cfg = self.cfg
        required = []
        if cfg.progress_file_explicit:
            required.append(cfg.progress_file)
        if cfg.progress_regex is not None:
            required.append("output")
        return WatchConfig(
            stall_timeout_s=cfg.stall_timeout_s,
            auto=cfg.stall_auto,
            startup_grace_s=cfg.startup_grace_s,
            silence_timeout_s=cfg.silence_timeout_s,
            required=tuple(required),
        )

    def _poll_interval_s(self) -> float:
        limits = [x for x in (self.cfg.stall_timeout_s, self.cfg.startup_grace_s, self.cfg.silence_timeout_s) if x > 0]
        return min(1.0, max(0.05, min(limits) / 20)) if limits else 1.0

    def _launch(self, attempt: int) -> Outcome:
        cfg = self.cfg
        try:
            kid = childmod.spawn(list(cfg.command), self._child_env(attempt), cfg.pty)
        except childmod.SpawnError as e:
            self.say(str(e))
            return Outcome(e.status, "error")
        self._attempt_pids = [kid.pid]
        self.emit("start", argv=list(cfg.command), pid=kid.pid, attempt=attempt)
        self.say(f"start pid={kid.pid} attempt={attempt} argv={list(cfg.command)}", terminal=False)
        launched_at = time.monotonic()
        watch = Watch(self._watch_config(), launched_at)
        files = ProgressFiles(cfg.progress_file)
        files.baseline()
        asm = {name: LineAssembler() for name in kid.fds}
        self._stampers = {name: Stamper() for name in kid.fds}
        open_fds = {fd: name for name, fd in kid.fds.items()}
        ladder_box: list[KillLadder | None] = [None]
        stop_reason: str | None = None
        stall_progress: str | None = None
        exited_at: float | None = None
        tree_gone_at: float | None = None
        last_output = launched_at
        poll_s = self._poll_interval_s()
        next_poll = launched_at
        self._tree_stats()  # prime cpu_percent

        while True:
            now = time.monotonic()
            ladder = ladder_box[0]
            # --- how long may we sleep?
            deadlines = [next_poll]
            if cfg.heartbeat_s > 0:
                deadlines.append(self.last_print + cfg.heartbeat_s)
            if ladder is not None and ladder.next_at() is not None:
                deadlines.append(ladder.next_at())
            if exited_at is not None:
                deadlines.append(now + 0.05)  # waiting for the tree to die: check often
            for a in asm.values():
                t = a.next_tick_at()
                if t is not None:
                    deadlines.append(t)

            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            for fd, name in open_fds.items():
                term = self.term[name]
                # Back-pressure while the terminal keeps up; with a log, read on (and drop) once it is stuck.
                if term.room() or (self.log is not None and term.stuck(now)):
                    poller.register(fd, select.POLLIN)
                elif self.log is not None:
                    deadlines.append(term.stuck_at() or now)
            timeout_s = max(0.0, min(deadlines) - now)
            try:
                ready = poller.poll(timeout_s * 1000)
            except InterruptedError:
                ready = []
            now = time.monotonic()

            for fd, _ev in ready:
                if fd == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    continue
                name = open_fds.get(fd)
                if name is None:
                    continue
                if self._read_once(fd, name, now, watch, asm):
                    last_output = now
                else:
                    del open_fds[fd]
            if self._signals:
                self._handle_signals(kid, ladder_box)
                ladder = ladder_box[0]

            # --- the main child
            if exited_at is None and kid.reap():
                exited_at = now
                self._drain(open_fds, now, watch, asm, max_reads=64)
                left = self._tree()
                if left and ladder is None:
                    pids = [p.pid for p in left]
                    self.alert(
                        f"ORPHANS {len(pids)} process(es) left behind by the child: {pids}; "
                        f"SIGTERM, SIGKILL after {fmt_limit(cfg.kill_grace_s)}",
                        self.emit("orphans", pids=pids),
                    )
                    # Orphans get no mercy for their session: TERM to each of them, not just the group.
                    ladder_box[0] = ladder = KillLadder(now, cfg.kill_grace_s, abort_step=False, first_target="tree")
            if self._child_exited_signal:  # scanning /proc is too dear to do on every chunk
                self._child_exited_signal = False
                childmod.reap_adopted({kid.pid} | (self.alerter.hook_pids() if self.alerter else set()))

            # --- the ladder
            if ladder is not None:
                for step in ladder.due(now):
                    self._send(kid, step.sig, step.target, "stall" if stop_reason == "stall" else "cleanup")

            # --- done?
            if exited_at is not None:
                if tree_gone_at is None and not self._tree():
                    tree_gone_at = now
                if tree_gone_at is not None and (not open_fds or now - tree_gone_at > DRAIN_AFTER_EXIT_S):
                    self._drain(open_fds, now, watch, asm)
                    break

            # --- timers, while the child runs and nothing is being stopped
            if now >= next_poll:
                next_poll = now + poll_s
                for path in files.poll():
                    if watch.progress(path, now, label=cfg.progress_file):
                        self.emit("progress-first", source=path)
                if exited_at is None and stop_reason is None:
                    stall = watch.check(now)
                    if stall is not None:
                        # The stalled file's own line: under torchrun the fresh ranks say nothing of the hung one.
                        stall_progress = (read_first_line(stall.source) if stall.source.startswith(os.sep) else None) \
                            or files.first_line()
                        if self._on_stall(kid, stall, stall_progress):
                            stop_reason = "stall"
                            ladder_box[0] = KillLadder(now, cfg.kill_grace_s, abort_step=True)
                            for step in ladder_box[0].due(now):
                                self._send(kid, step.sig, step.target, "stall")
            if cfg.heartbeat_s > 0 and now - self.last_print >= cfg.heartbeat_s and exited_at is None:
                self._heartbeat(kid, launched_at, last_output, watch, files, now)
            for name, a in asm.items():
                self._lines(name, a.tick(now), time.time(), now, watch)
            self._check_terminals()
            self._report_alert_failures()
            if self.log:
                self.log.flush()

        for name, a in asm.items():
            self._lines(name, a.close(), time.time(), now, watch)
        for fd in open_fds:
            os.close(fd)
        if stop_reason == "stall":
            return Outcome(124, "stall", stall_progress)
        if self.user_signal is not None:
            return Outcome(kid.status, "user-signal")
        return Outcome(kid.status, "signal" if kid.term_signal else "exited")

    def _read_once(self, fd: int, name: str, now: float, watch: Watch, asm: dict) -> bool:
        """Read one chunk and relay it; False at end of file."""
        try:
            data = os.read(fd, READ_BYTES)
        except BlockingIOError:
            return True
        except OSError as e:
            if e.errno == errno.EIO:  # a pty whose last writer closed it
                data = b""
            else:
                raise
        if not data:
            os.close(fd)
            return False
        self._relay(name, data, now, watch, asm)
        return True

    def _drain(self, open_fds: dict[int, str], now: float, watch: Watch, asm: dict, max_reads: int = -1) -> None:
        """Relay what is already in the pipes, without waiting for more (at most max_reads chunks each)."""
        for fd, name in list(open_fds.items()):
            reads = 0
            while reads != max_reads:
                reads += 1
                try:
                    data = os.read(fd, READ_BYTES)
                except BlockingIOError:
                    break
                except OSError as e:
                    if e.errno != errno.EIO:
                        raise
                    data = b""
                if not data:
                    os.close(fd)
                    del open_fds[fd]
                    break
                self._relay(name, data, now, watch, asm)
                if self.log is None and not self.term[name].room():
                    self.term[name].flush(None)  # no log: nothing may be dropped, so wait like cat

    def _heartbeat(self, kid, launched_at, last_output, watch: Watch, files: ProgressFiles, now: float) -> None:
        cpu, rss = self._tree_stats()
        age = watch.progress_age_s(now)
        first = files.first_line()
        text = (
            f"heartbeat pid={kid.pid} up={fmt_duration(now - launched_at)} silent={fmt_duration(now - last_output)} "
            f"progress={fmt_duration(age) + '-ago' if age is not None else 'none'} cpu={cpu:.0f}% rss={fmt_bytes(rss)}"
        )
        if first:
            text += f" | {first}"
        self.say(text)
        self.emit(
            "heartbeat",
            pid=kid.pid,
            silent_s=round(now - last_output, 3),
            progress_age_s=None if age is None else round(age, 3),
            cpu_percent=round(cpu, 1),
            rss_bytes=rss,
            progress=first,
        )

    def _on_stall(self, kid: childmod.Child, stall: Stall, progress: str | None) -> bool:
        """Report a stall with its diagnosis; True when the child must now be stopped."""
        cfg = self.cfg
        self.stalls += 1
        action = cfg.on_stall
        if stall.kind == "silence":
            what = f"no output for {fmt_duration(stall.age_s)} (limit {fmt_limit(stall.limit_s)})"
        else:
            where = os.path.relpath(stall.source) if stall.source.startswith(os.sep) else stall.source
            what = f"no progress for {fmt_duration(stall.age_s)} (limit {fmt_limit(stall.limit_s)}) in {where}"
        message = f"STALL {what}; action={action}"
        if progress:
            message += f" | {progress}"
        event = self.emit(
            "stall", kind=stall.kind, source=stall.source, age_s=round(stall.age_s, 3),
            limit_s=stall.limit_s, progress=progress, action=action,
        )
        self.alert(message, event)
        pids = [p.pid for p in self._tree()]
        self._attempt_pids = sorted(set(self._attempt_pids) | set(pids))
        diag = diagnose(pids, self.py_spy)
        lines = format_diagnosis(diag)
        self.say("diagnosis: " + (lines[0] if lines else "nothing left to diagnose"))
        for line in lines[1:]:
            self.say("  " + line)
        self.emit(
            "diagnosis",
            processes=[
                {k: getattr(p, k) for k in ("pid", "cmd", "state", "cpu_percent", "rss_bytes", "threads")}
                for p in diag.processes
            ],
            stacks=diag.stacks,
            stack_method=diag.stack_method,
            gpus=diag.gpus,
        )
        return action in ("kill", "restart")

    def abandon(self) -> None:
        """After an internal error, end the child's tree rather than leave it running unwatched."""
        procs = self._tree()
        childmod.signal_processes(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=5.0)
        childmod.signal_processes(alive, signal.SIGKILL)

    # ----- the whole run ------------------------------------------------------------------

    def _restart_reason(self, outcome: Outcome) -> str | None:
        if outcome.reason == "stall" and self.cfg.on_stall == "restart":
            return "stall"
        if outcome.reason in ("exited", "signal") and outcome.status != 0 and self.cfg.restart_on_crash:
            return "crash"
        return None

    def _sleep_interruptibly(self, seconds: float) -> bool:
        """Sleep, but wake for a user signal (there is no child to forward it to); False if one came."""
        deadline = time.monotonic() + seconds
        while True:
            for sig in self._signals:
                if sig in (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT):
                    self.user_signal = sig
            self._signals.clear()
            if self.user_signal is not None:
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            select.select([self._wake_r], [], [], left)
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass

    def _wait_gpu_released(self, pids: list[int]) -> None:
        deadline = time.monotonic() + GPU_RELEASE_WAIT_S
        while True:
            held = gpu_memory_used_by(pids)
            if not held:
                return
            if time.monotonic() >= deadline:
                self.say(f"old processes still hold {fmt_bytes(held)} of GPU memory after "
                         f"{fmt_limit(GPU_RELEASE_WAIT_S)}; restarting anyway")
                return
            if not self._sleep_interruptibly(0.5):
                return

    def run(self) -> int:
        """Supervise the command until it is done; return the exit status."""
        self._install_signals()
        childmod.become_subreaper()
        budget = RestartBudget(RestartPolicy(max_restarts=self.cfg.max_restarts))
        attempt = 0
        while True:
            outcome = self._launch(attempt)
            last_pids = self._attempt_pids
            why = self._restart_reason(outcome) if self.user_signal is None else None
            if why is None:
                status, reason = outcome.status, outcome.reason
                break
            decision = budget.decide(why, outcome.progress)
            if not decision.restart:
                status = 124 if why == "stall" else outcome.status
                reason = "gave-up"
                self.alert(f"GAVE-UP {decision.why}", self.emit("gave-up", reason=decision.why))
                break
            backoff_s = min(decision.backoff_s, BACKOFF_MAX_S)
            self.restarts += 1
            attempt += 1
            self.alert(
                f"RESTART attempt {attempt}/{self.cfg.max_restarts} after {why} "
                f"(status {outcome.status}) in {fmt_limit(backoff_s)}",
                self.emit("restart", attempt=attempt, backoff_s=backoff_s, reason=why),
            )
            self._wait_gpu_released(last_pids)
            if self.user_signal is None:
                self._sleep_interruptibly(backoff_s)
            if self.user_signal is not None:
                status, reason = 128 + self.user_signal, "user-signal"
                break
        return self._finish(status, reason)

    def _finish(self, status: int, reason: str) -> int:
        runtime = time.monotonic() - self.started_at
        message = (f"exit status={status} reason={reason} runtime={fmt_duration(runtime)} "
                   f"restarts={self.restarts} stalls={self.stalls}")
        event = self.emit("exit", status=status, reason=reason, runtime_s=round(runtime, 3),
                          restarts=self.restarts, stalls=self.stalls)
        if status != 0:
            self.alert(message, event)
        else:
            self.say(message)
        if self.alerter:
            self.alerter.close(timeout_s=10.0)
            self._report_alert_failures()
        if self.log:
            self.log.close()
        if self.events:
            self.events.close()
        wait_s = TERMINAL_EXIT_WAIT_S if self.cfg.log_path else None
        for term in self.term.values():
            term.flush(wait_s)
        return status
