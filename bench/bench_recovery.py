"""What a hang costs under the supervisor: the default trainer with and without injected hangs.

    python bench/bench_recovery.py [--hangs 3] [--stall-timeout 10] [--checkpoint-every-s 2]
                                   [--trainer-arg=--epochs=4 ...]

Two runs of the same job in one sitting, each in a fresh run folder, the trainer
checkpointing every 2 s of training (a save of this model takes about 15 ms here, so
that costs under 1 %) besides each epoch end; `--checkpoint-every-s 600`, the
trainer's default, leaves only the epoch ends in a run this short:

- clean: `magvit-supervise --run-dir A --stall-timeout S --on-stall restart -- train.py`
- faulted: the same with `--fault hang-once:STEP` at evenly spaced steps (each fires once,
  records that it fired, and hangs with no progress while its heartbeat thread goes on).

Per hang, from the faulted run's events, log and metrics: detection (the stall's age:
from the last progress to the STALL line), diagnosis (from the STALL line to SIGTERM),
kill (from SIGTERM to the restart decision), back-off, restart-to-first-step (from the
new start to the first step it logs), steps lost (the hung step minus the checkpoint
step it resumed from, minus one), and the cost: the sum of those parts, the lost steps
at the clean run's pace. For the whole run: goodput = clean time / faulted time, the
step counts and the final losses, and whether the faulted run's validation losses are the
clean run's, bit for bit (a resume must change nothing).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MAGVIT_")}, "PYTHONPATH": str(ROOT)}


def supervised(run_dir: Path, stall_timeout_s: float, trainer_args: list[str]) -> float:
    """Run the trainer under the supervisor in run_dir; return the wall time."""
    argv = [sys.executable, "-m", "supervisor", "--run-dir", str(run_dir), "--stall-timeout", str(stall_timeout_s),
            "--on-stall", "restart", "--kill-grace", "30", "--max-restarts", "10", "--heartbeat", "30",
            "--", sys.executable, "-u", str(ROOT / "trainer" / "train.py"), "--out", str(run_dir), *trainer_args]
    started = time.monotonic()
    done = subprocess.run(argv, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    elapsed = time.monotonic() - started
    if done.returncode != 0:
        raise SystemExit(f"bench_recovery: the supervised run in {run_dir} exited {done.returncode}")
    return elapsed


def jsonl(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def wall(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").timezone.utc).timestamp()


def last_steps(run_dir: Path) -> tuple[int, float | None]:
    """The last step logged and the final validation loss."""
    metrics = jsonl(run_dir / "metrics.jsonl")
    steps = [m["step"] for m in metrics if m.get("kind") == "step"]
    epochs = [m for m in metrics if m.get("kind") == "epoch"]
    return (max(steps) if steps else 0), (epochs[-1].get("val_loss") if epochs else None)


def val_losses(run_dir: Path) -> list:
    """Every epoch's validation loss, in order."""
    return [m.get("val_loss") for m in jsonl(run_dir / "metrics.jsonl") if m.get("kind") == "epoch"]


def verdict(clean: list, faulted: list) -> str:
    """Say whether two runs' validation losses are the same, bit for bit, or where they part."""
    if clean == faulted:
        return f"match, bit for bit (all {len(clean)} epochs' validation losses)"
    first = next((i for i, (a, b) in enumerate(zip(clean, faulted)) if a != b), min(len(clean), len(faulted)))
    return f"DIFFER from epoch {first + 1} on (clean {clean[first:first + 1]}, faulted {faulted[first:first + 1]})"


