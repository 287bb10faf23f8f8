"""Options of magvit-supervise: one table drives the parser, the environment, the defaults and --help.

Every bad value becomes a ConfigError naming the option, the value and where it
came from (command line or environment), so the CLI can print one line and exit 125.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shlex
from dataclasses import dataclass
from typing import Callable

ENV_PREFIX = "MAGVIT_SUPERVISE_"
DEFAULT_PROGRESS_FILE = "PROGRESS.txt"
ON_STALL_CHOICES = ("warn", "kill", "restart")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h)?\s*$", re.ASCII)
_UNIT_S = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_ANY_LINES = (b"", b"\x01")  # a regex that finds itself in both of these finds itself in every line
MAX_RESTARTS_LIMIT = 10**6  # more than a lifetime of restarts: a bigger number is a typo


class ConfigError(ValueError):
    """A bad option: the message is the whole one-line reason."""


class HelpRequested(Exception):
    """-h or --help before the command: print help_text() and exit 0."""


@dataclass(frozen=True)
class Option:
    name: str  # the flag without dashes: "stall-timeout"
    metavar: str | None  # None: a switch that takes no value
    default: str  # as the user would write it; "" for none
    help: str

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()


OPTIONS = (
    Option("heartbeat", "S", "30", "heartbeat after S seconds without output (0: off)"),
    Option("progress-file", "PATH", DEFAULT_PROGRESS_FILE, "file (or glob) whose updates count as progress"),
    Option("stall-timeout", "S|auto", "600", "no progress for S seconds is a stall (0: off; auto: learn it)"),
    Option("startup-grace", "S", "", "first progress is due within S seconds (default: the stall timeout)"),
    Option("silence-timeout", "S", "0", "no output for S seconds is a stall (0: off)"),
    Option("progress-regex", "RE", "", "output lines matching RE count as progress"),
    Option("on-stall", "ACTION", "kill", "warn, kill or restart"),
    Option("kill-grace", "S", "30", "seconds between SIGTERM and SIGKILL"),
    Option("max-restarts", "N", "3", "restarts allowed (stalls and crashes together)"),
    Option("restart-on-crash", None, "", "also restart on a non-zero exit or a signal"),
    Option("log", "PATH", "", "append every line, timestamped and tagged, to PATH"),
    Option("events", "PATH", "", "append one JSON object per supervisor event to PATH"),
    Option("timestamps", None, "", "prefix relayed lines with HH:MM:SS.mmm"),
    Option("alert-cmd", "CMD", "", "run CMD (split like a shell, run without one) on each alert"),
    Option("alert-webhook", "URL", "", "POST each alert as JSON to URL"),
    Option("pty", None, "", "run the child on a pseudo-terminal"),
    Option("run-dir", "DIR", "", "make the run a folder: --log, --events, --progress-file default inside it"),
    Option("flight-recorder", "DIR|off", "", "where NCCL flight-recorder dumps go (default: beside --events/--log)"),
    Option("max-expect", "S", "6h", "the longest deadline a progress file may declare (expect_next_s)"),
    Option("output-progress", "on|off", "on", "read progress from the counters in the output when no "
           "--progress-file or --progress-regex is given"),
    Option("slow-window", "S", "10m", "the window over which the progress rate is measured"),
    Option("slow-ratio", "R", "0.5", "SLOW when the rate falls below R x the run's typical rate (0: off)"),
    Option("metrics-port", "[HOST:]PORT", "", "serve Prometheus /metrics there (HOST defaults to 127.0.0.1)"),
    Option("metrics-file", "PATH", "", "write the metrics to PATH atomically at each heartbeat and at exit"),
    Option("ping-url", "URL", "", "dead-man's switch: ping URL, URL/start, URL/fail, URL/STATUS (healthchecks.io)"),
)
_BY_DEST = {o.dest: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    command: tuple[str, ...]
    heartbeat_s: float = 30.0  # 0 turns heartbeats off
    progress_file: str = ""  # absolute path or glob pattern
    progress_file_explicit: bool = False  # given by the user: then it is due by the startup grace
    stall_timeout_s: float = 600.0  # 0 turns progress stalls off
    stall_auto: bool = False  # learn the timeout from the gaps between updates
    startup_grace_s: float = 600.0
    silence_timeout_s: float = 0.0  # 0 = off
    progress_regex: re.Pattern[bytes] | None = None
    on_stall: str = "kill"
    on_stall_explicit: bool = False  # given by the user: then it applies to output counters too (SPEC 1.2)
    kill_grace_s: float = 30.0
    max_restarts: int = 3
    restart_on_crash: bool = False
    log_path: str | None = None  # absolute
    events_path: str | None = None  # absolute
    timestamps: bool = False
    alert_cmd: tuple[str, ...] = ()
    alert_webhook: str | None = None
    pty: bool = False
    run_dir: str | None = None  # absolute; the supervisor creates it
    flight_recorder: str | None = None  # absolute folder, None when off
    max_expect_s: float = 6 * 3600.0  # cap on a progress file's expect_next_s
    output_progress: bool = True  # read counters from the output (SPEC 1.2), when nothing else is given
    slow_window_s: float = 600.0  # the progress rate is measured over this window (SPEC 1.3)
    slow_ratio: float = 0.5  # SLOW below this x the typical rate; 0 = off
    metrics_addr: tuple[str, int] | None = None  # (host, port) to serve /metrics on; port 0: any free one
    metrics_file: str | None = None  # absolute; node_exporter's textfile collector reads it
    ping_url: str | None = None  # healthchecks.io-style dead-man's switch; a secret, shown redacted


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises instead of printing usage and exiting 2."""

    def error(self, message: str):  # noqa: D401 - argparse's name
        raise ConfigError(message)


