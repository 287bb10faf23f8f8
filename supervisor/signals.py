"""Signals the supervisor receives, as an inbox the loop reads (SPEC 5).

The handler only records the signal; the wake-up pipe makes every wait in the
loop (poll, the pause between launches, the exit flush) end at once, so the
supervisor stays responsive in every phase.
"""
from __future__ import annotations

import os
import signal

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
ENDING = (signal.SIGINT, signal.SIGTERM, signal.SIGQUIT)  # the user wants the run over: never restart


class Inbox:
    """Pending signals, and the wake-up pipe that makes a waiting loop look at them."""

    def __init__(self):
        self.wake_fd, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.user_signal: int | None = None  # the last ending signal the user sent us
        self._pending: list[int] = []
        self._abort: int | None = None  # an ending signal that arrived during a final flush

    def install(self) -> None:
        """Route our signals here; ignore SIGXFSZ so a file-size limit is an error, not our death."""
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        # A Python handler, not SIG_IGN, for SIGHUP: an ignored signal would stay ignored in the child.
        for sig in (*FORWARDED, signal.SIGHUP, signal.SIGCHLD):
            signal.signal(sig, self._on_signal)
        # Ignored here, and restored to the default in the child by subprocess (restore_signals).
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def _on_signal(self, signum, _frame) -> None:
        self._pending.append(signum)

    def wake(self) -> None:
        """Make the loop look now (a terminal writer thread drained its backlog)."""
        try:
            os.write(self._wake_w, b"w")
        except OSError:
            pass  # the pipe is full: the loop is waking anyway

    def drain(self) -> None:
        """Empty the wake-up pipe."""
        try:
            while os.read(self.wake_fd, 4096):
                pass
        except BlockingIOError:
            pass

    def take(self) -> list[int]:
        """Return and forget the signals received since the last call; remember an ending one."""
        self.drain()
        taken, self._pending = self._pending, []
        for sig in taken:
            if sig in ENDING:
                self.user_signal = sig
        return taken

    def abort(self, sig: int) -> None:
        """An ending signal with no child left to pass it to: stop waiting for the terminal."""
        self._abort = sig

    def aborted(self) -> int | None:
        """The ending signal that came with no child left to pass it to, without taking the inbox (for the loop)."""
        return self._abort

    def interrupted(self) -> int | None:
        """For the final flushes: an ending signal that came while we wait (sticky); None while none did."""
        if self._abort is None:
            for sig in self.take():
                if sig in ENDING:
                    self._abort = sig
        return self._abort
