"""SLOW on a real child whose speed is known: one episode for one slowdown, none for jitter (SPEC 1.3)."""
import re
import shlex
from datetime import datetime, timezone

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import PY, ROOT, events_of, run_sup, sup_lines

RATE_CHILD = str(ROOT / "tests" / "fixtures" / "rate_child.py")
WINDOW_S = 2


def unix(ts):
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


# The alert hook: appends the event's name to a file.
HOOK = "import os, sys; open(sys.argv[1], 'a').write(os.environ['SUPERVISE_EVENT'] + '\\n')"


def supervise(tmp_path, phases, jitter=0.0):
    progress = tmp_path / "PROGRESS.txt"
    events = tmp_path / "events.jsonl"
    hook = shlex.join([PY, "-c", HOOK, str(tmp_path / "alerts")])
    done = run_sup("--progress-file", str(progress), "--events", str(events), "--heartbeat", "1",
                   "--alert-cmd", hook, "--metrics-file", str(tmp_path / "job.prom"),
                   "--stall-timeout", "10", "--slow-window", str(WINDOW_S), "--on-stall", "warn",
                   child=[PY, RATE_CHILD, str(progress), phases, str(jitter)], cwd=tmp_path, timeout_s=90)
    phase_at = {int(k): float(t) for k, t in re.findall(rb"phase (\d+) at ([\d.]+)", done.stdout)}
    return done, events_of(events), phase_at


@pytest.mark.timeout(120)
def test_fast_slow_fast_is_one_slow_and_one_slow_ended(tmp_path):
    done, events, phase_at = supervise(tmp_path, "6:20,5:2,5:20")
    assert done.returncode == 0, done.stderr.decode()
    slow = [e for e in events if e["event"] == "slow"]
    ended = [e for e in events if e["event"] == "slow-ended"]
    assert len(slow) == 1 and len(ended) == 1, [e["event"] for e in events]
    flagged_after = unix(slow[0]["ts"]) - phase_at[1]
    assert 0 < flagged_after <= WINDOW_S + 3, flagged_after
    assert slow[0]["typical_rate"] == pytest.approx(20, rel=0.2)
    assert slow[0]["rate"] < 0.5 * slow[0]["typical_rate"]
    assert (slow[0]["window_s"], slow[0]["source"]) == (WINDOW_S, "PROGRESS.txt")
    assert unix(ended[0]["ts"]) > phase_at[2] and ended[0]["duration_s"] > 0
    lines = sup_lines(done.stderr)
    slow_line = next(line for line in lines if " SLOW " in line)
    assert re.search(r"SLOW progress rate [\d.]+ steps/s over the last 2s, 0\.\d\dx the run's typical [\d.]+ steps/s"
                     r" \| step \d+$", slow_line), slow_line
    assert any(" slow-ended after " in line for line in lines)
    assert any(re.search(r" heartbeat .* rate=[\d.]+/s", line) for line in lines)
    assert not any(e["event"] == "stall" for e in events)
    assert (tmp_path / "alerts").read_text() == "slow\n"  # the hooks fire for SLOW, not for its end
    metrics = {s.name: s.value for f in text_string_to_metric_families((tmp_path / "job.prom").read_text())
               for s in f.samples}
    # The last window's rate: the fast phase's, less the moments after the child's last step.
    assert 10 < metrics["magvit_supervise_progress_rate"] < 25
    assert metrics["magvit_supervise_slow"] == 0 and metrics["magvit_supervise_step"] > 200


@pytest.mark.timeout(120)
def test_a_steady_jittery_job_is_never_slow(tmp_path):
    done, events, _ = supervise(tmp_path, "10:20", jitter=0.6)
    assert done.returncode == 0, done.stderr.decode()
    assert [e for e in events if e["event"].startswith("slow")] == []
    rates = [e["rate"] for e in events if e["event"] == "heartbeat" and e.get("rate") is not None]
    assert rates and all(10 < r < 30 for r in rates), rates


@pytest.mark.timeout(120)
def test_slow_from_a_tqdm_bar_with_no_progress_file(tmp_path):
    """Output counters feed the rate (SPEC 1.3): a bar of 100 steps an epoch, back at 0 each epoch."""
    events = tmp_path / "events.jsonl"
    done = run_sup("--events", str(events), "--heartbeat", "1", "--stall-timeout", "10", "--slow-window",
                   str(WINDOW_S), child=[PY, RATE_CHILD, "-", "6:20,5:2,5:20"], cwd=tmp_path, timeout_s=90)
    assert done.returncode == 0, done.stderr.decode(errors="replace")
    phase_at = {int(k): float(t) for k, t in re.findall(rb"phase (\d+) at ([\d.]+)", done.stdout)}
    found = events_of(events)
    slow = [e for e in found if e["event"] == "slow"]
    assert len(slow) == 1 and len([e for e in found if e["event"] == "slow-ended"]) == 1
    assert slow[0]["source"] == "output-counters" and "/100" in slow[0]["progress"]
    assert slow[0]["typical_rate"] == pytest.approx(20, rel=0.2)  # epochs start again at 0: no negative advance
    assert 0 < unix(slow[0]["ts"]) - phase_at[1] <= WINDOW_S + 3
