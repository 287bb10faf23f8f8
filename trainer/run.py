"""One training run, start to finish: the folder, resume, epochs, checkpoints, the end.

Exit statuses (SPEC 8): 0 done; 2 bad input (one line); 65 a non-finite loss; 74 a
checkpoint could not be saved (the previous one kept); 128+N stopped by signal N;
1 a bug (a traceback).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional, Tuple

import numpy as np
import torch

from trainer.checkpoint import (SaveFailed, capture_rng, check_resumable, load_checkpoint,
                                nonfinite_tensors, restore_rng, save_checkpoint)
from trainer.config import Fault, TrainConfig, parse_faults
from trainer.control import NonFiniteLoss, RunControl
from trainer.signals import STOP_GRACE_S, StopSignals, Watchdog
from trainer.data import (VideoSet, background_baseline, identify, load_npz, make_loaders,
                          make_moving_shapes)
from trainer.distributed import Dist, setup_distributed, teardown_distributed
from trainer.heartbeat import Heartbeat
from trainer.loop import StopTraining, evaluate, steps_per_epoch, train_one_epoch
from trainer.metrics import MetricsLog, plot_losses
from trainer.model import VideoTokenizer
from trainer.outdir import RunLock, move_aside, remove_leftovers
from trainer.progress import BatchReporter, SoftWrites, emit, format_loss, progress_path_for

EXIT_BUG = 1  # what Python gives an uncaught exception
EXIT_USAGE = 2  # bad input: options, data, checkpoint, --out
EXIT_NONFINITE = 65  # EX_DATAERR: the loss became NaN or infinite
EXIT_IOERR = 74  # EX_IOERR: a checkpoint could not be saved

# A declared phase (SPEC 7: expect_next_s) gets 3x its last measured time, at least this.
PHASE_MIN_S = 60.0
FIRST_STEP_S = 60.0  # the first step, with nothing measured yet (CUDA start-up, first batch)


class SaveAborted(Exception):
    """A checkpoint save failed on rank 0 (every rank raises it, to stop together)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


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


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # load_state_dict: "Error(s) in loading state_dict for X:" then the reasons
    if len(lines) > 1 and lines[0].startswith("Error(s) in loading"):
        lines = lines[1:]
    return (lines[0] if lines else type(exc).__name__)[:300]


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
        path = self.checkpoint_path
        state = load_checkpoint(path)
        if state is None:
            return
        changed = check_resumable(state, path, self.config.to_dict(), self.data_id,
                                  self.dist.world_size, self.steps_per_epoch)
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            mine = state["rank_state"][self.dist.rank]
            restore_rng(mine["rng"], self.rng)
            self.carried_loss_sum = float(mine["epoch_loss_sum"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
            raise ValueError(f"checkpoint {path} does not fit this model ({_first_line(exc)});"
                             " move it away or pass --resume never") from None
        self.next_step = self.saved_step = state["next_step"]
        self.history = state["history"]
        self.elapsed_before_s = float(state["elapsed_s"])
        if self.dist.is_main:
            line = f"Resuming from {path} at step {self.next_step}"
            if changed:
                line += f"; changed since the checkpoint: {', '.join(changed)}"
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
            self.control.expect(STOP_GRACE_S)
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
            self.control.watchdog.checkpoint_note = f"the checkpoint at step {next_step} stands"

    # --- the epochs

    def train(self, control: RunControl) -> int:
        """Run the remaining epochs; return the exit status."""
        c, d = self.config, self.dist
        self.control = control
        control.on_checkpoint = self.save
        if self.saved_step is not None and control.watchdog is not None:
            control.watchdog.checkpoint_note = f"the checkpoint at step {self.saved_step - 1} stands"
        progress_path = progress_path_for(self.out, d.rank, d.world_size)
        metrics = MetricsLog(self.out / "metrics.jsonl", soft=self.soft) if d.is_main else None
        if metrics is not None:
            dropped = metrics.cut_back(self.next_step, self.steps_per_epoch)
            if dropped:
                emit(f"Cut {metrics.path} back to step {self.next_step - 1}"
                     f" ({dropped} later or torn line(s) dropped)")
        self.reporter = reporter = BatchReporter(
            c.epochs, c.log_every_s, verbose=d.is_main and not c.bar, progress_path=progress_path,
            metrics=metrics, start_time=self.started - self.elapsed_before_s, soft=self.soft,
            print_progress=d.is_main)
        if self.history:
            reporter.val_loss = self.history[-1]["val_loss"]
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
                return self.stopped(control, stop.next_step)
            start_batch, self.carried_loss_sum = 0, 0.0
            self.end_epoch(epoch, d.mean(result["loss"], self.device), metrics)
            next_step = (epoch + 1) * self.steps_per_epoch + 1
            self.save(next_step)
            # a signal may have come during validation or the save
            if control.check() and epoch + 1 < c.epochs:
                return self.stopped(control, next_step)
        self.finish()
        return 0

    def end_epoch(self, epoch: int, train_loss: float, metrics: Optional[MetricsLog]) -> None:
        """Validate, then report the epoch: [PROGRESS] line, progress file, metrics."""
        with self.phase("validation"):
            val_loss = evaluate(self.model, self.val_loader, self.device)
        self.history.append({"epoch": epoch + 1, "train_loss": train_loss, "val_loss": val_loss})
        if metrics is not None:
            metrics.epoch(epoch + 1, train_loss, val_loss, self.elapsed_s())
        self.reporter.end_epoch(epoch, train_loss, val_loss, (epoch + 1) * self.steps_per_epoch,
                                self.steps_per_epoch)

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
            # This rank's file would stand still while rank 0 tests and plots: say for how long, so a
            # supervisor watching every rank's file does not take the end of the run for a hang.
            self.reporter.declare("done; rank 0 finishes the run",
                                  self.expect_s("testing") + self.expect_s("drawing loss.png"))
            return
        with self.phase("testing"):
            test_loss = evaluate(self.model, self.test_loader, self.device)
        wrote = "metrics.jsonl"
        with self.phase("drawing loss.png"):  # matplotlib's import alone can take seconds
            if self.history and self.soft.attempt("the plot", self.out / "loss.png",
                                                  lambda: plot_losses(self.history, self.out / "loss.png")):
                wrote += ", loss.png"
        done = (max(self.next_step, self.saved_step or 1) - 1) / self.steps_per_epoch
        epochs = f"{done:.0f}" if done == int(done) else f"{done:.2f}"
        emit(f"Done: {epochs} epochs in {self.elapsed_s():.1f}s; test loss {format_loss(test_loss)};"
             f" wrote {self.out}/checkpoint.pt, {wrote}")



def report_error(message: str) -> None:
    """Print a one-line error for bad input (no traceback: nothing in the code went wrong)."""
    line = " ".join(message.split())
    try:
        sys.stderr.write(f"train.py: error: {line}\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


@dataclasses.dataclass
class Prepared:
    faults: Tuple[Fault, ...]  # --fault, parsed
    device: torch.device  # --device, resolved (before the rank picks its GPU)
    data: VideoSet  # --data, or the synthetic set
    data_id: dict  # what a checkpoint knows the data by (content, not name)


def prepare(config: TrainConfig) -> Prepared:
    """Check everything the user gave before any training starts; ValueError names what is wrong."""
    config.validate()
    faults = parse_faults(config.fault)
    device = resolve_device(config.device)
    if config.data is not None:
        data = load_npz(config.data)
    else:
        data = make_moving_shapes(config.samples, config.frames, config.size, config.seed)
    return Prepared(faults, device, data, identify(data, config.data))


def take_folder(config: TrainConfig) -> RunLock:
    """Lock OUT, remove half-written leftovers, move an old run aside for --resume never (rank 0)."""
    lock = RunLock(config.out).acquire()
    try:
        remove_leftovers(config.out)
        if config.resume == "never":
            moved = move_aside(config.out)
            if moved is not None:
                emit(f"Moved the earlier run's files to {moved}/ (--resume never)")
    except BaseException:
        lock.release()
        raise
    return lock


def run(config: TrainConfig, prepared: Optional[Prepared] = None) -> int:
    """Train as `config` says; return the exit status (see the module's docstring)."""
    prepared = prepared or prepare(config)
    dist = setup_distributed(prepared.device.type)
    device = prepared.device
    if device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    heartbeat = None
    lock = None
    try:
        # rank 0 takes the folder; the others wait for its verdict (a collective)
        problem = None
        if dist.is_main:
            try:
                lock = take_folder(config)
            except ValueError as exc:
                problem = str(exc)
        if dist.reduce_max(int(problem is not None), device):
            if problem:
                report_error(problem)
            return EXIT_USAGE
        if dist.is_main and os.environ.get("MAGVIT_SUPERVISED") != "1":
            heartbeat = Heartbeat(config.heartbeat_s).start()
        with StopSignals(Watchdog()) as signals:
            job = Run(config, dist, device, prepared.data_id)
            job.build(prepared.data)
            try:
                job.resume()
            except ValueError as exc:
                if dist.is_main:
                    report_error(str(exc))
                return EXIT_USAGE
            control = RunControl(dist, device, signals, prepared.faults, heartbeat,
                                 config.max_steps, checkpoint_every_s=config.checkpoint_every_s,
                                 out=config.out)
            try:
                return job.train(control)
            except NonFiniteLoss as exc:
                if dist.is_main:
                    kept = "no checkpoint was saved" if job.saved_step is None else \
                        f"last good checkpoint at step {job.saved_step - 1} kept"
                    report_error(f"{exc.describe()}; {kept}")
                return EXIT_NONFINITE
            except SaveAborted as exc:
                if dist.is_main:
                    previous = ("no previous checkpoint" if job.saved_step is None else
                                f"previous checkpoint at step {job.saved_step - 1} kept")
                    report_error(f"checkpoint save failed: {exc.reason}; {previous}")
                return EXIT_IOERR
    finally:
        if heartbeat is not None:
            heartbeat.stop()
        if lock is not None:
            lock.release()
        teardown_distributed(dist)
