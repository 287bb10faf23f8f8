"""The step loop: one epoch of training, and evaluation.

The loop knows nothing of files or signals: what it reports goes through a
BatchReporter, and whether to fault or stop is asked of a RunControl, both optional.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Optional

import numpy as np
import torch
from tqdm import tqdm

from trainer.console import BarStdout
from trainer.data import ResumableSampler, to_unit_float
from trainer.model import reconstruction_loss
from trainer.progress import BatchReporter


class StopTraining(Exception):
    """Raised at a step boundary inside an epoch when the run must stop; carries what resume needs."""

    def __init__(self, next_step: int, epoch_loss_sum: float, epoch_batches: int):
        super().__init__(f"stop before step {next_step}")
        self.next_step = next_step  # global 1-based step to run after resuming
        self.epoch_loss_sum = epoch_loss_sum  # reconstruction loss summed over the epoch so far
        self.epoch_batches = epoch_batches  # batches of this epoch done so far


def steps_per_epoch(loader) -> int:
    """Return the number of batches in a full epoch, even while the sampler skips some."""
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        return math.ceil(sampler.num_samples / loader.batch_size)
    return len(loader)


def autocast_for(device: torch.device):
    """Return bf16 autocast on CUDA and a no-op elsewhere."""
    if device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return nullcontext()


def prepare_batch(videos: torch.Tensor, device: torch.device,
                  rng: Optional[np.random.Generator] = None) -> torch.Tensor:
    """Move a batch to the device as float in [0, 1]; flip it left-right half the time if rng."""
    # convert after the copy: uint8 crosses the bus at a quarter of the bytes
    videos = to_unit_float(videos.to(device, non_blocking=True))
    if rng is not None and rng.random() < 0.5:
        videos = videos.flip(-1)
    return videos


class FirstNonFinite:
    """The first step whose loss was NaN or infinite, kept on the device as [step, loss].

    Recording costs a few tiny kernels and no synchronisation; the value is read only
    where the loop reads the loss anyway (a printed line), or agreed on under torchrun.
    """

    def __init__(self, device: torch.device):
        self.t = torch.zeros(2, dtype=torch.float64, device=device)  # [0, 0]: none yet

    def record(self, step: int, loss: torch.Tensor) -> None:
        """Remember `step` if `loss` is not finite and nothing was remembered before."""
        bad = ~torch.isfinite(loss.detach()) & (self.t[0] == 0)
        self.t = torch.where(bad, torch.stack([torch.full_like(self.t[0], step),
                                               loss.detach().double()]), self.t)


def train_one_epoch(model, train_loader, optimizer, device, epoch: int, verbose: bool = True, *,
                    total_epochs: Optional[int] = None, scheduler=None,
                    reporter: Optional[BatchReporter] = None, control=None,
                    rng: Optional[np.random.Generator] = None, start_batch: int = 0,
                    carried_loss_sum: float = 0.0, bar: bool = False) -> dict:
    """Train one epoch (0-based `epoch`); return {"loss": mean reconstruction loss}.

    Prints `  Batch i/n - Loss: x` (the mean since the previous line) on the first and
    last batch and at least every log_every_s of `reporter`. `start_batch` and
    `carried_loss_sum` continue an epoch a checkpoint stopped in the middle of; the
    sampler must already skip those batches. With a `control`: raises StopTraining when
    it says stop, saves when it says save, and raises NonFiniteLoss (control.NonFiniteLoss)
    at the first printed line after a NaN or infinite loss.
    """
    device = torch.device(device)
    model.train()
    n = steps_per_epoch(train_loader)
    sampler = getattr(train_loader, "sampler", None)
    if isinstance(sampler, ResumableSampler):
        sampler.set_epoch(epoch)  # a new order each epoch, for callers of the API too
    if reporter is None:
        reporter = BatchReporter(total_epochs or epoch + 1, verbose=verbose)
    # running sums stay on the device: reading them (.tolist) waits for the GPU,
    # so it happens only when a line is printed
    epoch_sum = torch.full((), carried_loss_sum, device=device)
    window = torch.zeros(3, device=device)  # recon, entropy, commitment since the last report
    window_steps = 0
    nonfinite = FirstNonFinite(device) if control is not None else None
    done = start_batch
    batches = train_loader
    if bar:
        batches = tqdm(train_loader, total=n, initial=start_batch, file=BarStdout(),
                       desc=f"Epoch {epoch + 1}/{total_epochs or epoch + 1}", dynamic_ncols=True)
    try:
        for batch, (videos, _labels) in enumerate(batches, start=start_batch):
            step = epoch * n + batch + 1
            poison = control.before_step(step) if control is not None else False
            videos = prepare_batch(videos, device, rng)
            with autocast_for(device):
                recon, aux = model(videos)
                recon_loss = reconstruction_loss(recon, videos)
                if poison:  # --fault nan: what an overflow does, on any machine
                    recon_loss = recon_loss * float("nan")
                loss = recon_loss + aux["quant_loss"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr = optimizer.param_groups[0]["lr"]  # this step's: the schedule moves it next
            if scheduler is not None:
                scheduler.step()
            terms = torch.stack([recon_loss, aux["entropy_loss"], aux["commit_loss"]]).detach()
            if nonfinite is not None:
                nonfinite.record(step, loss)
            window += terms
            window_steps += 1
            epoch_sum += terms[0]
            done += 1
            if reporter.due(batch, n):
                read = (window / window_steps).double()
                if nonfinite is not None:
                    read = torch.cat([read, nonfinite.t])
                values = read.tolist()  # the one device read of this line
                if nonfinite is not None and values[3]:
                    control.nonfinite(int(values[3]), values[4])  # raises, in one process
                recon_mean, entropy_mean, commit_mean = values[:3]
                reporter.report(epoch, batch, n, step, recon_mean,
                                lr=lr,
                                entropy_loss=entropy_mean, commit_loss=commit_mean)
                if bar:
                    batches.set_postfix_str(f"loss={recon_mean:.4f}", refresh=False)
                window.zero_()
                window_steps = 0
            else:
                reporter.tick(epoch, batch, n, step)
            if control is None:
                continue
            last = batch == n - 1
            decision = control.after_step(step, epoch + 1, batch + 1, last,
                                          nonfinite.t if nonfinite is not None else None)
            # a stop on the last batch is left to the caller, after validation and the epoch checkpoint
            if (decision.stop or decision.save) and not last:
                first_bad, bad_loss = nonfinite.t.tolist()  # a save reads the device anyway
                if first_bad:
                    control.nonfinite(int(first_bad), bad_loss)
                if decision.stop:
                    raise StopTraining(step + 1, float(epoch_sum.item()), done)
                control.checkpoint(step + 1, float(epoch_sum.item()))
    finally:
        if bar:
            batches.close()
    return {"loss": float(epoch_sum.item()) / max(1, done)}


@torch.no_grad()
def evaluate(model, loader, device) -> float:
    """Return the mean reconstruction loss per pixel over `loader`."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device, dtype=torch.float64)
    count = 0
    for videos, _labels in loader:
        videos = prepare_batch(videos, device)
        with autocast_for(device):
            recon, _aux = model(videos)
        total += reconstruction_loss(recon, videos).double() * videos.shape[0]
        count += videos.shape[0]
    model.train(was_training)
    return float(total.item()) / max(1, count)
