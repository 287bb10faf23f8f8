"""Alert hooks against real commands and a real HTTP server: delivered, bounded, failures reported."""

import base64
import http.server
import json
import os
import subprocess
import queue
import re
import socket
import sys
import threading
import time

import psutil
import pytest

from supervisor.output.alerts import Alerter, redact_url

EXIT_EVENT = {"ts": "2026-11-28T14:15:41.000Z", "event": "exit", "status": 124, "reason": "stall"}
CHILD_PID = 4242
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
    assert alerter.close(timeout_s), "hooks still running, killed"
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
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    wait_for(record.exists, what="the hook's record")
    seen = json.loads(record.read_text())
    assert seen == {
        "SUPERVISE_EVENT": "exit",
        "SUPERVISE_MESSAGE": MESSAGE,
        "SUPERVISE_PID": "4242",
        "SUPERVISE_STATUS": "124",
        "SUPERVISE_EVENT_JSON": seen["SUPERVISE_EVENT_JSON"],
        "SUPERVISE_HOOK_ID": seen["SUPERVISE_HOOK_ID"],
        "own_session": True,
        "stdin": "",
    }
    assert json.loads(seen["SUPERVISE_EVENT_JSON"]) == EXIT_EVENT
    assert seen["SUPERVISE_HOOK_ID"].startswith(alerter.token + ".")
    assert failures_after_close(alerter) == []


def test_supervise_pid_is_the_main_childs_not_the_events():
    """Issue 7 item 12: SUPERVISE_PID came from event["pid"], which no alert event carries."""
    alerter = Alerter([sys.executable, "-c", "import os, sys; sys.exit(os.environ['SUPERVISE_PID'] != '4242')"], None)
    alerter.fire({"event": "stall", "kind": "progress"}, MESSAGE, 4242)
    assert failures_after_close(alerter) == []


def test_status_only_on_exit_and_no_stale_variables(tmp_path, monkeypatch):
    monkeypatch.setenv("SUPERVISE_STATUS", "stale from an outer supervisor")
    record = tmp_path / "env.json"
    alerter = Alerter([sys.executable, "-c", RECORD_ENV, str(record)], None)
    alerter.fire({"event": "gave-up", "reason": "max restarts (3) reached"}, "GAVE-UP\0 with a NUL", None)
    wait_for(record.exists, what="the hook's record")
    seen = json.loads(record.read_text())
    assert "SUPERVISE_STATUS" not in seen
    assert (seen["SUPERVISE_EVENT"], seen["SUPERVISE_PID"]) == ("gave-up", "")
    assert seen["SUPERVISE_MESSAGE"] == "GAVE-UP with a NUL"
    assert failures_after_close(alerter) == []


def test_a_failing_cmd_is_reported_with_its_last_words():
    alerter = Alerter([sys.executable, "-c", "import sys; print('trying'); sys.exit('boom: no route')"], None)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    assert failures_after_close(alerter) == [("cmd", "exited with status 1: boom: no route")]
    assert alerter.failures() == []  # drained


def test_a_cmd_killed_by_a_signal_is_reported():
    alerter = Alerter(["sh", "-c", "kill -TERM $$"], None)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    assert failures_after_close(alerter) == [("cmd", "killed by SIGTERM")]


@pytest.mark.parametrize("argv,error", [
    (["/nonexistent/notify"], "not found: /nonexistent/notify"),
    (["/dev/null"], "not executable: /dev/null"),
])
def test_a_cmd_that_cannot_start_is_reported(argv, error):
    alerter = Alerter(argv, None)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    assert failures_after_close(alerter) == [("cmd", error)]


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_a_slow_cmd_is_killed_with_its_group_and_never_blocks_the_caller():
    alerter = Alerter(["sh", "-c", "sleep 30; :"], None, cmd_timeout_s=0.5)
    started = time.monotonic()
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
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
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    background = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the pid file"))
    assert failures_after_close(alerter) == []  # the hook itself succeeded
    wait_for(lambda: gone(background), what="the background process to die")


