"""Options of magvit-supervise: parsing, environment defaults, validation.

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

ENV_PREFIX = "MAGVIT_SUPERVISE_"
DEFAULT_PROGRESS_FILE = "PROGRESS.txt"
ON_STALL_CHOICES = ("warn", "kill", "restart")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(s|m|h)?\s*$")
_UNIT_S = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class ConfigError(ValueError):
    """A bad option: the message is the whole one-line reason."""


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
    kill_grace_s: float = 30.0
    max_restarts: int = 3
    restart_on_crash: bool = False
    log_path: str | None = None
    events_path: str | None = None
    timestamps: bool = False
    alert_cmd: tuple[str, ...] = ()
    alert_webhook: str | None = None
    pty: bool = False


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
    )
    add = p.add_argument
    add("--heartbeat", metavar="S", help="heartbeat after S seconds without output (0: off; default 30)")
    add("--progress-file", metavar="PATH", help="file (or glob) whose updates count as progress (default PROGRESS.txt)")
    add("--stall-timeout", metavar="S|auto", help="no progress for S seconds is a stall (0: off; default 600)")
    add("--startup-grace", metavar="S", help="first progress is due within S seconds (default: the stall timeout)")
    add("--silence-timeout", metavar="S", help="no output for S seconds is a stall (default 0: off)")
    add("--progress-regex", metavar="RE", help="output lines matching RE count as progress")
    add("--on-stall", metavar="ACTION", help="warn, kill or restart (default kill)")
    add("--kill-grace", metavar="S", help="seconds between SIGTERM and SIGKILL (default 30)")
    add("--max-restarts", metavar="N", help="restarts allowed (default 3)")
    add("--restart-on-crash", action="store_const", const="1", help="also restart on a non-zero exit or a signal")
    add("--log", metavar="PATH", help="append every line, timestamped and tagged, to PATH")
    add("--events", metavar="PATH", help="append one JSON object per supervisor event to PATH")
    add("--timestamps", action="store_const", const="1", help="prefix relayed lines with HH:MM:SS.mmm")
    add("--alert-cmd", metavar="CMD", help="run CMD (split like a shell, run without one) on each alert")
    add("--alert-webhook", metavar="URL", help="POST each alert as JSON to URL")
    add("--pty", action="store_const", const="1", help="run the child on a pseudo-terminal")
    add("command", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
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


def _raw_options(argv: list[str], environ: dict[str, str]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """Merge environment and command line into {dest: (text, source)}; the command line wins."""
    ns = _parser().parse_args(argv)
    command = list(ns.command)
    if command and command[0] == "--":
        command = command[1:]
    raw: dict[str, tuple[str, str]] = {}
    for dest, value in vars(ns).items():
        if dest == "command":
            continue
        env_name = ENV_PREFIX + dest.upper()
        if value is not None:
            raw[dest] = (value, "command line")
        elif env_name in environ:
            raw[dest] = (environ[env_name], env_name)
    return raw, command


def parse_config(argv: list[str], environ: dict[str, str] | None = None, cwd: str | None = None) -> Config:
    """Build a validated Config from argv and MAGVIT_SUPERVISE_* variables."""
    environ = os.environ if environ is None else environ
    cwd = os.getcwd() if cwd is None else cwd
    raw, command = _raw_options(argv, environ)
    if not command:
        raise ConfigError("no command given (put it after --)")

    def text(dest: str) -> str | None:
        return raw[dest][0] if dest in raw else None

    def duration(dest: str, default: float) -> float:
        if dest not in raw:
            return default
        value, source = raw[dest]
        return parse_duration("--" + dest.replace("_", "-"), value, source)

    def flag(dest: str) -> bool:
        if dest not in raw:
            return False
        value, source = raw[dest]
        return _parse_flag("--" + dest.replace("_", "-"), value, source)

    stall_auto = (text("stall_timeout") or "").strip().lower() == "auto"
    stall_timeout_s = 600.0 if stall_auto else duration("stall_timeout", 600.0)
    startup_grace_s = duration("startup_grace", 600.0 if stall_auto else stall_timeout_s)

    on_stall = (text("on_stall") or "kill").strip().lower()
    if on_stall not in ON_STALL_CHOICES:
        raise ConfigError(
            f"invalid --on-stall {text('on_stall')!r} (from {raw['on_stall'][1]}): expected warn, kill or restart"
        )

    max_restarts = 3
    if "max_restarts" in raw:
        value, source = raw["max_restarts"]
        if not value.strip().isdigit():
            raise ConfigError(f"invalid --max-restarts {value!r} (from {source}): expected a whole number >= 0")
        max_restarts = int(value)

    progress_regex = None
    if text("progress_regex") is not None:
        value, source = raw["progress_regex"]
        try:
            # MULTILINE: ^ and $ anchor at each line of a chunk, searched in one pass.
            progress_regex = re.compile(value.encode("utf-8", "surrogateescape"), re.MULTILINE)
        except re.error as e:
            raise ConfigError(f"invalid --progress-regex {value!r} (from {source}): {e}") from None

    alert_cmd: tuple[str, ...] = ()
    if text("alert_cmd") is not None:
        value, source = raw["alert_cmd"]
        try:
            alert_cmd = tuple(shlex.split(value))
        except ValueError as e:
            raise ConfigError(f"invalid --alert-cmd {value!r} (from {source}): {e}") from None
        if not alert_cmd:
            raise ConfigError(f"invalid --alert-cmd {value!r} (from {source}): empty command")

    webhook = text("alert_webhook")
    if webhook is not None and not re.match(r"^https?://[^/\s]+", webhook):
        raise ConfigError(
            f"invalid --alert-webhook {webhook!r} (from {raw['alert_webhook'][1]}): expected an http:// or https:// URL"
        )

    progress_file = text("progress_file")
    if progress_file is not None and not progress_file.strip():
        raise ConfigError(f"invalid --progress-file '' (from {raw['progress_file'][1]}): empty path")

    return Config(
        command=tuple(command),
        heartbeat_s=duration("heartbeat", 30.0),
        progress_file=os.path.join(cwd, progress_file or DEFAULT_PROGRESS_FILE),
        progress_file_explicit=progress_file is not None,
        stall_timeout_s=stall_timeout_s,
        stall_auto=stall_auto,
        startup_grace_s=startup_grace_s,
        silence_timeout_s=duration("silence_timeout", 0.0),
        progress_regex=progress_regex,
        on_stall=on_stall,
        kill_grace_s=duration("kill_grace", 30.0),
        max_restarts=max_restarts,
        restart_on_crash=flag("restart_on_crash"),
        log_path=text("log") or None,
        events_path=text("events") or None,
        timestamps=flag("timestamps"),
        alert_cmd=alert_cmd,
        alert_webhook=webhook,
        pty=flag("pty"),
    )
