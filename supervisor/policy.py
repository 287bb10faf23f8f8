"""Decide whether an ended child is started again (SPEC 4): the restart budget.

Pure: it counts restarts and remembers where earlier stalls happened; the
supervisor does the waiting and the launching.
"""

from __future__ import annotations

from dataclasses import dataclass

REASONS = ("stall", "crash")


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int  # restarts allowed over the whole run, stalls and crashes together
    backoff_initial_s: float = 1.0  # wait before the first restart; doubles for each next one
    backoff_max_s: float = 60.0  # the back-off never grows past this
    # An attempt that still showed progress this long after its start ran well: the
    # back-off after it starts over (Docker resets its restart delay after 10 s of running).
    # Doubling is for a child that fails again at once, not for a hang every half hour.
    reset_after_s: float = 10.0

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.backoff_initial_s < 0:
            raise ValueError(f"backoff_initial_s must be >= 0, got {self.backoff_initial_s}")
        if self.backoff_max_s < self.backoff_initial_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_initial_s ({self.backoff_initial_s})"
            )


@dataclass(frozen=True)
class Decision:
    restart: bool  # start the command again, or give up
    attempt: int  # restarts so far, this one included (when giving up: the restarts done)
    backoff_s: float  # wait this long before the restart (0 when giving up)
    why: str  # one line for the RESTART / GAVE-UP alert


class RestartBudget:
    """Restart budget of one supervised run."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self.restarts = 0
        self._failing = 0  # restarts since the last attempt that ran well: the back-off's exponent
        self._stalled_at: set[str] = set()  # progress first lines of earlier stalls

    def decide(self, reason: str, progress: str | None, progressed_s: float = 0.0) -> Decision:
        """Decide whether to restart after a `stall` or a `crash` at `progress`.

        progressed_s: how long after its start the attempt last showed progress.
        """
        if reason not in REASONS:
            raise ValueError(f"reason must be one of {REASONS}, got {reason!r}")
        if reason == "stall" and progress is not None:
            # A hang that repeats at the same step will not cure itself.
            if progress in self._stalled_at:
                return Decision(False, self.restarts, 0.0, f"stalled twice at the same progress: {progress}")
            self._stalled_at.add(progress)
        if self.restarts >= self.policy.max_restarts:
            return Decision(False, self.restarts, 0.0, f"max restarts ({self.policy.max_restarts}) reached")
        self.restarts += 1
        self._failing = 1 if progressed_s >= self.policy.reset_after_s else self._failing + 1
        # The exponent is capped: 2 ** 1024 is past any float (restart 1025 raised OverflowError).
        backoff = min(self.policy.backoff_max_s, self.policy.backoff_initial_s * 2.0 ** min(self._failing - 1, 64))
        return Decision(True, self.restarts, backoff, f"{reason}, restart {self.restarts}/{self.policy.max_restarts}")
