"""Measure the supervisor against baselines taken in the same run; print the figures.

    python bench/bench_supervisor.py [--gib 2] [--soak-s 0] [--only relay,latency,...] [--before DIR]

- relay: GiB of 100-byte counter lines (`Epoch 1/1 - Batch N/M - Loss: x`, the output counters'
  worst case) through the supervisor vs through cat (start-up aside); also with
  `--output-progress off` (the bare kernel splice) and, with --before DIR, with the code in DIR
- lines: a job flushing one counter line per step, its run time bare and supervised (counters on/off)
- latency: p50/p99 of line delivery, supervisor vs cat
- idle CPU: the supervisor's own CPU while its child sleeps
- memory: the supervisor's peak RSS relaying one 300 MB line (with and without --log)
- start-up: `magvit-supervise -- true` vs `true`
- stall: from the last progress to the STALL event (vs the timeout), and kill time (vs the grace)
- soak (--soak-s N): a child whose progress gaps reach 80 % of the timeout; false stalls must be 0
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHILD = str(ROOT / "tests" / "fixtures" / "child.py")
ENV = {**{k: v for k, v in os.environ.items() if not k.startswith("MAGVIT_")}, "PYTHONPATH": str(ROOT)}
SUP = [sys.executable, "-m", "supervisor", "--heartbeat", "0"]


def timed(argv: list[str], stdout=subprocess.DEVNULL, shell=False, env=None) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, stdout=stdout, stderr=subprocess.DEVNULL, env=env or ENV, check=True, shell=shell)
    return time.perf_counter() - t0


def median_of(n: int, fn) -> float:
    return statistics.median(fn() for _ in range(n))


RELAY_REPS = 5


def interleaved_best(reps: int, runs: dict[str, tuple[str, dict, float]]) -> dict[str, float]:
    """Run each shell command reps times, taking turns (so a busy minute hits all alike); the best of
    each, less its start-up: on a shared machine the least disturbed run is the nearest to the cost."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, (cmd, env, startup) in runs.items():
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            times[name].append(timed(cmd, shell=True, env=env) - startup)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu[name].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    best = {name: min(ts) for name, ts in times.items()}
    # CPU of the whole pipeline (generator, relay, sink): a busy machine stretches wall time, not this.
    best.update({f"{name}_cpu": min(cs) for name, cs in cpu.items()})
    return best


def bench_startup() -> dict:
    # Bytecode compiled, as an install leaves it (PYTHONDONTWRITEBYTECODE would otherwise
    # have every start compile the package from source).
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "supervisor")], check=True)
    base = median_of(10, lambda: timed(["true"]))
    sup = median_of(10, lambda: timed([*SUP, "--", "true"]))
    return {"startup_true_s": base, "startup_supervised_s": sup, "startup_overhead_ms": (sup - base) * 1000}


def _counter_block() -> bytes:
    """100 MiB of 100-byte lines, each with counters that move: the output counters' worst case."""
    lines = []
    for i in range(1 << 20):
        head = b"Epoch 1/1 - Batch %d/1048576 - Loss: 0.%04d " % (i + 1, i % 10000)
        lines.append(head + b"x" * (99 - len(head)) + b"\n")
    return b"".join(lines)


def bench_relay(gib: float, tmp: Path, startup_s: float, before: str | None = None) -> dict:
    block = tmp / "lines100"
    block.write_bytes(_counter_block())
    reps = max(1, round(gib * 1024 / 100))
    gen = f"for i in $(seq {reps}); do cat {block}; done"
    variants = {"supervised": (SUP, ENV), "counters_off_supervised": ([*SUP, "--output-progress", "off"], ENV)}
    if before:
        variants["before_supervised"] = (SUP, {**ENV, "PYTHONPATH": before})
    out = {}
    for sink in ("devnull", "pipe"):
        tail = " > /dev/null" if sink == "devnull" else " | cat > /dev/null"
        runs = {"cat": (f"sh -c '{gen}' | cat{tail}", ENV, 0.0)}
        for name, (sup, env) in variants.items():
            runs[name] = (" ".join([*sup, "--", "sh", "-c", f"'{gen}'"]) + f" 2>/dev/null{tail}", env, startup_s)
        best = interleaved_best(RELAY_REPS, runs)
        out[f"relay_{sink}_cat_s"] = best["cat"]
        out[f"relay_{sink}_cat_cpu_s"] = best["cat_cpu"]
        for name in variants:
            out[f"relay_{sink}_{name}_s"] = best[name]
            out[f"relay_{sink}_{name}_ratio"] = best[name] / best["cat"]
            out[f"relay_{sink}_{name}_cpu_s"] = best[f"{name}_cpu"]
    log = tmp / "relay.log"
    sup_cmd = " ".join([*SUP, "--log", str(log), "--", "sh", "-c", f"'{gen}'"])
    out["relay_with_log_supervised_s"] = timed(f"{sup_cmd} 2>/dev/null > /dev/null", shell=True) - startup_s
    out["relay_with_log_ratio"] = out["relay_with_log_supervised_s"] / out["relay_devnull_cat_s"]
    log.unlink()
    out["relay_gib"] = reps * 100 / 1024
    return out


