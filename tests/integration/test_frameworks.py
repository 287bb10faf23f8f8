"""Real clients (issue 17): hangs in real frameworks flagged from their own progress output, with no
configuration, and healthy runs of the same scripts never flagged (SPEC 1.2).

tqdm runs in the default suite; Lightning (its TQDM bar on a pipe, its Rich bar under --pty)
and a Hugging Face Trainer import for 10-20 s of CPU each, so they are `heavy`.
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest

from tests.helpers import PY, ROOT, base_env, kill_tree_of, run_sup, start_sup, wait_for

FIXTURE = str(ROOT / "tests" / "fixtures" / "frameworks.py")
TIMEOUT_S = 4  # --stall-timeout
SLACK_S = 4.0  # "within the timeout + a few seconds", on a loaded 2-core machine
START_S = 90  # imports (torch, Lightning, transformers) on a busy machine


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]


def wall(event: dict) -> float:
    return datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def env() -> dict[str, str]:
    return base_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                    TOKENIZERS_PARALLELISM="false", COLUMNS="120")


def hang_is_flagged(tmp_path: Path, mode: str, hang_at: int, *options: str) -> dict:
    """Run mode until it hangs at step hang_at; return the stall event, after checking when it came."""
    ev, mark = tmp_path / "events.jsonl", tmp_path / "hung"
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = start_sup("--stall-timeout", str(TIMEOUT_S), "--heartbeat", "0", "--events", str(ev), *options,
                         child=[PY, FIXTURE, mode, "--steps", "1000", "--hang-at", str(hang_at), "--mark", str(mark),
                                "--out", str(tmp_path)], cwd=tmp_path, env=env(), stdout=out, stderr=err)
    try:
        wait_for(mark.exists, START_S, interval_s=0.1, what=f"{mode} to reach step {hang_at}")
        hung_at = float(mark.read_text())
        stall = wait_for(lambda: next((e for e in events(ev) if e["event"] == "stall"), None),
                         TIMEOUT_S * 5 + SLACK_S, interval_s=0.1, what="a stall")
        assert stall["source"] == "output-counters", stall
        assert stall["action"] == "warn", stall  # inferred evidence: flagged, not killed
        assert stall["age_s"] >= TIMEOUT_S
        assert wall(stall) - hung_at <= stall["limit_s"] + SLACK_S, (wall(stall) - hung_at, stall)
        assert proc.poll() is None, "warn must leave the job running"
        stderr = (tmp_path / "err").read_bytes()
        assert b"in output counters; action=warn" in stderr
        return stall
    finally:
        kill_tree_of(proc)


def healthy_is_never_flagged(tmp_path: Path, mode: str, steps: int, *options: str) -> None:
    ev = tmp_path / "healthy.jsonl"
    r = run_sup("--stall-timeout", str(TIMEOUT_S), "--heartbeat", "0", "--events", str(ev), *options,
                child=[PY, FIXTURE, mode, "--steps", str(steps), "--out", str(tmp_path)], cwd=tmp_path, env=env(),
                timeout_s=START_S + 60)
    seen = events(ev)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [e for e in seen if e["event"] == "stall"] == []
    assert {"event": "progress-first", "source": "output-counters"}.items() <= next(
        e for e in seen if e["event"] == "progress-first").items()


@pytest.mark.timeout(90)
def test_tqdm_hang_is_flagged_by_output_counters(tmp_path):
    stall = hang_is_flagged(tmp_path, "tqdm", 25)
    assert stall["limit_s"] == TIMEOUT_S  # a bar moving ten times a second: the timeout itself
    assert "25/1000" in stall["progress"] or "24/1000" in stall["progress"], stall["progress"]


@pytest.mark.timeout(90)
def test_tqdm_healthy_is_never_flagged(tmp_path):
    healthy_is_never_flagged(tmp_path, "tqdm", 80)  # 8 s: twice the timeout


@pytest.mark.timeout(90)
def test_batch_lines_on_spliced_stdout_beside_a_heartbeat_thread(tmp_path):
    """stdout into a file moves inside the kernel (splice): its counters are seen through tee; the
    heartbeat thread's clock and repeated counters on stderr hide nothing."""
    stall = hang_is_flagged(tmp_path, "batches", 20)
    # The last line whose counter moved: the batch line, or the heartbeat that repeated its new batch.
    assert stall["progress"] in ("Epoch 1/1 - Batch 19/1000 - Loss: 0.0526",) or stall["progress"].endswith(
        "epoch 1 batch 19"), stall["progress"]
    assert (tmp_path / "out").read_bytes().endswith(b"Batch 19/1000 - Loss: 0.0526\n")


