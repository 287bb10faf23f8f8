"""Settings of a training run: the model's shape and the run's options, validated."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 3  # video channels (RGB); taken from the data
    width: int = 8  # channels after the first conv; doubled at each downsampling
    codebook_bits: int = 8  # LFQ latent channels; the implicit codebook has 2**bits codes
    levels: int = 1  # downsamplings by 2 in space (latent grid H/2**levels); channels double each
    temporal_downsample: bool = True  # halve T at the first level (8 frames -> 4 latent frames)
    entropy_weight: float = 0.02  # LFQ entropy term; MAGVIT-v2 uses 0.1, which here outweighs MSE
    diversity_gamma: float = 1.0  # weight of codebook entropy inside the entropy term
    commitment_weight: float = 0.25  # weight of ||z - sg(q)||^2, keeps z near the corners
    temperature: float = 0.01  # softmax temperature of the code distribution for the entropy term

    def validate(self) -> None:
        """Raise ValueError naming the first field that is out of range."""
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {self.in_channels}")
        if not 1 <= self.levels <= 4:
            raise ValueError(f"levels must be in 1..4, got {self.levels}")
        if self.width < 1:
            raise ValueError(f"width must be >= 1, got {self.width}")
        # the entropy term materialises all 2**bits codes per position
        if not 1 <= self.codebook_bits <= 12:
            raise ValueError(f"codebook_bits must be in 1..12, got {self.codebook_bits}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")


@dataclass(frozen=True)
class Fault:
    kind: str  # "hang" or "crash"
    step: int  # global 1-based step at whose start the fault fires
    rank: Optional[int] = None  # only this rank; None means every rank

    def fires(self, step: int, rank: int) -> bool:
        """Tell whether the fault fires when `step` begins on `rank`."""
        return step == self.step and (self.rank is None or self.rank == rank)


def parse_fault(spec: Optional[str]) -> Optional[Fault]:
    """Parse `hang:STEP[:RANK]` or `crash:STEP[:RANK]`; None stays None."""
    if spec is None or spec == "":
        return None
    parts = spec.split(":")
    usage = f"--fault: expected hang:STEP[:RANK] or crash:STEP[:RANK], got {spec!r}"
    if len(parts) not in (2, 3) or parts[0] not in ("hang", "crash"):
        raise ValueError(usage)
    try:
        numbers = [int(p) for p in parts[1:]]
    except ValueError:
        raise ValueError(usage) from None
    if numbers[0] < 1:
        raise ValueError(f"--fault: STEP is 1-based, got {numbers[0]}")
    if len(numbers) == 2 and numbers[1] < 0:
        raise ValueError(f"--fault: RANK must be >= 0, got {numbers[1]}")
    return Fault(parts[0], numbers[0], numbers[1] if len(numbers) == 2 else None)


@dataclass(frozen=True)
class TrainConfig:
    data: Optional[str] = None  # .npz with videos (N,C,T,H,W) and labels (N,); None = synthetic
    samples: int = 384  # synthetic clips (split 80/10/10 into train/val/test)
    frames: int = 8  # synthetic clip length T
    size: int = 32  # synthetic frame side H = W, in pixels
    epochs: int = 12  # passes over the training split
    batch_size: int = 8  # clips per step, per process
    lr: float = 1e-3  # peak Adam learning rate, after warm-up
    warmup_steps: int = 20  # linear warm-up, then cosine decay to 10% of lr
    seed: int = 0  # seeds the synthetic set, the split, the init and the data order
    out: str = "runs/magvit"  # checkpoint.pt, metrics.jsonl, loss.png, PROGRESS.txt
    device: str = "auto"  # auto | cpu | cuda
    resume: str = "auto"  # auto: continue from OUT/checkpoint.pt when present; never
    log_every_s: float = 30.0  # longest gap between batch lines / progress-file updates
    heartbeat_s: float = 30.0  # heartbeat thread period; 0 = off
    bar: bool = False  # tqdm bar per epoch instead of batch lines
    fault: Optional[str] = None  # hang:STEP[:RANK] | crash:STEP[:RANK], for testing supervisors
    max_steps: Optional[int] = None  # stop (with a checkpoint) before this global step; for tests
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)

    def validate(self) -> None:
        """Raise ValueError naming the first option whose value cannot work."""
        positive = {"--samples": self.samples, "--frames": self.frames, "--epochs": self.epochs,
                    "--batch-size": self.batch_size}
        for option, value in positive.items():
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        if self.data is None and self.samples < 3:
            raise ValueError(f"--samples must be >= 3 (train, val and test), got {self.samples}")
        if self.size < 8:
            raise ValueError(f"--size must be >= 8, got {self.size}")
        if self.lr <= 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"--resume must be auto or never, got {self.resume!r}")
        if self.log_every_s < 0:
            raise ValueError(f"--log-every-s must be >= 0, got {self.log_every_s}")
        if self.heartbeat_s < 0:
            raise ValueError(f"--heartbeat-s must be >= 0, got {self.heartbeat_s}")
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        parse_fault(self.fault)
        self.model.validate()

    def to_dict(self) -> dict:
        """Return plain types only, so torch.load(weights_only=True) accepts the checkpoint."""
        return dataclasses.asdict(self)
