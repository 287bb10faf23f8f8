"""The whole run: launch, relaunch after a stall or crash, and the final report.

One thread runs the loop (poll on the child's fds and the signal wake-up pipe);
terminal writers that cannot be made non-blocking run in their own threads, so a
frozen SSH link never stops heartbeats, stall detection or the log.
"""
from __future__ import annotations

import functools
import os
import select
import shlex
import signal
import time

from supervisor import child as childmod
from supervisor.output import lines
from supervisor.output.events import make_event
from supervisor.attempt import Attempt, Outcome
from supervisor.config import Config
from supervisor.forensics import helpers
from supervisor.output.router import Output
from supervisor.policy import RestartBudget, RestartPolicy
from supervisor.forensics.gpu_holders import MARKER
from supervisor.rundir import ANSWER_WITHIN_S, NoAnswer, Settled, within
from supervisor.watch.progress_files import ProgressFiles, Scanner
from supervisor.signals import Inbox

TERMINAL_EXIT_WAIT_S = 5.0  # SPEC 5: with --log, wait at most this for a frozen terminal at exit
GPU_RELEASE_WAIT_S = 60.0
ABANDON_GRACE_S = 5.0


class Supervisor:
    """Run one command under supervision; run() returns the exit status."""

    def __init__(self, config: Config, stdout_fd: int = 1, stderr_fd: int = 2):
        self.cfg = config
        self.inbox = Inbox()
        self.out = Output(config, self.inbox.wake, stdout_fd, stderr_fd)
        # Our own processes are never the child's: alert hooks, py-spy, torchfrtrace (SPEC 4).
        self.tree = childmod.Tree(lambda pid: self.out.is_hook(pid) or helpers.is_helper(pid))
        self.started_at = time.monotonic()
        self.restarts = 0
        self.stalls = 0
        self._fr_failed = False
        self._sessions: set[int] = set()  # the children's sessions (and groups): the job's lineage

    @functools.cached_property
    def py_spy(self) -> str | None:
        """py-spy's path, looked up at the first stall (nothing to import at start-up)."""
        from supervisor.forensics.diagnose import find_py_spy

        return find_py_spy()

    def settled(self, settled: Settled) -> None:
        """Say, once at start, what the run goes without and who else writes or watches its files."""
        for sink, path, error in settled.dropped:  # a folder on a hung mount: rundir.settle() left it out
            event = self.out.emit("sink-failed", sink=sink, path=path, error=error)
            self.out.say(lines.sink_failed_line(event, retry=False))
        shared = list(settled.shared)
        locked = self.cfg.run_dir and "run-dir" not in {sink for sink, _, _ in settled.dropped}
        if not (locked and self.cfg.progress_file.startswith(os.path.join(self.cfg.run_dir, ""))):
            from supervisor.rundir import other_watchers  # outside a folder we hold alone: look

            try:
                others = within(lambda: other_watchers(self.cfg.progress_file))
            except (NoAnswer, OSError):
                others = []
            if others:
                shared.append(("progress-file", self.cfg.progress_file, others))
        for what, path, pids in shared:
            event = self.out.emit("shared", what=what, path=path, pids=pids, pid=os.getpid())
            self.out.say(lines.shared_line(event))

    # ----- launches ---------------------------------------------------------------------------

    def _child_env(self, attempt: int) -> dict[str, str]:
        # Our own settings are not the child's, and one of them may hold a webhook's secret.
        env = {k: v for k, v in os.environ.items() if not k.startswith("MAGVIT_SUPERVISE_")}
        env.update(PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1", MAGVIT_PROGRESS_FILE=self.cfg.progress_file,
                   MAGVIT_SUPERVISED="1", MAGVIT_RESTART_COUNT=str(attempt))
        env[MARKER] = str(os.getpid())  # the job's processes, wherever they end up (GPU-HOLDERS)
        if self.cfg.run_dir:
            env["MAGVIT_RUN_DIR"] = self.cfg.run_dir
        if self.cfg.flight_recorder:
            from supervisor.forensics import flight_recorder as fr

            try:  # a folder on a hung mount must not hold up the launch
                error = within(lambda: fr.prepare(self.cfg.flight_recorder, attempt))
            except NoAnswer as e:
                error = str(e)
            if error is None:
                env.update(fr.child_env(self.cfg.flight_recorder, attempt, env))
            elif not self._fr_failed:  # once: a folder that cannot be made now will not be made later
                self._fr_failed = True
                event = self.out.emit("sink-failed", sink="flight-recorder", path=self.cfg.flight_recorder,
                                      error=error)
                self.out.say(lines.sink_failed_line(event, retry=False))
        return env

    def _launch(self, number: int) -> Outcome:
        argv = list(self.cfg.command)
        # The baseline before the spawn: a write in the child's first milliseconds is progress.
        files = ProgressFiles(self.cfg.progress_file, exclude=(self.cfg.log_path or "", self.cfg.events_path or ""))
        # In the scan thread: a progress path on a hung mount must not hold up the launch. A
        # baseline that does not answer is a scan in flight, so it becomes a stall in time.
        scanner = Scanner(files, self.inbox.wake, baseline_at=time.monotonic())
        if not scanner.wait_idle(ANSWER_WITHIN_S):
            event = self.out.emit("progress-not-answering", path=self.cfg.progress_file, waited_s=ANSWER_WITHIN_S)
            self.out.say(lines.progress_not_answering_line(event))
        env = self._child_env(number)
        try:
            kid = childmod.spawn(argv, env, self.cfg.pty)
        except childmod.SpawnError as e:
            scanner.close()
            self.out.say(str(e))
            return Outcome(e.status, "error")
        self._sessions.add(kid.pid)
        event = self.out.emit("start", argv=argv, pid=kid.pid, attempt=number, supervisor_pid=os.getpid())
        self.out.say(lines.start_line(event), terminal=False)
        attempt = Attempt(self.cfg, self.out, self.tree, self.inbox, kid, files, lambda: self.py_spy, env, scanner)
        outcome = attempt.run()
        self.stalls += outcome.stalls
        return outcome

    def _restart_reason(self, outcome: Outcome) -> str | None:
        if self.inbox.user_signal is not None:
            return None
        if outcome.reason == "stall" and self.cfg.on_stall == "restart":
            return "stall"
        if outcome.reason in ("exited", "signal") and outcome.status != 0 and self.cfg.restart_on_crash:
            # A child that ended after the user's signal (Slurm's USR1: checkpoint and stop) did what
            # it was asked: that is no crash to restart.
            return None if outcome.user_signalled else "crash"
        return None

    def _not_restarted(self, outcome: Outcome) -> str | None:
        """Why a crash was not restarted under --restart-on-crash (for the exit line), or None."""
        if not self.cfg.restart_on_crash or outcome.status == 0 or outcome.reason in ("stall", "unkillable", "error"):
            return None
        if self.inbox.user_signal is not None:
            return f"the user's {childmod.signal_name(self.inbox.user_signal)} ended it"
        return outcome.user_stop

    def _pause(self, seconds: float) -> bool:
        """Wait between launches, but stop for an ending signal (there is no child to pass it to)."""
        deadline = time.monotonic() + seconds
        while True:
            self.inbox.take()
            left = deadline - time.monotonic()
            if self.inbox.user_signal is not None or left <= 0:
                return self.inbox.user_signal is None
            select.select([self.inbox.wake_fd], [], [], left)

    def _wait_gpu_released(self, pids: set[int]) -> None:
        from supervisor.forensics.diagnose import gpu_memory_used_by

        deadline = time.monotonic() + GPU_RELEASE_WAIT_S
        while (held := gpu_memory_used_by(sorted(pids))) and self._pause(0.5):
            if time.monotonic() >= deadline:
                self.out.say(f"old processes still hold {lines.fmt_bytes(held)} of GPU memory after "
                             f"{lines.fmt_limit(GPU_RELEASE_WAIT_S)}; restarting anyway")
                return

    def _wait_gpu_holders(self) -> None:
        """Report processes outside the tree that still hold the GPU, and wait for them (at most 60 s).

        Only the job's processes started during this run: nvidia-persistenced, DCGM, another
        user's job and our own alert hooks are none of our business.
        """
        from supervisor.forensics.gpu_holders import find_holders, of_lineage

        started = time.time() - (time.monotonic() - self.started_at)
        me = os.getpid()
        holders = find_holders(set(), keep=lambda pid: (not self.tree.is_own(pid) and _started_after(pid, started)
                                                        and of_lineage(pid, me, self._sessions)))
        if not holders:
            return
        event = self.out.emit("gpu-holders", pids=[pid for pid, _ in holders], cmds=[cmd for _, cmd in holders])
        self.out.alert(lines.gpu_holders_line(event, waiting=True), event)
        deadline = time.monotonic() + GPU_RELEASE_WAIT_S
        ours = {pid for pid, _ in holders}
        while ours and self._pause(0.5):
            ours &= {pid for pid, _ in find_holders(set())}
            if ours and time.monotonic() >= deadline:
                self.out.say(f"processes {sorted(ours)} still hold the GPU after "
                             f"{lines.fmt_limit(GPU_RELEASE_WAIT_S)}; restarting anyway")
                return

    def run(self) -> int:
        """Supervise the command until it is done; return the exit status."""
        self.inbox.install()
        childmod.become_subreaper()
        budget = RestartBudget(RestartPolicy(max_restarts=self.cfg.max_restarts))
        number = 0
        while True:
            outcome = self._launch(number)
            why = self._restart_reason(outcome)
            if why is None:
                return self._finish(outcome.status, outcome.reason, outcome.cause, outcome.detail,
                                    self._not_restarted(outcome))
            decision = budget.decide(why, outcome.progress, outcome.progressed_s)
            if not decision.restart:
                event = self.out.emit("gave-up", reason=decision.why)
                self.out.alert(lines.gave_up_line(event), event)
                return self._finish(124 if why == "stall" else outcome.status, "gave-up", outcome.cause, outcome.detail)
            self.restarts += 1
            number += 1
            why_crashed = {"cause": outcome.cause, "detail": outcome.detail} if why == "crash" else {}
            event = self.out.emit("restart", attempt=number, backoff_s=decision.backoff_s, reason=why, **why_crashed)
            self.out.alert(lines.restart_line(event, self.cfg.max_restarts, outcome.status), event)
            self._wait_gpu_released(outcome.pids_seen)
            self._wait_gpu_holders()
            if not self._pause(decision.backoff_s):
                name = childmod.signal_name(self.inbox.user_signal)
                return self._finish(128 + self.inbox.user_signal, "user-signal", "signal",
                                    f"the user's {name}, while waiting to restart")

    def _finish(self, status: int, reason: str, cause: str | None = None, detail: str | None = None,
                not_restarted: str | None = None) -> int:
        """Say how the run ended, wait (bounded) for hooks and the terminal, record it; return our exit status."""
        helpers.close()  # a diagnosis left behind (cut short, or past its bound) is for nobody now
        stopped_by = self.inbox.interrupted()  # the user's signal while nobody was left to take it (the orphans' grace)
        if stopped_by is not None:
            status, reason = 128 + stopped_by, "user-signal"
        runtime = time.monotonic() - self.started_at
        if status == 0:
            cause = detail = None  # SPEC 4: a clean exit has no cause, whatever its output said
        event = make_event("exit", status=status, reason=reason, runtime_s=round(runtime, 3), restarts=self.restarts,
                           stalls=self.stalls, cause=cause, detail=detail, not_restarted=not_restarted)
        # The report is where a person finds the whole story at a glance.
        report = f"magvit-report {shlex.quote(self.cfg.run_dir or self.cfg.events_path)}" if self.cfg.events_path else None
        message = lines.exit_line(event, report)
        self.out.ended(message, event)
        if status != 0:
            self.out.alert(message, event)
        else:
            self.out.say(message)
        # A user's signal while we wait for a frozen terminal or a hook ends the wait, as it would end cat;
        # once the user has signalled, the terminal gets a bounded wait even without a log.
        bounded = self.cfg.log_path or self.inbox.user_signal is not None
        took_all = self.out.settle(TERMINAL_EXIT_WAIT_S if bounded else None, self.inbox.interrupted,
                                   self.inbox.wake_fd)
        # Output the terminal never took, and no log that has it: the user's signal ended the run, as for cat.
        lost = (not took_all and not self.cfg.log_path) or self.out.lost_output()
        late = self.inbox.interrupted() or (self.inbox.user_signal if lost else None)
        if late is not None and status != 128 + late:
            # The exit record goes in last, so that it carries the status we really exit with.
            status, event["status"], event["reason"] = 128 + late, 128 + late, "user-signal"
            why = ("output the terminal did not take is lost" if lost
                   else "it came while waiting for the terminal or an alert hook")
            self.out.say(f"the user's {childmod.signal_name(late)}: {why}; exit status={status}", terminal=False)
        self.out.record(event)
        self.out.close(self.inbox.interrupted, self.inbox.wake_fd)
        return status

    def abandon(self) -> None:
        """After an internal error, end the child's tree rather than leave it running unwatched."""
        import psutil

        procs = self.tree.processes()
        childmod.signal_processes(procs, signal.SIGTERM)
        childmod.signal_processes(procs, signal.SIGCONT)
        _, alive = psutil.wait_procs(procs, timeout=ABANDON_GRACE_S)
        childmod.signal_processes(alive, signal.SIGKILL)


def _started_after(pid: int, wall: float) -> bool:
    """Say whether pid started after the wall-clock time wall (a leftover of this run, not another job)."""
    import psutil

    try:
        return psutil.Process(pid).create_time() >= wall - 1.0
    except psutil.Error:
        return False
