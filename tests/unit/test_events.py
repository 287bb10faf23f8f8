"""Formats users grep for: durations, sizes, supervisor lines, log prefixes, events."""
import json
import re

from supervisor.events import EventLog, LogFile, fmt_bytes, fmt_duration, fmt_limit, make_event, sup_line


def test_durations_and_limits():
    assert [fmt_duration(s) for s in (0, 45, 303, 7440)] == ["0s", "45s", "5m03s", "2h04m"]
    assert [fmt_limit(s) for s in (1.5, 600, 7200, 90)] == ["1.5s", "10m", "2h", "1m30s"]


def test_bytes():
    assert [fmt_bytes(n) for n in (12, 2048, 5 << 20, int(2.1 * (1 << 30)))] == ["12B", "2.0K", "5.0M", "2.1G"]


def test_sup_line_shape():
    assert re.fullmatch(r"\[supervise \d\d:\d\d:\d\d\] heartbeat pid=1", sup_line("heartbeat pid=1"))


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
