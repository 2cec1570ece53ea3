"""Validated, frozen configs: one per command.

A config is what a command means, independent of how it was asked for (shell or Python).
Validation happens in ``__post_init__`` so that a bad value fails before any work starts,
with a message that names the option. This module must not import torch: the CLI
builds configs before it pays torch's import time.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from typing import Any

from .errors import ConfigError

DEVICE_HELP = "auto, cpu, cuda, cuda:N, N or mps"
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CACHE_MODES = ("auto", "none", "ram", "device")


def parse_rotations(text: str | tuple | list) -> tuple[float, ...]:
    """'0,90,180,270' -> (0.0, 90.0, 180.0, 270.0); the label of a copy is its index here."""
    if isinstance(text, (tuple, list)):
        items = [str(v) for v in text]
    else:
        items = [t.strip() for t in str(text).split(",")]
    if not items or all(t == "" for t in items):
        raise ConfigError("--rotations is empty: give angles in degrees, e.g. --rotations 0,90,180,270")
    angles: list[float] = []
    for t in items:
        try:
            a = float(t)
        except ValueError:
            raise ConfigError(
                f"--rotations: {t!r} is not a number; give angles in degrees, e.g. --rotations 0,90,180,270"
            ) from None
        if not math.isfinite(a) or not 0 <= a < 360:
            raise ConfigError(f"--rotations: {t} is outside [0, 360); use e.g. 270 instead of -90")
        if a in angles:
            raise ConfigError(f"--rotations: {t} appears twice; every angle must be distinct")
        angles.append(a)
    if len(angles) < 2:
        raise ConfigError("--rotations needs at least two angles: with one there is nothing to predict")
    return tuple(angles)


def format_rotations(angles: tuple[float, ...]) -> str:
    return ",".join(f"{a:g}" for a in angles)


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)} (got {value!r})")


def _check_positive(option: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{option} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


class _Serializable:
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[arg-type]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        return cls(**kwargs)


@dataclass(frozen=True)
class PretrainConfig(_Serializable):
    """Everything `rotnet pretrain` needs; see `rotnet pretrain --help` for each field."""

    model: str = "resnet18"
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_split: float = 0.1
    rotations: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    copies: str = "all"
    epochs: int = 10
    batch_size: int = 128
    lr: float | None = None
    weight_decay: float | None = None
    momentum: float = 0.9
    optimizer: str = "sgd"
    schedule: str = "cosine"
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    warmup_epochs: float = 0.0
    img_size: int | None = None
    augment: bool = True
    workers: int = 2
    seed: int = 0
    init: str | None = None
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    cache: str = "auto"
    strict_data: bool = False
    out: str | None = None
    overwrite: bool = False
    resume: bool = False
    save_every: int = 0
    log_every: int = 10
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "rotations", parse_rotations(self.rotations))
        _check_choice("--copies", self.copies, ("all", "one"))
        _check_choice("--optimizer", self.optimizer, ("sgd", "adamw"))
        _check_choice("--schedule", self.schedule, ("cosine", "step"))
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--cache", self.cache, CACHE_MODES)
        _check_positive("--epochs", self.epochs)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--lr", self.lr)
        _check_positive("--weight-decay", self.weight_decay, allow_zero=True)
        _check_positive("--warmup-epochs", self.warmup_epochs, allow_zero=True)
        _check_positive("--workers", self.workers, allow_zero=True)
        _check_positive("--save-every", self.save_every, allow_zero=True)
        _check_positive("--log-every", self.log_every)
        _check_positive("--max-steps-per-epoch", self.max_steps_per_epoch)
        if self.img_size is not None and self.img_size < 8:
            raise ConfigError(f"--img-size must be at least 8 pixels (got {self.img_size})")
        if not 0 <= self.val_split < 1:
            raise ConfigError(f"--val-split must be in [0, 1) (got {self.val_split})")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"--gamma must be in (0, 1] (got {self.gamma})")
        if self.warmup_epochs >= self.epochs:
            raise ConfigError(
                f"--warmup-epochs ({self.warmup_epochs:g}) must be shorter than --epochs ({self.epochs})"
            )
        milestones = tuple(int(m) for m in self.milestones)
        if any(m <= 0 or m >= self.epochs for m in milestones) or list(milestones) != sorted(set(milestones)):
            raise ConfigError(
                f"--milestones must be increasing epochs between 1 and {self.epochs - 1} (got {','.join(map(str, milestones))})"
            )
        object.__setattr__(self, "milestones", milestones)
        if self.schedule == "step" and not milestones:
            raise ConfigError("--schedule step needs --milestones, e.g. --milestones 30,60,80")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume contradict each other: choose one")

    @property
    def num_rotations(self) -> int:
        return len(self.rotations)

    @property
    def resolved_lr(self) -> float:
        # The paper: SGD lr 0.1 at 128 images x 4 rotations; AdamW's usual 1e-3.
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05


# Options that may differ on --resume without changing what is computed.
RESUME_FREE_OPTIONS = ("device", "workers", "save_every", "log_every", "cache", "out", "resume", "overwrite", "strict_data", "download", "data_dir")


def parse_int_list(option: str, text: str | None) -> tuple[int, ...]:
    if text is None or str(text).strip() == "":
        return ()
    try:
        return tuple(int(t) for t in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{option} must be a comma-separated list of integers (got {text!r})") from None


__all__ = [
    "PretrainConfig",
    "parse_rotations",
    "format_rotations",
    "parse_int_list",
    "RESUME_FREE_OPTIONS",
]
