"""The epoch loop's bookkeeping: one training run's objects, its epochs, declared phases and
checkpoints (the steps themselves: trainer/loop.py; how it ends: trainer/exits.py)."""
from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from trainer.checkpoint import SaveFailed, capture_rng, nonfinite_tensors, save_checkpoint
from trainer.config import TrainConfig
from trainer.control import NonFiniteLoss, RunControl
from trainer.data import VideoSet, background_baseline, make_loaders
from trainer.distributed import Dist
from trainer.exits import EXIT_DONE, SaveAborted, finish, stopped
from trainer.loop import StopTraining, evaluate, steps_per_epoch, train_one_epoch
from trainer.metrics import MetricsLog
from trainer.model import VideoTokenizer
from trainer.console import emit
from trainer.progress import BatchReporter, SoftWrites, progress_path_for
from trainer.start import resume_from

# A declared phase (SPEC 7: expect_next_s) gets 3x its last measured time, at least this.
PHASE_MIN_S = 60.0
FIRST_STEP_S = 60.0  # the first step, with nothing measured yet (CUDA start-up, first batch)


def lr_schedule(warmup_steps: int, total_steps: int):
    """Return the LambdaLR factor: linear warm-up, then cosine decay to 10% at total_steps."""

    def factor(done: int) -> float:
        if done < warmup_steps:
            return (done + 1) / warmup_steps
        progress = min(1.0, (done - warmup_steps) / max(1, total_steps - warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def checkpoint_note(next_step: int) -> str:
    """Name a checkpoint by the last step it holds, as every line does (it resumes at the next)."""
    return f"the checkpoint at step {next_step - 1} stands"


class Run:
    """One training run: the objects it needs and the steps of main, each a method."""

    def __init__(self, config: TrainConfig, dist: Dist, device: torch.device, data_id: dict):
        self.config = config
        self.dist = dist
        self.device = device
        self.data_id = data_id  # data.identify(): what the checkpoint knows the data by
        self.out = Path(config.out)
        self.checkpoint_path = self.out / "checkpoint.pt"
        self.history: list = []  # {"epoch", "train_loss", "val_loss"} per finished epoch
        self.next_step = 1
        # next_step of the checkpoint on disk, if any (it holds the state after step saved_step - 1)
        self.saved_step: Optional[int] = None
        self.carried_loss_sum = 0.0  # of the epoch a checkpoint stopped in
        self.elapsed_before_s = 0.0  # training time of earlier processes (resumes)
        self.started = time.monotonic()
        self.phase_s: dict = {}  # last measured seconds of each declared phase
        self.soft = SoftWrites()  # progress, metrics and plot: failures are warnings
        self.reporter: Optional[BatchReporter] = None
        self.control: Optional[RunControl] = None
        self.metrics: Optional[MetricsLog] = None  # rank 0's, once training starts

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
        """Continue from OUT/checkpoint.pt when --resume auto finds one; ValueError (one line) if
        it is not ours, was made with other settings or data, or does not fit."""
        if self.config.resume != "auto":
            return
        resumed = resume_from(self.checkpoint_path, self.config, self.dist, self.data_id,
                              self.steps_per_epoch, self.model, self.optimizer, self.scheduler,
                              self.rng)
        if resumed is None:
            return
        self.carried_loss_sum = resumed.carried_loss_sum
        self.next_step = self.saved_step = resumed.next_step
        self.history = resumed.history
        self.elapsed_before_s = resumed.elapsed_s
        if self.dist.is_main:
            line = f"Resuming from {self.checkpoint_path} at step {self.next_step}"
            if resumed.changed:
                line += f"; changed since the checkpoint: {', '.join(resumed.changed)}"
            emit(line)
            if self.next_step - 1 > self.total_steps:
                emit(f"The checkpoint is past the {self.total_steps} steps of --epochs"
                     f" {self.config.epochs}: nothing to train")

    # --- declared phases: expect_next_s in the progress file, and the watchdog's patience

    def expect_s(self, phase: str) -> float:
        """Return how long `phase` may take: 3x its last measured time, at least PHASE_MIN_S."""
        return max(PHASE_MIN_S, 3 * self.phase_s.get(phase, 0.0))

    @contextmanager
    def phase(self, name: str):
        """Declare a slow phase before it (expect_next_s), measure it, and clear it after."""
        expect = self.expect_s(name)
        self.reporter.declare(name, expect)
        self.control.expect(expect)
        began = time.monotonic()
        try:
            yield
        finally:
            self.phase_s[name] = time.monotonic() - began
            self.control.phase_over()
        self.reporter.clear()

    # --- checkpoints

    def save(self, next_step: int, epoch_loss_sum: float = 0.0) -> None:
        """Write the checkpoint (rank 0), resuming at `next_step`; every rank must call it.

        NonFiniteLoss instead when the weights are not finite (never saved); SaveAborted
        when the file could not be written (the previous checkpoint is kept).
        """
        d = self.dist
        with self.phase("saving checkpoint"):
            bad = nonfinite_tensors(self.model.named_parameters())
            if d.reduce_max(int(bool(bad) or not math.isfinite(epoch_loss_sum)), self.device):
                raise NonFiniteLoss(next_step - 1, float("nan"), what="weights")
            # per rank: each has its own random state and its own share of the epoch's loss
            per_rank = d.gather({"rng": capture_rng(self.rng),
                                 "epoch_loss_sum": epoch_loss_sum})  # a collective
            failure = None
            if d.is_main:
                try:
                    save_checkpoint(self.checkpoint_path, {
                        "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict(), "next_step": next_step,
                        "rank_state": per_rank, "steps_per_epoch": self.steps_per_epoch,
                        "world_size": d.world_size, "history": self.history,
                        "elapsed_s": self.elapsed_s(), "config": self.config.to_dict(),
                        "data": self.data_id})
                except SaveFailed as exc:
                    failure = exc.reason
            # no rank may go on (or exit, making torchrun kill the rest) before the file is
            # in place, and all stop together if it could not be written
            if d.reduce_max(int(failure is not None), self.device):
                raise SaveAborted(failure or "failed on rank 0")
        self.saved_step = next_step
        self.control.saved()
        if self.control.watchdog is not None:
            self.control.watchdog.checkpoint_note = checkpoint_note(next_step)

    # --- the epochs

    def train(self, control: RunControl) -> int:
        """Run the remaining epochs; return the exit status."""
        c, d = self.config, self.dist
        self.control = control
        control.on_checkpoint = self.save
        if self.saved_step is not None and control.watchdog is not None:
            control.watchdog.checkpoint_note = checkpoint_note(self.saved_step)
        progress_path = progress_path_for(self.out, d.rank, d.world_size)
        self.metrics = metrics = (MetricsLog(self.out / "metrics.jsonl", soft=self.soft)
                                  if d.is_main else None)
        if metrics is not None:
            later, torn = metrics.cut_back(self.next_step, self.steps_per_epoch)
            if later or torn:
                dropped = " and ".join(part for n, part in (
                    (later, f"{later} record(s) of later steps"), (torn, f"{torn} torn line(s)")) if n)
                emit(f"Cut {metrics.path} back to step {self.next_step - 1}: dropped {dropped}")
        self.reporter = reporter = BatchReporter(
            c.epochs, c.log_every_s, verbose=d.is_main and not c.bar, progress_path=progress_path,
            metrics=metrics, start_time=self.started - self.elapsed_before_s, soft=self.soft,
            print_progress=d.is_main)
        if self.history:  # what the file showed at the last epoch's end, until a step runs
            last = self.history[-1]
            reporter.epoch_ended(last["epoch"] - 1, last["train_loss"], last["val_loss"],
                                 last["epoch"] * self.steps_per_epoch, self.steps_per_epoch)
        first_epoch, start_batch = divmod(self.next_step - 1, self.steps_per_epoch)
        if first_epoch < c.epochs:
            reporter.start(first_epoch, self.steps_per_epoch, self.next_step)
            reporter.declare("first step", FIRST_STEP_S)
            control.expect(FIRST_STEP_S)
        sampler = self.train_loader.sampler
        for epoch in range(first_epoch, c.epochs):
            if d.is_main and not c.bar:
                emit(f"Epoch {epoch + 1}/{c.epochs}")
            sampler.set_epoch(epoch)
            sampler.set_start(start_batch * c.batch_size)
            try:
                result = train_one_epoch(
                    self.ddp, self.train_loader, self.optimizer, self.device, epoch,
                    total_epochs=c.epochs, scheduler=self.scheduler, reporter=reporter,
                    control=control, rng=self.rng, start_batch=start_batch,
                    carried_loss_sum=self.carried_loss_sum, bar=c.bar and d.is_main)
            except StopTraining as stop:
                self.save(stop.next_step, stop.epoch_loss_sum)
                return stopped(self, control, stop.next_step)
            start_batch, self.carried_loss_sum = 0, 0.0
            self.end_epoch(epoch, d.mean(result["loss"], self.device), metrics)
            next_step = (epoch + 1) * self.steps_per_epoch + 1
            self.save(next_step)
            # a signal may have come during validation or the save
            if control.check() and epoch + 1 < c.epochs:
                return stopped(self, control, next_step)
        finish(self)
        return EXIT_DONE

    def end_epoch(self, epoch: int, train_loss: float, metrics: Optional[MetricsLog]) -> None:
        """Validate, then report the epoch: [PROGRESS] line, progress file, metrics."""
        with self.phase("validation"):
            val_loss = evaluate(self.model, self.val_loader, self.device)
        self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        if metrics is not None:
            metrics.epoch(epoch + 1, train_loss, val_loss, self.elapsed_s())
        self.reporter.end_epoch(epoch, train_loss, val_loss, (epoch + 1) * self.steps_per_epoch,
                                self.steps_per_epoch)