def report_json(run_dir: Path) -> dict:
    """magvit-report's summary of a run folder (its goodput and badput_s)."""
    out = subprocess.run([sys.executable, "-m", "supervisor.report", str(run_dir), "--json"], env=ENV, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def step_s(run_dir: Path) -> float:
    """Seconds per training step of a run, from its first and last logged steps (validation included)."""
    steps = [m for m in jsonl(run_dir / "metrics.jsonl") if m.get("kind") == "step" and m.get("time")]
    first, last = steps[0], steps[-1]
    return (_time(last["time"]) - _time(first["time"])) / max(1, last["step"] - first["step"])


def per_hang(run_dir: Path, hang_steps: list[int], seconds_per_step: float) -> list[dict]:
    """Measure each stall of the faulted run from its events, log and metrics.

    A hang's cost is the sum of its parts: from the last progress before it to the first
    step after the restart, plus the steps done again at the clean run's pace.
    """
    events = jsonl(run_dir / "events.jsonl")
    log = (run_dir / "supervise.log").read_text(errors="replace")
    resumed = [int(m) for m in re.findall(r"out\| .*[Rr]esum\w* .*?step (\d+)", log)]
    starts = [e for e in events if e["event"] == "start"]
    steps = [m for m in jsonl(run_dir / "metrics.jsonl") if m.get("kind") == "step"]
    rows = []
    for i, stall in enumerate(e for e in events if e["event"] == "stall"):
        after = [e for e in events if wall(e["ts"]) >= wall(stall["ts"])]
        term = next(e for e in after if e["event"] == "signal" and e["signal"] == "SIGTERM")
        restart = next(e for e in after if e["event"] == "restart")
        start = next(s for s in starts if wall(s["ts"]) >= wall(restart["ts"]))
        first = next((m for m in steps if m.get("time") and _time(m["time"]) >= wall(start["ts"])), None)
        from_step = resumed[i] if i < len(resumed) else None
        hung = hang_steps[i] if i < len(hang_steps) else None
        lost = None if hung is None or from_step is None else max(0, hung - from_step - 1)
        to_first = None if first is None else _time(first["time"]) - wall(start["ts"])
        parts = [stall["age_s"], wall(start["ts"]) - wall(stall["ts"]),  # diagnosis, kill, back-off, launch
                 to_first, None if lost is None else lost * seconds_per_step]
        rows.append({
            "hang_step": hung,
            "detect_s": stall["age_s"],
            "diagnose_s": round(wall(term["ts"]) - wall(stall["ts"]), 2),
            "kill_s": round(wall(restart["ts"]) - wall(term["ts"]), 2),
            "backoff_s": restart["backoff_s"],
            "first_step_after_s": None if to_first is None else round(to_first, 2),
            "resumed_at_step": from_step,
            "steps_lost": lost,
            "cost_s": None if None in parts else round(sum(parts), 1),
        })
    return rows


def save_cost(checkpoint: Path) -> float:
    """The median time of saving the run's own checkpoint again, as the trainer does (fsync, rename)."""
    sys.path.insert(0, str(ROOT))
    import torch
    from trainer.checkpoint import save_checkpoint

    state = torch.load(checkpoint, weights_only=False)
    times = []
    with tempfile.TemporaryDirectory(dir=checkpoint.parent) as tmp:
        for _ in range(10):
            started = time.perf_counter()
            save_checkpoint(Path(tmp) / "checkpoint.pt", state)
            times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _time(value) -> float:
    """A metrics record's time: epoch seconds or an ISO string."""
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hangs", type=int, default=3)
    ap.add_argument("--stall-timeout", type=float, default=10.0)
    ap.add_argument("--checkpoint-every-s", type=float, default=2.0, help="the trainer's checkpoint cadence")
    ap.add_argument("--trainer-arg", action="append", default=[], help="extra trainer argument (repeatable)")
    args = ap.parse_args()
    trainer_args = ["--checkpoint-every-s", str(args.checkpoint_every_s)]
    trainer_args += [a for arg in args.trainer_arg for a in arg.split("=", 1)]
    with tempfile.TemporaryDirectory() as tmp:
        clean_dir, faulted_dir = Path(tmp) / "clean", Path(tmp) / "faulted"
        clean_s = supervised(clean_dir, args.stall_timeout, trainer_args)
        total, clean_loss = last_steps(clean_dir)
        hang_steps = [round(total * (k + 1) / (args.hangs + 1)) for k in range(args.hangs)]
        faults = [a for step in hang_steps for a in ("--fault", f"hang-once:{step}")]
        faulted_s = supervised(faulted_dir, args.stall_timeout, trainer_args + faults)
        faulted_total, faulted_loss = last_steps(faulted_dir)
        rows = per_hang(faulted_dir, hang_steps, step_s(clean_dir))
        same = verdict(val_losses(clean_dir), val_losses(faulted_dir))
        save_s = save_cost(clean_dir / "checkpoint.pt")
        reports = report_json(clean_dir), report_json(faulted_dir)
    print(f"clean run:   {clean_s:7.1f} s, {total} steps, final val loss {clean_loss}")
    print(f"faulted run: {faulted_s:7.1f} s, {faulted_total} steps, final val loss {faulted_loss}, "
          f"{len(rows)} hangs at steps {hang_steps}")
    print(f"final val loss: clean {clean_loss!r}, faulted {faulted_loss!r}: {same}")
    print(f"a checkpoint save takes {save_s * 1000:.0f} ms (median of 10): every {args.checkpoint_every_s:g} s "
          f"of training that is {100 * save_s / args.checkpoint_every_s:.2f} % of it")
    costs = [r["cost_s"] for r in rows if r["cost_s"] is not None]
    print(f"cost of each hang (the sum of its parts, below): {', '.join(f'{c:g}' for c in costs)} s; "
          f"target: at most the stall timeout + 10 s = {args.stall_timeout + 10:g} s")
    print(f"goodput (clean time / faulted time): {clean_s / faulted_s:.3f}; the time difference per hang: "
          f"{(faulted_s - clean_s) / max(1, len(rows)):.1f} s (two whole runs: a few seconds of noise)")
    clean_r, faulted_r = reports  # the same through magvit-report: its lost time beyond the clean run's
    extra = {k: faulted_r["badput_s"][k] - clean_r["badput_s"][k] for k in faulted_r["badput_s"]}
    print(f"goodput by magvit-report: clean {clean_r['goodput']:.3f}, faulted {faulted_r['goodput']:.3f}; the faulted"
          f" run lost {sum(extra.values()):.1f} s more ({', '.join(f'{v:.1f} s {k}' for k, v in extra.items())})"
          f" against {faulted_s - clean_s:.1f} s more wall time")
    print()
    print("| hang at step | detected after (s) | diagnosis (s) | kill (s) | back-off (s) | restart to first step (s) "
          "| resumed at step | steps lost | cost (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['hang_step']} | {r['detect_s']} | {r['diagnose_s']} | {r['kill_s']} | {r['backoff_s']} "
              f"| {r['first_step_after_s']} | {r['resumed_at_step']} | {r['steps_lost']} | {r['cost_s']} |")


if __name__ == "__main__":
    main()
