"""Progress read from the counters a job already prints (SPEC 1.2): lines in, counter moves out.

Pure: no clock, no I/O. A counter is an `N/M` pair of integers (`Batch 12/400`, tqdm,
Keras, Rich) or a number after step/steps/iter/iteration/it/batch/epoch/global_step
(`step 120`, `step=120`, `'epoch': 0.46`). Times of day, dates, durations, rates and
percentages are masked out first, so a clock that ticks is never a counter.

A line's *shape* is its words up to its last counter, numbers masked: a bar redrawn
with new glyphs, rates and times keeps its shape, and a heartbeat thread's line
(`last step 45s ago, epoch 3 batch 120`) has a shape of its own whose counters do
not change while the loop is hung. A counter *moves* when a line of a known shape
shows new values; the first line of a shape only sets its baseline.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

SOURCE = "output-counters"  # the source's name in events and the watch
MAX_SHAPES = 256  # shapes remembered; the oldest is forgotten (a job printing endless new shapes)
MAX_LINE_CHARS = 4096  # a longer line is looked at only up to here: counters sit near the start
SHOWN_LINE_CHARS = 200  # the line kept for the STALL line and the heartbeat

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[PX^_][^\x1b]*(?:\x1b\\)?|[ -/]*[0-~])")
_SEGMENT = re.compile(r"[\r\n]+")
_NUMBER = r"\d+(?:\.\d+)?"
# What is never a counter, masked before counters are looked for (order matters: dates before times).
_NOT_COUNTERS = re.compile(
    r"\d{4}-\d\d-\d\d"  # dates 2026-12-06
    r"|\d+/\d+/\d+"  # dates 12/06/2026
    r"|\d+(?::\d\d)+(?:[.,]\d+)?"  # times of day and clock durations: 14:03:05, 00:01, 0:00:08.5
    rf"|{_NUMBER}[eE][-+]?\d+"  # 4.5e-05 (a learning rate)
    rf"|{_NUMBER}\s*(?:[A-Za-z_]+/s|s/[A-Za-z_]+)\b"  # rates: 8.0it/s, 1.2s/it, 3.4 samples/s
    rf"|{_NUMBER}\s*%"  # percentages 37%
    rf"|{_NUMBER}[A-Za-z_µ]+"  # durations and sizes: 12s, 3m, 45ms, 1.2G
    r"|[A-Za-z_]\d[\w.]*"  # numbers inside words: v2, conv1d, GPU0
    r"|\d+(?:\.\d+){2,}"  # versions 2.13.0, addresses
)
_KEYWORD = r"global_step|iteration|steps|step|iter|it|batch|epoch"
_COUNTER = re.compile(
    r"(?<![\w./:-])(\d+)\s*/\s*(\d+)(?![\w./:])"  # N/M
    rf"|\b(?:{_KEYWORD})\b['\"]?\s*[:=]?\s*['\"]?\s*({_NUMBER})(?![\w./%]|:\d)",  # step 120, 'epoch': 0.46
    re.IGNORECASE,
)
_WORD = re.compile(r"[A-Za-z_]+")
_MASK = "\x00"  # stands in for a masked span; never in a stripped line


@dataclass(frozen=True)
class Counters:
    """The counters of one line."""

    shape: str  # words up to the last counter, numbers masked
    items: tuple[tuple[float, int | None], ...]  # each counter: its N or number, and its M for a pair


@dataclass(frozen=True)
class Move:
    """A counter took a new value."""

    value: float  # the first counter that changed: the N of N/M, or the number after step/iter/...
    total: int | None  # its M, when it is a pair
    finished: bool  # a pair that moved now stands at its total: no deadline until the next move
    line: str  # the line it moved in (escapes stripped, at most SHOWN_LINE_CHARS)
    previous_at: float  # when this shape's previous values were seen
    key: str = ""  # which counter moved: its line's shape and its place in the line (for the rate)


def strip_ansi(text: str) -> str:
    """Drop terminal escape sequences (colours, cursor moves, Rich's redraws)."""
    return _ANSI.sub("", text) if "\x1b" in text else text


def parse(line: str) -> Counters | None:
    """Find the counters of one line (already stripped of escapes); None when it has none."""
    if line.lstrip().startswith("[supervise"):
        return None  # a supervisor's own line (a nested one's, in our child's output)
    line = line[:MAX_LINE_CHARS]
    masked = _NOT_COUNTERS.sub(lambda m: _keep_words(m.group()), line)
    items: list[tuple[float, int | None]] = []
    end = 0
    for m in _COUNTER.finditer(masked):
        if m.group(1) is not None:
            items.append((float(m.group(1)), int(m.group(2))))
        else:
            items.append((float(m.group(3)), None))
        end = m.end()
    if not items:
        return None
    shape = " ".join(_WORD.findall(_DIGITS.sub("", masked[:end])))
    return Counters(shape, tuple(items))


_DIGITS = re.compile(r"\d+")
_SCIENTIFIC = re.compile(rf"{_NUMBER}[eE][-+]?\d+")


def _keep_words(span: str) -> str:
    """Mask a span that is not a counter, keeping its words so the line's shape stays the same."""
    words = [] if _SCIENTIFIC.fullmatch(span) else _WORD.findall(span)
    return _MASK + (" ".join(words) + _MASK if words else "")


class Tracker:
    """Remember the counters of each line shape and report the ones that move."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[tuple, float]] = {}  # shape -> (items, when seen), oldest first

    def feed(self, line: str, now: float) -> Move | None:
        """Look at one line (stripped of escapes); return a Move when a counter in it took a new value."""
        found = parse(line)
        if found is None:
            return None
        before = self._last.pop(found.shape, None)  # popped and put back: the dict stays in age order
        self._last[found.shape] = (found.items, now)
        if len(self._last) > MAX_SHAPES:
            del self._last[next(iter(self._last))]
        if before is None or len(before[0]) != len(found.items) or before[0] == found.items:
            return None
        changed = [(i, new) for i, (old, new) in enumerate(zip(before[0], found.items)) if old != new]
        first, (value, total) = changed[0]
        finished = any(m is not None and n == m for _, (n, m) in changed)
        return Move(value, total, finished, line.strip()[:SHOWN_LINE_CHARS], before[1], f"{found.shape}#{first}")


class Segments:
    """Cut a stream's bytes into lines: `\\n` ends one and so does `\\r` (a bar redrawn is a new line).

    The unfinished last piece is looked at too (a bar is never ended until it is redrawn)
    and kept, so its end is read with the rest of it once it comes.
    """

    def __init__(self) -> None:
        self._carry = ""

    def feed(self, data: bytes, cut: bool) -> list[str]:
        """Return the lines in data (cut: bytes before it were skipped, so its first piece is partial)."""
        text = data.decode("utf-8", "replace")
        if cut:
            self._carry = ""
            head, sep, text = _first_break(text)
            if not sep:  # one long unfinished piece with no start: nothing whole to read
                return []
        pieces = _SEGMENT.split(self._carry + text)
        last = pieces[-1]  # kept with its escapes: one cut in two is whole once the rest comes
        self._carry = last[-MAX_LINE_CHARS:] if len(last) > MAX_LINE_CHARS else last
        return [line for line in map(strip_ansi, pieces) if line.strip()]


def _first_break(text: str) -> tuple[str, str, str]:
    m = _SEGMENT.search(text)
    if m is None:
        return text, "", ""
    return text[:m.start()], m.group(), text[m.end():]
