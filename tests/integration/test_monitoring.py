"""Prometheus metrics and the dead-man's switch on a real run (SPEC 12): a real scraper, a real ping server."""
import json
import os
import re
import socket
import time
import threading
import urllib.request
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import PY, LineReader, base_env, kill_tree_of, run_sup, start_sup, sup_lines, wait_for
from ping_server import PingServer

# First launch: steps for a second, then hangs (a stall); after the restart: steps, then exits 3.
JOB = """
import os, sys, time
path = os.environ["MAGVIT_PROGRESS_FILE"]
first = os.environ["MAGVIT_RESTART_COUNT"] == "0"
for step in range(1, 16):
    with open(path + ".tmp", "w") as f:
        f.write(f"Step {step}/100\\nstep: {step}\\n")
    os.replace(path + ".tmp", path)
    time.sleep(0.1)
if first:
    time.sleep(120)
time.sleep(1.5)
sys.exit(3)
"""
NAMES = {"up": "gauge", "stalls": "counter", "restarts": "counter", "progress_age_seconds": "gauge",
         "last_progress_timestamp_seconds": "gauge", "step": "gauge", "progress_rate": "gauge", "slow": "gauge",
         "rss_bytes": "gauge", "cpu_percent": "gauge", "eta_seconds": "gauge", "exit_status": "gauge"}


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def parse(text: str) -> dict:
    """{name: (type, {run label: value})} of a scrape, by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        name = family.name.removeprefix("magvit_supervise_")
        found[name] = (family.type, {s.labels["run"]: s.value for s in family.samples})
    return found


def value(metrics: dict, name: str, run: str):
    return metrics[name][1].get(run)


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse(r.read().decode())


def metrics_port(reader: LineReader) -> int:
    data = reader.wait_for(b"/metrics", timeout_s=20)
    return int(re.search(rb"metrics at http://127\.0\.0\.1:(\d+)/metrics", data).group(1))


@pytest.mark.timeout(120)
def test_metrics_and_pings_through_a_stall_a_restart_and_the_end(tmp_path):
    pings = PingServer()
    prom = tmp_path / "textfile" / "job.prom"
    prom.parent.mkdir()
    events = tmp_path / "events.jsonl"
    proc = start_sup("--run-dir", str(tmp_path / "run-42"), "--events", str(events), "--heartbeat", "0.5",
                     "--stall-timeout", "2", "--on-stall", "restart", "--max-restarts", "1", "--kill-grace", "1",
                     "--metrics-port", "0", "--metrics-file", str(prom), "--ping-url", pings.url + "/secret-uuid",
                     child=[PY, "-c", JOB], cwd=tmp_path)
    try:
        reader = LineReader(proc.stderr)
        port = metrics_port(reader)
        running = wait_for(lambda: (m := scrape(port)) and value(m, "step", "run-42") and m, 20, what="a step")
        assert {name: kind for name, (kind, _) in running.items()} == NAMES
        assert value(running, "up", "run-42") == 1
        assert value(running, "stalls", "run-42") == 0
        assert 0 <= value(running, "progress_age_seconds", "run-42") < 5
        assert abs(value(running, "last_progress_timestamp_seconds", "run-42") - time.time()) < 5
        assert value(running, "exit_status", "run-42") is None  # not before the end
        stalled = wait_for(lambda: (m := scrape(port)) and value(m, "stalls", "run-42") == 1 and m, 30,
                           what="the stall counted")
        assert value(stalled, "progress_age_seconds", "run-42") >= 2
        assert proc.wait(60) == 3
    finally:
        kill_tree_of(proc)
        pings.close()
    final = parse(prom.read_text())
    assert {n: value(final, n, "run-42") for n in ("up", "stalls", "restarts", "exit_status")} == \
        {"up": 0, "stalls": 1, "restarts": 1, "exit_status": 3}
    assert os.listdir(prom.parent) == ["job.prom"]  # no temporary file left behind
    paths = pings.paths()
    assert paths[0] == "/secret-uuid/start" and paths[-1] == "/secret-uuid/3"
    fail = paths.index("/secret-uuid/fail")
    assert paths.count("/secret-uuid/start") == 2 and paths.index("/secret-uuid/start", 1) > fail
    assert set(paths[fail + 1:paths.index("/secret-uuid/start", 1)]) == set()  # no heartbeat ping while stalled
    assert "/secret-uuid" in paths[1:fail]  # heartbeat pings while it ran
    bodies = dict(pings.requests)
    assert bodies["/secret-uuid/fail"].startswith("STALL no progress")
    assert bodies["/secret-uuid/3"].startswith("exit status=3")
    text = reader.pump().decode() + events.read_text()
    assert "STALL" in text
    assert "secret" not in text


def test_a_port_in_use_is_one_line_and_125(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_sup("--metrics-port", str(port), child=[PY, "-c", "print('ran')"], cwd=tmp_path)
    assert done.returncode == 125 and done.stdout == b""
    assert done.stderr.decode().splitlines() == [
        f"magvit-supervise: --metrics-port 127.0.0.1:{port}: Address already in use"]


def test_without_prometheus_client_it_says_how_to_install_it(tmp_path):
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    env = base_env()
    env["PYTHONPATH"] = f"{shadow.parent}{os.pathsep}{env['PYTHONPATH']}"
    done = run_sup("--metrics-file", str(tmp_path / "m.prom"), child=[PY, "-c", "print('ran')"], cwd=tmp_path,
                   env=env)
    assert done.returncode == 125 and done.stdout == b""
    [line] = done.stderr.decode().splitlines()
    assert "prometheus-client" in line and "magvit-supervise[metrics]" in line


def test_a_failing_ping_service_is_one_alert_failed_per_outage(tmp_path):
    pings = PingServer(status=500)
    events = tmp_path / "events.jsonl"
    try:
        done = run_sup("--heartbeat", "0.3", "--events", str(events), "--ping-url", pings.url + "/secret-uuid",
                       child=[PY, "-c", "import time; time.sleep(3)"], cwd=tmp_path, timeout_s=60)
    finally:
        pings.close()
    assert done.returncode == 0
    assert len(pings.requests) >= 4  # start, heartbeat pings, the end
    failed = [json.loads(line) for line in events.read_text().splitlines() if '"alert-failed"' in line]
    assert [(e["hook"], e["error"]) for e in failed] == [("ping", f"{pings.url}: HTTP 500 Internal Server Error")]
    assert [line for line in sup_lines(done.stderr) if "failed" in line][0].endswith(
        f"alert ping failed: {pings.url}: HTTP 500 Internal Server Error")
    assert b"secret" not in done.stderr


# Prints its own clock every 0.5 s until told to stop: the relay's delay is the reader's clock minus it.
TICKER = """
import os, sys, time
while not os.path.exists(sys.argv[1]):
    print(f"tick {time.time():.3f}", flush=True)
    time.sleep(0.5)
