"""One training run, start to finish: set-up, resume, epochs, checkpoints, the end."""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.checkpoint import capture_rng, load_checkpoint, restore_rng, save_checkpoint
from trainer.config import Fault, TrainConfig, parse_fault
from trainer.control import RunControl, StopSignals
from trainer.data import VideoSet, background_baseline, load_npz, make_loaders, make_moving_shapes
from trainer.distributed import Dist, setup_distributed, teardown_distributed
from trainer.heartbeat import Heartbeat
from trainer.loop import StopTraining, evaluate, steps_per_epoch, train_one_epoch
from trainer.metrics import MetricsLog, plot_losses
from trainer.model import VideoTokenizer
from trainer.progress import BatchReporter, emit, format_loss, progress_path_for, update_progress


def resolve_device(choice: str) -> torch.device:
    """Map --device auto|cpu|cuda to a torch device; ValueError when CUDA is asked for but absent."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: CUDA is not available on this machine")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def lr_schedule(warmup_steps: int, total_steps: int):
    """Return the LambdaLR factor: linear warm-up, then cosine decay to 10% at total_steps."""

    def factor(done: int) -> float:
        if done < warmup_steps:
            return (done + 1) / warmup_steps
        progress = min(1.0, (done - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


class Run:
    """One training run: the objects it needs and the steps of main, each a method."""

    def __init__(self, config: TrainConfig, dist: Dist, device: torch.device):
        self.config = config
        self.dist = dist
        self.device = device
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.history: list = []  # {"epoch", "train_loss", "val_loss"} per finished epoch
        self.next_step = 1
        self.carried_loss_sum = 0.0  # of the epoch a checkpoint stopped in
        self.elapsed_before_s = 0.0  # training time of earlier processes (resumes)
        self.started = time.monotonic()

    def elapsed_s(self) -> float:
        """Return the seconds trained so far, earlier processes of a resumed run included."""
        return self.elapsed_before_s + time.monotonic() - self.started

    def build(self, data: VideoSet) -> None:
        """Make loaders, model, optimizer, schedule and RNG for this rank."""
        c, d = self.config, self.dist
        self.train_loader, self.val_loader, self.test_loader = make_loaders(
            data, c.batch_size, seed=c.seed, rank=d.rank, world_size=d.world_size)
        self.steps_per_epoch = steps_per_epoch(self.train_loader)
        self.total_steps = c.epochs * self.steps_per_epoch
        torch.manual_seed(c.seed)  # same initial weights on every rank
        model_config = dataclasses.replace(c.model, in_channels=int(data.videos.shape[1]))
        self.model = VideoTokenizer(model_config).to(self.device)
        self.ddp = self.model
        if d.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=c.lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(c.warmup_steps, self.total_steps))
        self.rng = np.random.default_rng([c.seed, d.rank])  # augmentation draws
        if d.is_main:
            sizes = "/".join(str(len(l.dataset)) for l in
                             (self.train_loader, self.val_loader, self.test_loader))
            line = (f"Data: {len(data.labels)} clips of {'x'.join(map(str, data.videos.shape[1:]))}"
                    f" ({sizes} train/val/test), {self.steps_per_epoch} steps per epoch")
            if c.data is None:
                # a yardstick for the printed losses: the trivial answer's score
                line += f"; predicting the background scores {background_baseline(data.videos):.4f}"
            emit(line)

    def resume(self) -> None:
        """Continue from OUT/checkpoint.pt when --resume auto finds one."""
        if self.config.resume != "auto":
            return
        state = load_checkpoint(self.checkpoint_path)
        if state is None:
            return
        if state["steps_per_epoch"] != self.steps_per_epoch or state["world_size"] != self.dist.world_size:
            raise ValueError(
                f"checkpoint {self.checkpoint_path} is from a run with {state['steps_per_epoch']}"
                f" steps per epoch on {state['world_size']} process(es), this one has"
                f" {self.steps_per_epoch} on {self.dist.world_size}; use another --out"
                " or --resume never")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        mine = state["rank_state"][self.dist.rank]
        restore_rng(mine["rng"], self.rng)
        self.next_step = state["next_step"]
        self.carried_loss_sum = mine["epoch_loss_sum"]
        self.history = state["history"]
        self.elapsed_before_s = state["elapsed_s"]
        if self.dist.is_main:
            emit(f"Resuming from {self.checkpoint_path} at step {self.next_step}")

    def save(self, next_step: int, epoch_loss_sum: float = 0.0) -> None:
        """Write the checkpoint (rank 0), resuming at `next_step`; every rank must call it."""
        # per rank: each has its own random state and its own share of the epoch's loss
        per_rank = self.dist.gather({"rng": capture_rng(self.rng),
                                     "epoch_loss_sum": epoch_loss_sum})  # a collective
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_path, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "next_step": next_step,
                "rank_state": per_rank,
                "steps_per_epoch": self.steps_per_epoch, "world_size": self.dist.world_size,
                "history": self.history, "elapsed_s": self.elapsed_s(),
                "config": self.config.to_dict()})
        # no rank may exit (and make torchrun kill the rest) before the file is in place
        self.dist.barrier()

    def train(self, control: RunControl, bar: bool) -> int:
        """Run the remaining epochs; return the exit status."""
        c, d = self.config, self.dist
        progress_path = progress_path_for(self.out, d.rank, d.world_size)
        metrics = MetricsLog(self.out / "metrics.jsonl") if d.is_main else None
        reporter = BatchReporter(c.epochs, c.log_every_s, verbose=d.is_main and not bar,
                                 progress_path=progress_path, metrics=metrics,
                                 start_time=self.started - self.elapsed_before_s)
        if self.history:
            reporter.val_loss = self.history[-1]["val_loss"]
        first_epoch, start_batch = divmod(self.next_step - 1, self.steps_per_epoch)
        sampler = self.train_loader.sampler
        for epoch in range(first_epoch, c.epochs):
            if d.is_main and not bar:
                emit(f"Epoch {epoch + 1}/{c.epochs}")
            sampler.set_epoch(epoch)
            sampler.set_start(start_batch * c.batch_size)
            try:
                result = train_one_epoch(
                    self.ddp, self.train_loader, self.optimizer, self.device, epoch,
                    total_epochs=c.epochs, scheduler=self.scheduler, reporter=reporter,
                    control=control, rng=self.rng, start_batch=start_batch,
                    carried_loss_sum=self.carried_loss_sum, bar=bar and d.is_main)
            except StopTraining as stop:
                self.save(stop.next_step, stop.epoch_loss_sum)
                return self.stopped(control, stop.next_step)
            start_batch, self.carried_loss_sum = 0, 0.0
            self.end_epoch(epoch, d.mean(result["loss"], self.device), reporter, metrics,
                           progress_path)
            next_step = (epoch + 1) * self.steps_per_epoch + 1
            self.save(next_step)
            # a signal may have come during validation or the save
            if control.check() and epoch + 1 < c.epochs:
                return self.stopped(control, next_step)
        self.finish()
        return 0

    def end_epoch(self, epoch: int, train_loss: float, reporter: BatchReporter, metrics,
                  progress_path) -> None:
        """Validate, then report the epoch: [PROGRESS] line, progress file, metrics."""
        val_loss = evaluate(self.model, self.val_loader, self.device)
        reporter.val_loss = val_loss
        self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        if metrics is not None:
            metrics.epoch(epoch + 1, train_loss, val_loss, self.elapsed_s())
        update_progress(progress_path, epoch, self.config.epochs, train_loss, val_loss,
                        self.elapsed_s(), verbose=self.dist.is_main,
                        batch=self.steps_per_epoch, total_batches=self.steps_per_epoch,
                        step=(epoch + 1) * self.steps_per_epoch)

    def stopped(self, control: RunControl, next_step: int) -> int:
        """Say why the run stopped early; return 128+N for signal N, else 0."""
        if control.signum:
            name = signal.Signals(control.signum).name
            if self.dist.is_main:
                emit(f"Stopped on {name} before step {next_step}; checkpoint saved to"
                     f" {self.checkpoint_path}")
            return 128 + control.signum
        if self.dist.is_main:
            emit(f"Stopped after step {next_step - 1} (step budget); checkpoint saved to"
                 f" {self.checkpoint_path}")
        return 0

    def finish(self) -> None:
        """Report the test loss and draw loss.png (rank 0)."""
        if not self.dist.is_main:
            return
        test_loss = evaluate(self.model, self.test_loader, self.device)
        if self.history:
            plot_losses(self.history, self.out / "loss.png")
        emit(f"Done: {self.config.epochs} epochs in {self.elapsed_s():.1f}s;"
             f" test loss {format_loss(test_loss)}; wrote {self.out}/checkpoint.pt,"
             f" metrics.jsonl, loss.png")


def report_error(message: str) -> None:
    """Print a one-line error for bad input (no traceback: nothing in the code went wrong)."""
    sys.stderr.write(f"train.py: error: {message}\n")
    sys.stderr.flush()


@dataclasses.dataclass
class Prepared:
    fault: Optional[Fault]  # --fault, parsed
    device: torch.device  # --device, resolved (before the rank picks its GPU)
    data: VideoSet  # --data, or the synthetic set


def prepare(config: TrainConfig) -> Prepared:
    """Check everything the user gave before any training starts; ValueError names what is wrong."""
    config.validate()
    fault = parse_fault(config.fault)
    device = resolve_device(config.device)
    if config.data is not None:
        data = load_npz(config.data)
    else:
        data = make_moving_shapes(config.samples, config.frames, config.size, config.seed)
    return Prepared(fault, device, data)


def run(config: TrainConfig, prepared: Optional[Prepared] = None) -> int:
    """Train as `config` says; return the exit status (128+N after stop signal N, 2 bad input)."""
    prepared = prepared or prepare(config)
    dist = setup_distributed(prepared.device.type)
    device = prepared.device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    heartbeat = None
    if dist.is_main and os.environ.get("MAGVIT_SUPERVISED") != "1":
        heartbeat = Heartbeat(config.heartbeat_s).start()
    try:
        with StopSignals() as signals:
            job = Run(config, dist, device)
            job.build(prepared.data)
            try:
                job.resume()
            except ValueError as exc:
                report_error(str(exc))
                return 2
            control = RunControl(dist, device, signals, prepared.fault, heartbeat,
                                 config.max_steps)
            return job.train(control, config.bar)
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        teardown_distributed(dist)
