"""The progress rate, and whether the job has slowed down (SPEC 1.3): pure, `now` passed in.

A job at a third of its speed for hours (thermal throttling, a degraded node, a starved data
loader, swapping) is not hung, and no stall says a word. The rate is the advance of a step
count per second over a sliding window; the run's typical rate is the median of the rates of
the whole windows seen so far in this attempt, leaving out the first (start-up, compilation)
and every window that was itself slow, so a long slowdown never teaches the run to expect it.

Any source feeds it through observe(value, now, source): a progress file's `step`, an output
counter. A count that goes back (a new epoch's bar at 0 again) continues the count, never a
negative advance. Only one source is followed at a time (rates of different units do not
mix); a source of a higher priority (a progress file over output counters) takes over, and
the measurement starts again. Within a source, `key` tells counters apart (the output's
line shapes: a tqdm bar and a `step=` log line): each is continued on its own, and their
advances add up, so two counters that take turns never read as resets.
"""
from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from supervisor.watch.eta import field_number

KEYS_MAX = 64  # counters told apart within a source; the one unseen longest is forgotten
SAMPLES_PER_WINDOW = 256  # (time, count) samples kept per window: a 20 steps/s counter keeps 256, not 12000
TYPICAL_WINDOWS_MAX = 4096  # window rates kept for the median (68 days of 10-minute windows)
# A source that has not advanced for half the window is hung, not slow: that is a stall's
# business (SPEC 1.1), and a SLOW alert would only say it earlier and less well.
HUNG_FRACTION = 0.5
# Output counters are inferred evidence: a progress file's step, once it shows, is followed instead.
PRIORITIES = {"output-counters": -1}  # any other source (a progress file's path) ranks 0


def step_of(fields: dict[str, str]) -> float | None:
    """Return the step count a progress file's fields show: `step`, else epoch/batch/total_batches."""
    step = _number(fields, "step")
    if step is not None:
        return step
    epoch, batch, total = _number(fields, "epoch"), _number(fields, "batch"), _number(fields, "total_batches")
    if batch is not None and epoch is not None and total:
        return max(0.0, epoch - 1) * total + batch  # epoch is 1-based (SPEC 7)
    if batch is not None:
        return batch  # resets each epoch: observe() continues the count
    return epoch


def _number(fields: dict, key: str) -> float | None:
    value = field_number(fields, key)
    return value if value is not None and value >= 0 else None  # a count never goes below 0


@dataclass(frozen=True)
class Slow:
    """A slowdown began: the rate over the last window against the typical one."""

    rate: float
    typical_rate: float
    window_s: float
    source: str


@dataclass(frozen=True)
class SlowEnded:
    """The slowdown is over: it lasted duration_s."""

    rate: float
    typical_rate: float
    window_s: float
    source: str
    duration_s: float


