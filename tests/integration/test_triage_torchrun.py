"""Stack triage on the real thing (SPEC 4): three CPU ranks under torchrun (gloo), rank 2 hangs.

The supervisor declares the stall, and its diagnosis names rank 2, in the injected hang, as
the odd one out, and groups ranks 0 and 1, which wait for it in collectives.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, base_env, kill_tree_of, sup_argv, sup_lines

TORCHRUN_MODULE = ["-m", "torch.distributed.run"]
TRAIN_PY = str(ROOT / "trainer" / "train.py")


@pytest.mark.skipif(not Path(sys.executable).with_name("torchrun").exists(), reason="torch is not installed")
@pytest.mark.timeout(300)  # ~35 s alone; three torch imports on a loaded machine take longer
@pytest.mark.heavy  # the real trainer, twice or three ranks: bin/test -m heavy and CI run it
def test_three_ranks_the_hung_one_is_named_and_the_waiting_ones_grouped(tmp_path):
    run = tmp_path / "run"
    events = tmp_path / "events.jsonl"
    command = [sys.executable, *TORCHRUN_MODULE, "--standalone", "--nproc-per-node", "3", TRAIN_PY,
               "--samples", "20", "--frames", "4", "--size", "16", "--batch-size", "2", "--epochs", "5",
               "--log-every-s", "0", "--heartbeat-s", "0", "--fault", "hang:6:2"]
    # Startup (three torch imports on a busy machine) is covered by the grace; once steps run,
    # every rank's file changes at least once a second, so 8 s without one is the hang.
    argv = sup_argv("--run-dir", str(run), "--progress-file", str(run / "PROGRESS-rank*.txt"),
                    "--events", str(events), "--stall-timeout", "8", "--startup-grace", "200",
                    "--on-stall", "kill", "--kill-grace", "2", "--heartbeat", "0", child=command)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            env=base_env(), cwd=ROOT)
    try:
        out, err = proc.communicate(timeout=280)
    finally:
        kill_tree_of(proc)
    assert proc.returncode == 124, err.decode(errors="replace")[-4000:]
    evs = [json.loads(line) for line in events.read_text().splitlines()]
    (diagnosis,) = [e for e in evs if e["event"] == "diagnosis"]
    ranks = {p["rank"]: p["pid"] for p in diagnosis["processes"] if p["rank"] is not None}
    assert sorted(ranks) == [0, 1, 2], diagnosis["processes"]
    groups = diagnosis["groups"]
    assert [g["ranks"] for g in groups] == [[0, 1], [2]], groups
    assert groups[0]["pids"] == [ranks[0], ranks[1]] and groups[1]["pids"] == [ranks[2]]
    assert re.fullmatch(r"_injected_hang \(.*trainer/control\.py:\d+\)", groups[1]["frame"]), groups
    assert groups[0]["collective"] and not groups[1]["collective"]
    # What a person reads: the verdict, before the stacks.
    said = sup_lines(err)
    verdict = [i for i, line in enumerate(said) if "odd one out: rank 2 " in line]
    assert verdict, "\n".join(said)
    assert f"odd one out: rank 2 (pid {ranks[2]}) in _injected_hang (" in said[verdict[0]]
    assert "; ranks 0,1 in a collective: " in said[verdict[0]]
    stacks_at = next(i for i, line in enumerate(said) if "python stacks (py-spy):" in line)
    assert verdict[0] < stacks_at
