"""Stop signals: a flag for the loop to read at a step boundary, and a watchdog for a loop
that never reaches one."""
from __future__ import annotations

import faulthandler
import os
import select
import signal
import threading
import time
from typing import Callable, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
# A stopped trainer must reach a step boundary this soon after the signal (or 3 step
# times, if steps are slower), else the watchdog ends it: it is stuck. A loop that was
# already this far past its due boundary when the signal came is ended at once.
STOP_GRACE_S = 2.0  # a healthy step ends well within it; every second more is GPU time a hang burns


class Watchdog:
    """Ends a trainer that shows no step boundary soon after a stop signal.

    The stop handlers only set a flag that the loop reads at a step boundary, so a hung
    loop would ignore SIGTERM and make a supervisor wait out its whole kill grace. The
    main thread keeps a deadline: the next boundary is due by then (a step boundary
    moves it STOP_GRACE_S or 3 step times ahead; a declared phase such as validation or
    a checkpoint save moves it by the phase's expect_next_s, and its end back to 3 step
    times, for the step after it). This thread wakes on the
    signal through signal.set_wakeup_fd, which the C-level handler writes even while the
    main thread is stuck in C code and runs no Python handler at all. It then waits
    until max(signal + STOP_GRACE_S, deadline), the deadline still moving while the main
    thread makes progress, and if that passes, prints every thread's stack and calls
    os._exit(128+N) at once. When the deadline had already passed before the signal, the
    grace counts from the deadline instead: a loop overdue by the whole grace when a
    supervisor's stall kill arrives (10 s or more with no step) is stuck, not slow, and
    waiting on would only burn the GPU for longer.

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
        self.alive_at = clock()  # the last step boundary, or the start of a declared phase
        self.step_s = 0.0  # the last step's duration (0 until one is measured)
        self.checkpoint_note = "no checkpoint was saved"
        self._read_fd: Optional[int] = None
        self._write_fd: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._closing = False

    def boundary(self, step_s: float) -> None:
        """A step just ended, the last one taking step_s: the next is due soon."""
        self.step_s = step_s
        self.alive_at = now = self.clock()
        self.deadline = now + max(self.grace_s, 3 * step_s)

    def steps_again(self) -> None:
        """A declared phase ended and steps follow: the next boundary is due as after a step
        (3 step times, at least the grace), not sooner because a phase came between."""
        self.alive_at = now = self.clock()
        self.deadline = now + max(self.grace_s, 3 * self.step_s)

    def expect(self, seconds: float) -> None:
        """A declared phase (first step, validation, save) starts and may take `seconds`."""
        self.alive_at = now = self.clock()
        self.deadline = now + seconds

    def fire_at(self, signalled_at: float) -> float:
        """When a loop signalled at `signalled_at` counts as stuck, if no boundary comes first."""
        return max(self.deadline, min(signalled_at, self.deadline) + self.grace_s)

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
                timeout = max(0.0, self.fire_at(armed_at) - self.clock())
                if timeout == 0.0:
                    self._fire(signum, armed_at)
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

    def _fire(self, signum: int, signalled_at: float) -> None:
        name = signal.Signals(signum).name
        now = self.clock()
        line = (f"train.py: no step boundary for {now - self.alive_at:.1f}s, {now - signalled_at:.1f}s of them"
                f" after {name}: the trainer is stuck; every thread's stack follows; exiting with"
                f" {128 + signum}, {self.checkpoint_note}\n")
        try:
            os.write(2, line.encode())
            faulthandler.dump_traceback(file=2, all_threads=True)
        except OSError:
            pass
        self.exit_fn(128 + signum)


class StopSignals:
    """While installed, SIGTERM/SIGINT/SIGUSR1 only set a flag the loop reads at a step boundary.

    A second SIGINT (Ctrl-C twice) kills at once with the default action, for a person
    who does not want to wait for the step to end; one SIGINT after a SIGTERM or SIGUSR1
    is only a stop like them (the checkpoint is still written, the status is the first's). A second SIGTERM does not: torchrun
    and a supervisor may both send one, and the checkpoint must still be written. A
    trainer that reaches no step boundary is ended by the Watchdog.
    """

    def __init__(self, watchdog: Optional[Watchdog] = None):
        self.signum: Optional[int] = None  # the first stop signal received
        self.interrupts = 0  # SIGINTs received: the second kills at once
        self.watchdog = watchdog
        self._previous = {}
        self._previous_wakeup: Optional[int] = None

    def _handle(self, signum, frame) -> None:
        # no printing here: the handler runs between bytecodes of whatever the main
        # thread was doing, possibly in the middle of a write to stdout
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:  # Ctrl-C twice; one after SIGTERM or SIGUSR1 is not
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGINT)
                return
        if self.signum is None:
            self.signum = signum

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
