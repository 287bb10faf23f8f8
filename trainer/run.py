"""One training run, start to finish: take the folder, build, resume, train, and map how
it ended to an exit status (trainer/exits.py). The parts: trainer/start.py (input, folder,
resume checks), trainer/epochs.py (the epochs' bookkeeping), trainer/loop.py (the steps).
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from trainer.config import TrainConfig
from trainer.control import NonFiniteLoss, RunControl
from trainer.distributed import setup_distributed, teardown_distributed
from trainer.epochs import Run
from trainer.exits import EXIT_IOERR, EXIT_NONFINITE, EXIT_USAGE, SaveAborted, report_error
from trainer.heartbeat import Heartbeat
from trainer.signals import StopSignals, Watchdog
from trainer.start import Prepared, prepare, take_folder

__all__ = ["run", "Run", "prepare", "report_error"]


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
