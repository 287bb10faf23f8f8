"""Two CPU ranks under torchrun (gloo): per-rank progress files, one agreed stop, one checkpoint."""
import os
import signal
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import TRAIN_PY, Child, tiny_cli_args  # noqa: E402

from trainer.checkpoint import load_checkpoint  # noqa: E402

TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed beside python")
@pytest.mark.heavy  # torchrun and two ranks: three torch start-ups, 7 s of CPU
def test_two_ranks_stop_together_on_sigterm(tmp_path):
    out = tmp_path / "run"
    # batch 2 on each of 2 ranks: 16 training clips make 4 steps per epoch per rank
    args = tiny_cli_args(out, "--epochs", "30", "--batch-size", "2", "--heartbeat-s", "0")
    child = Child([str(TRAIN_PY), *args], command=[str(TORCHRUN), "--standalone",
                                                   "--nproc-per-node", "2"])
    try:
        child.wait_line("  Batch 2/4", timeout_s=60)
        # as the supervisor does: the signal reaches torchrun, which passes it to the ranks
        os.kill(child.proc.pid, signal.SIGTERM)
        assert child.wait(timeout_s=45) != 0
    finally:
        child.kill()
    stopped = child.wait_line("Stopped on SIGTERM before step ")
    next_step = int(stopped.split("before step ")[1].split(";")[0])
    # the ranks agree every 4 steps (and at epoch ends), so the stop is on such a step
    assert (next_step - 1) % 4 == 0
    assert load_checkpoint(out / "checkpoint.pt")["next_step"] == next_step
    assert sorted(p.name for p in out.glob("PROGRESS*.txt")) == ["PROGRESS-rank0.txt",
                                                                  "PROGRESS-rank1.txt"]
    for rank in (0, 1):
        assert (out / f"PROGRESS-rank{rank}.txt").read_text().startswith("Epoch ")
    # only rank 0 prints batch lines
    assert sum(1 for line in child.out if line == "Epoch 1/30") == 1
