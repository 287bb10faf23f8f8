"""Decide whether the child is stalled (SPEC 1.1), from observations and `now`.

Pure: no clock, no sleep, no filesystem. The supervisor feeds it what it saw
(progress from a source, child output) with the monotonic time it saw it, and
asks `check(now)`. Every source has its own clock; the stalest one decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from supervisor.watch.counters import SOURCE as COUNTERS

# `--stall-timeout auto`: the limit is this many times the longest gap seen ...
AUTO_FACTOR = 5
# ... never below this, so a job that updates every second is not killed after 5 s ...
AUTO_MIN_LIMIT_S = 60.0
# ... and only once this many updates were seen; before that each gap gets the startup grace.
AUTO_LEARN_UPDATES = 5


@dataclass(frozen=True)
class WatchConfig:
    stall_timeout_s: float  # no progress for this long is a stall; 0 = progress stalls off
    auto: bool  # learn the limit from the gaps between updates (--stall-timeout auto)
    startup_grace_s: float  # first progress of a required source is due by then; 0 = no deadline
    silence_timeout_s: float  # no child output for this long is a stall; 0 = off
    required: tuple[str, ...] = ()  # sources the user named explicitly: they must show up

    def __post_init__(self) -> None:
        for name in ("stall_timeout_s", "startup_grace_s", "silence_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")

    @property
    def progress_stalls(self) -> bool:
        """Say whether a lack of progress can be a stall at all."""
        return self.auto or self.stall_timeout_s > 0


@dataclass(frozen=True)
class Stall:
    kind: str  # "progress" or "silence"
    source: str  # a progress file path, a required label, or "output"
    age_s: float  # how long the source has been quiet
    limit_s: float  # the limit it passed
    declared: bool = False  # the limit was the source's own expect_next_s (longer than the user's)


@dataclass
class _Source:
    last_s: float  # monotonic time of the latest update
    updates: int = 1
    longest_gap_s: float = 0.0
    expect_s: float | None = None  # a deadline the source declared for its next update (expect_next_s)
    done: bool = False  # output counters only: the counter that moved stands at its total (no deadline)


class Watch:
    """Stall detector for one launch of the child."""

    def __init__(self, config: WatchConfig, started_at: float) -> None:
        self.config = config
        self.started_at = started_at
        self._sources: dict[str, _Source] = {}
        self._pending = set(config.required)  # required labels with no progress yet
        self._last_output_s = started_at  # silence is counted from the launch
        # The stall being reported: (kind, source) and when it was last reported.
        self._current: tuple[str, str] | None = None
        self._reported_at = 0.0
        self.counters_off = False  # a progress file showed progress: output counters are no source any more

    def progress(self, source: str, now: float, label: str | None = None, expect_s: float | None = None,
                 done: bool = False, previous_s: float | None = None) -> bool:
        """Record progress from `source`; return True when it is that source's first.

        expect_s: the source declares its next update may take this long (where that is longer
        than its limit) until it changes again; `auto` does not learn from such a gap.
        For output counters (SPEC 1.2): done, the counter stands at its total (no deadline
        until the next move); previous_s, when the counter's previous value was seen (the
        first gap to learn from).
        """
        if source == COUNTERS:
            if self.counters_off:
                return False
        elif source != "output" and not self.counters_off:
            # A progress file decides from now on, with its own declared deadlines.
            self.counters_off = True
            self._sources.pop(COUNTERS, None)
            if self._current is not None and self._current[1] == COUNTERS:
                self._current = None
        self._pending.discard(source)
        if label is not None:
            self._pending.discard(label)
        if source == "output":
            # A line matching --progress-regex is output too.
            self._last_output_s = max(self._last_output_s, now)
        state = self._sources.get(source)
        if state is None:
            first_gap = max(0.0, now - previous_s) if previous_s is not None else 0.0
            self._sources[source] = _Source(last_s=now, expect_s=expect_s, done=done, longest_gap_s=first_gap)
            return True
        gap = max(0.0, now - state.last_s)  # a clock never goes back; be safe anyway
        # A declared gap (a checkpoint, validation) teaches auto nothing, nor does the wait after a finished bar.
        if state.expect_s is None and not state.done:
            state.longest_gap_s = max(state.longest_gap_s, gap)
        state.last_s = max(state.last_s, now)
        state.updates += 1
        state.expect_s = expect_s
        state.done = done
        return False

    def declared_s(self) -> float | None:
        """The longest deadline a source declares now, None when none does."""
        declared = [s.expect_s for s in self._sources.values() if s.expect_s is not None]
        return max(declared) if declared else None

    def output(self, now: float) -> None:
        """Record that the child printed something (it only resets silence)."""
        self._last_output_s = max(self._last_output_s, now)

    def progress_age_s(self, now: float) -> float | None:
        """Return the age of the freshest progress of any source, None before any."""
        if not self._sources:
            return None
        return max(0.0, now - max(s.last_s for s in self._sources.values()))

    def progress_times(self) -> tuple[float | None, float | None]:
        """Return when the freshest and the stalest source last progressed, (None, None) before any."""
        if not self._sources:
            return None, None
        times = [s.last_s for s in self._sources.values()]
        return max(times), min(times)

    def progressed_s(self) -> float:
        """How long after the launch the latest sign of progress came (output, when no source had any)."""
        last = max(s.last_s for s in self._sources.values()) if self._sources else self._last_output_s
        return max(0.0, last - self.started_at)

    def limit_s(self, source: str) -> float | None:
        """Return the current progress limit of a tracked source, None when it has none."""
        state = self._sources.get(source)
        if state is None or not self.config.progress_stalls:
            return None
        return self._limit(state, counters=source == COUNTERS)

    def check(self, now: float) -> Stall | None:
        """Return a stall when a limit is passed, again at most once per limit while it lasts."""
        overdue = self._overdue(now)
        if not overdue:
            self._current = None
            return None
        for stall in overdue:
            if (stall.kind, stall.source) == self._current:
                # The same stall goes on: repeat it once per limit (the `warn` action).
                if now - self._reported_at < stall.limit_s:
                    return None
                self._reported_at = now
                return stall
        # A new stall (or the reported one ended and another source is still overdue).
        stall = max(overdue, key=lambda s: (s.age_s, s.kind, s.source))
        self._current = (stall.kind, stall.source)
        self._reported_at = now
        return stall

    def _overdue(self, now: float) -> list[Stall]:
        """List every source that has passed its limit at `now`."""
        cfg = self.config
        overdue: list[Stall] = []
        if cfg.progress_stalls:
            for name, state in self._sources.items():
                counters = name == COUNTERS
                limit = self._limit(state, counters)
                age = now - state.last_s
                if limit is not None and age >= limit:
                    overdue.append(Stall("progress", name, age, limit,
                                         declared=limit != self._base_limit(state, counters)))
            if cfg.startup_grace_s > 0:
                age = now - self.started_at
                if age >= cfg.startup_grace_s:
                    for label in sorted(self._pending):
                        overdue.append(Stall("progress", label, age, cfg.startup_grace_s))
        if cfg.silence_timeout_s > 0:
            age = now - self._last_output_s
            if age >= cfg.silence_timeout_s:
                overdue.append(Stall("silence", "output", age, cfg.silence_timeout_s))
        return overdue

    def _limit(self, state: _Source, counters: bool = False) -> float | None:
        """Return the progress limit of one source (None: no limit yet).

        A declaration only ever extends the user's limit, as systemd's EXTEND_TIMEOUT_USEC:
        a trainer's "60 s before the first step" must not cut a `--stall-timeout 10m`.
        """
        base = self._base_limit(state, counters)
        if state.expect_s is None or base is None:  # no limit at all is longer than any declaration
            return base
        return max(base, state.expect_s)

    def _base_limit(self, state: _Source, counters: bool = False) -> float | None:
        """Return the limit of one source without its declaration (None: no limit yet)."""
        cfg = self.config
        if state.done:
            return None  # a bar at its total is finished, not hung (SPEC 1.2)
        if counters and not cfg.auto:
            # Inferred from output: an epoch line every 15 minutes must not be flagged every epoch.
            # Whole seconds once learned: a limit of 4.20818s tells the reader nothing more than 5s.
            learned = AUTO_FACTOR * state.longest_gap_s
            return cfg.stall_timeout_s if learned <= cfg.stall_timeout_s else float(math.ceil(learned))
        if not cfg.auto:
            return cfg.stall_timeout_s
        if state.updates >= AUTO_LEARN_UPDATES:
            return max(AUTO_MIN_LIMIT_S, AUTO_FACTOR * state.longest_gap_s)
        # Still learning: a slow first few steps (compilation, data loading) get the grace.
        return cfg.startup_grace_s if cfg.startup_grace_s > 0 else None
