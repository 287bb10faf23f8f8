"""Formats users grep for: durations, sizes, supervisor lines, log prefixes, events."""
import json
import re

import pytest

from supervisor.output import lines
from supervisor.output.events import make_event
from supervisor.output.lines import fmt_bytes, fmt_duration, fmt_limit, printable, sup_line
from supervisor.output.sinks import EventLog, LogFile


def test_durations_and_limits():
    assert [fmt_duration(s) for s in (0, 45, 303, 7440, 3 * 86400 + 4 * 3600)] == ["0s", "45s", "5m03s", "2h04m",
                                                                                   "3d04h"]
    assert [fmt_limit(s) for s in (1.5, 600, 7200, 90)] == ["1.5s", "10m", "2h", "1m30s"]


def test_bytes():
    assert [fmt_bytes(n) for n in (12, 2048, 5 << 20, int(2.1 * (1 << 30)))] == ["12B", "2.0K", "5.0M", "2.1G"]


def test_sup_line_shape():
    assert re.fullmatch(r"\[supervise \d\d:\d\d:\d\d\] heartbeat pid=1", sup_line("heartbeat pid=1"))


@pytest.mark.parametrize("raw,shown", [
    ("plain text, ünïcode and 中文", "plain text, ünïcode and 中文"),
    ("x\udcff", "x\\xff"),  # a byte that was not UTF-8 (argv, a file name: surrogateescape)
    (b"bad \xff\xfe bytes", "bad \\xff\\xfe bytes"),
    ("\x1b[2J\x1b]0;owned\x07", "\\x1b[2J\\x1b]0;owned\\x07"),  # clear screen, set title, bell
    ("one\nfake [supervise 00:00:00] line\r", "one\\nfake [supervise 00:00:00] line\\r"),
    ("\x9b31m", "\\x9b31m"),  # a C1 control: CSI on some terminals
    ("tab\there", "tab\\there"),
])
def test_printable_escapes_what_could_act_on_a_terminal_or_forge_a_line(raw, shown):
    assert printable(raw) == shown
    assert "\n" not in sup_line(raw) and "\x1b" not in sup_line(raw)


def test_events_are_strict_json_whatever_the_text(tmp_path):
    ev = EventLog(str(tmp_path / "e"))
    ev.emit(make_event("start", 0.0, argv=["sh", "x\udcff\x1b"], pid=1, attempt=0))
    ev.emit(make_event("heartbeat", 0.0, cpu_percent=float("nan"), progress="\ud800 lone"))
    ev.close()
    text = (tmp_path / "e").read_text(encoding="utf-8")  # strict UTF-8: no lone surrogate got through
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["argv"] == ["sh", "x\\xff\x1b"]
    assert second["cpu_percent"] is None and second["progress"] == "\\ud800 lone"
    assert "NaN" not in text


def test_log_and_event_files(tmp_path):
    log = LogFile(str(tmp_path / "l"))
    log.write_lines(0.0, "out", [b"a", b"\xffb"])
    log.write_lines(0.0, "out+", [b"c"])
    log.close()
    assert (tmp_path / "l").read_bytes() == (b"1970-01-01T00:00:00.000Z out| a\n1970-01-01T00:00:00.000Z out| \xffb\n"
                                             b"1970-01-01T00:00:00.000Z out+| c\n")
    ev = EventLog(str(tmp_path / "e"))
    ev.emit(make_event("exit", 0.0, status=3))
    ev.close()
    obj = json.loads((tmp_path / "e").read_text())
    assert list(obj) == ["ts", "event", "status"] and obj["ts"] == "1970-01-01T00:00:00.000Z"


def test_a_full_disk_turns_a_file_off_once_and_it_comes_back(tmp_path):
    log = LogFile("/dev/full")
    log.write_lines(0.0, "out", [b"lost"])
    log.flush()  # ENOSPC: never raised
    assert log.news() == [("failed", "No space left on device")]
    log.write_lines(0.0, "out", [b"also lost"])
    log.flush()
    assert log.news() == [] and log.lost == 2
    log.path = str(tmp_path / "good")  # the disk got space back (a path that works, for the test)
    log.retry(now=1e12)
    assert log.news() == [("restored", 2)]
    log.write_lines(0.0, "out", [b"back"])
    log.close()
    assert (tmp_path / "good").read_bytes().endswith(b"out| back\n")