LINES_CHILD = (
    "import sys,time\n"
    "n=int(sys.argv[1]); t0=time.perf_counter()\n"
    "for i in range(n):\n"
    "    sys.stdout.write('Epoch 1/1 - Batch %d/%d - Loss: 0.%04d\\n' % (i + 1, n, i % 10000)); sys.stdout.flush()\n"
    "open(sys.argv[2],'w').write(repr(time.perf_counter()-t0))\n"
)


def bench_lines(tmp: Path, lines: int = 300_000) -> dict:
    """A job that flushes one counter line per step: the time its own loop takes (measured inside it),
    bare (| cat) and supervised with the output counters on and off, into a pipe. The counters' work
    is the supervisor's: the job must not slow."""
    script = tmp / "lines_child.py"
    script.write_text(LINES_CHILD)
    took = tmp / "took"
    child = f"{sys.executable} {script} {lines} {took}"
    runs = {"cat": (f"{child} | cat > /dev/null", []),
            "counters_on": (" ".join([*SUP, "--", child]) + " 2>/dev/null | cat > /dev/null", []),
            "counters_off": (" ".join([*SUP, "--output-progress", "off", "--", child]) + " 2>/dev/null | cat > /dev/null", [])}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(RELAY_REPS):
        for name, (cmd, _) in runs.items():
            timed(cmd, shell=True)
            times[name].append(float(took.read_text()))
    out = {"lines_n": lines}
    for name, ts in times.items():
        out[f"lines_{name}_job_s"] = min(ts)
    return out


LATENCY_CHILD = (
    "import sys,time\n"
    "for i in range(2000):\n"
    "    sys.stdout.write('%d\\n' % time.monotonic_ns()); sys.stdout.flush(); time.sleep(0.001)\n"
)


def _latencies(argv: list[str]) -> list[float]:
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=ENV)
    lat = []
    buf = b""
    while True:
        chunk = os.read(p.stdout.fileno(), 65536)
        now = time.monotonic_ns()
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        lat += [(now - int(line)) / 1e6 for line in lines if line.strip().isdigit()]
    p.wait()
    return sorted(lat)


def bench_latency() -> dict:
    child = [sys.executable, "-u", "-c", LATENCY_CHILD]
    base = _latencies(["sh", "-c", '"$@" | cat', "sh", *child])
    sup = _latencies([*SUP, "--", *child])

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"latency_cat_p50_ms": pct(base, 0.5), "latency_cat_p99_ms": pct(base, 0.99),
            "latency_supervised_p50_ms": pct(sup, 0.5), "latency_supervised_p99_ms": pct(sup, 0.99)}


