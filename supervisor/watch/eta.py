"""How far along a job is, and when it will end: pure, so heartbeats and the report share it.

A fraction comes from a progress file's key: value lines (SPEC 7: `epoch`, `total_epochs`,
`batch`, `total_batches`) or, failing those, from the `N/M` counters of a progress line
(`Epoch 3/100 - Batch 120/400`). An ETA is the recent rate of that fraction, extrapolated:
nothing cleverer, so that it is easy to trust and easy to see through.
"""
from __future__ import annotations

import re

ETA_WINDOW_S = 600.0  # the rate is measured over the last 10 minutes of samples
_COUNTER = re.compile(r"(?<![\w.])(\d{1,15})\s*/\s*(\d{1,15})(?![\w.\d])")  # 3/100, not 1.5/2 or v2/3


def parse_fields(text: str) -> dict[str, str]:
    """Return the `key: value` lines of a progress file's text (the first line is the headline)."""
    fields: dict[str, str] = {}
    for line in text.splitlines()[1:]:
        key, sep, value = line.partition(":")
        if sep and key.strip() and " " not in key.strip():
            fields[key.strip()] = value.strip()
    return fields


def field_number(fields: dict, key: str) -> float | None:
    """Return a progress file's field as a finite float; None when it is absent or not a number."""
    try:
        value = float(fields[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if value == value and abs(value) != float("inf") else None  # no NaN, no inf


def _clamp(fraction: float) -> float:
    return min(1.0, max(0.0, fraction))


def fraction_done(fields: dict) -> float | None:
    """Return the fraction of the job done (0..1) from epoch/total_epochs[/batch/total_batches], or None.

    `epoch` is the 1-based epoch in progress and `batch` the batches done in it; an epoch
    with no batch is taken as finished, as an end-of-epoch update says.
    """
    epoch, total_epochs = field_number(fields, "epoch"), field_number(fields, "total_epochs")
    if epoch is None or not total_epochs or total_epochs <= 0:
        return None
    batch, total_batches = field_number(fields, "batch"), field_number(fields, "total_batches")
    if batch is not None and total_batches and total_batches > 0:
        return _clamp((epoch - 1 + min(batch, total_batches) / total_batches) / total_epochs)
    return _clamp(epoch / total_epochs)


def fraction_from_line(line: str | None) -> float | None:
    """Return the fraction done from `N/M` counters in a line: one is N/M, two are epoch and batch."""
    if not line:
        return None
    counters = [(int(n), int(m)) for n, m in _COUNTER.findall(line) if int(m) > 0][:2]
    if len(counters) == 1:
        n, m = counters[0]
        return _clamp(n / m)
    if len(counters) == 2:
        (epoch, total_epochs), (batch, total_batches) = counters
        return _clamp((epoch - 1 + min(batch, total_batches) / total_batches) / total_epochs)
    return None


def eta_s(samples: list[tuple[float, float]], now: float, window_s: float = ETA_WINDOW_S) -> float | None:
    """Return the seconds left at `now`, from (time, fraction) samples, or None when unknown.

    The rate is taken over the samples of the last `window_s` before the newest one (at
    least its two newest), after the last time the fraction went back (a resume from an
    older checkpoint starts a new run of samples). Time since the newest sample counts
    as spent: a job that stopped moving sees its ETA run down, not freeze.
    """
    points = sorted((t, f) for t, f in samples if f is not None)
    if not points:
        return None
    if points[-1][1] >= 1.0:
        return 0.0
    start = 0
    for i in range(1, len(points)):
        if points[i][1] < points[i - 1][1]:
            start = i
    points = points[start:]
    newest_t, newest_f = points[-1]
    recent = [p for p in points if p[0] >= newest_t - window_s]
    if len(recent) < 2:
        recent = points[-2:]
    if len(recent) < 2:
        return None
    (t0, f0), (t1, f1) = recent[0], recent[-1]
    if t1 <= t0 or f1 <= f0:
        return None
    left = (1.0 - f1) * (t1 - t0) / (f1 - f0)
    return max(0.0, left - max(0.0, now - t1))
