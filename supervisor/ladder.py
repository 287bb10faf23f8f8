"""The kill ladder: SIGTERM to the group, then (after a grace) SIGABRT and SIGKILL to the tree.

Pure: given `now` and whether anything is left, it says which signal is due. The
supervisor does the sending, so the loop keeps relaying output while the child
checkpoints, and a child that exits on SIGTERM is not waited on for the whole grace.
"""
from __future__ import annotations

import signal
from dataclasses import dataclass

ABORT_TO_KILL_S = 2.0  # SPEC 4: SIGABRT gives faulthandler 2 s to print the stacks


@dataclass(frozen=True)
class Step:
    sig: int
    target: str  # "group" or "tree"


class KillLadder:
    """Decide the next signal of a TERM -> (ABRT) -> KILL escalation."""

    def __init__(self, started_at: float, grace_s: float, abort_step: bool, first_target: str = "group",
                 term_sent: bool = False):
        # term_sent: the user's own ending signal, just passed on, is the first rung: the grace counts from it.
        self._steps: list[tuple[float, Step]] = [] if term_sent else [(started_at, Step(signal.SIGTERM, first_target))]
        at = started_at + grace_s
        if abort_step:
            self._steps.append((at, Step(signal.SIGABRT, "tree")))
            at += ABORT_TO_KILL_S
        self._steps.append((at, Step(signal.SIGKILL, "tree")))
        self.killed_at: float | None = None  # when SIGKILL went out

    def due(self, now: float) -> list[Step]:
        """Pop and return the steps whose time has come."""
        out = []
        while self._steps and self._steps[0][0] <= now:
            _, step = self._steps.pop(0)
            if step.sig == signal.SIGKILL:
                self.killed_at = now
            out.append(step)
        return out

    def next_at(self) -> float | None:
        """When the next step is due, or None once SIGKILL has gone out."""
        return self._steps[0][0] if self._steps else None

    def kill_now(self, now: float) -> None:
        """Skip ahead: the next due() returns SIGKILL (a second Ctrl-C)."""
        self._steps = [(now, Step(signal.SIGKILL, "tree"))]
