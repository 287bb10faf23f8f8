"""Run the alert hooks (SPEC 6): --alert-cmd and --alert-webhook, off the main loop.

A hook must never stop or kill the supervisor: each runs in a daemon thread,
bounded in time, and its failure is only collected for the caller to log.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

from .child import signal_name
from .events import one_line

ERROR_CHARS = 300  # a failure is reported on one line
GROUP_POLL_S = 0.1  # how often to look whether a finished hook left processes behind


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
        self._lock = threading.Lock()
        self._failures: list[tuple[str, str]] = []
        self._sessions: set[int] = set()  # live hook commands: leader pid == session id == group id
        self._threads: list[threading.Thread] = []

    def fire(self, event: dict, message: str) -> None:
        """Start every configured hook for one alert, without waiting for any."""
        # Snapshot now: the caller may reuse the dict once we return.
        event = dict(event)
        event_json = json.dumps(event, default=str)
        hooks = []
        if self.cmd:
            hooks.append(("cmd", lambda: self._run_cmd(event, message, event_json)))
        if self.webhook:
            hooks.append(("webhook", lambda: self._post(event, message)))
        for name, run in hooks:
            thread = threading.Thread(target=self._guard, args=(name, run), name=f"alert-{name}", daemon=True)
            with self._lock:
                self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()

    def failures(self) -> list[tuple[str, str]]:
        """Return and forget the (hook, error) pairs collected so far."""
        with self._lock:
            drained, self._failures = self._failures, []
        return drained

    def hook_pids(self) -> set[int]:
        """Return the pids of hook commands still running (each is its own session and group)."""
        with self._lock:
            return set(self._sessions)

    def close(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for hooks in flight; return True when none is left."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads)

    def _guard(self, hook: str, run) -> None:
        """Run one hook and record its failure; nothing may escape the thread."""
        try:
            error = run()
        except Exception as e:  # a bug or an odd OS error: still only a failed alert
            error = f"{type(e).__name__}: {e}"
        if error:
            with self._lock:
                self._failures.append((hook, one_line(error, ERROR_CHARS)))

    def _run_cmd(self, event: dict, message: str, event_json: str) -> str | None:
        """Run the alert command; return an error, or None when it exited 0 in time."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SUPERVISE_")}
        env["SUPERVISE_EVENT"] = _env_safe(str(event.get("event", "")))
        env["SUPERVISE_MESSAGE"] = _env_safe(message)
        env["SUPERVISE_PID"] = "" if event.get("pid") is None else str(event["pid"])
        if event.get("event") == "exit":
            env["SUPERVISE_STATUS"] = str(event.get("status"))
        env["SUPERVISE_EVENT_JSON"] = event_json
        deadline = time.monotonic() + self.cmd_timeout_s
        with tempfile.TemporaryFile() as out:
            # Its output goes to a file, not a pipe: a background grandchild holding a pipe
            # open would make us wait for it; a file only needs the hook itself to end.
            with self._lock:  # so that hook_pids() never misses a hook that already runs
                try:
                    proc = subprocess.Popen(
                        self.cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                        env=env, start_new_session=True,  # off our terminal; killable as a group
                    )
                except FileNotFoundError:
                    return f"not found: {self.cmd[0]}"
                except PermissionError:
                    return f"not executable: {self.cmd[0]}"
                self._sessions.add(proc.pid)
            try:
                try:
                    status = proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill_group(proc.pid)
                    proc.wait()
                    return f"timed out after {self.cmd_timeout_s:g}s, killed"
                # What it left running in its group is bounded by the same deadline.
                while _group_alive(proc.pid) and time.monotonic() < deadline:
                    time.sleep(GROUP_POLL_S)
                _kill_group(proc.pid)
            finally:
                with self._lock:
                    self._sessions.discard(proc.pid)
            if status == 0:
                return None
            how = f"exited with status {status}" if status > 0 else f"killed by {signal_name(-status)}"
            tail = _tail(out)
            return f"{how}: {tail}" if tail else how

    def _post(self, event: dict, message: str) -> str | None:
        """POST the alert as Slack-compatible JSON; return an error, or None on a 2xx answer."""
        body = json.dumps({"text": message, "event": event}, default=str).encode()
        request = urllib.request.Request(
            self.webhook, data=body, method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "magvit-supervise"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.webhook_timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as e:  # before URLError: it is one
            return f"HTTP {e.code} {e.reason}"
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                return f"timed out after {self.webhook_timeout_s:g}s"
            return str(e.reason)
        except TimeoutError:
            return f"timed out after {self.webhook_timeout_s:g}s"
        if not 200 <= status < 300:
            return f"HTTP {status}"
        return None


def _kill_group(pgid: int) -> None:
    """SIGKILL a hook's process group, whatever is left of it."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(pgid: int) -> bool:
    """Say whether any process is left in the group."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _tail(out) -> str:
    """Return the last non-empty line the hook printed."""
    out.seek(0, os.SEEK_END)
    out.seek(max(0, out.tell() - 4096))
    lines = out.read().decode("utf-8", errors="replace").splitlines()
    return next((line for line in reversed(lines) if line.strip()), "")


def _env_safe(text: str) -> str:
    """Drop NUL bytes, which an environment variable cannot hold."""
    return text.replace("\0", "")