def _parser() -> _Parser:
    p = _Parser(
        prog="magvit-supervise",
        description="Run COMMAND, relay its output, heartbeat while it is silent, "
        "and detect, diagnose and act on stalls.",
        usage="magvit-supervise [OPTIONS] -- COMMAND [ARG...]",
        add_help=False,
        epilog=f"Every option may also come from {ENV_PREFIX}<OPTION> (e.g. {ENV_PREFIX}STALL_TIMEOUT=15m); "
        "the command line wins. Durations: 90, 1.5, 30s, 10m, 2h.",
    )
    for o in OPTIONS:
        text = o.help + (f" (default {o.default})" if o.default else "")
        if o.metavar is None:
            p.add_argument("--" + o.name, action="store_const", const="1", help=text)
        else:
            p.add_argument("--" + o.name, metavar=o.metavar, help=text)
    p.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    p.add_argument("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def usage() -> str:
    """The one-line usage, for the error that no command was given."""
    return _parser().format_usage().strip()


def help_text() -> str:
    """The --help text."""
    return _parser().format_help()


def parse_duration(option: str, text: str, source: str) -> float:
    """Turn '90', '1.5', '30s', '10m' or '2h' into seconds."""
    m = _DURATION.match(text)
    value = float(m.group(1)) * _UNIT_S[m.group(2)] if m else math.nan
    if not math.isfinite(value):
        raise ConfigError(
            f"invalid {option} {text!r} (from {source}): expected seconds or a duration like 90, 1.5, 30s, 10m, 2h"
        )
    return value


def _parse_flag(option: str, text: str, source: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(f"invalid {option} {text!r} (from {source}): expected 1/0, true/false, yes/no or on/off")


def _raw_options(argv: list[str], environ) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Merge environment and command line into {dest: (text, source)}; the command line wins."""
    ns = _parser().parse_args(argv)
    if ns.help:
        raise HelpRequested()
    command = list(ns.command)
    if command and command[0] == "--":
        command = command[1:]
    raw: dict[str, tuple[str, str]] = {}
    for o in OPTIONS:
        value = getattr(ns, o.dest)
        if value == "" and o.metavar is not None:
            # `--log "$LOG"` with LOG unset: refused, not quietly off (leave the option out for that).
            raise ConfigError(f"invalid --{o.name} '' (from command line): empty; leave the option out instead")
        if value is not None:
            raw[o.dest] = (value, "command line")
        elif environ.get(o.env):  # set to nothing (`MAGVIT_SUPERVISE_X= cmd`) is no setting
            raw[o.dest] = (environ[o.env], o.env)
    return raw, command


class _Values:
    """The raw option texts, read through typed getters that name the option in every error."""

    def __init__(self, raw: dict[str, tuple[str, str]]):
        self.raw = raw

    def fail(self, dest: str, expected: str) -> ConfigError:
        value, source = self.raw[dest]
        return ConfigError(f"invalid --{_BY_DEST[dest].name} {value!r} (from {source}): {expected}")

    def text(self, dest: str) -> str | None:
        return self.raw[dest][0] if dest in self.raw else None

    def duration(self, dest: str, default: float | None = None) -> float:
        if dest not in self.raw:
            return parse_duration("--" + _BY_DEST[dest].name, _BY_DEST[dest].default, "default") \
                if default is None else default
        value, source = self.raw[dest]
        return parse_duration("--" + _BY_DEST[dest].name, value, source)

    def flag(self, dest: str) -> bool:
        if dest not in self.raw:
            return False
        value, source = self.raw[dest]
        return _parse_flag("--" + _BY_DEST[dest].name, value, source)

    def parsed(self, dest: str, parse: Callable[[str], object], expected: str):
        try:
            return parse(self.raw[dest][0])
        except (ValueError, re.error) as e:
            raise self.fail(dest, f"{expected}{': ' + str(e) if str(e) else ''}") from None


def _whole_number(text: str) -> int:
    if not re.fullmatch(r"\s*\d+\s*", text, re.ASCII) or int(text) > MAX_RESTARTS_LIMIT:
        raise ValueError("")
    return int(text)


def _ratio(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError("")
    return value


def _host_port(text: str) -> tuple[str, int]:
    """'9400' -> ('127.0.0.1', 9400); '0.0.0.0:9400'; '[::1]:9400'."""
    host, sep, port = text.strip().rpartition(":")
    if not sep:
        host = "127.0.0.1"  # a training box's job state is not for the whole network unless asked
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not re.fullmatch(r"\d{1,5}", port, re.ASCII) or int(port) > 65535 or not host or " " in host:
        raise ValueError("")
    return host, int(port)


def parse_config(argv: list[str], environ=None, cwd: str | None = None) -> Config:
    """Build a validated Config from argv and MAGVIT_SUPERVISE_* variables."""
    environ = os.environ if environ is None else environ
    raw, command = _raw_options(argv, environ)
    if not command:
        raise ConfigError("no command given (put it after --)")
    if cwd is None:
        try:
            cwd = os.getcwd()
        except OSError as e:
            raise ConfigError(f"cannot read the working directory: {e.strerror}") from None
    v = _Values(raw)

    stall_auto = (v.text("stall_timeout") or "").strip().lower() == "auto"
    stall_timeout_s = 600.0 if stall_auto else v.duration("stall_timeout")
    startup_grace_s = v.duration("startup_grace", 600.0 if stall_auto else stall_timeout_s)

    on_stall = (v.text("on_stall") or "kill").strip().lower()
    if on_stall not in ON_STALL_CHOICES:
        raise v.fail("on_stall", "expected warn, kill or restart")

    max_restarts = 3
    if "max_restarts" in raw:
        max_restarts = v.parsed("max_restarts", _whole_number, f"expected a whole number from 0 to {MAX_RESTARTS_LIMIT}")

    progress_regex = None
    if "progress_regex" in raw:
        # MULTILINE: ^ and $ anchor at each line of a chunk, searched in one pass.
        progress_regex = v.parsed("progress_regex",
                                  lambda t: re.compile(t.encode("utf-8", "surrogateescape"), re.MULTILINE), "bad regex")
        if all(progress_regex.search(line) for line in _ANY_LINES):
            # "" or "step|": every line, a heartbeat thread's too, would be progress and hide every hang.
            raise v.fail("progress_regex", "it matches every line (an empty one too), so any output would be progress")

    alert_cmd: tuple[str, ...] = ()
    if "alert_cmd" in raw:
        alert_cmd = v.parsed("alert_cmd", lambda t: tuple(shlex.split(t)), "cannot split it")
        if not alert_cmd:
            raise v.fail("alert_cmd", "empty command")

    webhook = v.text("alert_webhook")
    if webhook is not None and not re.match(r"^https?://[^/\s]+", webhook):
        from supervisor.output.alerts import redact_url

        raise ConfigError(f"invalid --alert-webhook {redact_url(webhook)!r} (from {raw['alert_webhook'][1]}): "
                          "expected an http:// or https:// URL")

    def path(dest: str) -> str | None:
        text = v.text(dest)
        if text is None:  # empty is never here: refused on the command line, unset from the environment
            return None
        if not text.strip():
            raise v.fail(dest, "empty path")
        return os.path.normpath(os.path.join(cwd, text))

    run_dir = path("run_dir")
    inside = (lambda name: os.path.join(run_dir, name)) if run_dir else (lambda name: None)
    progress_file = path("progress_file")
    log_path = path("log") or inside("supervise.log")
    events_path = path("events") or inside("events.jsonl")

    flight_recorder = None
    fr_text = v.text("flight_recorder")
    if fr_text is not None and fr_text.strip().lower() == "off":
        flight_recorder = None
    elif fr_text is not None:
        flight_recorder = path("flight_recorder")
    elif events_path or log_path:
        flight_recorder = os.path.join(os.path.dirname(events_path or log_path), "flight-recorder")

    max_expect_s = v.duration("max_expect")
    if max_expect_s <= 0:
        raise v.fail("max_expect", "expected a duration above 0")

    slow_window_s = v.duration("slow_window")
    if slow_window_s <= 0:
        raise v.fail("slow_window", "expected a duration above 0")
    slow_ratio = 0.5
    if "slow_ratio" in raw:
        slow_ratio = v.parsed("slow_ratio", _ratio, "expected a number from 0 (off) to below 1")

    metrics_addr = None
    if v.text("metrics_port"):  # an empty variable leaves it unset
        metrics_addr = v.parsed("metrics_port", _host_port, "expected [HOST:]PORT, PORT from 0 to 65535")

    ping_url = v.text("ping_url") or None
    if ping_url is not None and not re.match(r"^https?://[^/\s]+", ping_url):
        from supervisor.output.alerts import redact_url

        raise ConfigError(f"invalid --ping-url {redact_url(ping_url)!r} (from {raw['ping_url'][1]}): "
                          "expected an http:// or https:// URL")

    return Config(
        command=tuple(command),
        heartbeat_s=v.duration("heartbeat"),
        progress_file=progress_file or inside("PROGRESS.txt") or os.path.join(cwd, DEFAULT_PROGRESS_FILE),
        progress_file_explicit=progress_file is not None,
        stall_timeout_s=stall_timeout_s,
        stall_auto=stall_auto,
        startup_grace_s=startup_grace_s,
        silence_timeout_s=v.duration("silence_timeout"),
        progress_regex=progress_regex,
        on_stall=on_stall,
        on_stall_explicit="on_stall" in raw,
        kill_grace_s=v.duration("kill_grace"),
        max_restarts=max_restarts,
        restart_on_crash=v.flag("restart_on_crash"),
        log_path=log_path,
        events_path=events_path,
        timestamps=v.flag("timestamps"),
        alert_cmd=alert_cmd,
        alert_webhook=webhook,
        pty=v.flag("pty"),
        run_dir=run_dir,
        flight_recorder=flight_recorder,
        max_expect_s=max_expect_s,
        output_progress=v.flag("output_progress") if "output_progress" in raw else True,
        slow_window_s=slow_window_s,
        slow_ratio=slow_ratio,
        metrics_addr=metrics_addr,
        metrics_file=path("metrics_file") if v.text("metrics_file") else None,
        ping_url=ping_url,
    )