class RateTracker:
    """The progress rate of one attempt, and its slowdowns."""

    def __init__(self, window_s: float, ratio: float, priorities: dict[str, int] | None = None) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be > 0, got {window_s}")
        if not 0 <= ratio < 1:
            raise ValueError(f"ratio must be in [0, 1), got {ratio}")
        self.window_s = window_s
        self.ratio = ratio  # 0: never slow, the rate is still measured
        self._priorities = PRIORITIES if priorities is None else priorities  # a higher rank takes over
        self._start(None, 0.0)

    def _start(self, source: str | None, now: float) -> None:
        """Measure `source` from scratch from `now` (its units are not the last one's)."""
        self.source = source  # the source followed
        self.value: float | None = None  # its latest value (the step, for the metrics)
        self._values: dict[str | None, float] = {}  # key -> latest value, least recently seen first
        self._total = 0.0  # the count, continued across resets
        self._last_t: float | None = None  # when it last advanced
        self._first_t = now
        self._samples: deque[tuple[float, float]] = deque()  # (time, total), one per window / SAMPLES_PER_WINDOW
        # (time, total) where the whole window under way began
        self._window_start: tuple[float, float] | None = None if source is None else (now, 0.0)
        self._windows = 0  # whole windows completed
        self._typical: list[float] = []  # sorted rates of the windows learned from
        self._slow_since: float | None = None
        self._slow: Slow | None = None

    # ----- observations ---------------------------------------------------------------------

    def observe(self, value: float, now: float, source: str, key: str | None = None) -> None:
        """Record that `source` (its counter `key`, when it has several) shows count `value` at `now`."""
        if self.source != source:
            if self.source is not None and self._priorities.get(source, 0) <= self._priorities.get(self.source, 0):
                return  # one source at a time: the followed one, until a better one shows up
            self._start(source, now)
        last = self._values.pop(key, None)
        if last is None:
            advance = 0.0  # a counter's first value is its baseline
        elif value >= last:
            advance = value - last
        else:
            advance = value  # back to 0 and on to value: a new epoch's bar
        self._values[key] = self.value = value
        if len(self._values) > KEYS_MAX:
            del self._values[next(iter(self._values))]
        if advance > 0:
            self._total += advance
            self._last_t = now
        self._roll(now)
        if not self._samples or now - self._samples[-1][0] >= self.window_s / SAMPLES_PER_WINDOW:
            self._samples.append((now, self._total))
        else:
            self._samples[-1] = (self._samples[-1][0], self._total)  # same time slot: keep its latest count

    def _roll(self, now: float) -> None:
        """Close the whole windows that ended by now; learn from those that count."""
        while self._window_start is not None and now - self._window_start[0] >= self.window_s:
            start_t, start_total = self._window_start
            end_t = start_t + self.window_s
            end_total = self._total_at(end_t)
            rate = (end_total - start_total) / self.window_s
            self._windows += 1
            typical = self.typical_rate()
            # The first window (start-up) and slow ones teach nothing.
            if self._windows > 1 and not (typical is not None and rate < self.ratio * typical):
                bisect.insort(self._typical, rate)
                if len(self._typical) > TYPICAL_WINDOWS_MAX:
                    self._typical = self._typical[::2]  # thinned evenly: the median stays
            self._window_start = (end_t, end_total)

    def _total_at(self, t: float) -> float:
        """The count as it stood at time t: the latest sample at or before it."""
        total = 0.0
        for sample_t, sample_total in self._samples:
            if sample_t > t:
                break
            total = sample_total
        return total

    # ----- what it says ---------------------------------------------------------------------

    def rate(self, now: float) -> float | None:
        """Return the advance per second over the last window, None until a whole window was seen."""
        if self.source is None or now - self._first_t < self.window_s:
            return None
        self._roll(now)
        cut = now - self.window_s
        while len(self._samples) > 1 and self._samples[1][0] <= cut:
            self._samples.popleft()  # keep one sample at or before the window's start
        base_t, base_total = self._samples[0] if self._samples else (self._first_t, 0.0)
        base_t = max(base_t, self._first_t)
        return (self._total - base_total) / max(now - base_t, 1e-9)

    def typical_rate(self) -> float | None:
        """Return the median rate of the windows learned from, None before the first."""
        n = len(self._typical)
        if not n:
            return None
        middle = self._typical[n // 2]
        return middle if n % 2 else (self._typical[n // 2 - 1] + middle) / 2

    @property
    def slow(self) -> bool:
        """Say whether a slowdown is under way."""
        return self._slow is not None

    def check(self, now: float) -> Slow | SlowEnded | None:
        """Return a Slow when a slowdown begins, a SlowEnded when it ends, else None (once per episode)."""
        rate = self.rate(now)
        typical = self.typical_rate()
        if rate is None or typical is None or typical <= 0 or self.ratio <= 0:
            return None
        threshold = self.ratio * typical
        if self._slow is None:
            hung = self._last_t is None or now - self._last_t >= HUNG_FRACTION * self.window_s
            if rate < threshold and not hung:
                self._slow_since = now
                self._slow = Slow(rate, typical, self.window_s, self.source)
                return self._slow
            return None
        if rate >= threshold:
            ended = SlowEnded(rate, typical, self.window_s, self.source, now - self._slow_since)
            self._slow = self._slow_since = None
            return ended
        return None