def test_both_hooks_fire_and_failures_name_the_hook():
    alerter = Alerter(["/nonexistent/notify"], f"http://127.0.0.1:{free_port()}/hook", webhook_timeout_s=2)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
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
    auth = queue.Queue()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.put((self.path, self.headers["Content-Type"], body))
            auth.put(self.headers.get("Authorization"))
            self.send_response(httpd.status)
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.status = 200
    httpd.received = received
    httpd.auth = auth
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
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    path, content_type, body = server.received.get(timeout=10)
    assert (path, content_type) == ("/hooks/T0", "application/json")
    assert json.loads(body) == {"text": MESSAGE, "event": EXIT_EVENT}
    assert failures_after_close(alerter) == []


def test_webhook_error_status_is_a_failure(server):
    server.status = 500
    alerter = Alerter(None, server.url)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    assert failures_after_close(alerter) == [("webhook", "HTTP 500 Internal Server Error")]


def test_webhook_non_2xx_without_error_is_a_failure(server):
    server.status = 101  # not an error to urllib, not a delivery either
    alerter = Alerter(None, server.url)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    assert failures_after_close(alerter) == [("webhook", "HTTP 101 Switching Protocols")]


def test_webhook_connection_refused_is_a_failure():
    alerter = Alerter(None, f"http://127.0.0.1:{free_port()}/hook")
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    [(hook, error)] = failures_after_close(alerter)
    assert hook == "webhook"
    assert "refused" in error.lower()


def test_webhook_that_never_answers_is_bounded():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)  # the kernel accepts the connection; nobody ever answers
        alerter = Alerter(None, f"http://127.0.0.1:{listener.getsockname()[1]}/hook", webhook_timeout_s=0.5)
        alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
        assert failures_after_close(alerter, timeout_s=5) == [("webhook", "timed out after 0.5s")]


# Hooks are the supervisor's processes (issue 7 item 11) ----------------------------------

ESCAPE = "setsid sleep 30 & echo $! > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}"


def test_a_process_that_escapes_the_hooks_session_is_still_known_as_the_hooks(tmp_path):
    pid_file = tmp_path / "escaped.pid"
    alerter = Alerter(["sh", "-c", ESCAPE.format(pid_file=pid_file)], None, cmd_timeout_s=3)
    outsider = subprocess.Popen(["sleep", "30"])  # any other process: the child's, say
    try:
        alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
        escaped = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the pid file"))
        # it leaves the hook's session (so no session test finds it) once setsid has run: the
        # shell may write its pid a moment before
        wait_for(lambda: os.getsid(escaped) == escaped, what="setsid in the escaped process")
        assert alerter.is_hook(escaped)
        assert not alerter.is_hook(outsider.pid)
        assert not alerter.is_hook(os.getpid())
        assert not alerter.is_hook(2**22 + 1)  # no such process: no exception either
        assert not Alerter(None, None).is_hook(escaped)  # another supervisor's hooks are not ours
        # What it leaves running is bounded by the hook's own deadline, even out of its session.
        assert failures_after_close(alerter) == []
        wait_for(lambda: gone(escaped), what="the escaped process to die")
    finally:
        outsider.kill()
        outsider.wait()


def test_a_running_hook_leader_is_a_hook():
    alerter = Alerter(["sleep", "30"], None)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    [leader] = wait_for(alerter.hook_pids, what="the hook to start")
    assert alerter.is_hook(leader)
    alerter.stop()


# Bounded at exit too (issue 7 item 13) ---------------------------------------------------

def test_close_waits_for_a_hook_until_its_own_deadline_then_kills_it():
    alerter = Alerter(["sleep", "30"], None, cmd_timeout_s=1)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    [leader] = wait_for(alerter.hook_pids, what="the hook to start")
    started = time.monotonic()
    alerter.close()
    assert 0.5 < time.monotonic() - started < 5
    assert alerter.failures() == [("cmd", "timed out after 1s, killed")]
    wait_for(lambda: gone(leader), what="the hook to die")


