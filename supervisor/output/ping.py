"""A dead-man's switch (SPEC 12): ping a healthchecks.io-style URL, off the loop and bounded.

  URL/start      at each launch
  URL            every heartbeat interval while no stall is open (the service alerts when they stop:
                 the supervisor died, the machine died, the network went)
  URL/fail       when a stall is declared, with the alert line as the body
  URL/<status>   at the end, with the exit line as the body (/0: success)

One thread sends them in order, one at a time, each bounded by PING_TIMEOUT_S: never more
than one in flight, and a ping that is late makes later heartbeat pings merge rather than
pile up. A failing service costs one failure per outage, not one per ping. The URL's path
and query are the credential: only its scheme and host are ever shown.
"""
from __future__ import annotations

import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque

from supervisor.output.alerts import _url_secrets, http_post, redact_url
from supervisor.output.lines import one_line

PING_TIMEOUT_S = 10.0
QUEUE_MAX = 32  # pings waiting; beyond it the oldest heartbeat pings go (a start, fail or end never)
ERROR_CHARS = 300


def ping_url(url: str, suffix: str) -> str:
    """URL with /suffix added to its path, its query kept at the end ('' : the URL itself)."""
    if not suffix:
        return url
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/" + suffix))


class Pinger:
    """The pings of one run, sent in order by one thread."""

    def __init__(self, url: str, timeout_s: float = PING_TIMEOUT_S):
        self.url = url.strip()
        self.shown = redact_url(self.url)
        self.timeout_s = timeout_s
        self._secrets = _url_secrets(self.url)
        self._lock = threading.Condition()
        self._queue: deque[tuple[str, bytes]] = deque()  # (suffix, body)
        self._busy = False  # a ping is in flight
        self._closed = False
        self._down = False  # the last ping failed: the outage was reported already
        self._failures: list[tuple[str, str]] = []
        threading.Thread(target=self._run, name="ping", daemon=True).start()

    # ----- the loop's side ------------------------------------------------------------------

    def start(self) -> None:
        """Ping URL/start: a launch."""
        self._put("start", b"")

    def beat(self) -> None:
        """Ping URL: still alive. Merged with a heartbeat ping already waiting."""
        with self._lock:
            if ("", b"") in self._queue:
                return
        self._put("", b"")

    def fail(self, text: str) -> None:
        """Ping URL/fail with text as the body: a stall."""
        self._put("fail", text.encode("utf-8", "replace"))

    def finish(self, status: int, text: str) -> None:
        """Ping URL/<status> with text as the body: the end. Nothing is sent after it."""
        self._put(str(status), text.encode("utf-8", "replace"))
        with self._lock:
            self._closed = True

    def failures(self) -> list[tuple[str, str]]:
        """Return and forget the ("ping", error) pairs: one per outage."""
        with self._lock:
            drained, self._failures = self._failures, []
        return drained

    def wait(self, timeout_s: float, interrupted=lambda: False) -> bool:
        """Wait until every ping is sent (at most timeout_s, or until interrupted()); True when they were."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or interrupted():
                    return False
                self._lock.wait(min(left, 0.05))
        return True

    # ----- the thread -----------------------------------------------------------------------

    def _put(self, suffix: str, body: bytes) -> None:
        with self._lock:
            if self._closed:
                return
            if len(self._queue) >= QUEUE_MAX:
                beats = [item for item in self._queue if item[0] == ""]
                if beats:
                    self._queue.remove(beats[0])
            self._queue.append((suffix, body))
            self._lock.notify_all()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                suffix, body = self._queue.popleft()
                self._busy = True
            error = self._send(suffix, body)
            with self._lock:
                if error is None:
                    self._down = False
                elif not self._down:
                    self._down = True
                    self._failures.append(("ping", one_line(self._scrub(f"{self.shown}: {error}"), ERROR_CHARS)))
                self._busy = False
                self._lock.notify_all()

    def _send(self, suffix: str, body: bytes) -> str | None:
        """Send one ping within timeout_s; return the error, None on a 2xx answer.

        urllib's timeout is per socket operation, so a server that trickles a byte at a
        time would never hit it: the request runs in an inner thread, given up at the
        deadline, and the next ping waits until it has really ended (one in flight).
        """
        result: list[str | None] = []

        def request() -> None:
            try:
                result.append(self._request(suffix, body))
            except Exception as e:  # a bug or an odd OS error: still only a failed ping
                result.append(f"{type(e).__name__}: {e}")

        inner = threading.Thread(target=request, name="ping-request", daemon=True)
        inner.start()
        inner.join(self.timeout_s)
        if inner.is_alive() or not result:
            error = f"timed out after {self.timeout_s:g}s"
            inner.join()  # urllib's own timeout ends it; until then no other ping starts
            return error
        return result[0]

    def _request(self, suffix: str, body: bytes) -> str | None:
        url = ping_url(self.url, suffix)
        return http_post(url, body, {"User-Agent": "magvit-supervise", "Content-Type": "text/plain; charset=utf-8"},
                         self.timeout_s, self.timeout_s)

    def _scrub(self, text: str) -> str:
        for secret, shown in self._secrets:
            text = text.replace(secret, shown)
        return text
