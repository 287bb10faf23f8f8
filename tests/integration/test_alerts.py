"""Alert hooks against real commands and a real HTTP server: delivered, bounded, failures reported."""

import http.server
import json
import queue
import socket
import sys
import threading
import time

import psutil
import pytest

from supervisor.alerts import Alerter

EXIT_EVENT = {"ts": "2026-11-28T14:15:41.000Z", "event": "exit", "status": 124, "reason": "stall", "pid": 4242}
MESSAGE = "[supervise 14:15:41] exit status=124 reason=stall runtime=15m41s restarts=0 stalls=1"

# Writes what the hook sees to argv[1], atomically so the test never reads half a file.
RECORD_ENV = """
import json, os, sys
seen = {k: v for k, v in os.environ.items() if k.startswith("SUPERVISE_")}
seen["own_session"] = os.getsid(0) == os.getpid()
seen["stdin"] = sys.stdin.read()
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump(seen, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def wait_for(condition, timeout_s=10.0, what="condition"):
    """Poll `condition` until it returns something truthy, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def failures_after_close(alerter, timeout_s=10.0):
    assert alerter.close(timeout_s), "hooks still running"
    return alerter.failures()


def gone(pid):
    """Say whether a process has ended (a zombie waiting for init counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# --alert-cmd ------------------------------------------------------------------------

def test_cmd_gets_the_event_in_its_environment(tmp_path):
    record = tmp_path / "env.json"
    alerter = Alerter([sys.executable, "-c", RECORD_ENV, str(record)], None)
    alerter.fire(EXIT_EVENT, MESSAGE)
    wait_for(record.exists, what="the hook's record")
    seen = json.loads(record.read_text())
    assert seen == {
        "SUPERVISE_EVENT": "exit",
        "SUPERVISE_MESSAGE": MESSAGE,
        "SUPERVISE_PID": "4242",
        "SUPERVISE_STATUS": "124",
        "SUPERVISE_EVENT_JSON": seen["SUPERVISE_EVENT_JSON"],
        "own_session": True,
        "stdin": "",
    }
    assert json.loads(seen["SUPERVISE_EVENT_JSON"]) == EXIT_EVENT
    assert failures_after_close(alerter) == []


def test_status_only_on_exit_and_no_stale_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERVISE_STATUS", "stale from an outer supervisor")
    record = tmp_path / "env.json"
    alerter = Alerter([sys.executable, "-c", RECORD_ENV, str(record)], None)
    alerter.fire({"event": "gave-up", "reason": "max restarts (3) reached"}, "GAVE-UP\0 with a NUL")
    wait_for(record.exists, what="the hook's record")
    seen = json.loads(record.read_text())
    assert "SUPERVISE_STATUS" not in seen
    assert (seen["SUPERVISE_EVENT"], seen["SUPERVISE_PID"]) == ("gave-up", "")
    assert seen["SUPERVISE_MESSAGE"] == "GAVE-UP with a NUL"
    assert failures_after_close(alerter) == []


def test_a_failing_cmd_is_reported_with_its_last_words():
    alerter = Alerter([sys.executable, "-c", "import sys; print('trying'); sys.exit('boom: no route')"], None)
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert failures_after_close(alerter) == [("cmd", "exited with status 1: boom: no route")]
    assert alerter.failures() == []  # drained


def test_a_cmd_killed_by_a_signal_is_reported():
    alerter = Alerter(["sh", "-c", "kill -TERM $$"], None)
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert failures_after_close(alerter) == [("cmd", "killed by SIGTERM")]


@pytest.mark.parametrize("argv,error", [
    (["/nonexistent/notify"], "not found: /nonexistent/notify"),
    (["/dev/null"], "not executable: /dev/null"),
])
def test_a_cmd_that_cannot_start_is_reported(argv, error):
    alerter = Alerter(argv, None)
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert failures_after_close(alerter) == [("cmd", error)]


def test_a_slow_cmd_is_killed_with_its_group_and_never_blocks_the_caller():
    alerter = Alerter(["sh", "-c", "sleep 30; :"], None, cmd_timeout_s=0.5)
    started = time.monotonic()
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert time.monotonic() - started < 0.3  # fire() returns at once
    [leader] = wait_for(alerter.hook_pids, what="the hook to start")
    [sleeper] = wait_for(lambda: psutil.Process(leader).children(), what="the hook's child")
    assert failures_after_close(alerter) == [("cmd", "timed out after 0.5s, killed")]
    assert alerter.hook_pids() == set()
    wait_for(lambda: gone(sleeper.pid), what="the hook's child to die")


def test_what_a_hook_leaves_running_is_bounded_too(tmp_path):
    pid_file = tmp_path / "bg.pid"
    alerter = Alerter(["sh", "-c", f'sleep 30 & echo $! > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}'], None,
                      cmd_timeout_s=0.5)
    alerter.fire(EXIT_EVENT, MESSAGE)
    background = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the pid file"))
    assert failures_after_close(alerter) == []  # the hook itself succeeded
    wait_for(lambda: gone(background), what="the background process to die")


def test_both_hooks_fire_and_failures_name_the_hook():
    alerter = Alerter(["/nonexistent/notify"], f"http://127.0.0.1:{free_port()}/hook", webhook_timeout_s=2)
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert sorted(hook for hook, _ in failures_after_close(alerter)) == ["cmd", "webhook"]


# --alert-webhook ---------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    """An HTTP server on 127.0.0.1 that records each POST and answers server.status."""
    received = queue.Queue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((self.path, self.headers["Content-Type"], body))
            self.send_response(httpd.status)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.status = 200
    httpd.received = received
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}/hooks/T0"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_webhook_posts_slack_compatible_json(server):
    alerter = Alerter(None, server.url)
    alerter.fire(EXIT_EVENT, MESSAGE)
    path, content_type, body = server.received.get(timeout=10)
    assert (path, content_type) == ("/hooks/T0", "application/json")
    assert json.loads(body) == {"text": MESSAGE, "event": EXIT_EVENT}
    assert failures_after_close(alerter) == []


def test_webhook_error_status_is_a_failure(server):
    server.status = 500
    alerter = Alerter(None, server.url)
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert failures_after_close(alerter) == [("webhook", "HTTP 500 Internal Server Error")]


def test_webhook_non_2xx_without_error_is_a_failure(server):
    server.status = 101  # not an error to urllib, not a delivery either
    alerter = Alerter(None, server.url)
    alerter.fire(EXIT_EVENT, MESSAGE)
    assert failures_after_close(alerter) == [("webhook", "HTTP 101 Switching Protocols")]


def test_webhook_connection_refused_is_a_failure():
    alerter = Alerter(None, f"http://127.0.0.1:{free_port()}/hook")
    alerter.fire(EXIT_EVENT, MESSAGE)
    [(hook, error)] = failures_after_close(alerter)
    assert hook == "webhook"
    assert "refused" in error.lower()


def test_webhook_that_never_answers_is_bounded():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel accepts the connection; nobody ever answers
        alerter = Alerter(None, f"http://127.0.0.1:{listener.getsockname()[1]}/hook", webhook_timeout_s=0.5)
        alerter.fire(EXIT_EVENT, MESSAGE)
        assert failures_after_close(alerter, timeout_s=5) == [("webhook", "timed out after 0.5s")]