def test_close_with_a_cap_kills_what_is_left_and_reports_it(tmp_path):
    """Before: close(10) returned with a 30 s hook still running; the hook outlived the supervisor."""
    pid_file = tmp_path / "escaped.pid"
    alerter = Alerter(["sh", "-c", ESCAPE.format(pid_file=pid_file) + "; exec sleep 30"], None)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    escaped = int(wait_for(lambda: pid_file.exists() and pid_file.read_text(), what="the pid file"))
    [leader] = alerter.hook_pids()
    started = time.monotonic()
    assert alerter.close(timeout_s=0.3) is False
    assert time.monotonic() - started < 3
    [(hook, error)] = alerter.failures()
    assert hook == "cmd"
    assert re.fullmatch(r"killed at exit after 0\.\ds \(limit 30s\)", error), error
    wait_for(lambda: gone(leader), what="the hook to die")
    wait_for(lambda: gone(escaped), what="the escaped process to die")


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_stop_ends_every_hook_at_once():
    alerter = Alerter(["sleep", "30"], None)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    [leader] = wait_for(alerter.hook_pids, what="the hook to start")
    started = time.monotonic()
    alerter.stop()
    assert time.monotonic() - started < 1
    [(hook, error)] = alerter.failures()
    assert (hook, error.startswith("killed at exit after ")) == ("cmd", True)
    wait_for(lambda: gone(leader), what="the hook to die")


@pytest.fixture
def trickler():
    """A server on 127.0.0.1 that answers a POST one byte every 0.5 s, for up to 30 s."""
    stop = threading.Event()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.1)

    def serve():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.recv(65536)
                for byte in b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok":
                    if stop.wait(0.5):
                        break
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/hook"
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_a_webhook_that_trickles_is_bounded_in_total(trickler):
    """Before: urllib's timeout is per read, and a byte every 0.5 s never trips a 1.5 s one."""
    alerter = Alerter(None, trickler, webhook_timeout_s=1.5)
    started = time.monotonic()
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    assert failures_after_close(alerter, timeout_s=None) == [("webhook", "timed out after 1.5s")]
    assert time.monotonic() - started < 4


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
def test_close_with_a_cap_abandons_a_webhook_in_flight(trickler):
    alerter = Alerter(None, trickler, webhook_timeout_s=20)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    started = time.monotonic()
    assert alerter.close(timeout_s=0.5) is False
    assert time.monotonic() - started < 2
    [(hook, error)] = alerter.failures()
    assert (hook, error.startswith("abandoned at exit after ")) == ("webhook", True)


# The webhook's secrets (issue 7 item 14) --------------------------------------------------

@pytest.mark.parametrize("url,shown", [
    ("https://hooks.slack.com/services/T000/B000/XXXX", "https://hooks.slack.com"),
    ("http://bot:TOKEN@Example.COM:8080/x?token=Y#z", "http://example.com:8080"),
    ("http://[::1]:9000/secret", "http://[::1]:9000"),
    ("http://host:notaport/secret", "http://host"),
    ("hooks.slack.com/services/T000", "<webhook>"),
    ("", "<webhook>"),
    ("http://[::1/secret", "<webhook>"),
])
def test_redact_url_keeps_only_scheme_and_host(url, shown):
    assert redact_url(url) == shown


def test_userinfo_goes_as_basic_auth_not_in_the_url(server):
    url = server.url.replace("http://", "http://bot:s%3Acret@")
    alerter = Alerter(None, url)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    path, _, _ = server.received.get(timeout=10)
    assert path == "/hooks/T0"
    assert server.auth.get(timeout=10) == "Basic " + base64.b64encode(b"bot:s:cret").decode()
    assert failures_after_close(alerter) == []


