"""When the loop stops: signals (and the watchdog behind them), the step budget, time-based
checkpoints, injected faults, non-finite losses, and rank agreement."""
from __future__ import annotations

import faulthandler
import os
import select
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from trainer.atomic import write_atomically
from trainer.config import Fault
from trainer.distributed import Dist
from trainer.heartbeat import Heartbeat
from trainer.outdir import fault_marker
from trainer.progress import warn

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# A stopped trainer must reach a step boundary this soon after the signal (or 3 step
# times, if steps are slower), else the watchdog ends it: it is stuck.
STOP_GRACE_S = 5.0


class NonFiniteLoss(Exception):
    """The loss was NaN or infinite at `step`: the weights are lost, stop without saving them."""

    def __init__(self, step: int, value: float, what: str = "loss"):
        super().__init__(f"{what} is {value} at step {step}")
        self.step = step
        self.value = value
        self.what = what  # "loss", or "weights" when a save finds them not finite

    def describe(self) -> str:
        """Return `loss is nan at step N` or `weights are not finite after step N`."""
        if self.what == "weights":
            return f"weights are not finite after step {self.step}"
        return f"loss is {self.value} at step {self.step}"


class Watchdog:
    """Ends a trainer that shows no step boundary soon after a stop signal.

    The stop handlers only set a flag that the loop reads at a step boundary, so a hung
    loop would ignore SIGTERM and make a supervisor wait out its whole kill grace. The
    main thread keeps a deadline: the next boundary is due by then (a step boundary
    moves it STOP_GRACE_S or 3 step times ahead; a declared phase such as validation or
    a checkpoint save moves it by the phase's expect_next_s). This thread wakes on the
    signal through signal.set_wakeup_fd, which the C-level handler writes even while the
    main thread is stuck in C code and runs no Python handler at all. It then waits
    until max(signal + STOP_GRACE_S, deadline), the deadline still moving while the main
    thread makes progress, and if that passes, prints every thread's stack and calls
    os._exit(128+N) at once.

    Cutting a checkpoint save short is safe: the save writes a temporary file, fsyncs
    it and renames it over checkpoint.pt, so at any instant checkpoint.pt is the old
    file or the new one, whole; the temporary file is removed at the next start. And a
    save normally finishes first: its declared deadline (3x the last save, >= 60 s)
    keeps the watchdog waiting.
    """

    def __init__(self, grace_s: float = STOP_GRACE_S, clock: Callable[[], float] = time.monotonic,
                 exit_fn: Callable[[int], None] = os._exit):
        self.grace_s = grace_s
        self.clock = clock
        self.exit_fn = exit_fn
        self.deadline = clock() + grace_s  # main thread: plain float stores, atomic under the GIL
        self.checkpoint_note = "no checkpoint was saved"
        self._read_fd: Optional[int] = None
        self._write_fd: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._closing = False

    def boundary(self, step_s: float) -> None:
        """A step just ended, the last one taking step_s: the next is due soon."""
        self.deadline = self.clock() + max(self.grace_s, 3 * step_s)

    def expect(self, seconds: float) -> None:
        """A declared phase (first step, validation, save) starts and may take `seconds`."""
        self.deadline = self.clock() + seconds

    def start(self) -> int:
        """Start the thread; return the fd to hand to signal.set_wakeup_fd."""
        self._read_fd, self._write_fd = os.pipe()
        for fd in (self._read_fd, self._write_fd):
            os.set_blocking(fd, False)
        self._thread = threading.Thread(target=self._run, name="stop-watchdog", daemon=True)
        self._thread.start()
        return self._write_fd

    def stop(self) -> None:
        """Stop the thread (after set_wakeup_fd was put back) and close the pipe."""
        if self._thread is None:
            return
        self._closing = True
        try:
            os.write(self._write_fd, b"\0")
        except OSError:
            pass
        self._thread.join(timeout=5)
        os.close(self._read_fd)
        os.close(self._write_fd)
        self._thread = None

    def _run(self) -> None:
        signum = None
        armed_at = 0.0
        while True:
            timeout = None
            if signum is not None:
                timeout = max(0.0, max(armed_at + self.grace_s, self.deadline) - self.clock())
                if timeout == 0.0:
                    self._fire(signum)
                    return
            ready, _, _ = select.select([self._read_fd], [], [], timeout)
            if self._closing:
                return
            if ready:
                try:
                    data = os.read(self._read_fd, 64)
                except BlockingIOError:
                    continue
                stops = [b for b in data if b in STOP_SIGNALS]
                if stops and signum is None:
                    signum, armed_at = stops[0], self.clock()

    def _fire(self, signum: int) -> None:
        name = signal.Signals(signum).name
        line = (f"train.py: no step boundary within {self.grace_s:g}s of {name}: the trainer is"
                f" stuck; every thread's stack follows; exiting with {128 + signum},"
                f" {self.checkpoint_note}\n")
        try:
            os.write(2, line.encode())
            faulthandler.dump_traceback(file=2, all_threads=True)
        except OSError:
            pass
        self.exit_fn(128 + signum)