def test_a_fifo_with_no_reader_fails_at_once_instead_of_hanging(tmp_path):
    import os

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as e:
        LogFile(str(fifo))
    assert "no reader" in str(e.value)


# ----- every supervisor line, from its event ------------------------------------------------------


def test_heartbeat_line_from_its_event():
    ev = make_event("heartbeat", 0.0, pid=42, silent_s=30.2, progress_age_s=12.0, cpu_percent=98.4,
                    rss_bytes=int(2.1 * (1 << 30)), progress="Epoch 3/100 - Batch 120/400", expect_s=None,
                    eta_s=4800, up_s=303)
    assert lines.heartbeat_line(ev) == ("heartbeat pid=42 up=5m03s silent=30s progress=12s-ago cpu=98% rss=2.1G "
                                        "eta=1h20m | Epoch 3/100 - Batch 120/400")
    ev.update(progress_age_s=None, progress=None, expect_s=900.0, eta_s=None)
    assert lines.heartbeat_line(ev).endswith("progress=none cpu=98% rss=2.1G expect=15m")


def test_stall_line_names_the_file_its_limit_and_the_action():
    ev = make_event("stall", 0.0, kind="progress", source="/r/P.txt", age_s=602, limit_s=600.0,
                    progress="Epoch 3/100", action="kill", declared=False)
    assert lines.stall_line(ev, "P.txt") == ("STALL no progress for 10m02s (limit 10m) in P.txt; action=kill "
                                             "| Epoch 3/100")
    ev.update(declared=True, limit_s=3.0, age_s=3.1, progress=None)
    assert lines.stall_line(ev, "P.txt") == "STALL no progress for 3s (limit declared 3s) in P.txt; action=kill"
    silence = make_event("stall", 0.0, kind="silence", source="output", age_s=61, limit_s=60.0, action="warn")
    assert lines.stall_line(silence, "output") == "STALL no output for 1m01s (limit 1m); action=warn"


def test_alert_lines_carry_their_kind_in_capitals():
    assert lines.restart_line({"attempt": 2, "backoff_s": 2.0, "reason": "stall"}, 3, 124) == \
        "RESTART attempt 2/3 after stall (status 124) in 2s"
    assert lines.gave_up_line({"reason": "max restarts (3) reached"}) == "GAVE-UP max restarts (3) reached"
    assert lines.orphans_line({"pids": [7, 8]}, 30.0) == \
        "ORPHANS 2 process(es) left behind by the child: [7, 8]; SIGTERM, SIGKILL after 30s"
    assert lines.unkillable_line({"pids": [9], "states": ["D"], "wchan": ["__refrigerator"]}).startswith(
        "UNKILLABLE 1 process(es) survived SIGKILL (stuck in the kernel): pid=9 state=D wchan=__refrigerator")
    assert lines.gpu_holders_line({"pids": [5], "cmds": ["python x.py"]}, waiting=True).startswith(
        "GPU-HOLDERS 1 process(es) outside the tree hold /dev/nvidia*: pid=5 cmd=python x.py")
    assert lines.exit_line({"status": 0, "reason": "exited", "runtime_s": 75.2, "restarts": 1, "stalls": 1}) == \
        "exit status=0 reason=exited runtime=1m15s restarts=1 stalls=1"
    assert lines.exit_line({"status": 130, "reason": "user-signal", "runtime_s": 2, "restarts": 0, "stalls": 0,
                            "not_restarted": "the user's SIGINT ended it"}) == \
        "exit status=130 reason=user-signal runtime=2s restarts=0 stalls=0 (not restarted: the user's SIGINT ended it)"


def test_sink_lines_name_the_sink_and_the_reason():
    failed = {"sink": "log", "path": "/d/x.log", "error": "No space left on device"}
    assert lines.sink_failed_line(failed, retry=True) == ("--log file /d/x.log failed: No space left on device; "
                                                          "turned off, the child runs on; retrying once a minute")
    assert lines.sink_restored_line({"sink": "log", "path": "/d/x.log", "lost": 3}) == \
        "--log file /d/x.log works again (3 lines lost while it failed)"
