"""Prometheus metrics (SPEC 12): /metrics from a thread, and a textfile written atomically.

The loop publishes a Snapshot (a frozen value, swapped whole: one reference assignment);
the server's threads and the file writer only read it. Nothing here ever waits on the
loop, and the loop never waits on them: a slow or hostile scraper (a connection that
never sends its request, a thousand scrapes in a row) costs a thread of its own, not a
heartbeat or a stall. Ages are computed when read, so a scrape is current between two
publications.

prometheus-client is the `[metrics]` extra: imported only when metrics are asked for.
"""
from __future__ import annotations

import os
import socket
import socketserver
import threading
import time
from dataclasses import dataclass, replace
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from supervisor.config import ConfigError

REQUEST_TIMEOUT_S = 10.0  # a connection that sends no request is closed after this
FILE_WRITE_WAIT_S = 5.0  # at exit: the last write of the textfile may take this long (a slow disk)
INSTALL_HINT = "pip install 'magvit-supervise[metrics]'"


class MetricsError(ConfigError):
    """Metrics asked for but impossible (no prometheus-client, a port in use): one line, exit 125."""


@dataclass(frozen=True)
class Snapshot:
    """What the metrics show, as the loop last published it."""

    up: int = 0  # 1 while a child runs
    stalls: int = 0
    restarts: int = 0
    progress_at: float | None = None  # monotonic time of the stalest source's latest progress
    last_progress_wall: float | None = None  # Unix time of the latest progress of any source
    step: float | None = None
    rate: float | None = None  # steps per second over the slow window
    slow: int = 0
    rss_bytes: int | None = None
    cpu_percent: float | None = None
    eta_s: float | None = None
    exit_status: int | None = None


# name (without the prefix), type, help; the order of the exposition
METRICS = (
    ("up", "gauge", "1 while a child runs, 0 between attempts and after the end"),
    ("stalls_total", "counter", "stalls declared"),
    ("restarts_total", "counter", "restarts"),
    ("progress_age_seconds", "gauge", "age of the stalest progress source"),
    ("last_progress_timestamp_seconds", "gauge", "Unix time of the latest progress"),
    ("step", "gauge", "the progress file's step (or the output counter)"),
    ("progress_rate", "gauge", "steps per second over the slow window"),
    ("slow", "gauge", "1 during a SLOW episode"),
    ("rss_bytes", "gauge", "resident memory of the child's process tree"),
    ("cpu_percent", "gauge", "CPU use of the child's process tree, in percent of one core"),
    ("eta_seconds", "gauge", "estimated time to the end of the job"),
    ("exit_status", "gauge", "the supervisor's exit status, after the end"),
)
PREFIX = "magvit_supervise_"


def values(snap: Snapshot, now: float) -> dict[str, float | None]:
    """The value of each metric in snap at monotonic time now (None: not known, not shown)."""
    age = None if snap.progress_at is None else max(0.0, now - snap.progress_at)
    return {
        "up": snap.up, "stalls_total": snap.stalls, "restarts_total": snap.restarts,
        "progress_age_seconds": age, "last_progress_timestamp_seconds": snap.last_progress_wall,
        "step": snap.step, "progress_rate": snap.rate, "slow": snap.slow, "rss_bytes": snap.rss_bytes,
        "cpu_percent": snap.cpu_percent, "eta_seconds": snap.eta_s, "exit_status": snap.exit_status,
    }


def run_label(run_dir: str | None, command: tuple[str, ...]) -> str:
    """The `run` label: the run folder's name, else the command's first word."""
    if run_dir:
        return os.path.basename(os.path.normpath(run_dir))
    return os.path.basename(command[0]) if command else ""


class Exporter:
    """The metrics of one run: a snapshot, /metrics on a port, a textfile; all optional but the snapshot."""

    def __init__(self, run: str, addr: tuple[str, int] | None, path: str | None, interval_s: float):
        try:
            import prometheus_client
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        except ImportError:
            raise MetricsError(f"--metrics-port and --metrics-file need prometheus-client: {INSTALL_HINT}") from None
        self.snapshot = Snapshot()
        self.run = run
        self._families = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._generate = prometheus_client.generate_latest
        self.server: _Server | None = None
        self.address: tuple[str, int] | None = None
        if addr is not None:
            self._serve(addr, prometheus_client.make_wsgi_app(self.registry))
        self.path = path
        self.interval_s = interval_s
        self.error: str | None = None  # the textfile's last failure, None while it works
        self._wake = threading.Event()
        self._closing = False
        self._written = threading.Event()
        self._writer = None
        if path is not None:
            self._writer = threading.Thread(target=self._write_loop, name="metrics-file", daemon=True)
            self._writer.start()

    # ----- the loop's side ------------------------------------------------------------------

    def publish(self, **changes) -> None:
        """Replace the snapshot with these fields changed (the loop's thread only)."""
        self.snapshot = replace(self.snapshot, **changes)

    def close(self, wait_s: float = FILE_WRITE_WAIT_S) -> None:
        """Write the textfile one last time (waiting at most wait_s) and stop serving."""
        if self._writer is not None:
            self._closing = True
            self._written.clear()
            self._wake.set()
            self._written.wait(wait_s)
        if self.server is not None:
            threading.Thread(target=self.server.shutdown, daemon=True).start()  # never waits on a scraper
            self.server.socket.close()

    # ----- the readers' side ----------------------------------------------------------------

    def collect(self):
        """Yield the metric families of the current snapshot (prometheus_client's Collector protocol)."""
        now_values = values(self.snapshot, time.monotonic())
        for name, kind, text in METRICS:
            value = now_values[name]
            family = self._families[kind](PREFIX + name, text, labels=["run"])
            if value is not None:
                family.add_metric([self.run], float(value))
            yield family

    def text(self) -> bytes:
        """The Prometheus text exposition of the current snapshot."""
        return self._generate(self.registry)

    def _serve(self, addr: tuple[str, int], app) -> None:
        host, port = addr
        try:
            family, *_, sockaddr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            server_cls = type("_Server6" if family == socket.AF_INET6 else "_Server4", (_Server,),
                              {"address_family": family})
            self.server = server_cls(sockaddr[:2], _Handler)
        except OSError as e:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise MetricsError(f"--metrics-port {where}: {reason}") from None
        self.server.set_app(app)
        self.address = self.server.server_address[:2]
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.5}, name="metrics-server",
                         daemon=True).start()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            closing = self._closing
            self.error = write_atomically(self.path, self.text())
            if closing:
                self._written.set()
                return


def write_atomically(path: str, data: bytes) -> str | None:
    """Replace path with data through a temporary file beside it; return the error, None when written.

    The temporary name does not end in .prom: node_exporter never reads half a file, and
    nothing is left behind when the write fails.
    """
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        return os.strerror(e.errno) if e.errno else str(e)
    return None


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """A WSGI server with a thread per connection: one stuck client holds only its own thread."""

    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def server_bind(self) -> None:
        # HTTPServer.server_bind asks DNS for the host's full name: a broken resolver must not delay the start.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
        self.setup_environ()

    def handle_error(self, request, client_address) -> None:
        pass  # a client that hung up or timed out: nothing to print on the user's stderr


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S  # a connection that never sends its request is closed, its thread ends

    def log_message(self, format, *args) -> None:  # noqa: A002 - the base class's name
        pass  # no access log on stderr: our stderr carries the child's bytes and our own lines
