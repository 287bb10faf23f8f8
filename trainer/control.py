"""When the loop stops: the step budget, time-based checkpoints, injected faults,
non-finite losses, and rank agreement (signals themselves: trainer/signals.py)."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

import torch

from trainer.atomic import write_atomically
from trainer.config import Fault
from trainer.distributed import Dist
from trainer.heartbeat import Heartbeat
from trainer.outdir import fault_marker
from trainer.console import stdout_gone, warn
from trainer.signals import StopSignals


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

    def before_step(self, step: int) -> bool:
        """Fire the injected faults whose step is `step` on this rank; tell whether the step's
        loss must be made NaN (--fault nan: a non-finite loss by construction, on any CPU)."""
        poison = False
        for fault in self.faults:
            if not fault.fires(step, self.dist.rank):
                continue
            if fault.kind == "crash":
                _injected_crash(step)
            elif fault.kind == "hang":
                _injected_hang(step)
            elif fault.kind == "nan":
                sys.stderr.write(f"[fault] injected NaN loss at step {step}\n")
                sys.stderr.flush()
                poison = True
            else:
                _hang_once(self.out, fault, step, self.dist.rank)
        return poison

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
        due = self.checkpoint_due(step, now)
        if not self.dist.enabled:
            self.check()
            return Decision(self.stopping, due and not last_of_epoch)
        if step % self.sync_every_steps == 0 or last_of_epoch:
            self.check(due, nonfinite)
            return Decision(self.stopping, self.save_due and not last_of_epoch)
        return Decision(self.budget_spent, False)

    def checkpoint_due(self, step: int, now: float) -> bool:
        """Tell whether a checkpoint is due after `step` (--checkpoint-every-s of training
        since the last one). Where it lands must change nothing: see tests/e2e/test_trainer_exact.py."""
        return self.checkpoint_every_s > 0 and now - self.last_save >= self.checkpoint_every_s

    def check(self, save_due: bool = False, nonfinite: Optional[torch.Tensor] = None) -> bool:
        """Agree on the stop signal now (a collective under torchrun: every rank must call it).

        Stdout with no reader (EPIPE) stops the run as SIGPIPE would, but with a checkpoint.
        """
        local = (self.signals.signum if self.signals is not None else None) or 0
        if not local and stdout_gone():
            local = int(signal.SIGPIPE)
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

    def phase_over(self) -> None:
        """A declared phase ended: the next step is timed from now, and given 3 step times."""
        if self.watchdog is not None:
            self.watchdog.steps_again()
        self.last_boundary = self.clock()
