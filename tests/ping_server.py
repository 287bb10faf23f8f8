"""A real HTTP server on 127.0.0.1 that records the pings it gets, for the dead-man's switch tests."""
from __future__ import annotations

import http.server
import threading
import time


class PingServer:
    """Record (path, body) of every request; answer `status` after `delay_s`; count requests in flight."""

    def __init__(self, status: int = 200, delay_s: float = 0.0):
        self.status, self.delay_s = status, delay_s
        self.requests: list[tuple[str, str]] = []
        self.in_flight = self.most_in_flight = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
                with owner._lock:
                    owner.in_flight += 1
                    owner.most_in_flight = max(owner.most_in_flight, owner.in_flight)
                    owner.requests.append((self.path, body))
                try:
                    time.sleep(owner.delay_s)
                finally:
                    # Out of flight before the answer leaves: a client's next request, sent once it
                    # has the answer, must never meet this thread still counting the last one.
                    with owner._lock:
                        owner.in_flight -= 1
                try:
                    self.send_response(owner.status)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"OK")
                except OSError:
                    pass

            do_GET = do_POST

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def paths(self) -> list[str]:
        with self._lock:
            return [path for path, _ in self.requests]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
