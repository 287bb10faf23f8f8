"""SIGUSR1/SIGUSR2 reach the processes that catch them: torchrun's ranks, not torchrun (SPEC 5, issue 10).

Slurm warns a job with SIGUSR1 before its time limit. Sent to the group, it reaches
torchrun (which has no handler and dies of it) and never the ranks in their own
sessions. Real torchrun, two real ranks with a handler.
"""
import os
import shutil
import signal
import sys

import pytest

from helpers import LineReader, base_env, kill_tree_of, start_sup, wait_for

RANK = """
import os, signal, sys, threading, time
out = sys.argv[1]
def on_usr1(*_):
    open(os.path.join(out, "usr1-rank" + os.environ["RANK"]), "w").write("caught")
    os._exit(0)
signal.signal(signal.SIGUSR1, on_usr1)
open(os.path.join(out, "ready-rank" + os.environ["RANK"]), "w").write(str(os.getpid()))
threading.Event().wait(120)
"""


@pytest.mark.timeout(120)
def test_sigusr1_reaches_both_ranks_and_torchrun_survives_it(tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    if torchrun is None:
        pytest.skip("torchrun is not installed (the [trainer] extra)")
    script = tmp_path / "rank.py"
    script.write_text(RANK)
    events = tmp_path / "ev"
    p = start_sup("--events", str(events), "--heartbeat", "0",
                  child=[torchrun, "--standalone", "--nproc-per-node", "2", str(script), str(tmp_path)],
                  cwd=tmp_path, env=base_env(OMP_NUM_THREADS="1"))
    err = LineReader(p.stderr)
    try:
        wait_for(lambda: all((tmp_path / f"ready-rank{r}").exists() for r in (0, 1)), 90, what="both ranks")
        p.send_signal(signal.SIGUSR1)
        wait_for(lambda: all((tmp_path / f"usr1-rank{r}").exists() for r in (0, 1)), 20, what="both handlers")
        status = p.wait(timeout=60)
        err.pump()
        # The ranks exited 0 from their handlers, so torchrun finished its job: it did not die of SIGUSR1.
        assert status == 0, err.data[-3000:]
        sent = [line for line in events.read_text().splitlines() if '"signal"' in line and "SIGUSR1" in line]
        assert len(sent) == 1 and '"target": "catchers"' in sent[0]
    finally:
        if p.poll() is None:
            kill_tree_of(p)
