"""Soak the output counters: healthy tqdm and Lightning runs for a long while must raise no STALL, no SLOW.

    python bench/soak_counters.py [--seconds 600] [--stall-timeout 10] [--slow-window 30]

Runs side by side, each under `magvit-supervise --stall-timeout T --events ...` with no
progress file (so the output counters are the only source): a tqdm loop (bar on stderr),
Lightning with its TQDM bar on a pipe, and Lightning with its Rich bar under --pty. Each
child steps every 0.1 s until the time is up. Prints, per run: STALL and SLOW events (must be 0),
whether output-counters tracked it, the exit status, and the supervisor's own CPU time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = str(ROOT / "tests" / "fixtures" / "frameworks.py")
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MAGVIT_")}, "PYTHONPATH": str(ROOT),
       "OMP_NUM_THREADS": "1", "COLUMNS": "120"}
RUNS = {  # name: (fixture mode, supervisor options)
    "tqdm": ("tqdm", []),
    "lightning-tqdm (pipe)": ("lightning-tqdm", []),
    "lightning-rich (--pty)": ("lightning-rich", ["--pty"]),
}
TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICKS_PER_S
    except (OSError, IndexError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=600.0)
    ap.add_argument("--stall-timeout", type=float, default=10.0)
    ap.add_argument("--slow-window", type=float, default=30.0,
                    help="SLOW's window: shorter than the default 10m, so a 10-minute soak learns and checks it")
    args = ap.parse_args()
    steps = int(args.seconds / 0.1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        procs = {}
        for name, (mode, options) in RUNS.items():
            ev = tmp / f"{mode}.jsonl"
            argv = [sys.executable, "-m", "supervisor", "--stall-timeout", str(args.stall_timeout), "--heartbeat",
                    "60", "--slow-window", str(args.slow_window), "--events", str(ev), *options, "--", sys.executable, FIXTURE, mode, "--steps", str(steps),
                    "--out", str(tmp)]
            procs[name] = (subprocess.Popen(argv, cwd=tmp, env=ENV, stdout=subprocess.DEVNULL,
                                            stderr=open(tmp / f"{mode}.err", "wb")), ev, time.monotonic())
        cpu: dict[str, float] = {}
        while any(p.poll() is None for p, _, _ in procs.values()):
            for name, (p, _, _) in procs.items():
                c = cpu_s(p.pid)
                if c is not None and p.poll() is None:
                    cpu[name] = c
            time.sleep(1.0)
        print(f"{'run':<24} {'wall_s':>7} {'stalls':>6} {'slows':>5} {'tracked':>8} {'status':>6} {'sup_cpu_s':>9}")
        for name, (p, ev, t0) in procs.items():
            events = [json.loads(line) for line in ev.read_text().splitlines()]
            stalls = sum(e["event"] == "stall" for e in events)
            slows = sum(e["event"] == "slow" for e in events)
            tracked = any(e["event"] == "progress-first" and e["source"] == "output-counters" for e in events)
            end = next(e for e in reversed(events) if e["event"] == "exit")
            print(f"{name:<24} {end['runtime_s']:>7.0f} {stalls:>6} {slows:>5} {str(tracked):>8} {p.returncode:>6} "
                  f"{cpu.get(name, float('nan')):>9.2f}")


if __name__ == "__main__":
    main()
