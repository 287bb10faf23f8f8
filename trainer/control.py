"""When the loop stops: signals, the step budget, injected faults, and rank agreement."""
from __future__ import annotations

import os
import signal
import sys
import time
from typing import Optional

import torch

from trainer.config import Fault
from trainer.distributed import Dist
from trainer.heartbeat import Heartbeat

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopSignals:
    """While installed, SIGTERM/SIGINT/SIGUSR1 only set a flag the loop reads at a step boundary.

    A second SIGINT (Ctrl-C twice) kills at once with the default action, for a person
    who does not want to wait for the step to end. A second SIGTERM does not: torchrun
    and a supervisor may both send one, and the checkpoint must still be written.
    """

    def __init__(self):
        self.signum: Optional[int] = None  # the first stop signal received
        self._previous = {}

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
        return self

    def __exit__(self, *exc) -> None:
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


class RunControl:
    """Called by the loop around every step: fires faults, beats the heartbeat, decides to stop.

    Ranks must stop at the same step, or the others wait forever in the next
    all-reduce: under torchrun the stop flag is reduced (max) every `sync_every_steps`
    steps and at the end of every epoch, and every rank acts on the reduced value.
    """

    def __init__(self, dist: Dist, device: torch.device, signals: Optional[StopSignals] = None,
                 fault: Optional[Fault] = None, heartbeat: Optional[Heartbeat] = None,
                 max_steps: Optional[int] = None, sync_every_steps: int = 4):
        self.dist = dist
        self.device = device
        self.signals = signals
        self.fault = fault
        self.heartbeat = heartbeat
        self.max_steps = max_steps  # stop after this global step (tests, benchmarks)
        self.sync_every_steps = sync_every_steps
        self.signum: Optional[int] = None  # agreed stop signal, 0 while none
        self.budget_spent = False

    @property
    def stopping(self) -> bool:
        """Tell whether the run must stop (agreed signal or step budget spent)."""
        return bool(self.signum) or self.budget_spent

    def before_step(self, step: int) -> None:
        """Fire the injected fault if `step` is its step on this rank."""
        if self.fault is not None and self.fault.fires(step, self.dist.rank):
            (_injected_hang if self.fault.kind == "hang" else _injected_crash)(step)

    def after_step(self, step: int, epoch: int, batch: int, last_of_epoch: bool) -> bool:
        """Record a finished step (1-based epoch, batch); tell whether the run must stop now."""
        if self.heartbeat is not None:
            self.heartbeat.beat(epoch, batch)
        if not self.dist.enabled or step % self.sync_every_steps == 0 or last_of_epoch:
            self.check()
        if self.max_steps is not None and step >= self.max_steps:
            self.budget_spent = True
        return self.stopping

    def check(self) -> bool:
        """Agree on the stop signal now (a collective under torchrun: every rank must call it)."""
        local = (self.signals.signum if self.signals is not None else None) or 0
        self.signum = self.dist.reduce_max(local, self.device)
        return self.stopping
