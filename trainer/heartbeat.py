"""A heartbeat thread for runs without the supervisor: it says how old the last step is."""
from __future__ import annotations

import threading
import time
from datetime import datetime
from typing import Callable, Optional

from trainer.console import emit


def heartbeat_line(now_wall: datetime, age_s: Optional[float], epoch: Optional[int],
                   batch: Optional[int], since_start_s: float) -> str:
    """Format `[HEARTBEAT HH:MM:SS] last step 45s ago, epoch 3 batch 120` (1-based epoch, batch)."""
    stamp = now_wall.strftime("%H:%M:%S")
    if age_s is None:
        return f"[HEARTBEAT {stamp}] no step yet, started {since_start_s:.0f}s ago"
    return f"[HEARTBEAT {stamp}] last step {age_s:.0f}s ago, epoch {epoch} batch {batch}"


class Heartbeat:
    """Print a heartbeat line every `period_s` from a daemon thread, until stopped.

    It only reads what the training loop records with beat(): it never writes the
    progress file, so a hung loop shows as a growing `last step` age, not as life.
    """

    def __init__(self, period_s: float, clock: Callable[[], float] = time.monotonic,
                 printer: Callable[[str], None] = emit):
        self.period_s = period_s
        self.clock = clock
        self.printer = printer
        self.started = clock()
        self.last_step: Optional[float] = None  # clock() at the end of the last step
        self.epoch: Optional[int] = None  # 1-based
        self.batch: Optional[int] = None  # 1-based
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self, epoch: int, batch: int) -> None:
        """Record that a step of 1-based `epoch` and `batch` just finished."""
        # plain attribute stores: atomic under the GIL, cheap enough for every step
        self.epoch, self.batch = epoch, batch
        self.last_step = self.clock()

    def line(self) -> str:
        """Return the heartbeat line for now."""
        now = self.clock()
        age = None if self.last_step is None else now - self.last_step
        return heartbeat_line(datetime.now(), age, self.epoch, self.batch, now - self.started)

    def start(self) -> "Heartbeat":
        """Start the thread (a period of 0 means no thread); return self."""
        if self.period_s > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.printer(self.line())