@pytest.mark.heavy
@pytest.mark.timeout(240)
def test_lightning_tqdm_bar_on_a_pipe(tmp_path):
    stall = hang_is_flagged(tmp_path, "lightning-tqdm", 20)  # epoch 1, after a validation
    assert "Epoch 1" in stall["progress"], stall["progress"]
    healthy_is_never_flagged(tmp_path, "lightning-tqdm", 48)


@pytest.mark.heavy
@pytest.mark.timeout(240)
def test_lightning_rich_bar_under_pty(tmp_path):
    stall = hang_is_flagged(tmp_path, "lightning-rich", 20, "--pty")
    assert "Epoch 1" in stall["progress"] and "\\x1b" not in stall["progress"], stall["progress"]
    healthy_is_never_flagged(tmp_path, "lightning-rich", 48, "--pty")


@pytest.mark.heavy
@pytest.mark.timeout(240)
def test_hf_trainer_hanging_in_a_callback(tmp_path):
    hang_is_flagged(tmp_path, "hf", 12)
    healthy_is_never_flagged(tmp_path, "hf", 40)


def test_output_progress_off_judges_as_before(tmp_path):
    """--output-progress off: a hung tqdm loop is not flagged (no source), as without this feature."""
    ev = tmp_path / "events.jsonl"
    with open(tmp_path / "out", "wb") as out, open(tmp_path / "err", "wb") as err:
        proc = start_sup("--stall-timeout", "2", "--heartbeat", "0", "--events", str(ev), "--output-progress", "off",
                         child=[PY, FIXTURE, "tqdm", "--steps", "1000", "--hang-at", "5", "--mark",
                                str(tmp_path / "hung")], cwd=tmp_path, env=env(), stdout=out, stderr=err)
    try:
        wait_for((tmp_path / "hung").exists, 30, interval_s=0.1, what="the hang")
        time.sleep(0.1)
        deadline = time.monotonic() + 4  # twice the timeout: a stall would have come
        while time.monotonic() < deadline:
            assert not [e for e in events(ev) if e["event"] in ("stall", "progress-first")]
            time.sleep(0.2)
    finally:
        kill_tree_of(proc)


def test_explicit_on_stall_applies_to_output_counters(tmp_path):
    r = run_sup("--stall-timeout", "2", "--heartbeat", "0", "--on-stall", "kill", "--kill-grace", "1",
                child=[PY, FIXTURE, "tqdm", "--steps", "1000", "--hang-at", "10"], cwd=tmp_path, env=env(),
                timeout_s=60)
    assert r.returncode == 124
    assert b"in output counters; action=kill | train:" in r.stderr


def test_heartbeat_shows_the_counters_age_and_line(tmp_path):
    proc = start_sup("--stall-timeout", "600", "--heartbeat", "1",
                     child=[PY, FIXTURE, "tqdm", "--steps", "1000", "--hang-at", "10"], cwd=tmp_path, env=env(),
                     stdout=open(os.devnull, "wb"), stderr=open(tmp_path / "err", "wb"))
    try:
        line = wait_for(lambda: next((ln for ln in (tmp_path / "err").read_bytes().splitlines()
                                      if b"heartbeat" in ln and b"-ago" in ln), None), 30, what="a heartbeat")
        assert b"progress=" in line and b"| train:" in line and b"/1000" in line, line
    finally:
        kill_tree_of(proc)
