"""Lines out of chunks, for --log, --progress-regex and --timestamps.

The terminal never waits for a line; lines are only assembled where something
needs to see them, with bounded memory whatever a line's length.
"""
from __future__ import annotations

from supervisor.output.events import LOG_PIECE_BYTES

REDRAW_EVERY_S = 5.0  # SPEC 3: a \r-redrawn line reaches the log at most this often


class Stamper:
    """Prefix each line of a stream with a timestamp (--timestamps), across chunk boundaries."""

    def __init__(self):
        self.at_line_start = True

    def stamp(self, data: bytes, prefix: bytes) -> bytes:
        """Insert prefix at every line start inside data."""
        if not data:
            return data
        head = prefix if self.at_line_start else b""
        self.at_line_start = data.endswith(b"\n")
        body = data[:-1] if self.at_line_start else data
        return head + body.replace(b"\n", b"\n" + prefix) + (b"\n" if self.at_line_start else b"")


Run = tuple[bool, list[bytes]]  # (continued, lines): lines after a piece of their own line was already out


class LineAssembler:
    """Turn one stream's chunks into runs of log lines: (continued, [text, ...]).

    Runs rather than single lines so the common case, a chunk of short plain
    lines, costs one split and one join in C rather than a Python step per line.

    - a complete line comes out once, as its final state: for a line redrawn with
      \\r (a tqdm bar) that is the text after the last \\r;
    - a line still being written (a bar, a prompt) comes out as its latest state
      at most once every REDRAW_EVERY_S, via tick();
    - a line longer than LOG_PIECE_BYTES comes out in pieces, each after the first
      marked continued, so memory stays bounded whatever the line length.
    """

    def __init__(self):
        # The pending line's latest state, < LOG_PIECE_BYTES; no \r in it but maybe a last one
        # (a redraw about to start, or the first half of a CRLF).
        self._buf = bytearray()
        self._continued = False  # a piece of the pending line was already emitted
        self._pending_since: float | None = None
        self._last_state_at = 0.0
        self._changed = False  # new bytes since the pending line's state was last emitted

    def feed(self, data: bytes, now: float) -> list[Run]:
        """Consume a chunk; return the lines it completes."""
        out: list[Run] = []
        lines = data.split(b"\n")
        tail = lines.pop()  # the partial line after the last newline ("" when data ends with one)
        if lines:
            plain = not self._continued and b"\r" not in data and b"\r" not in self._buf
            if self._buf:
                lines[0] = bytes(self._buf) + lines[0]
                self._buf.clear()
            self._changed = False
            if plain and max(map(len, lines)) <= LOG_PIECE_BYTES:
                out.append((False, lines))  # fast path: plain short lines
            else:
                for line in lines:
                    self._complete(line, out)
                    self._continued = False
            self._pending_since = None
        if tail:
            self._extend(tail, out)
            if self._pending_since is None:
                self._pending_since = now
                self._last_state_at = now
        return out

    def tick(self, now: float) -> list[Run]:
        """Emit the pending line's latest state if it has waited REDRAW_EVERY_S and changed since.

        An unchanged state is never emitted twice: only new bytes may count as
        progress for --progress-regex (a bar frozen mid-line is a hang, not progress).
        """
        if self._pending_since is None or not self._changed or now - self._last_state_at < REDRAW_EVERY_S:
            return []
        self._last_state_at = now
        self._changed = False
        state = self._state()
        return [(self._continued, [state])] if state else []

    def next_tick_at(self) -> float | None:
        """When tick() will next have something to say."""
        if self._pending_since is None or not self._changed:
            return None
        return self._last_state_at + REDRAW_EVERY_S

    def close(self) -> list[Run]:
        """Emit the final state of a last line that never got its newline."""
        out: list[Run] = []
        if self._pending_since is not None:
            state = self._state()
            if state or not self._continued:
                out.append((self._continued, [state]))
        self._buf.clear()
        self._continued = False
        self._pending_since = None
        self._changed = False
        return out

    def _state(self) -> bytes:
        text = bytes(self._buf)
        if text.endswith(b"\r"):
            text = text[:-1]
        cut = text.rfind(b"\r")
        return text[cut + 1 :] if cut >= 0 else text

    def _complete(self, line: bytes, out: list[Run]) -> None:
        if line.endswith(b"\r"):  # CRLF endings: the \r belongs to the newline, not a redraw
            line = line[:-1]
        cut = line.rfind(b"\r")
        if cut >= 0:
            line = line[cut + 1 :]
        for i in range(0, max(len(line), 1), LOG_PIECE_BYTES):
            out.append((self._continued or i > 0, [line[i : i + LOG_PIECE_BYTES]]))

    def _extend(self, tail: bytes, out: list[Run]) -> None:
        self._changed = True
        # A redraw (a \r followed by more) starts the line over: only the newest state matters,
        # whatever the read boundaries, which keeps a tqdm bar's memory and its log lines flat.
        cut = tail.rfind(b"\r", 0, len(tail) - 1)
        if cut >= 0:
            self._buf[:] = tail[cut + 1:]
        elif self._buf.endswith(b"\r"):
            self._buf[:] = tail
        else:
            self._buf += tail
        while len(self._buf) > LOG_PIECE_BYTES:
            out.append((self._continued, [bytes(self._buf[:LOG_PIECE_BYTES])]))
            del self._buf[:LOG_PIECE_BYTES]
            self._continued = True
