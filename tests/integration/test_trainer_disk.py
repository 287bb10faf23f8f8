"""A full disk, for real: the trainer process under RLIMIT_FSIZE (writes past the limit fail
with EFBIG, as on a full disk with ENOSPC; no root tricks, no mounts)."""
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from trainer_helpers import TRAIN_PY, tiny_cli_args  # noqa: E402

from trainer.train import main  # noqa: E402

LIMIT_BYTES = 64  # below a progress file, a metrics file and any checkpoint


def small_files_only():
    # in the child, before exec: an ignored SIGXFSZ stays ignored, so a write past the
    # limit fails with EFBIG instead of killing the process
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT_BYTES, LIMIT_BYTES))


def test_failed_checkpoint_save_exits_74_keeping_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_cli_args(out, "--epochs", "1", "--heartbeat-s", "0")) == 0  # in-process: fast
    capsys.readouterr()
    checkpoint = (out / "checkpoint.pt").read_bytes()

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("MAGVIT_PROGRESS_FILE", None)
    done = subprocess.run([sys.executable, "-u", str(TRAIN_PY),
                           *tiny_cli_args(out, "--epochs", "2", "--heartbeat-s", "0")],
                          preexec_fn=small_files_only, env=env, capture_output=True, text=True,
                          timeout=50, stdin=subprocess.DEVNULL)

    assert done.returncode == 74, done.stderr
    # the progress file and metrics failed from the first write: a warning each, once,
    # and the epoch was trained all the same
    assert done.stderr.splitlines() == [
        f"train.py: warning: cannot write the progress file {out / 'PROGRESS.txt'} (File too large);"
        " training goes on (said once)",
        f"train.py: warning: cannot write metrics {out / 'metrics.jsonl'} (File too large);"
        " training goes on (said once)",
        "train.py: error: checkpoint save failed: File too large; previous checkpoint at step 4 kept"]
    assert "  Batch 4/4 - Loss: " in done.stdout and "[PROGRESS] Epoch 2/2" in done.stdout
    assert (out / "checkpoint.pt").read_bytes() == checkpoint
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
