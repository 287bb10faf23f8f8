"""Steps per second of the default tokenizer with progress reporting on and off.

    python bench/bench_trainer.py [--device cpu|cuda] [--steps 40] [--repeats 3]

"off" is the same loop with reporting disabled (no batch lines, no progress file, no
metrics, no heartbeat); "on" is what train.py does by default (a report at least every
30 s and on the first and last batch, heartbeat thread running), and "every step" is
the worst case, --log-every-s 0 (a device sync, a progress file and a metrics line per
step). Modes are interleaved and repeated, in a rotating order; the best pass of each
is compared (as timeit does: other load on the machine only ever slows a pass down),
and the median is shown beside it. On CUDA the peak GPU memory is printed too.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from trainer.config import ModelConfig, TrainConfig  # noqa: E402
from trainer.control import RunControl  # noqa: E402
from trainer.data import make_moving_shapes  # noqa: E402
from trainer.distributed import Dist  # noqa: E402
from trainer.heartbeat import Heartbeat  # noqa: E402
from trainer.loop import train_one_epoch  # noqa: E402
from trainer.metrics import MetricsLog  # noqa: E402
from trainer.model import VideoTokenizer  # noqa: E402
from trainer.progress import BatchReporter  # noqa: E402


class Timed:
    """Wrap an object's methods to add up the seconds spent in them."""

    def __init__(self, target, *names):
        self.seconds = 0.0
        for name in names:
            setattr(target, name, self._timed(getattr(target, name)))

    def _timed(self, method):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - start
        return call


def measure(model, optimizer, loader, device, mode: str, folder: Path):
    """Train one pass over `loader` in `mode`; return (steps per second, seconds spent reporting)."""
    heartbeat = None
    if mode == "off":
        reporter = BatchReporter(1, log_every_s=float("inf"), verbose=False)
        control = None
    else:
        log_every_s = 30.0 if mode == "on" else 0.0
        reporter = BatchReporter(1, log_every_s=log_every_s, progress_path=folder / "PROGRESS.txt",
                                 metrics=MetricsLog(folder / "metrics.jsonl"))
        heartbeat = Heartbeat(30.0).start()
        control = RunControl(Dist(), device, heartbeat=heartbeat)
    timers = [Timed(reporter, "due", "report")] + ([Timed(control, "after_step", "before_step")]
                                                   if control is not None else [])
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        train_one_epoch(model, loader, optimizer, device, 0, reporter=reporter, control=control)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    if heartbeat is not None:
        heartbeat.stop()
    return len(loader) / elapsed, sum(t.seconds for t in timers)


def main(argv=None) -> int:
    """Print steps/s with reporting off, on, and on at every step, and the ratios."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--steps", type=int, default=30, help="steps per measurement")
    p.add_argument("--repeats", type=int, default=5, help="measurements per mode (interleaved)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_trainer: error: --device cuda: CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    defaults, model_config = TrainConfig(), ModelConfig()
    batch = defaults.batch_size
    data = make_moving_shapes(args.steps * batch, defaults.frames, defaults.size, seed=0)
    loader = DataLoader(TensorDataset(data.videos, data.labels), batch_size=batch, shuffle=True)
    torch.manual_seed(0)
    model = VideoTokenizer(model_config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=defaults.lr)
    modes = ["off", "on", "every step"]
    rates = {m: [] for m in modes}
    reporting_s = {m: [] for m in modes}  # seconds inside the reporter and the control
    with tempfile.TemporaryDirectory() as tmp:
        warm = DataLoader(TensorDataset(data.videos[:3 * batch], data.labels[:3 * batch]),
                          batch_size=batch)
        measure(model, optimizer, warm, device, "off", Path(tmp))  # first-step costs
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for repeat in range(args.repeats):
            for mode in modes[repeat % 3:] + modes[:repeat % 3]:
                rate, seconds = measure(model, optimizer, loader, device, mode, Path(tmp))
                rates[mode].append(rate)
                reporting_s[mode].append(seconds)

    threads = f", {torch.get_num_threads()} thread(s)" if device.type == "cpu" else ""
    print(f"device: {device}{threads}; model: width {model_config.width}, "
          f"{model_config.codebook_bits}-bit LFQ, {model_config.levels} level(s), "
          f"{sum(q.numel() for q in model.parameters())} parameters; batch {batch} x "
          f"3x{defaults.frames}x{defaults.size}x{defaults.size}; "
          f"{args.steps} steps x {args.repeats} passes per mode")
    base = max(rates["off"])
    labels = {"off": "reporting off", "on": "reporting on (every 30 s)",
              "every step": "reporting every step"}
    for mode in modes:
        best, median = max(rates[mode]), statistics.median(rates[mode])
        # the share of the pass spent reporting: immune to other load on the machine
        share = statistics.median(s * r / args.steps for s, r in zip(reporting_s[mode], rates[mode]))
        print(f"  {labels[mode]:<27} best {best:6.2f} steps/s (median {median:6.2f})"
              f"  ratio {best / base:.3f}; time spent reporting {share * 100:.2f}% of the pass")
    if device.type == "cuda":
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
