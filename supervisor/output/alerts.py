"""Run the alert hooks (SPEC 6): --alert-cmd and --alert-webhook, off the main loop.

A hook must never stop or kill the supervisor, nor outlive it: each runs in a daemon
thread against its own deadline (the command 30 s, the webhook 10 s, both in total),
close() ends whatever is still running, and failures are only collected for the
caller to log.

Hooks are the supervisor's processes, never the child's. Every process a hook command
starts inherits SUPERVISE_HOOK_ID=<this Alerter's token>.<hook number>, so is_hook()
knows it even after it left the hook's session with setsid and was re-parented to the
supervisor (a child subreaper), and the hook's deadline reaches it too.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import select
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass

from supervisor.child import signal_name
from supervisor.output.lines import one_line

ERROR_CHARS = 300  # a failure is reported on one line
LEFTOVER_POLL_S = 0.5  # how often to look whether a finished hook left processes behind (a /proc scan)
JOIN_SLACK_S = 0.5  # close() gives a hook's thread this long past its deadline to end it itself
HOOK_ID_VAR = "SUPERVISE_HOOK_ID"
WEBHOOK_VAR = "MAGVIT_SUPERVISE_ALERT_WEBHOOK"  # the option's environment form: the URL is a secret
_MARKER_CACHE_MAX = 8192  # (pid, start time) entries; cleared when full, it only saves /proc reads
_OWN_FORK = ""  # _marker(): our own fork that has not exec'd yet, so carries no marker


def redact_url(url: str) -> str:
    """Show a URL as its scheme and host only (https://hooks.slack.com); the rest may hold a secret."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        host = parts.hostname
        port = parts.port
    except ValueError:  # a bad port or IPv6 literal: the host may still be shown
        try:
            parts = urllib.parse.urlsplit(url.strip())
            host, port = parts.hostname, None
        except ValueError:
            return "<webhook>"
    if not parts.scheme or not host:
        return "<webhook>"
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


@dataclass
class _Hook:
    """One run of one hook: its deadline and, for the command, its leader until reaped."""

    name: str  # "cmd" or "webhook"
    timeout_s: float
    started: float  # monotonic
    marker: str  # SUPERVISE_HOOK_ID of its processes
    thread: threading.Thread | None = None
    pid: int | None = None  # the command's leader (also its session and group id) until reaped
    done: bool = False  # its outcome is recorded, by its own thread or by close()

    @property
    def deadline(self) -> float:
        return self.started + self.timeout_s


class Alerter:
    """The alert hooks of one supervised run."""

    def __init__(
        self,
        cmd: list[str] | None,
        webhook: str | None,
        cmd_timeout_s: float = 30.0,
        webhook_timeout_s: float = 10.0,
    ) -> None:
        self.cmd = list(cmd) if cmd else None  # already split like a shell would; never run through one
        self.webhook = webhook or None
        self.cmd_timeout_s = cmd_timeout_s
        self.webhook_timeout_s = webhook_timeout_s
        self.token = secrets.token_hex(8)  # per Alerter: an outer supervisor's hooks are not ours
        self._secrets = _url_secrets(self.webhook) if self.webhook else []
        # Reentrant: stop() may run from a signal handler on the main thread while it holds the lock.
        self._lock = threading.RLock()
        self._failures: list[tuple[str, str]] = []
        self._hooks: list[_Hook] = []  # threads still running
        self._count = 0
        self._markers: dict[tuple[int, str], str | None] = {}
        self._own_environ = _read_bytes("/proc/self/environ")
        self._own_cmdline = _read_bytes("/proc/self/cmdline")

    def fire(self, event: dict, message: str, pid: int | None) -> None:
        """Start every configured hook for one alert, without waiting for any; pid is the main child's."""
        # Snapshot now: the caller may reuse the dict once we return.
        event = dict(event)
        if self.cmd:
            self._start("cmd", self.cmd_timeout_s, lambda hook: self._run_cmd(hook, event, message, pid))
        if self.webhook:
            self._start("webhook", self.webhook_timeout_s, lambda hook: self._post(hook, event, message))

    def failures(self) -> list[tuple[str, str]]:
        """Return and forget the (hook, error) pairs collected so far."""
        with self._lock:
            drained, self._failures = self._failures, []
        return drained

    def hook_pids(self) -> set[int]:
        """Return the pids of hook commands not yet reaped (each is its own session and group)."""
        with self._lock:  # held while a hook starts: a hook that already runs is never missed
            return {hook.pid for hook in self._hooks if hook.pid is not None}

    def is_hook(self, pid: int) -> bool:
        """Say whether pid is a hook's: a hook command, or any process that carries our marker."""
        try:
            if pid in self.hook_pids():
                return True
            if pid == os.getpid():
                return False
            stat = _proc_stat(pid)
            return stat is not None and self._marker(pid, stat[3]) is not None
        except Exception:  # never let a /proc oddity reach the main loop
            return False

    def close(self, timeout_s: float | None = None) -> bool:
        """End the hooks in flight: wait for each until its own deadline (at most timeout_s), kill the rest.

        Whatever had to be ended is recorded as a failure; return True when every hook
        finished on its own. close(timeout_s=0) ends everything at once.
        """
        cap = None if timeout_s is None else time.monotonic() + max(0.0, timeout_s)
        with self._lock:
            hooks = [hook for hook in self._hooks if not hook.done]
        for hook in hooks:
            until = hook.deadline + JOIN_SLACK_S if cap is None else min(hook.deadline + JOIN_SLACK_S, cap)
            if hook.thread is not None:
                hook.thread.join(max(0.0, until - time.monotonic()))
        all_done = True
        for hook in hooks:
            with self._lock:
                if hook.done:
                    continue
                elapsed = time.monotonic() - hook.started
                if elapsed >= hook.timeout_s:
                    error = f"timed out after {hook.timeout_s:g}s" + (", killed" if hook.name == "cmd" else "")
                else:
                    what = "killed" if hook.name == "cmd" else "abandoned"
                    error = f"{what} at exit after {elapsed:.1f}s (limit {hook.timeout_s:g}s)"
                self._record(hook, error)
                if hook.name == "cmd":
                    self._kill(hook)
            all_done = False
        return all_done

    def stop(self) -> None:
        """End every hook at once (the user's signal at exit); failures() then reports them."""
        self.close(timeout_s=0)

    # The hooks ------------------------------------------------------------------------

    def _start(self, name: str, timeout_s: float, run) -> None:
        with self._lock:
            self._count += 1
            hook = _Hook(name, timeout_s, time.monotonic(), f"{self.token}.{self._count}")
            hook.thread = threading.Thread(target=self._guard, args=(hook, run), name=f"alert-{name}", daemon=True)
            self._hooks.append(hook)
            hook.thread.start()  # under the lock: close() never sees a thread it cannot join yet

    def _guard(self, hook: _Hook, run) -> None:
        """Run one hook and record its outcome; nothing may escape the thread."""
        try:
            try:
                error = run(hook)
            except Exception as e:  # a bug or an odd OS error: still only a failed alert
                error = f"{type(e).__name__}: {e}"
            with self._lock:
                if error and not hook.done:
                    self._record(hook, error)
                hook.done = True
        finally:
            with self._lock:
                self._hooks = [h for h in self._hooks if h is not hook]

    def _record(self, hook: _Hook, error: str) -> None:
        """Keep one failure per hook, on one line, with no secret of the webhook in it (lock held)."""
        hook.done = True
        self._failures.append((hook.name, one_line(self._scrub(error), ERROR_CHARS)))

    def _run_cmd(self, hook: _Hook, event: dict, message: str, pid: int | None) -> str | None:
        """Run the alert command; return an error, or None when it exited 0 in time."""
        env = self._cmd_env(hook, event, message, pid)
        with tempfile.TemporaryFile() as out:
            # Its output goes to a file, not a pipe: a background grandchild holding a pipe
            # open would make us wait for it; a file only needs the hook itself to end.
            with self._lock:  # so that hook_pids() and close() never miss a hook that already runs
                if hook.done:
                    return None  # close() came first
                try:
                    proc = subprocess.Popen(
                        self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                        env=env, start_new_session=True,  # off our terminal; killable as a group
                    )
                except FileNotFoundError:
                    return f"not found: {self.cmd[0]}"
                except PermissionError:
                    return f"not executable: {self.cmd[0]}"
                except OSError as e:
                    return f"cannot run {self.cmd[0]}: {e.strerror or e}"
                hook.pid = proc.pid
            # Wait without reaping: while the leader is a zombie its pid, and so its group
            # id, cannot be given to another process, and killpg() stays safe.
            exited = _wait_exit(proc.pid, hook.deadline)
            if exited:
                # What it left running (in its group, or escaped with setsid) is bounded by the same deadline.
                while time.monotonic() < hook.deadline and self._leftovers(hook, proc.pid):
                    time.sleep(LEFTOVER_POLL_S)
            self._kill(hook)
            _wait_exit(proc.pid, None)  # not under the lock: a process stuck in the kernel may take its time
            with self._lock:  # reap and forget at once, so that close() never signals a reaped group
                status = proc.wait()
                hook.pid = None
            if not exited:
                return f"timed out after {hook.timeout_s:g}s, killed"
            if status == 0:
                return None
            how = f"exited with status {status}" if status > 0 else f"killed by {signal_name(-status)}"
            tail = _tail(out)
            return f"{how}: {tail}" if tail else how

    def _cmd_env(self, hook: _Hook, event: dict, message: str, pid: int | None) -> dict[str, str]:
        """The command's environment: ours, the alert, and the marker; never the webhook URL."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISE_") and k != WEBHOOK_VAR}
        env["SUPERVISE_EVENT"] = _env_safe(str(event.get("event", "")))
        env["SUPERVISE_MESSAGE"] = _env_safe(self._scrub(message))
        env["SUPERVISE_PID"] = "" if pid is None else str(pid)
        if event.get("event") == "exit":
            env["SUPERVISE_STATUS"] = str(event.get("status"))
        env["SUPERVISE_EVENT_JSON"] = _env_safe(self._scrub(json.dumps(event, default=str)))
        env[HOOK_ID_VAR] = hook.marker
        return env

    def _post(self, hook: _Hook, event: dict, message: str) -> str | None:
        """POST the alert as Slack-compatible JSON; return an error, or None on a 2xx answer.

        The 10 s bound is for the whole exchange: urllib's timeout is per socket
        operation, so a server that trickles a byte at a time would never hit it.
        The POST runs in an inner daemon thread that is abandoned at the deadline.
        """
        body = json.dumps({"text": message, "event": event}, default=str).encode()
        result: list[str | None] = []

        def post() -> None:
            try:
                result.append(self._post_once(body, max(0.1, hook.deadline - time.monotonic())))
            except Exception as e:
                result.append(f"{type(e).__name__}: {e}")

        inner = threading.Thread(target=post, name="alert-webhook-post", daemon=True)
        inner.start()
        inner.join(max(0.0, hook.deadline - time.monotonic()))
        if inner.is_alive() or not result:
            return f"timed out after {hook.timeout_s:g}s"
        return result[0]

    def _post_once(self, body: bytes, timeout_s: float) -> str | None:
        url, auth = _split_userinfo(self.webhook)
        headers = {"Content-Type": "application/json", "User-Agent": "magvit-supervise"}
        if auth:
            headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
        return http_post(url, body, headers, timeout_s, self.webhook_timeout_s)

    def _scrub(self, text: str) -> str:
        """Replace every secret part of the webhook URL in text: only its scheme and host may show."""
        for secret, shown in self._secrets:
            text = text.replace(secret, shown)
        return text

    # Processes --------------------------------------------------------------------------

    def _marker(self, pid: int, start: str) -> str | None:
        """Return the hook marker pid carries (_OWN_FORK for our fork before its exec), else None."""
        key = (pid, start)
        if key in self._markers:
            return self._markers[key]
        environ = _read_bytes(f"/proc/{pid}/environ")
        prefix = f"{HOOK_ID_VAR}={self.token}.".encode()
        marker = next(
            (entry[len(HOOK_ID_VAR) + 1:].decode("ascii", "replace") for entry in environ.split(b"\0")
             if entry.startswith(prefix)),
            None,
        )
        if (marker is None and environ and environ == self._own_environ
                and _read_bytes(f"/proc/{pid}/cmdline") == self._own_cmdline):
            # Forked by us and not yet exec'd (a hook being started): ours, but it will
            # carry its marker in a moment, so this answer must not be cached. The
            # command line too: a nested supervisor's child may inherit our very environment.
            return _OWN_FORK
        if not environ:
            # Not cached: unreadable, a zombie, or caught between its exec and the kernel
            # setting up its new environment (empty for a moment, markers included).
            return None
        if len(self._markers) >= _MARKER_CACHE_MAX:
            self._markers.clear()
        self._markers[key] = marker
        return marker

    def _leftovers(self, hook: _Hook, leader: int | None) -> list[int]:
        """Return the live processes a hook started: in its group, or carrying its marker."""
        found = []
        me = os.getpid()
        for pid in _all_pids():
            if pid in (me, leader):
                continue
            stat = _proc_stat(pid)
            if stat is None or stat[0] in "ZX":
                continue
            if (leader is not None and stat[1] == leader) or self._marker(pid, stat[3]) == hook.marker:
                found.append(pid)
        return found

    def _kill(self, hook: _Hook) -> None:
        """SIGKILL what is left of a hook command: its group while the leader is unreaped, and its marked processes."""
        with self._lock:
            if hook.pid is not None:
                try:
                    os.killpg(hook.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            for pid in self._leftovers(hook, hook.pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _wait_exit(pid: int, deadline: float | None) -> bool:
    """Wait until our child pid exits, without reaping it; False at the deadline (None: no deadline)."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # before Linux 5.3: poll instead
        pidfd = None
    try:
        while True:
            try:
                if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
                    return True
            except ChildProcessError:  # reaped elsewhere: it has exited all the same
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            if pidfd is not None:
                select.select([pidfd], [], [], left)  # readable once the process has exited
            else:
                time.sleep(0.05 if left is None else min(left, 0.05))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _all_pids() -> list[int]:
    try:
        return [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []


def _proc_stat(pid: int) -> tuple[str, int, int, str] | None:
    """Return (state, process group, session, start time) from /proc/PID/stat, None when gone."""
    raw = _read_bytes(f"/proc/{pid}/stat")
    # The command name (field 2) may hold spaces and parentheses: split after the last ")".
    fields = raw[raw.rfind(b")") + 2:].split()
    if len(fields) < 20:
        return None
    try:
        return fields[0].decode(), int(fields[2]), int(fields[3]), fields[19].decode()
    except ValueError:
        return None


def _read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def http_post(url: str, body: bytes, headers: dict[str, str], timeout_s: float, budget_s: float) -> str | None:
    """POST body to url; None on a 2xx answer, else why not (a timeout is told as the budget_s it ran out)."""
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            status = response.status
            response.read(65536)
    except urllib.error.HTTPError as e:  # before URLError: it is one
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        return f"timed out after {budget_s:g}s" if isinstance(e.reason, TimeoutError) else str(e.reason)
    except TimeoutError:
        return f"timed out after {budget_s:g}s"
    except OSError as e:  # a connection reset mid-answer
        return str(e)
    return None if 200 <= status < 300 else f"HTTP {status}"


def _split_userinfo(url: str) -> tuple[str, str | None]:
    """Return the URL without its user:password, and "user:password" for HTTP basic auth (or None)."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    auth = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
    return urllib.parse.urlunsplit(parts._replace(netloc=hostport)), auth


def _url_secrets(url: str) -> list[tuple[str, str]]:
    """(text, shown as) pairs for every secret part of a URL, longest first, for _scrub()."""
    shown = redact_url(url)
    pieces = {url: shown, url.strip(): shown}
    try:
        pieces.setdefault(_split_userinfo(url.strip())[0], shown)  # what is actually requested
    except ValueError:
        pass
    try:
        parts = urllib.parse.urlsplit(url.strip())
    except ValueError:
        parts = None
    if parts is not None:
        userinfo = parts.netloc.rpartition("@")[0]
        user, _, password = userinfo.partition(":")
        for piece in (parts.netloc if userinfo else "", userinfo, user, password, parts.path, parts.query,
                      parts.fragment):
            if len(piece) > 1 and piece != "/":
                pieces.setdefault(piece, "***")
                pieces.setdefault(urllib.parse.unquote(piece), "***")
    return sorted(((text, show) for text, show in pieces.items() if len(text) > 1),
                  key=lambda pair: -len(pair[0]))


def _tail(out) -> str:
    """Return the last non-empty line the hook printed."""
    out.seek(0, os.SEEK_END)
    out.seek(max(0, out.tell() - 4096))
    lines = out.read().decode("utf-8", errors="replace").splitlines()
    return next((line for line in reversed(lines) if line.strip()), "")


def _env_safe(text: str) -> str:
    """Drop NUL bytes, which an environment variable cannot hold."""
    return text.replace("\0", "")
