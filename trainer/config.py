"""Settings of a training run: the model's shape and the run's options, validated."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

FAULT_KINDS = ("hang", "hang-once", "crash", "nan")

# Options a resume may change: how the run reports, where it runs, when it ends, faults.
# Everything else (data, shapes, seeds, optimisation) must match the checkpoint's, or the
# resumed run would train the old weights on something else. Field -> option.
MAY_CHANGE_ON_RESUME = {
    "epochs": "--epochs", "log_every_s": "--log-every-s", "heartbeat_s": "--heartbeat-s",
    "checkpoint_every_s": "--checkpoint-every-s", "bar": "--bar", "device": "--device",
    "fault": "--fault", "out": "--out", "resume": "--resume", "max_steps": "max_steps",
}
# Not worth a word when they differ: the folder may be moved, and --resume is auto to get here.
SILENT_CHANGES = ("out", "resume", "max_steps")
SYNTHETIC_FIELDS = ("samples", "frames", "size")  # shape the synthetic set only
MAX_HEARTBEAT_S = 1e9  # about 30 years; threading cannot wait much longer than 9e9 s


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
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature}")


@dataclass(frozen=True)
class Fault:
    kind: str  # "hang", "hang-once", "crash" or "nan" (the step's loss made NaN)
    step: int  # global 1-based step at whose start the fault fires
    rank: Optional[int] = None  # only this rank; None means every rank

    def fires(self, step: int, rank: int) -> bool:
        """Tell whether the fault is due when `step` begins on `rank` (hang-once then checks its marker)."""
        return step == self.step and (self.rank is None or self.rank == rank)


FaultSpecs = Union[None, str, Sequence[str]]


def parse_fault(spec: Optional[str]) -> Optional[Fault]:
    """Parse `KIND:STEP[:RANK]`, KIND one of FAULT_KINDS; None stays None."""
    if spec is None or spec == "":
        return None
    parts = spec.split(":")
    usage = ("--fault: expected hang:STEP[:RANK], hang-once:STEP[:RANK], crash:STEP[:RANK] or"
             f" nan:STEP[:RANK], got {spec!r}")
    if len(parts) not in (2, 3) or parts[0] not in FAULT_KINDS:
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


def parse_faults(specs: FaultSpecs) -> Tuple[Fault, ...]:
    """Parse every --fault given (one spec or several); ValueError names a bad one."""
    if specs is None:
        return ()
    if isinstance(specs, str):
        specs = (specs,)
    return tuple(f for f in map(parse_fault, specs) if f is not None)


def _finite(option: str, value: float, minimum: float, strict: bool = False) -> None:
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
        raise ValueError(f"{option} must be a finite number {bound}, got {value}")


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
    log_every_s: float = 30.0  # longest gap between batch lines and metrics records
    heartbeat_s: float = 30.0  # heartbeat thread period; 0 = off
    checkpoint_every_s: float = 600.0  # longest training time between checkpoints (and each epoch end)
    bar: bool = False  # tqdm bar per epoch instead of batch lines
    fault: FaultSpecs = ()  # hang:STEP[:RANK] | hang-once:... | crash:... | nan:..., for testing
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
        if not 0 <= self.seed < 2 ** 63:
            raise ValueError(f"--seed must be in 0..2**63-1, got {self.seed}")
        if self.warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {self.warmup_steps}")
        _finite("--lr", self.lr, 0, strict=True)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.resume not in ("auto", "never"):
            raise ValueError(f"--resume must be auto or never, got {self.resume!r}")
        _finite("--log-every-s", self.log_every_s, 0)
        _finite("--heartbeat-s", self.heartbeat_s, 0)
        if self.heartbeat_s > MAX_HEARTBEAT_S:  # a thread cannot wait longer (OverflowError)
            raise ValueError(f"--heartbeat-s must be at most {MAX_HEARTBEAT_S:g} (0 turns it off),"
                             f" got {self.heartbeat_s:g}")
        _finite("--checkpoint-every-s", self.checkpoint_every_s, 0)
        if self.max_steps is not None and self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}")
        parse_faults(self.fault)
        self.model.validate()

    def to_dict(self) -> dict:
        """Return plain types only, so torch.load(weights_only=True) accepts the checkpoint."""
        d = dataclasses.asdict(self)
        d["fault"] = [f"{f.kind}:{f.step}" + ("" if f.rank is None else f":{f.rank}")
                      for f in parse_faults(self.fault)]
        return d


def option_name(field: str) -> str:
    """Return the command-line spelling of a TrainConfig field (`batch_size` -> `--batch-size`)."""
    if field.startswith("model."):
        return field  # no option: set through the API only
    return MAY_CHANGE_ON_RESUME.get(field, "--" + field.replace("_", "-"))


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in d.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _shown(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "none"
    return str(value)


def config_differences(saved: dict, current: dict) -> Tuple[list, list]:
    """Compare a checkpoint's config with this run's (both TrainConfig.to_dict()).

    Return (refused, changed): lines `--size 32 there, 16 here` for fields that must match,
    and `--epochs 3 -> 5` for fields that may change on resume. `data` is left out: a
    data file is compared by content (data_differences), not by name; the synthetic
    set's fields are compared only when neither run reads a file.
    """
    old, new = _flatten(saved), _flatten(current)
    synthetic = saved.get("data") is None and current.get("data") is None
    refused, changed = [], []
    for field in list(new) + [f for f in old if f not in new]:
        if field == "data" or (field in SYNTHETIC_FIELDS and not synthetic):
            continue
        a, b = old.get(field, "absent"), new.get(field, "absent")
        if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
            a, b = list(a), list(b)
        if a == b:
            continue
        if field in MAY_CHANGE_ON_RESUME:
            if field not in SILENT_CHANGES:
                changed.append(f"{option_name(field)} {_shown(a)} -> {_shown(b)}")
        else:
            refused.append(f"{option_name(field)} {_shown(a)} there, {_shown(b)} here")
    return refused, changed


def data_difference(saved: dict, current: dict) -> Optional[str]:
    """Compare two data identities (data.identify); return a refusal line, or None if the same.

    A file is known by its content (clip count, shape, dtype and a hash of its arrays),
    so a renamed copy resumes and another file of the same shape does not.
    """
    if saved.get("hash") == current.get("hash"):
        return None
    old, new = saved.get("source"), current.get("source")
    if old is None and new is None:
        return ("the synthetic data differs from the checkpoint's with the same options"
                " (made by another version of the trainer)")
    if old is None or new is None:
        return f"--data {old or 'synthetic'} there, {new or 'synthetic'} here"
    there, here = saved.get("summary", "?"), current.get("summary", "?")
    if there == here:
        there += f", hash {str(saved.get('hash'))[:12]}"
        here += f", hash {str(current.get('hash'))[:12]}"
    return f"--data {new} holds other videos than the checkpoint's {old} ({there} there, {here} here)"