@pytest.mark.parametrize("template", [
    "http://bot:S3CRET@127.0.0.1:{port}/hooks/PATHSECRET?token=QSECRET",  # refused
    "http://bot:S3CRET@127.0.0.1/hooks/PATHSECRET",  # before: "nonnumeric port: 'S3CRET@127.0.0.1'"
    "http://127.0.0.1:{port}/hooks/PATHSECRET x?token=QSECRET",  # http.client: InvalidURL, with the URL in it
    "http://bot:S3CRET@127.0.0.1:notaport/PATHSECRET",  # a bad port
    "ftp://bot:S3CRET@127.0.0.1:{port}/PATHSECRET",  # urllib: unknown url type
])
def test_webhook_errors_never_show_its_secrets(template):
    alerter = Alerter(None, template.format(port=free_port()), webhook_timeout_s=2)
    alerter.fire(EXIT_EVENT, MESSAGE, CHILD_PID)
    [(hook, error)] = failures_after_close(alerter)
    assert hook == "webhook"
    assert error and "\n" not in error
    for secret in ("S3CRET", "PATHSECRET", "QSECRET", "hooks/"):
        assert secret not in error, error


def test_the_webhook_url_never_reaches_a_hook_command(tmp_path, monkeypatch):
    url = f"http://bot:S3CRET@127.0.0.1:{free_port()}/services/PATHSECRET"  # nobody listens: refused
    monkeypatch.setenv("MAGVIT_SUPERVISE_ALERT_WEBHOOK", url)
    monkeypatch.setenv("MAGVIT_SUPERVISE_HEARTBEAT", "7")  # the supervisor's other settings stay
    record = tmp_path / "env.json"
    script = (
        "import json, os, sys; json.dump(dict(os.environ), open(sys.argv[1] + '.tmp', 'w'));"
        "os.replace(sys.argv[1] + '.tmp', sys.argv[1]); print('failing on ' + sys.argv[2]); sys.exit(3)"
    )
    alerter = Alerter([sys.executable, "-c", script, str(record), url], url, webhook_timeout_s=2)
    alerter.fire({"event": "stall", "progress": f"posting to {url}"}, f"STALL {url}", CHILD_PID)
    wait_for(record.exists, what="the hook's record")
    seen = json.loads(record.read_text())
    assert seen["MAGVIT_SUPERVISE_HEARTBEAT"] == "7"
    assert "MAGVIT_SUPERVISE_ALERT_WEBHOOK" not in seen
    assert not [k for k, v in seen.items() if "S3CRET" in v or "PATHSECRET" in v]
    shown = redact_url(url)
    assert seen["SUPERVISE_MESSAGE"] == f"STALL {shown}"
    failures = dict(failures_after_close(alerter))
    assert failures["cmd"] == f"exited with status 3: failing on {shown}"
    assert "S3CRET" not in failures["webhook"] and "PATHSECRET" not in failures["webhook"]


TWIN = """
import os, subprocess, sys
from supervisor.output.alerts import Alerter
alerter = Alerter(["true"], None)
twin = subprocess.Popen(["sleep", "30"], env=dict(os.environ))  # our environment, byte for byte
try:
    theirs = b""
    while not theirs:  # empty for a moment after its exec, until the kernel has set it up
        with open(f"/proc/{twin.pid}/environ", "rb") as f:
            theirs = f.read()
    with open("/proc/self/environ", "rb") as f:
        print(theirs == f.read(), alerter.is_hook(twin.pid))
finally:
    twin.kill()
    twin.wait()
"""


def test_a_process_with_our_very_environment_is_not_taken_for_a_hook():
    """A nested supervisor's child may inherit our environment byte for byte; it is still not a hook."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env["PYTHONPATH"] = root
    done = subprocess.run([sys.executable, "-c", TWIN], env=env, capture_output=True, timeout=20)
    assert done.stdout.split() == [b"True", b"False"], done.stderr