def _cpu_ns(pid: int) -> int:
    """CPU time of all the process's threads in ns (schedstat: finer than the 10 ms of cpu_times)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
            total += int(f.read().split()[0])
    return total


def bench_idle_cpu() -> dict:
    p = subprocess.Popen([sys.executable, "-m", "supervisor", "--", "sleep", "30"], env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(1.5)  # past start-up
        t0, c0 = time.monotonic(), _cpu_ns(p.pid)
        time.sleep(10)
        pct = (_cpu_ns(p.pid) - c0) / 1e9 / (time.monotonic() - t0) * 100
    finally:
        p.terminate()
        p.wait()
    return {"idle_cpu_percent": pct}


def _peak_rss_kib(argv: list[str]) -> int:
    """Peak RSS of the supervisor itself: VmHWM polled while it runs (ru_maxrss would
    include this process's image from before exec)."""
    p = subprocess.Popen(argv, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    peak = 0
    while p.poll() is None:
        try:
            with open(f"/proc/{p.pid}/status") as f:
                peak = max([peak] + [int(line.split()[1]) for line in f if line.startswith("VmHWM:")])
        except (OSError, ValueError):
            pass
        time.sleep(0.01)
    return peak


def bench_memory(tmp: Path) -> dict:
    child = [sys.executable, CHILD, "bigline", "300"]
    plain = _peak_rss_kib([*SUP, "--", *child])
    logged = _peak_rss_kib([*SUP, "--log", str(tmp / "big.log"), "--", *child])
    (tmp / "big.log").unlink()
    return {"peak_rss_300mb_line_mib": plain / 1024, "peak_rss_300mb_line_with_log_mib": logged / 1024}


def _events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _ts(event: dict) -> float:
    from datetime import datetime

    return datetime.strptime(event["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=__import__("datetime").timezone.utc).timestamp()


def bench_stall(tmp: Path) -> dict:
    timeout_s, grace_s = 3.0, 2.0
    ev = tmp / "stall.events"
    subprocess.run([*SUP, "--stall-timeout", str(timeout_s), "--kill-grace", str(grace_s), "--events", str(ev),
                    "--", sys.executable, CHILD, "hang-after-progress", "ignore-term"],
                   cwd=tmp, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    events = _events(ev)
    last_progress = os.stat(tmp / "PROGRESS.txt").st_mtime
    stall = next(e for e in events if e["event"] == "stall")
    term = next(e for e in events if e["event"] == "signal" and e["signal"] == "SIGTERM")
    exit_ = events[-1]
    return {
        "stall_timeout_s": timeout_s,
        "stall_reported_after_s": _ts(stall) - last_progress,
        "kill_grace_s": grace_s,
        "kill_complete_after_term_s": _ts(exit_) - _ts(term),
    }


SOAK_CHILD = (
    "import os,random,sys,time\n"
    "path=os.environ['MAGVIT_PROGRESS_FILE']; end=time.monotonic()+float(sys.argv[1]); gap_max=float(sys.argv[2])\n"
    "rng=random.Random(7); i=0\n"
    "while time.monotonic()<end:\n"
    "    i+=1; open(path+'.t','w').write(f'step {i}\\n'); os.replace(path+'.t',path)\n"
    "    time.sleep(rng.uniform(0.5, 1.0)*gap_max)\n"
)


def bench_soak(tmp: Path, seconds: float) -> dict:
    timeout_s = 10.0
    ev = tmp / "soak.events"
    r = subprocess.run([*SUP, "--stall-timeout", str(timeout_s), "--on-stall", "warn", "--events", str(ev),
                        "--", sys.executable, "-c", SOAK_CHILD, str(seconds), str(0.8 * timeout_s)],
                       cwd=tmp, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stalls = sum(1 for e in _events(ev) if e["event"] == "stall")
    return {"soak_s": seconds, "soak_gap_max_of_timeout": 0.8, "soak_false_stalls": stalls, "soak_status": r.returncode}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=2.0, help="relay volume (default 2)")
    ap.add_argument("--soak-s", type=float, default=0.0, help="run the false-stall soak for this long (600 for the target)")
    ap.add_argument("--only", default="startup,relay,lines,latency,idle,memory,stall",
                    help="comma-separated benches to run (start-up always runs: the relay subtracts it)")
    ap.add_argument("--before", help="also relay with the supervisor package from this checkout (side by side)")
    args = ap.parse_args()
    only = set(args.only.split(","))
    results: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        results.update(bench_startup())
        if "relay" in only:
            results.update(bench_relay(args.gib, tmp, results["startup_supervised_s"], args.before))
        if "lines" in only:
            results.update(bench_lines(tmp))
        if "latency" in only:
            results.update(bench_latency())
        if "idle" in only:
            results.update(bench_idle_cpu())
        if "memory" in only:
            results.update(bench_memory(tmp))
        if "stall" in only:
            results.update(bench_stall(tmp))
        if args.soak_s > 0:
            results.update(bench_soak(tmp, args.soak_s))
    width = max(map(len, results))
    for key, value in results.items():
        print(f"{key:<{width}}  {value:.3f}" if isinstance(value, float) else f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
