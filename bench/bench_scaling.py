"""Steps per second on 1 and 2 CPU ranks under torchrun, bare and under magvit-supervise.

    python bench/bench_scaling.py [--repeats 3] [--epochs 2] [--samples 384] [--batch-size 8]

Each rank gets cores/ranks torch threads (OMP_NUM_THREADS), so 1 and 2 ranks use the same
cores. The real command line runs (`torchrun --standalone --nproc-per-node R trainer/train.py`,
the default model on synthetic data), with a metrics line per step; from their timestamps:
- steps/s: optimizer steps per second inside epochs (validation and checkpoints left out);
  samples/s = steps/s x batch size x ranks, the figure that scaling is about;
- start-up: launch to the end of the first step (imports, data, process group, step 1).
"supervised" is the same command under `magvit-supervise` (heartbeat, progress files and
log on, as bin/run has them): its overhead over the bare torchrun is the difference. On a
shared machine those differences drown in noise, so two figures of the supervisor alone
come too: its own CPU time over the run (sampled from /proc while it runs, its children
left out) and its start-up, from launch to its `start` event (torchrun spawned).
Configurations are interleaved and repeated in a rotating order; the best pass of each is
compared (other load on a shared machine only ever slows a pass down), the median beside it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
TRAIN_PY = str(ROOT / "trainer" / "train.py")


def cores() -> int:
    return len(os.sched_getaffinity(0))


def command(ranks: int, supervised: bool, out: Path, args) -> list[str]:
    """The launch command of one configuration, writing into `out`."""
    train = [TORCHRUN, "--standalone", "--nproc-per-node", str(ranks), TRAIN_PY,
             "--samples", str(args.samples), "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
             "--log-every-s", "0", "--heartbeat-s", "0", "--resume", "never", "--out", str(out)]
    if not supervised:
        return train
    return [sys.executable, "-m", "supervisor", "--heartbeat", "30", "--stall-timeout", "5m",
            "--progress-file", str(out / "PROGRESS.txt"), "--log", str(out / "supervise.log"),
            "--events", str(out / "events.jsonl"), "--", *train]


def step_times(out: Path) -> dict[int, list[float]]:
    """Step timestamps from metrics.jsonl, per epoch."""
    epochs: dict[int, list[float]] = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "step":
            epochs.setdefault(record["epoch"], []).append(record["time"])
    return epochs


def run_once(ranks: int, supervised: bool, args) -> dict:
    """One launch; return its steps/s, start-up and wall time."""
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as folder:
        out = Path(folder) / "run"
        out.mkdir()
        env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores() // ranks)), PYTHONPATH=str(ROOT))
        env = {k: v for k, v in env.items() if not k.startswith("MAGVIT_")}
        started = time.time()
        proc = subprocess.Popen(command(ranks, supervised, out, args), cwd=folder, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        own_cpu_s = 0.0
        while proc.poll() is None:
            own_cpu_s = max(own_cpu_s, cpu_seconds(proc.pid))
            if time.time() - started > 1800:
                proc.kill()
                raise RuntimeError("a pass took more than 30 minutes")
            time.sleep(0.1)
        if proc.returncode != 0:
            raise RuntimeError(f"exit status {proc.returncode}: {command(ranks, supervised, out, args)}")
        wall_s = time.time() - started
        epochs = step_times(out)
        spawn_s = None
        if supervised:
            start = next(json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()
                         if json.loads(line)["event"] == "start")
            spawn_s = parse_ts(start["ts"]) - started
    first_step = min(t[0] for t in epochs.values())
    # intervals inside an epoch only: an epoch's end adds validation and a checkpoint
    steps = sum(len(t) - 1 for t in epochs.values())
    seconds = sum(t[-1] - t[0] for t in epochs.values())
    return {"steps_per_s": steps / seconds, "startup_s": first_step - started, "wall_s": wall_s,
            "own_cpu_percent": 100 * own_cpu_s / wall_s, "spawn_s": spawn_s}


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process itself (not its children), from /proc."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def parse_ts(ts: str) -> float:
    """Unix time of an events timestamp (ISO-8601 UTC with 'Z')."""
    from datetime import datetime
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--samples", type=int, default=384)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)

    load_before = os.getloadavg()[0]
    configs = [(1, False), (2, False), (1, True), (2, True)]
    results: dict[tuple[int, bool], list[dict]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        shift = repeat % len(configs)
        for config in configs[shift:] + configs[:shift]:
            result = run_once(*config, args)
            results[config].append(result)
            print(f"  pass {repeat + 1}: {config[0]} rank(s) {'supervised' if config[1] else 'bare'}: "
                  f"{result['steps_per_s']:.2f} steps/s, start-up {result['startup_s']:.2f} s", file=sys.stderr)

    def best(config, key, pick=max):
        return pick(r[key] for r in results[config])

    def median(config, key):
        return statistics.median(r[key] for r in results[config])

    print(f"{cores()} cores, torch threads per rank = cores / ranks, batch {args.batch_size} per rank, "
          f"{args.samples} clips, best (median) of {args.repeats}; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after")
    print()
    print("| ranks | launch | steps/s | samples/s | start-up (to the end of step 1) |")
    print("|---|---|---|---|---|")
    for ranks, supervised in configs:
        c = (ranks, supervised)
        sps, med = best(c, "steps_per_s"), median(c, "steps_per_s")
        print(f"| {ranks} | {'magvit-supervise + torchrun' if supervised else 'torchrun'} | {sps:.2f} ({med:.2f}) "
              f"| {sps * args.batch_size * ranks:.1f} | {best(c, 'startup_s', min):.2f} s "
              f"({median(c, 'startup_s'):.2f} s) |")
    print()
    one, two = best((1, False), "steps_per_s"), best((2, False), "steps_per_s")
    print(f"2 ranks vs 1: {2 * two / one:.2f}x the samples/s ({two / one:.2f}x the steps/s)")
    for ranks in (1, 2):
        bare, sup = (ranks, False), (ranks, True)
        print(f"supervisor overhead, {ranks} rank(s): steps/s ratio {best(sup, 'steps_per_s') / best(bare, 'steps_per_s'):.3f}, "
              f"time to step 1 {1000 * (best(sup, 'startup_s', min) - best(bare, 'startup_s', min)):+.0f} ms "
              f"(medians {1000 * (median(sup, 'startup_s') - median(bare, 'startup_s')):+.0f} ms); "
              f"the supervisor itself: {median(sup, 'own_cpu_percent'):.2f} % of a core, "
              f"{1000 * median(sup, 'spawn_s'):.0f} ms from launch to torchrun spawned (medians)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