class StopSignals:
    """While installed, SIGTERM/SIGINT/SIGUSR1 only set a flag the loop reads at a step boundary.

    A second SIGINT (Ctrl-C twice) kills at once with the default action, for a person
    who does not want to wait for the step to end. A second SIGTERM does not: torchrun
    and a supervisor may both send one, and the checkpoint must still be written. A
    trainer that reaches no step boundary is ended by the Watchdog.
    """

    def __init__(self, watchdog: Optional[Watchdog] = None):
        self.signum: Optional[int] = None  # the first stop signal received
        self.watchdog = watchdog
        self._previous = {}
        self._previous_wakeup: Optional[int] = None

    def _handle(self, signum, frame) -> None:
        # no printing here: the handler runs between bytecodes of whatever the main
        # thread was doing, possibly in the middle of a write to stdout
        if self.signum is None:
            self.signum = signum
        elif signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)

    def __enter__(self) -> "StopSignals":
        for sig in STOP_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        if self.watchdog is not None:
            self._previous_wakeup = signal.set_wakeup_fd(self.watchdog.start(),
                                                         warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.watchdog is not None:
            signal.set_wakeup_fd(self._previous_wakeup if self._previous_wakeup is not None else -1)
            self.watchdog.stop()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def _injected_hang(step: int) -> None:
    """Sleep forever at the start of `step` (--fault hang): no progress, the heartbeat goes on."""
    sys.stderr.write(f"[fault] injected hang at step {step}: sleeping forever\n")
    sys.stderr.flush()
    while True:  # signals run their handlers and the sleep resumes, as in a stuck collective
        time.sleep(3600)


def _injected_crash(step: int) -> None:
    """Raise at the start of `step` (--fault crash): a traceback and exit status 1."""
    raise RuntimeError(f"injected crash at step {step} (--fault crash)")


def _hang_once(out: Path, fault: Fault, step: int, rank: int) -> None:
    """Hang at `step` unless this folder says it already did here (--fault hang-once)."""
    marker = fault_marker(out, fault.step, rank)
    if marker.exists():
        return
    try:
        # recorded before hanging, and durably: the process will be killed, not ended
        write_atomically(marker, lambda f: f.write(f"hung at step {step}\n".encode()), durable=True)
    except OSError as exc:
        warn(f"--fault hang-once:{fault.step}: cannot record it in {marker}"
             f" ({exc.strerror or exc}), so not hanging: it would hang every time")
        return
    _injected_hang(step)


class Decision(NamedTuple):
    """What the loop does after a step."""

    stop: bool  # stop now (signal, step budget): checkpoint and end
    save: bool  # save a checkpoint now (--checkpoint-every-s) and go on


class RunControl:
    """Called by the loop around every step: fires faults, beats the heartbeat, decides to stop.

    Ranks must stop (and save) at the same step, or the others wait forever in the next
    all-reduce: under torchrun the stop flag, the save flag and the first non-finite step
    are reduced (max) every `sync_every_steps` steps and at the end of every epoch, and
    every rank acts on the reduced values.
    """

    def __init__(self, dist: Dist, device: torch.device, signals: Optional[StopSignals] = None,
                 faults: Sequence[Fault] = (), heartbeat: Optional[Heartbeat] = None,
                 max_steps: Optional[int] = None, sync_every_steps: int = 4,
                 checkpoint_every_s: float = 0.0, out=".", clock=time.monotonic,
                 on_checkpoint: Optional[Callable[[int, float], None]] = None):
        self.dist = dist
        self.device = device
        self.signals = signals
        self.watchdog = signals.watchdog if signals is not None else None
        self.faults = tuple(faults)
        self.heartbeat = heartbeat
        self.max_steps = max_steps  # stop after this global step (tests, benchmarks)
        self.sync_every_steps = sync_every_steps
        self.checkpoint_every_s = checkpoint_every_s  # 0: at epoch ends only
        self.out = Path(out)
        self.clock = clock
        self.on_checkpoint = on_checkpoint  # (next_step, epoch_loss_sum): Run.save
        self.signum: Optional[int] = None  # agreed stop signal, 0 while none
        self.budget_spent = False
        self.last_save = clock()  # the checkpoint resumed from counts as one
        self.last_boundary = clock()
        self.save_due = False

    @property
    def stopping(self) -> bool:
        """Tell whether the run must stop (agreed signal or step budget spent)."""
        return bool(self.signum) or self.budget_spent

    def before_step(self, step: int) -> None:
        """Fire the injected faults whose step is `step` on this rank."""
        for fault in self.faults:
            if not fault.fires(step, self.dist.rank):
                continue
            if fault.kind == "crash":
                _injected_crash(step)
            elif fault.kind == "hang":
                _injected_hang(step)
            else:
                _hang_once(self.out, fault, step, self.dist.rank)

    def after_step(self, step: int, epoch: int, batch: int, last_of_epoch: bool,
                   nonfinite: Optional[torch.Tensor] = None) -> Decision:
        """Record a finished step (1-based epoch, batch); decide whether to stop or save now.

        `nonfinite` is the loop's device tensor [first bad step, its loss] (0 while none);
        under torchrun it is agreed on with the stop flag, without a read of its own.
        """
        now = self.clock()
        if self.watchdog is not None:
            self.watchdog.boundary(now - self.last_boundary)
        self.last_boundary = now
        if self.heartbeat is not None:
            self.heartbeat.beat(epoch, batch)
        if self.max_steps is not None and step >= self.max_steps:
            self.budget_spent = True
        due = self.checkpoint_every_s > 0 and now - self.last_save >= self.checkpoint_every_s
        if not self.dist.enabled:
            self.check()
            return Decision(self.stopping, due and not last_of_epoch)
        if step % self.sync_every_steps == 0 or last_of_epoch:
            self.check(due, nonfinite)
            return Decision(self.stopping, self.save_due and not last_of_epoch)
        return Decision(self.budget_spent, False)

    def check(self, save_due: bool = False, nonfinite: Optional[torch.Tensor] = None) -> bool:
        """Agree on the stop signal now (a collective under torchrun: every rank must call it)."""
        local = (self.signals.signum if self.signals is not None else None) or 0
        if not self.dist.enabled:
            self.signum = local
            return self.stopping
        flags = torch.tensor([local, int(save_due), 0], dtype=torch.float64, device=self.device)
        if nonfinite is not None:
            flags[2] = nonfinite[0]
        flags = self.dist.all_max(flags)
        signum, save, bad_step = flags.tolist()
        self.signum, self.save_due = int(signum), bool(save)
        if bad_step:
            value = nonfinite[1].item() if nonfinite is not None and nonfinite[0].item() else float("nan")
            raise NonFiniteLoss(int(bad_step), value)
        return self.stopping

    def nonfinite(self, step: int, value: float) -> None:
        """The loop read a non-finite loss: stop now, alone (under torchrun, at the next check)."""
        if not self.dist.enabled:
            raise NonFiniteLoss(step, value)

    def checkpoint(self, next_step: int, epoch_loss_sum: float) -> None:
        """Save a checkpoint mid-epoch (every rank calls it) and restart the clock."""
        if self.on_checkpoint is not None:
            self.on_checkpoint(next_step, epoch_loss_sum)

    def saved(self) -> None:
        """A checkpoint was just written: the next is due checkpoint_every_s from now."""
        self.last_save = self.clock()
        self.save_due = False

    def expect(self, seconds: float) -> None:
        """A declared phase begins: the watchdog gives it `seconds`."""
        if self.watchdog is not None:
            self.watchdog.expect(seconds)
        self.last_boundary = self.clock()
