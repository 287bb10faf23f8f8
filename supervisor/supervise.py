"""The whole run: launch, relaunch after a stall or crash, signals, and the final report.

One thread runs the loop (poll on the child's fds and a wake-up pipe); the
terminal writers run in their own threads, so a frozen SSH link never stops
heartbeats, stall detection or the log.
"""
from __future__ import annotations

import functools
import os
import select
import signal
import time

from typing import TYPE_CHECKING

from . import child as childmod
from .attempt import Attempt, Outcome
from .config import Config
from .events import fmt_bytes, fmt_duration, fmt_limit
from .output import Output
from .policy import RestartBudget, RestartPolicy

if TYPE_CHECKING:
    import psutil

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)  # the user wants the run over: never restart
DOUBLE_INT_S = 2.0  # a second Ctrl-C within this kills the tree (SPEC 5)
TERMINAL_EXIT_WAIT_S = 5.0  # SPEC 5: with --log, wait at most this for a frozen terminal at exit
GPU_RELEASE_WAIT_S = 60.0
ABANDON_GRACE_S = 5.0


class Supervisor:
    """Run one command under supervision; run() returns the exit status."""

    def __init__(self, config: Config, stdout_fd: int = 1, stderr_fd: int = 2):
        self.cfg = config
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.out = Output(config, self._wake, stdout_fd, stderr_fd)
        self.started_at = time.monotonic()
        self.restarts = 0
        self.stalls = 0
        self.user_signal: int | None = None  # an ending signal the user sent us
        self._signals: list[int] = []
        self._last_int_at = -1e9
        self._sigchld = False  # a child of ours exited: look for adopted zombies
        self._cpu_seen: dict[tuple[int, float], tuple[float, float]] = {}  # (pid, start) -> (cpu s, when)

    @functools.cached_property
    def py_spy(self) -> str | None:
        """py-spy's path, looked up at the first stall (nothing to import at start-up)."""
        from .diagnose import find_py_spy

        return find_py_spy()

    # ----- wake-ups and signals -----------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass  # the pipe is full: the loop is waking anyway

    def drain_wakeups(self) -> None:
        """Empty the wake-up pipe (signals and terminal drains write to it)."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def _on_signal(self, signum, _frame) -> None:
        self._signals.append(signum)

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # A Python handler, not SIG_IGN, for SIGHUP: an ignored signal would stay ignored in the child.
        for sig in (*FORWARDED, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)

    def handle_signals(self, attempt: Attempt | None) -> None:
        """Forward user signals to the child's group; a second SIGINT within 2 s kills the tree."""
        if not self._signals:
            return
        pending, self._signals = self._signals, []
        for sig in pending:
            if sig == signal.SIGCHLD:
                self._sigchld = True
            elif sig == signal.SIGHUP:
                self.out.say("SIGHUP ignored (the terminal is gone?): the child keeps running", terminal=False)
            else:
                self._user_signal(sig, attempt)

    def _user_signal(self, sig: int, attempt: Attempt | None) -> None:
        now = time.monotonic()
        if sig in ENDING:
            self.user_signal = sig
        if sig == signal.SIGINT:
            if now - self._last_int_at < DOUBLE_INT_S and attempt is not None:
                self.out.say("second SIGINT: killing the whole tree")
                attempt.kill_now(now)
                return
            self._last_int_at = now
        if attempt is not None and attempt.kid.status is None and attempt.kid.signal_group(sig):
            self.out.emit("signal", signal=childmod.signal_name(sig), target="group", reason="forwarded")

    # ----- the child's tree -------------------------------------------------------------------

    def tree(self) -> list[psutil.Process]:
        """Everything below us except alert hooks."""
        return childmod.descendants(self.out.hook_pids())

    def tree_stats(self) -> tuple[float, int]:
        """CPU % and RSS summed over the tree; CPU since the last call, or since a process started."""
        import psutil

        cpu_percent, rss, seen = 0.0, 0, {}
        now = time.time()  # psutil's create_time is wall-clock
        for p in self.tree():
            try:
                with p.oneshot():
                    times = p.cpu_times()
                    rss += p.memory_info().rss
                    key = (p.pid, p.create_time())
            except psutil.Error:
                continue
            used_s = times.user + times.system
            before_s, before_at = self._cpu_seen.get(key, (0.0, key[1]))
            cpu_percent += 100.0 * (used_s - before_s) / max(now - before_at, 1e-3)
            seen[key] = (used_s, now)
        self._cpu_seen = seen
        return cpu_percent, rss

    def send(self, kid: childmod.Child, sig: int, target: str, reason: str) -> None:
        """Signal the child's group, or its whole tree (the group plus whatever left it)."""
        if target == "group" and not kid.signal_group(sig):
            target = "tree"
        if target == "tree":
            kid.signal_group(sig)  # members psutil has not seen yet
            childmod.signal_processes(self.tree(), sig)
        self.out.emit("signal", signal=childmod.signal_name(sig), target=target, reason=reason)

    def reap_adopted(self, main_pid: int) -> None:
        """Reap orphans we adopted, after a SIGCHLD (scanning /proc is too dear for every turn)."""
        if self._sigchld:
            self._sigchld = False
            childmod.reap_adopted({main_pid} | self.out.hook_pids())

    # ----- launches ---------------------------------------------------------------------------

    def _child_env(self, attempt: int) -> dict[str, str]:
        env = dict(os.environ)
        env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", MAGVIT_PROGRESS_FILE=self.cfg.progress_file,
                   MAGVIT_SUPERVISED="1", MAGVIT_RESTART_COUNT=str(attempt))
        return env

    def _launch(self, number: int) -> tuple[Outcome, set[int]]:
        argv = list(self.cfg.command)
        try:
            kid = childmod.spawn(argv, self._child_env(number), self.cfg.pty)
        except childmod.SpawnError as e:
            self.out.say(str(e))
            return Outcome(e.status, "error"), set()
        self.out.emit("start", argv=argv, pid=kid.pid, attempt=number)
        self.out.say(f"start pid={kid.pid} attempt={number} argv={argv}", terminal=False)
        attempt = Attempt(self, kid, number)
        return attempt.run(), attempt.pids_seen

    def _restart_reason(self, outcome: Outcome) -> str | None:
        if self.user_signal is not None:
            return None
        if outcome.reason == "stall" and self.cfg.on_stall == "restart":
            return "stall"
        if outcome.reason in ("exited", "signal") and outcome.status != 0 and self.cfg.restart_on_crash:
            return "crash"
        return None

    def _pause(self, seconds: float) -> bool:
        """Wait between launches, but stop for an ending signal (there is no child to pass it to)."""
        deadline = time.monotonic() + seconds
        while True:
            for sig in self._signals:
                if sig in ENDING:
                    self.user_signal = sig
            self._signals.clear()
            left = deadline - time.monotonic()
            if self.user_signal is not None or left <= 0:
                return self.user_signal is None
            select.select([self.wake_fd], [], [], left)
            self.drain_wakeups()

    def _wait_gpu_released(self, pids: set[int]) -> None:
        from .diagnose import gpu_memory_used_by

        deadline = time.monotonic() + GPU_RELEASE_WAIT_S
        while (held := gpu_memory_used_by(sorted(pids))) and self._pause(0.5):
            if time.monotonic() >= deadline:
                self.out.say(f"old processes still hold {fmt_bytes(held)} of GPU memory after "
                             f"{fmt_limit(GPU_RELEASE_WAIT_S)}; restarting anyway")
                return

    def run(self) -> int:
        """Supervise the command until it is done; return the exit status."""
        self._install_signals()
        childmod.become_subreaper()
        budget = RestartBudget(RestartPolicy(max_restarts=self.cfg.max_restarts))
        number = 0
        while True:
            outcome, pids = self._launch(number)
            why = self._restart_reason(outcome)
            if why is None:
                return self._finish(outcome.status, outcome.reason)
            decision = budget.decide(why, outcome.progress)
            if not decision.restart:
                self.out.alert(f"GAVE-UP {decision.why}", self.out.emit("gave-up", reason=decision.why))
                return self._finish(124 if why == "stall" else outcome.status, "gave-up")
            self.restarts += 1
            number += 1
            self.out.alert(
                f"RESTART attempt {number}/{self.cfg.max_restarts} after {why} "
                f"(status {outcome.status}) in {fmt_limit(decision.backoff_s)}",
                self.out.emit("restart", attempt=number, backoff_s=decision.backoff_s, reason=why),
            )
            self._wait_gpu_released(pids)
            if not self._pause(decision.backoff_s):
                return self._finish(128 + self.user_signal, "user-signal")

    def _finish(self, status: int, reason: str) -> int:
        runtime = time.monotonic() - self.started_at
        message = (f"exit status={status} reason={reason} runtime={fmt_duration(runtime)} "
                   f"restarts={self.restarts} stalls={self.stalls}")
        event = self.out.emit("exit", status=status, reason=reason, runtime_s=round(runtime, 3),
                              restarts=self.restarts, stalls=self.stalls)
        if status != 0:
            self.out.alert(message, event)
        else:
            self.out.say(message)
        self.out.close(TERMINAL_EXIT_WAIT_S if self.cfg.log_path else None)
        return status

    def abandon(self) -> None:
        """After an internal error, end the child's tree rather than leave it running unwatched."""
        import psutil

        procs = self.tree()
        childmod.signal_processes(procs, signal.SIGTERM)
        _, alive = psutil.wait_procs(procs, timeout=ABANDON_GRACE_S)
        childmod.signal_processes(alive, signal.SIGKILL)