"""


@pytest.mark.xdist_group("serial")  # times itself: with the other timing tests, one at a time
@pytest.mark.timeout(180)
def test_a_hostile_scraper_never_delays_the_relay_or_a_heartbeat(tmp_path):
    stop = tmp_path / "stop"
    events = tmp_path / "events.jsonl"
    proc = start_sup("--heartbeat", "0.3", "--events", str(events), "--metrics-port", "0",
                     child=[PY, "-c", TICKER, str(stop)], cwd=tmp_path)
    delays = []

    def relay_delays():
        for line in proc.stdout:
            if line.startswith(b"tick "):
                delays.append(time.time() - float(line.split()[1]))

    reader_thread = threading.Thread(target=relay_delays, daemon=True)
    reader_thread.start()
    try:
        port = metrics_port(LineReader(proc.stderr))
        silent = socket.create_connection(("127.0.0.1", port))  # connects, never sends a request
        started = time.time()
        scrape(port)
        assert time.time() - started < 5  # the silent connection holds a thread of its own, not the server
        for _ in range(999):
            last = scrape(port)
        scraped_for = time.time() - started
        assert last["up"][1] == {"python": 1.0}  # the run label: the command's first word
        stop.touch()
        assert proc.wait(30) == 0
        silent.close()
    finally:
        kill_tree_of(proc)
    reader_thread.join(10)
    beats = [json.loads(line) for line in events.read_text().splitlines() if '"heartbeat"' in line]
    times = [datetime.strptime(b["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()
             for b in beats]
    during = [t for t in times if started <= t <= started + scraped_for]
    gaps = [b - a for a, b in zip(during, during[1:])]
    print(f"1000 scrapes in {scraped_for:.1f}s; {len(during)} heartbeats, largest gap {max(gaps):.2f}s; "
          f"relay delay at most {max(delays):.3f}s over {len(delays)} lines")
    assert len(during) >= scraped_for / 1.5 and max(gaps) < 1.5  # every 0.3 s after a print, at most 0.5 s apart
    assert len(delays) >= scraped_for / 1.0 and max(delays) < 1.0


def test_a_metrics_file_that_cannot_be_written_is_one_line_and_the_child_runs_on(tmp_path):
    events = tmp_path / "events.jsonl"
    target = tmp_path / "missing-folder" / "job.prom"
    done = run_sup("--heartbeat", "0.3", "--events", str(events), "--metrics-file", str(target),
                   child=[PY, "-c", "import time; time.sleep(2); print('finished')"], cwd=tmp_path)
    assert done.returncode == 0 and done.stdout == b"finished\n"
    failed = [line for line in sup_lines(done.stderr) if "--metrics-file" in line]
    assert len(failed) == 1 and "No such file or directory" in failed[0], failed
    assert '"sink": "metrics-file"' in events.read_text()
    assert not target.parent.exists()
