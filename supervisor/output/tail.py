"""The last bytes of each stream of a launch: the evidence of why it ended (SPEC 4, `cause`).

Bounded whatever the child prints: a stream's tail never holds more than twice TAIL_BYTES,
and each byte is copied about twice on its way through, so keeping it costs no more than
the relay's own copy.
"""
from __future__ import annotations

TAIL_BYTES = 64 << 10  # the last 64 KiB of a stream: a traceback, an NCCL watchdog's last words


class Tail:
    """The last `limit` bytes fed to it."""

    __slots__ = ("limit", "_buf")

    def __init__(self, limit: int = TAIL_BYTES):
        self.limit = limit
        self._buf = bytearray()

    def feed(self, data: bytes | memoryview) -> None:
        """Keep the end of data; trim at twice the limit, so trimming costs one move per limit's bytes."""
        n = len(data)
        if n >= self.limit:
            self._buf[:] = data[n - self.limit:]
            return
        self._buf += data
        if len(self._buf) > 2 * self.limit:
            del self._buf[: len(self._buf) - self.limit]

    def value(self) -> bytes:
        """The last `limit` bytes (fewer when less was fed)."""
        return bytes(self._buf[-self.limit:])
