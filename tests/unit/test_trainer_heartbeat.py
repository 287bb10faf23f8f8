"""The heartbeat thread: the age of the last step, its period, and silence under the supervisor."""
import sys
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import tiny_config, wait_for  # noqa: E402

from trainer.heartbeat import Heartbeat, heartbeat_line  # noqa: E402
from trainer.run import run  # noqa: E402


def test_line_tells_the_age_of_the_last_step():
    at = datetime(2026, 11, 28, 14, 3, 5)
    assert heartbeat_line(at, 45.2, 3, 120, 900) == "[HEARTBEAT 14:03:05] last step 45s ago, epoch 3 batch 120"
    assert heartbeat_line(at, None, None, None, 12.4) == "[HEARTBEAT 14:03:05] no step yet, started 12s ago"


def test_age_grows_when_no_step_comes():
    now = [100.0]
    beat = Heartbeat(30, clock=lambda: now[0])
    beat.beat(epoch=2, batch=7)
    now[0] = 145.0
    assert beat.line().endswith("last step 45s ago, epoch 2 batch 7")
    beat.beat(epoch=2, batch=8)
    assert beat.line().endswith("last step 0s ago, epoch 2 batch 8")


def test_thread_prints_every_period_until_stopped():
    lines = []
    beat = Heartbeat(0.02, printer=lines.append).start()
    wait_for(lambda: len(lines) >= 3, 10, what="three heartbeats")
    beat.stop()
    count = len(lines)
    assert all(line.startswith("[HEARTBEAT ") for line in lines)
    assert not beat._thread.is_alive() and len(lines) == count


def test_zero_period_starts_no_thread():
    beat = Heartbeat(0).start()
    assert beat._thread is None
    beat.stop()


def test_run_prints_heartbeats_unless_supervised(tmp_path, capsys, monkeypatch):
    # 20 steps take well over the 10 ms heartbeat period
    config = dict(samples=100, epochs=1, heartbeat_s=0.01, log_every_s=3600)
    monkeypatch.delenv("MAGVIT_SUPERVISED", raising=False)
    assert run(tiny_config(tmp_path / "a", **config)) == 0
    assert "[HEARTBEAT " in capsys.readouterr().out

    monkeypatch.setenv("MAGVIT_SUPERVISED", "1")
    assert run(tiny_config(tmp_path / "b", **config)) == 0
    out = capsys.readouterr().out
    assert "[HEARTBEAT " not in out and "[PROGRESS] Epoch 1/1" in out
