"""Validated, frozen configs: one per command.

A config is what a command means, independent of how it was asked for (shell or Python).
Validation happens in ``__post_init__`` so that a bad value fails before any work starts,
with a message that names the option. This module must not import torch: the CLI
builds configs before it pays torch's import time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import ConfigError
from .heads import HEAD_TYPES, HeadRecipe, trained_heads

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CACHE_MODES = ("auto", "none", "ram", "device")
AUGMENTS = ("auto", "none", "shift", "crop", "crop+flip")
MIN_IMG_SIZE = 8
# Sizes are bounded before anything is allocated: 8192 px is 200 MB per RGB float image, and a
# picture rotnet draws is bounded by PIL's decompression-bomb limit (about 89 million pixels).
MAX_IMG_SIZE = 8192
MAX_PICTURE_PIXELS = 89_478_485
LOGGERS = ("csv", "tensorboard", "wandb", "mlflow")  # --logger; each but csv is an optional extra
EVAL_HEADS = ("knn", "linear")  # --eval-heads: probe's heads cheap enough to run during pretraining
BEST_METRICS = (
    "auto",
    "none",
    "val_rot_acc",
    "val_loss",
    "knn",
    "linear",
)  # --best-metric (knn and linear also as knn:S)


def default_workers() -> int:
    """Loader workers when --workers is not given: the CPU cores this process may use, shared
    by the processes torchrun starts on this machine, less one for the training loop itself;
    at least 2, at most 8 (more rarely helps and costs memory; timm's train.py uses 4)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity call
        cores = os.cpu_count() or 2
    per_process = cores // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(2, min(8, per_process - 1))


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


def counted(n: Any, noun: str) -> str:
    """'1 epoch', '2 epochs', '3 batches': a count with its noun, singular for exactly one."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}es" if noun.endswith(("s", "x", "sh", "tch")) else f"{n} {noun}s"  # batches; epochs


def _check_choice(option: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{option} must be one of {', '.join(choices)} (got {value!r})")


def _check_positive(option: str, value: float | int | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    # nan and inf pass the comparisons below and would only fail deep inside training
    if (isinstance(value, float) and not math.isfinite(value)) or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"{option} must be {'>= 0' if allow_zero else '> 0'} (got {value})")


def _check_img_size(img_size: int | None) -> None:
    if img_size is not None and not MIN_IMG_SIZE <= img_size <= MAX_IMG_SIZE:
        raise ConfigError(f"--img-size must be between {MIN_IMG_SIZE} and {MAX_IMG_SIZE} pixels (got {img_size})")


def _check_png(out: str) -> None:
    if not str(out).lower().endswith(".png"):
        raise ConfigError(f"--out {out}: the picture is a PNG; give a file name ending in .png")


class _Serializable:
    # fields whose files from earlier versions hold another type (read as the field's own in __post_init__)
    _OLDER_TYPES: typing.ClassVar[dict[str, Any]] = {}

    def _check_number_types(self) -> None:
        """A number field holds a number: True is not 1 epoch, 1.5 is not an integer (a --config file's
        values, or Python callers, reach here without the command line's parsing). Called first in
        every config's __post_init__, so the range checks that follow compare numbers."""
        hints = typing.get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            value, hint = getattr(self, f.name), hints[f.name]
            numeric = {int, float} & ({hint} | set(typing.get_args(hint)))
            if not numeric or isinstance(value, str) or value is None or _value_fits(value, hint):
                continue
            if f.name in self._OLDER_TYPES and _value_fits(value, self._OLDER_TYPES[f.name]):
                continue
            option = "--" + f.name.replace("_", "-")
            raise ConfigError(f"{option} must be {_describe(hint).replace(' or null', '')} (got {_shown(value)})")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[arg-type]
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str | None = None):
        """The config from a dict whose keys are field names; other keys (a command's --json, ...) are ignored.

        A command names its parameters after the fields, so ``from_dict(ctx.params)`` builds its config.
        ``source`` names the file ``d`` was read from: then every field is type-checked first and
        every problem is a ConfigError that names the file and the field (data from files is user input).
        """
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        if source is not None:
            if not isinstance(d, dict):
                raise ConfigError(
                    f"{source} holds a {type(d).__name__} where a config (a JSON object) belongs; {FILE_FIX}"
                )
            hints = typing.get_type_hints(cls)
            for name in sorted(names & d.keys()):
                if not _value_fits(d[name], hints[name]) and not (
                    name in cls._OLDER_TYPES and _value_fits(d[name], cls._OLDER_TYPES[name])
                ):
                    raise ConfigError(
                        f"{source}: field {name!r} is {_shown(d[name])}, not {_describe(hints[name])}; {FILE_FIX}"
                    )
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in d.items() if k in names}
        if source is None:
            return cls(**kwargs)
        try:
            return cls(**kwargs)
        except ConfigError as e:  # a value that parses but cannot be (a negative size, no rotations...)
            raise ConfigError(f"{source} holds an impossible value ({e}); {FILE_FIX}") from None


FILE_FIX = "the file was changed or not written by rotnet: use the file rotnet wrote, or make it again"


def _value_fits(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON has the type of a config field (int is not bool; a list is a tuple)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_value_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple:
        return isinstance(value, (list, tuple)) and all(_value_fits(v, args[0]) for v in value)
    return True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(args[0], str(args[0]))
    return {type(None): "null", bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, str(hint)
    )


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# Field metadata: an option that may differ on --resume without changing what is computed.
RESUME_FREE = {"resume_free": True}


def _resume_free(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    return field(default=default, metadata=RESUME_FREE, **kwargs)


def _check_required(option: str, value: Any, what: str) -> None:
    """A required argument given as an empty string (from the shell: rotnet probe "")."""
    if not str(value).strip():
        raise ConfigError(f"{option} is empty: give {what}")


WEIGHTS_SPECS = "a run directory, checkpoint.pt, .safetensors, an exported folder, timm:NAME or random:NAME"


@dataclass(frozen=True)
class PretrainConfig(_Serializable):
    """Everything `rotnet pretrain` needs; see `rotnet pretrain --help` for each field."""

    _OLDER_TYPES = {"augment": bool}  # runs made before --augment had choices saved true/false

    model: str = "resnet18"
    data: str = "digits"
    data_dir: str | None = _resume_free(None)
    download: bool = _resume_free(False)
    val_split: float = 0.1
    rotations: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)
    copies: str = "all"
    epochs: int | None = None  # None: the data plan decides (planning.plan_epochs: a step budget, at least 10)
    batch_size: int | None = None  # None: the data plan decides (planning.plan_batch_size: 128 where it fits)
    accum_steps: int = 1  # micro-batches of --batch-size whose gradients add up to one optimizer step
    lr: float | None = None
    lr_scale: str = "none"  # the lr in use: --lr x (global batch / --lr-ref-batch) linear, its sqrt, or --lr as given
    lr_ref_batch: int = 128  # the global batch --lr is meant for (the paper's 0.1 at 128 images)
    weight_decay: float | None = None
    decay_all_params: bool = False  # True: norms and biases decay too (the official RotNet code)
    momentum: float = 0.9
    optimizer: str = "sgd"
    schedule: str = "cosine"
    milestones: tuple[int, ...] | str | None = ()  # "30,60,80" is parsed here
    gamma: float = 0.2
    warmup_epochs: float = 0.0
    img_size: int | None = None
    augment: str = "auto"  # auto: the data plan decides by what the images are (planning.plan_augment)
    workers: int = _resume_free(default_factory=default_workers)
    seed: int = 0
    init: str | None = None
    device: str = _resume_free("auto")
    precision: str = "auto"
    channels_last: bool = False
    compile: bool = False
    cache: str = _resume_free("auto")
    strict_data: bool = _resume_free(False)
    out: str | None = _resume_free(None)
    overwrite: bool = _resume_free(False)
    resume: bool = _resume_free(False)
    save_every: int = _resume_free(0)
    log_every: int = _resume_free(10)
    max_steps_per_epoch: int | None = None
    # watching and steering a run (none of them changes what is computed, so all may differ on --resume)
    logger: tuple[str, ...] | str = _resume_free(("csv",))  # --logger csv,tensorboard,wandb,mlflow or none
    eval_data: str | None = _resume_free(None)  # labelled data for kNN (and linear) accuracy during training
    eval_every: int | str = _resume_free("auto")  # epochs between evaluations (and the last); auto: see evaluation.py
    eval_layers: tuple[int, ...] | str | None = _resume_free(None)  # stages, as probe's --layers; None: every stage
    eval_heads: tuple[str, ...] | str = _resume_free(("knn",))
    keep_checkpoints: int = _resume_free(0)  # weights of the last N epochs under checkpoints/
    best_metric: str = _resume_free("auto")  # the epoch kept as checkpoints/best (see resolved_best_metric)

    def __post_init__(self) -> None:
        self._check_number_types()
        object.__setattr__(self, "rotations", parse_rotations(self.rotations))
        object.__setattr__(self, "milestones", parse_int_list("--milestones", self.milestones))
        object.__setattr__(self, "logger", parse_loggers(self.logger))
        object.__setattr__(self, "eval_layers", parse_layers(self.eval_layers, option="--eval-layers"))
        object.__setattr__(self, "eval_heads", parse_name_list("--eval-heads", self.eval_heads, EVAL_HEADS))
        _check_best_metric(self.best_metric, self.eval_data, self.eval_heads)
        if str(self.eval_every).strip().lower() == "auto":
            object.__setattr__(self, "eval_every", "auto")
        else:
            try:
                object.__setattr__(self, "eval_every", int(self.eval_every))
            except (TypeError, ValueError):
                raise ConfigError(f"--eval-every is a number of epochs or auto (got {self.eval_every!r})") from None
            _check_positive("--eval-every", self.eval_every)
        _check_positive("--keep-checkpoints", self.keep_checkpoints, allow_zero=True)
        _check_choice("--copies", self.copies, ("all", "one"))
        _check_choice("--optimizer", self.optimizer, ("sgd", "adamw"))
        _check_choice("--schedule", self.schedule, ("cosine", "step"))
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_choice("--cache", self.cache, CACHE_MODES)
        # configs of runs before --augment had choices: what true/false meant then
        object.__setattr__(self, "augment", older_augment(self.augment))
        _check_choice("--augment", self.augment, AUGMENTS)
        _check_positive("--epochs", self.epochs)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--accum-steps", self.accum_steps)
        _check_positive("--lr", self.lr)
        _check_choice("--lr-scale", self.lr_scale, LR_SCALES)
        _check_positive("--lr-ref-batch", self.lr_ref_batch)
        _check_positive("--weight-decay", self.weight_decay, allow_zero=True)
        _check_positive("--warmup-epochs", self.warmup_epochs, allow_zero=True)
        _check_positive("--workers", self.workers, allow_zero=True)
        _check_positive("--save-every", self.save_every, allow_zero=True)
        _check_positive("--log-every", self.log_every)
        _check_positive("--max-steps-per-epoch", self.max_steps_per_epoch)
        if not 0 <= self.momentum < 1:  # 1 and above: the step grows without bound (1.5 trained to loss 6540)
            raise ConfigError(f"--momentum must be in [0, 1) (got {self.momentum})")
        _check_img_size(self.img_size)
        if not 0 <= self.seed < 2**32:  # the per-step generators derive their seeds from it (64-bit)
            raise ConfigError(f"--seed must be in [0, 2**32) (got {self.seed})")
        if not 0 <= self.val_split < 1:
            raise ConfigError(f"--val-split must be in [0, 1) (got {self.val_split})")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"--gamma must be in (0, 1] (got {self.gamma})")
        if self.epochs is not None and self.warmup_epochs >= self.epochs:
            raise ConfigError(f"--warmup-epochs ({self.warmup_epochs:g}) must be shorter than --epochs ({self.epochs})")
        milestones = self.milestones
        given = ",".join(map(str, milestones))
        if milestones and self.epochs is not None and self.epochs < 2:  # "between 1 and 0" named no epoch
            raise ConfigError(
                f"--milestones {given}: --epochs {self.epochs} has no epoch to lower the learning rate after; "
                "raise --epochs or drop --milestones"
            )
        if list(milestones) != sorted(set(milestones)):
            raise ConfigError(f"--milestones must be increasing epochs, each once (got {given})")
        last = self.epochs - 1 if self.epochs is not None else math.inf  # None: checked again once planned
        if any(m <= 0 or m > last for m in milestones):
            if self.epochs is None:
                raise ConfigError(f"--milestones must be epochs from 1 on (got {given})")
            raise ConfigError(
                f"--milestones must be epochs between 1 and {self.epochs - 1} for --epochs {self.epochs} (got {given})"
            )
        if self.schedule == "step" and not milestones:
            raise ConfigError("--schedule step needs --milestones, e.g. --milestones 30,60,80")
        if self.overwrite and self.resume:
            raise ConfigError("--overwrite and --resume contradict each other: choose one")

    @property
    def num_rotations(self) -> int:
        return len(self.rotations)

    @property
    def copies_per_image(self) -> int:
        """Rotated copies a training image makes per step: every rotation (--copies all) or one."""
        return self.num_rotations if self.copies == "all" else 1

    def resolved_best_metric(self, has_val: bool) -> str:
        """--best-metric with auto resolved: the kNN accuracy when features are evaluated (the best stage's),
        else the validation rotation accuracy when checkpoints are kept and there are validation images,
        else none. An explicit val_* metric without validation images is a ConfigError."""
        if self.best_metric != "auto":
            if self.best_metric.startswith("val_") and not has_val:
                raise ConfigError(f"--best-metric {self.best_metric} needs validation images: give --val-split > 0")
            return self.best_metric
        if self.eval_data:
            return self.eval_heads[0]
        return "val_rot_acc" if self.keep_checkpoints and has_val else "none"

    @property
    def global_batch(self) -> int | None:
        """Images per optimizer step over all processes: --batch-size (split among them) x --accum-steps;
        None while the data plan has not chosen the batch."""
        return None if self.batch_size is None else self.batch_size * self.accum_steps

    @property
    def base_lr(self) -> float:
        # The paper: SGD lr 0.1 at 128 images x 4 rotations; AdamW's usual 1e-3.
        return self.lr if self.lr is not None else (0.1 if self.optimizer == "sgd" else 1e-3)

    @property
    def resolved_lr(self) -> float | None:
        """The peak lr in use: --lr (or the optimizer's default) scaled by --lr-scale for the global batch
        (None while a scaled lr waits for the data plan's batch)."""
        if self.lr_scale == "none":
            return self.base_lr
        if self.global_batch is None:
            return None
        ratio = self.global_batch / self.lr_ref_batch
        factor = {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scale]
        return self.base_lr * factor

    @property
    def resolved_weight_decay(self) -> float:
        if self.weight_decay is not None:
            return self.weight_decay
        return 5e-4 if self.optimizer == "sgd" else 0.05

    def contradictions(self, other: PretrainConfig, names: Iterable[str]) -> list[str]:
        """'--NAME VALUE (the run used SAVED)' for each of ``names`` in which ``other`` would
        compute something else than this config (options marked resume-free never do; names
        that are not fields, a command's --json say, are not options of the run)."""
        compared = {f.name for f in fields(self) if not f.metadata.get("resume_free")}
        return [
            f"--{name.replace('_', '-')} {_option_text(getattr(other, name))} (the run used {self._used_text(name)})"
            for name in names
            if name in compared and getattr(other, name) != getattr(self, name)
        ]

    def _used_text(self, name: str) -> str:
        """The saved value of option ``name`` as a user reads it: an unset one is the default, with
        what it resolved to where the config knows it (--lr: 'the default, 0.1')."""
        value = getattr(self, name)
        if value is not None:
            return _option_text(value)
        resolved = getattr(self, f"resolved_{name}", None)
        return "the default" + ("" if resolved is None else f", {_option_text(resolved)}")


PLANNED_FIELDS = ("img_size", "batch_size", "epochs", "augment")  # what the data plan sets (planning.py)


def older_augment(value: Any) -> Any:
    """--augment as runs saved it before it had choices (true/false), as what that meant then."""
    if isinstance(value, bool):
        return "crop+flip" if value else "none"
    return value


def as_trained(config: dict[str, Any], resolved: Any) -> dict[str, Any]:
    """A run's config.json "config" as the values the run trained with, for --config RUN/config.json to
    repeat it: augment true/false of runs from before --augment had choices as what it meant then, and
    the planned values a run from before the data plan left unset (None, auto) as its "resolved" has them."""
    config = {**config, "augment": older_augment(config.get("augment"))} if "augment" in config else dict(config)
    if isinstance(resolved, dict):
        for name in PLANNED_FIELDS:
            if config.get(name) in (None, "auto") and resolved.get(name) is not None:
                config[name] = resolved[name]
    return config


def parse_loggers(text: str | tuple | list | None) -> tuple[str, ...]:
    """'tensorboard,csv' -> ('tensorboard', 'csv'); 'none' or '' -> ()."""
    if not text or (isinstance(text, str) and text.strip().lower() == "none"):
        return ()
    return parse_name_list("--logger", text, LOGGERS)


def _check_best_metric(metric: str, eval_data: str | None, eval_heads: tuple[str, ...]) -> None:
    """auto, none, val_rot_acc, val_loss, or an --eval-heads head (knn, linear) alone or at a stage (knn:3)."""
    head, _, stage = str(metric).partition(":")
    if head not in BEST_METRICS or (stage and head not in EVAL_HEADS):
        raise ConfigError(
            f"--best-metric must be one of {', '.join(BEST_METRICS)}, or knn:S / linear:S for stage S (got {metric!r})"
        )
    if stage and not stage.lstrip("-").isdigit():
        raise ConfigError(f"--best-metric {metric}: the stage after ':' is a number, e.g. knn:3")
    if head in EVAL_HEADS and not eval_data:
        raise ConfigError(
            f"--best-metric {metric} needs --eval-data: the labelled images the {head} accuracy is measured on"
        )
    if head in EVAL_HEADS and head not in eval_heads:
        raise ConfigError(f"--best-metric {metric} needs --eval-heads to include {head}")


def _option_text(value: Any) -> str:
    """A value as it is written on the command line (rotations 0,90 rather than (0.0, 90.0))."""
    if isinstance(value, tuple):
        return format_rotations(value) if value and isinstance(value[0], float) else ",".join(map(str, value))
    return str(value)


# The one place where a command line spells a default differently from its config: a field whose
# None means "every stage" or "by depth" shows the word the option takes for it (and parses back to
# None: parse_layers("all"), parse_power("auto")). Every other default is spelled by the rule in
# option_default.
NONE_ON_THE_COMMAND_LINE = {"layers": "all", "eval_layers": "all", "power": "auto"}


def option_default(config: type, name: str) -> Any:
    """The default of a command's option ``--name``: its config field's default, as the command line
    spells it. Each option's default is declared once, in its config class; the commands take it
    from here (``knn_k: Annotated[int, typer.Option(...)] = option_default(ProbeConfig, "knn_k")``).

    A tuple is a comma list (rotations 0,90,180,270), an empty one None (a list option not given),
    and None a word where NONE_ON_THE_COMMAND_LINE names one. Works for default_factory fields too.
    """
    spec = next((f for f in fields(config) if f.name == name), None)
    if spec is None:
        raise AttributeError(f"{config.__name__} has no field {name!r}")  # a command option without a field
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        raise AttributeError(f"{config.__name__}.{name} has no default (a required argument takes none)")
    if value is None:
        return NONE_ON_THE_COMMAND_LINE.get(name)
    if isinstance(value, tuple):
        return _option_text(value) if value else None
    return value


def parse_int_list(option: str, text: str | tuple | list | None) -> tuple[int, ...]:
    """'30,60,80' (or a sequence of numbers) -> (30, 60, 80); None or '' -> ()."""
    if isinstance(text, (tuple, list)):
        text = ",".join(map(str, text))
    if text is None or str(text).strip() == "":
        return ()
    try:
        return tuple(int(t) for t in str(text).split(","))
    except ValueError:
        raise ConfigError(f"{option} must be a comma-separated list of integers (got {text!r})") from None


__all__ = [
    "PretrainConfig",
    "AUGMENTS",
    "LOGGERS",
    "EVAL_HEADS",
    "BEST_METRICS",
    "parse_loggers",
    "parse_rotations",
    "format_rotations",
    "parse_int_list",
    "ExportConfig",
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
]


LR_SCALES = ("none", "linear", "sqrt")
EXPORT_DTYPES = ("fp32", "fp16", "bf16")
EXPORT_FORMATS = ("safetensors", "onnx")  # onnx: model.onnx as well, beside the safetensors


@dataclass(frozen=True)
class ExportConfig(_Serializable):
    """Everything `rotnet export` needs; see `rotnet export --help` for each field."""

    weights: str
    out: str
    with_head: bool = False
    dtype: str = "fp32"
    format: str = "safetensors"
    overwrite: bool = False

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("WEIGHTS", self.weights, WEIGHTS_SPECS)
        _check_required("--out", self.out, "the folder to write, e.g. --out exported/")
        _check_choice("--dtype", self.dtype, EXPORT_DTYPES)
        _check_choice("--format", self.format, EXPORT_FORMATS)


PROBE_HEADS = tuple(HEAD_TYPES)  # heads.py's registry: a name not there never gets past --head
BATCHNORM_HEADS = tuple(h for h, t in HEAD_TYPES.items() if t.batchnorm)  # a batch of one cannot be normalised
PROBE_POOLS = ("avg", "max", "flatten")
PROBE_FEATURES = ("cached", "augmented")
TRAINED_HEADS = tuple(h for h, t in HEAD_TYPES.items() if t.trains)  # knn has nothing to train: it votes


@dataclass(frozen=True)
class ProbeRecipe:
    """A named probe protocol: where head inputs come from, the batch, the precision, one HeadRecipe per head."""

    features: str  # 'cached': extracted once; 'augmented': recomputed every batch from cropped + flipped images
    batch_size: int
    precision: str  # used when --precision is auto
    heads: dict[str, HeadRecipe]
    reports_best: bool  # report the best epoch next to the last (the official code keeps its best test epoch)


# Each head's training under each recipe is in its entry of heads.HEAD_TYPES (the paper's: the official code's).
PROBE_RECIPES = {
    # fast looks: features extracted once, AdamW with cosine decay
    "quick": ProbeRecipe("cached", 256, "auto", trained_heads("quick"), reports_best=False),
    # the official code's classifiers: features recomputed from cropped and flipped images every batch, fp32
    "paper": ProbeRecipe("augmented", 128, "fp32", trained_heads("paper"), reports_best=True),
}


def parse_layers(text: str | tuple | list | None, option: str = "--layers") -> tuple[int, ...] | None:
    """'all' -> None (every stage); '1,2,-1' -> (1, 2, -1): 1-based, negative counts from the last stage."""
    if text is None or (isinstance(text, str) and text.strip().lower() in ("", "all")):
        return None
    layers = parse_int_list(option, ",".join(map(str, text)) if isinstance(text, (tuple, list)) else text)
    if 0 in layers:
        raise ConfigError(f"{option} counts stages from 1 (first) or -1 (last); 0 is not a stage")
    if len(set(layers)) != len(layers):
        raise ConfigError(f"{option} names a stage twice ({','.join(map(str, layers))})")
    return layers


def parse_name_list(option: str, text: str | tuple | list, choices: tuple[str, ...]) -> tuple[str, ...]:
    """'linear,mlp' -> ('linear', 'mlp'), each one of ``choices``, none twice."""
    items = (
        list(text)
        if isinstance(text, (tuple, list))
        else [t.strip().lower() for t in str(text).split(",") if t.strip()]
    )
    if not items:
        raise ConfigError(f"{option} is empty: give one or more of {', '.join(choices)}")
    for item in items:
        _check_choice(option, item, choices)
    if len(set(items)) != len(items):
        raise ConfigError(f"{option} names {', '.join(sorted({i for i in items if items.count(i) > 1}))} twice")
    return tuple(items)


# ProbeConfig fields that do not change what a probe measures: probe.json keys its results without them.
PROBE_RUN_OPTIONS = ("weights", "data_dir", "download", "workers", "device", "save", "overwrite")


@dataclass(frozen=True)
class ProbeConfig(_Serializable):
    """Everything `rotnet probe` needs; see `rotnet probe --help` for each field.

    ``recipe`` names the protocol (PROBE_RECIPES); ``features``, ``epochs``, ``lr``,
    ``weight_decay`` and ``batch_size`` left as None take the recipe's values.
    """

    weights: str
    data: str = "digits"
    data_dir: str | None = None
    download: bool = False
    val_data: str | None = None
    val_split: float = 0.2
    layers: tuple[int, ...] | None = None  # None: every stage
    heads: tuple[str, ...] = ("linear", "knn")
    pool: str = "avg"
    recipe: str = "quick"
    features: str | None = None
    epochs: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    batch_size: int | None = None
    labels_per_class: int | None = None
    knn_k: int = 20
    knn_temperature: float = 0.07
    compare: tuple[str, ...] | str | None = ()  # 'random,timm:resnet18' or a sequence
    img_size: int | None = None  # timm:/random: weights only; saved weights keep their own size
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    save: bool = True
    overwrite: bool = False  # replace a saved result of the same setting in probe.json

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("WEIGHTS", self.weights, WEIGHTS_SPECS)
        _check_img_size(self.img_size)
        object.__setattr__(self, "layers", parse_layers(self.layers))
        object.__setattr__(self, "heads", parse_name_list("--head", self.heads, PROBE_HEADS))
        compare = self.compare.split(",") if isinstance(self.compare, str) else (self.compare or ())
        object.__setattr__(self, "compare", tuple(c.strip() for c in compare if c.strip()))
        _check_choice("--pool", self.pool, PROBE_POOLS)
        _check_choice("--recipe", self.recipe, tuple(PROBE_RECIPES))
        if self.features is not None:
            _check_choice("--features", self.features, PROBE_FEATURES)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--epochs", self.epochs)
        _check_positive("--lr", self.lr)
        _check_positive("--weight-decay", self.weight_decay, allow_zero=True)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--labels-per-class", self.labels_per_class)
        _check_positive("--knn-k", self.knn_k)
        _check_positive("--knn-temperature", self.knn_temperature)
        _check_positive("--workers", self.workers, allow_zero=True)
        if not 0 < self.val_split < 1:
            raise ConfigError(f"--val-split must be in (0, 1) (got {self.val_split}); or give --val-data")
        normalised = [h for h in self.heads if h in BATCHNORM_HEADS]
        if self.resolved_batch_size < 2 and normalised:
            raise ConfigError(
                f"--batch-size 1: the {', '.join(normalised)} head(s) normalise over each batch (BatchNorm), which needs "
                "at least 2 images; use --batch-size 2 or more, or --head knn"
            )

    @property
    def protocol(self) -> ProbeRecipe:
        return PROBE_RECIPES[self.recipe]

    @property
    def resolved_features(self) -> str:
        return self.features or self.protocol.features

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or self.protocol.batch_size

    def resolved_precision(self) -> str:
        """--precision, or the recipe's when it is auto (the paper recipe: fp32, as the official code)."""
        return self.protocol.precision if self.precision == "auto" else self.precision

    def head_recipe(self, head: str) -> HeadRecipe:
        """The recipe's training of ``head`` with --epochs, --lr and --weight-decay applied."""
        recipe = self.protocol.heads[head]
        if self.epochs is not None:
            recipe = recipe.with_epochs(self.epochs)
        if self.lr is not None:
            recipe = dataclasses.replace(recipe, lr=self.lr)
        if self.weight_decay is not None:
            recipe = dataclasses.replace(recipe, weight_decay=self.weight_decay)
        return recipe

    def setting(self) -> dict[str, Any]:
        """What decides the numbers of a probe, resolved (probe.json keeps one result per setting):
        ``--recipe paper`` and ``--recipe paper --features augmented`` are the same setting."""
        setting = {k: v for k, v in self.to_dict().items() if k not in PROBE_RUN_OPTIONS}
        setting.update(
            features=self.resolved_features,
            batch_size=self.resolved_batch_size,
            precision=self.resolved_precision(),
            epochs=None,
            lr=None,
            weight_decay=None,
        )
        setting["training"] = {h: dataclasses.asdict(self.head_recipe(h)) for h in self.heads if h in TRAINED_HEADS}
        for key in ("epochs", "lr", "weight_decay"):  # folded into "training"
            del setting[key]
        if "knn" not in self.heads:
            del setting["knn_k"], setting["knn_temperature"]
        return json_safe(setting)


def json_safe(value: Any) -> Any:
    """Tuples as lists, recursively: a setting compares equal to itself read back from JSON."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


__all__ += [
    "ProbeConfig",
    "parse_layers",
    "parse_name_list",
    "PROBE_HEADS",
    "PROBE_POOLS",
    "PROBE_FEATURES",
    "TRAINED_HEADS",
    "HeadRecipe",
    "ProbeRecipe",
    "PROBE_RECIPES",
    "PROBE_RUN_OPTIONS",
]


VIZ_COLORMAPS = ("jet", "inferno")


@dataclass(frozen=True)
class FiltersConfig(_Serializable):
    """Everything `rotnet viz filters` needs; see `rotnet viz filters --help` for each field."""

    weights: tuple[str, ...]
    out: str = "filters.png"
    labels: tuple[str, ...] | None = ()  # one per weights; default: the weights spec itself
    scale: int | None = None  # None: enlarge each tile to about 32 pixels
    cols: int | None = None  # None: a square-ish grid
    overwrite: bool = False  # replace an existing picture that rotnet drew

    def __post_init__(self) -> None:
        self._check_number_types()
        object.__setattr__(self, "weights", tuple(self.weights))
        object.__setattr__(self, "labels", tuple(self.labels or ()))
        if not self.weights:
            raise ConfigError(f"give the weights to draw: {WEIGHTS_SPECS}")
        for spec in self.weights:
            _check_required("WEIGHTS", spec, WEIGHTS_SPECS)
        if self.labels and len(self.labels) != len(self.weights):
            raise ConfigError(f"--label: give one per weights ({len(self.weights)}), got {len(self.labels)}")
        _check_positive("--scale", self.scale)
        _check_positive("--cols", self.cols)
        _check_png(self.out)


@dataclass(frozen=True)
class AttentionConfig(_Serializable):
    """Everything `rotnet viz attention` needs; see `rotnet viz attention --help` for each field."""

    weights: str
    images: tuple[str, ...]
    out: str = "attention"
    layers: tuple[int, ...] | None = None  # 1-based, negative from the last; None: every stage
    power: float | str | None = None  # None or 'auto': 1, 2, 4 for early, middle, late stages (the paper)
    rotations: tuple[float, ...] | None = None  # None: the model's own set, else 0,90,180,270
    align: bool = False
    img_size: int | None = None  # None: the size the weights were trained at
    scale: int | None = None  # None: enlarge tiles to at least 128 pixels
    cmap: str = "jet"
    alpha: float = 0.5
    device: str = "auto"
    overwrite: bool = False  # write into a folder that is not empty (replacing only pictures rotnet drew)

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("WEIGHTS", self.weights, WEIGHTS_SPECS)
        object.__setattr__(self, "images", tuple(self.images))
        if not self.images:
            raise ConfigError("give one or more image files or folders after the weights")
        object.__setattr__(self, "layers", parse_layers(self.layers))
        if self.rotations is not None:
            object.__setattr__(self, "rotations", parse_rotations(self.rotations))
        object.__setattr__(self, "power", parse_power(self.power))
        _check_positive("--power", self.power)
        _check_positive("--scale", self.scale)
        _check_choice("--cmap", self.cmap, VIZ_COLORMAPS)
        _check_img_size(self.img_size)
        if not 0 <= self.alpha <= 1:
            raise ConfigError(f"--alpha must be in [0, 1] (got {self.alpha})")


def parse_power(text: float | str | None) -> float | None:
    """--power: a number, or 'auto' / None for the paper's 1, 2, 4 by depth."""
    if text is None or (isinstance(text, str) and text.strip().lower() == "auto"):
        return None
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"--power must be a number or auto (got {text!r})") from None


@dataclass(frozen=True)
class CurvesConfig(_Serializable):
    """Everything `rotnet viz curves` needs."""

    run: str
    out: str = "curves.png"
    overwrite: bool = False  # replace an existing picture that rotnet drew

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("RUN", self.run, "a run directory made by rotnet pretrain (it holds metrics.jsonl)")
        _check_png(self.out)


__all__ += ["FiltersConfig", "AttentionConfig", "CurvesConfig", "VIZ_COLORMAPS"]


JPEG_ROUTES = ("reencode", "lossless", "lossless-trim", "orientation-tag")  # how predict --fix turns a JPEG
# Fix only images the model is at least this sure about. With calibrated confidences (see
# prediction.combine_votes), at most about 1 in 10 of the images turned at exactly this
# confidence are turned wrongly, and fewer above it; leaving a photo as it was costs the user
# a manual turn, turning an upright one the wrong way costs more.
DEFAULT_MIN_CONFIDENCE = 0.9
DEFAULT_BACKUP_SUFFIX = ".orig"  # not an image extension: the next run does not take backups for images


@dataclass(frozen=True)
class PredictConfig(_Serializable):
    """Everything `rotnet predict` needs; see `rotnet predict --help` for each field."""

    weights: str
    inputs: tuple[str, ...]
    tta: bool | None = None  # None: test-time agreement where the rotation set allows it (prediction.plan_tta)
    fix: bool = False
    out: str | None = None
    in_place: bool = False
    backup_suffix: str | None = None  # with in_place; None: DEFAULT_BACKUP_SUFFIX
    jpeg: str = "reencode"
    copy_unchanged: bool = False
    min_confidence: float = DEFAULT_MIN_CONFIDENCE
    overwrite: bool = False
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        self._check_number_types()
        object.__setattr__(self, "inputs", tuple(str(p) for p in self.inputs))
        _check_required(
            "WEIGHTS", self.weights, "a run directory, checkpoint.pt or model.safetensors with a rotation head"
        )
        if not self.inputs:
            raise ConfigError("give at least one image file or folder to predict")
        if self.in_place and not self.fix:
            raise ConfigError("--in-place changes the originals only together with --fix; add --fix")
        if self.fix and not (self.out or self.in_place):
            raise ConfigError(
                "--fix needs --out DIR for upright copies (the originals are never changed), "
                "or --in-place to turn the originals themselves (each kept as a backup)"
            )
        if self.backup_suffix is not None and not self.in_place:
            raise ConfigError("--backup-suffix names the backups that --in-place keeps; add --in-place or drop it")
        if self.in_place:
            suffix = self.resolved_backup_suffix
            # a control character (a newline pasted in) would make every backup a name no listing shows whole
            if not suffix or "/" in suffix or suffix in (".", "..") or not suffix.isprintable():
                raise ConfigError(f"--backup-suffix must be a non-empty file-name ending like .orig (got {suffix!r})")
        if self.copy_unchanged and not (self.fix and self.out) or self.copy_unchanged and self.in_place:
            raise ConfigError(
                "--copy-unchanged completes the mirror that --fix --out DIR writes; use it with --fix --out (not --in-place)"
            )
        _check_choice("--jpeg", self.jpeg, JPEG_ROUTES)
        if not 0 <= self.min_confidence <= 1:
            raise ConfigError(f"--min-confidence is a probability in [0, 1] (got {self.min_confidence})")
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--workers", self.workers, allow_zero=True)

    @property
    def resolved_backup_suffix(self) -> str:
        return DEFAULT_BACKUP_SUFFIX if self.backup_suffix is None else self.backup_suffix


__all__ += ["PredictConfig", "JPEG_ROUTES", "DEFAULT_MIN_CONFIDENCE", "DEFAULT_BACKUP_SUFFIX"]


# The RotNet pretraining schedules of the CIFAR-10 study: (epochs, epochs after which lr is divided by 5).
# 'paper': the paper's text (section 3.1: 100 epochs, steps after 30, 60, 80);
# 'official': config/CIFAR10_RotNet_NIN4blocks.py (l. 23, 31: 200 epochs, steps after 60, 120, 160), the model
# the official classifier configs load (model_net_epoch200, e.g. CIFAR10_MultLayerClassifier_..._feats.py l. 27).
PRETRAIN_SCHEDULES = {"paper": (100, (30, 60, 80)), "official": (200, (60, 120, 160))}


@dataclass(frozen=True)
class ReproduceConfig(_Serializable):
    """Everything `rotnet reproduce` needs: the paper's CIFAR-10 study (or its smoke mode)."""

    recipe: str = "paper-cifar10"
    data: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    out: str | None = None  # None: runs/paper-cifar10, or runs/paper-cifar10-smoke with --smoke
    schedule: str = "paper"
    smoke: bool = False
    device: str = "auto"
    precision: str = "fp32"  # the official code trains in fp32
    workers: int = field(default_factory=default_workers)
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_choice("recipe", self.recipe, ("paper-cifar10",))
        _check_choice("--schedule", self.schedule, tuple(PRETRAIN_SCHEDULES))
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--workers", self.workers, allow_zero=True)

    @property
    def out_dir(self) -> str:
        # smoke runs get their own folder: a full run must never find them (they are digits, 2 epochs)
        return self.out or ("runs/paper-cifar10-smoke" if self.smoke else "runs/paper-cifar10")


@dataclass(frozen=True)
class SupervisedConfig(_Serializable):
    """A network trained from scratch on the labels: Table 3's "Supervised NIN" frame for the probes.

    Defaults are config/CIFAR10_supervised_NIN.py of the official code: a 3-block NIN (l. 27),
    200 epochs (l. 24), SGD Nesterov lr 0.1, momentum 0.9, weight decay 5e-4, lr / 5 after
    epochs 60, 120, 160 (l. 30), batch 128 (l. 1), crop + flip augmentation, fp32.
    """

    model: str = "rotnet_nin3"
    data: str = "cifar10"
    data_dir: str | None = None
    download: bool = False
    val_data: str | None = None  # labelled validation data (default: the dataset's test split, else --val-split)
    val_split: float = 0.2  # only for data without its own test split
    labels_per_class: int | None = None
    epochs: int = 200
    milestones: tuple[int, ...] = (60, 120, 160)
    gamma: float = 0.2
    lr: float = 0.1
    weight_decay: float = 5e-4
    batch_size: int = 128
    img_size: int | None = None
    max_steps_per_epoch: int | None = None
    device: str = "auto"
    precision: str = "fp32"
    workers: int = field(default_factory=default_workers)
    seed: int = 0
    out: str | None = None  # a folder for supervised.json; a finished result with the same setting is reused

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_choice("--precision", self.precision, PRECISIONS)
        for option, value in (
            ("--epochs", self.epochs),
            ("--lr", self.lr),
            ("--batch-size", self.batch_size),
            ("--labels-per-class", self.labels_per_class),
            ("--max-steps-per-epoch", self.max_steps_per_epoch),
        ):
            _check_positive(option, value)
        _check_positive("--weight-decay", self.weight_decay, allow_zero=True)
        _check_positive("--workers", self.workers, allow_zero=True)
        _check_img_size(self.img_size)
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))
        if any(not 0 < m < self.epochs for m in self.milestones):
            raise ConfigError(f"--milestones must lie between 1 and {self.epochs - 1} (got {self.milestones})")
        if not 0 < self.val_split < 1:
            raise ConfigError(f"--val-split must be in (0, 1) (got {self.val_split})")


__all__ += ["ReproduceConfig", "SupervisedConfig", "PRETRAIN_SCHEDULES"]


# The embedding file formats, by the extension of --out: arrays (npz, safetensors) or a table (parquet, csv).
EMBEDDING_FORMATS = (".parquet", ".npz", ".safetensors", ".csv")
EMBED_POOLS = ("avg", "max")
MAP_METHODS = ("pca", "tsne", "umap")


def _check_suffix(option: str, value: str, suffixes: tuple[str, ...], what: str) -> None:
    if not any(str(value).lower().endswith(s) for s in suffixes):
        raise ConfigError(f"{option} {value}: {what}; give a file name ending in {', '.join(suffixes)}")


@dataclass(frozen=True)
class EmbedConfig(_Serializable):
    """Everything `rotnet embed` needs; see `rotnet embed --help` for each field."""

    weights: str
    data: str
    out: str
    layer: int = -1  # 1-based stage, negative from the last
    pool: str = "avg"
    normalize: bool = False  # L2-normalise every embedding
    img_size: int | None = None  # timm:/random: weights only; saved weights are embedded at their own size
    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    data_dir: str | None = None
    download: bool = False
    strict_data: bool = False
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("WEIGHTS", self.weights, WEIGHTS_SPECS)
        _check_required(
            "DATA", self.data, "a folder of images (flat or class sub-folders), digits, or a torchvision name"
        )
        _check_required("--out", self.out, "the file to write, e.g. --out embeddings.parquet")
        _check_suffix("--out", self.out, EMBEDDING_FORMATS, "the format comes from the extension")
        if self.layer == 0:
            raise ConfigError("--layer 0: stages are numbered from 1 (negative: from the last, -1 is the last)")
        _check_choice("--pool", self.pool, EMBED_POOLS)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--workers", self.workers, allow_zero=True)
        _check_img_size(self.img_size)

    @property
    def format(self) -> str:
        """'.parquet', '.npz', '.safetensors' or '.csv'."""
        return next(s for s in EMBEDDING_FORMATS if self.out.lower().endswith(s))


@dataclass(frozen=True)
class NeighboursConfig(_Serializable):
    """Everything `rotnet neighbours` needs; see `rotnet neighbours --help` for each field."""

    embeddings: str
    query: tuple[str, ...] = ()  # image files or folders; () = every image of the file
    k: int = 5
    threshold: float | None = None  # keep only neighbours at least this similar (near-duplicates)
    out: str | None = None  # a CSV of every row found
    weights: str | None = None  # for --query: instead of the weights the embeddings file names
    batch_size: int = 256
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False
    show: int = 20  # rows of the table on screen

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("EMBEDDINGS", self.embeddings, "a file written by rotnet embed")
        object.__setattr__(self, "query", tuple(str(q) for q in (self.query or ())))
        _check_positive("-k", self.k)
        _check_positive("--show", self.show, allow_zero=True)
        if self.threshold is not None and not -1 <= self.threshold <= 1:
            raise ConfigError(f"--threshold is a cosine similarity in [-1, 1] (got {self.threshold})")
        if self.out is not None:
            _check_suffix("--out", self.out, (".csv",), "the neighbours are written as a table")
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--workers", self.workers, allow_zero=True)


@dataclass(frozen=True)
class EmbeddingMapConfig(_Serializable):
    """Everything `rotnet viz embeddings` needs; see `rotnet viz embeddings --help` for each field."""

    embeddings: str
    out: str = "embeddings.png"
    method: str = "pca"
    thumbnails: int = 0  # images drawn at this many points spread over the map
    max_points: int = 20000  # a seeded sample of the rows beyond this
    seed: int = 0
    overwrite: bool = False  # replace an existing --out that rotnet drew

    def __post_init__(self) -> None:
        self._check_number_types()
        _check_required("EMBEDDINGS", self.embeddings, "a file written by rotnet embed")
        _check_png(self.out)
        _check_choice("--method", self.method, MAP_METHODS)
        _check_positive("--thumbnails", self.thumbnails, allow_zero=True)
        _check_positive("--max-points", self.max_points)
        if self.max_points < 3:
            raise ConfigError(f"--max-points must be at least 3 (got {self.max_points})")


__all__ += ["EmbedConfig", "NeighboursConfig", "EmbeddingMapConfig", "EMBEDDING_FORMATS", "EMBED_POOLS", "MAP_METHODS"]


# ----------------------------------------------------------------------------- rotnet score (issue 25)

SCORE_METHODS = ("rotation", "knn", "both")  # how unusual an image is: see scoring.py
SCORE_FORMATS = (".csv", ".parquet", ".npz", ".json")
KNN_DISTANCES = ("mean", "kth")  # the mean cosine distance to the k nearest training features, or to the k-th


@dataclass(frozen=True)
class ScoreConfig(_Serializable):
    """Everything `rotnet score` needs; see `rotnet score --help` for each field."""

    weights: str
    data: tuple[str, ...] = ()  # image files, folders (recursive) or a built-in / torchvision dataset name
    out: str | None = None  # .csv, .parquet, .npz or .json: one row per image
    method: str = "rotation"
    k: int = 5  # neighbours of the knn score
    knn_distance: str = "mean"
    reference: str | None = None  # the knn bank: a folder or dataset name; None: the run's own training data
    inliers: tuple[str, ...] = ()  # evaluation: images known to be normal ...
    outliers: tuple[str, ...] = ()  # ... and known to be unusual
    normal: str | None = None  # evaluation on class sub-folders: this class is normal, every other one unusual
    img_size: int | None = None  # timm:/random: weights only
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    data_dir: str | None = None
    strict_data: bool = False
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        for name in ("data", "inliers", "outliers"):
            object.__setattr__(self, name, tuple(str(p) for p in (getattr(self, name) or ())))
        _check_required("WEIGHTS", self.weights, WEIGHTS_SPECS)
        if bool(self.inliers) != bool(self.outliers):
            given, missing = ("--inliers", "--outliers") if self.inliers else ("--outliers", "--inliers")
            raise ConfigError(f"{given} needs {missing} too: the evaluation compares the two")
        if self.inliers and (self.data or self.normal):
            raise ConfigError(
                "give either DATA (with --normal CLASS for an evaluation) or --inliers DIR --outliers DIR, not both"
            )
        if not self.data and not self.inliers:
            raise ConfigError(
                "give the images to score (DATA: files, folders or a dataset name), or --inliers DIR --outliers DIR"
            )
        if self.normal is not None and not self.normal.strip():
            raise ConfigError("--normal is empty: give the name of the class sub-folder that holds the normal images")
        if self.out is not None:
            _check_suffix("--out", self.out, SCORE_FORMATS, "the format comes from the extension")
        _check_choice("--method", self.method, SCORE_METHODS)
        _check_choice("--knn-distance", self.knn_distance, KNN_DISTANCES)
        _check_positive("-k", self.k)
        if self.reference is not None and self.method == "rotation":
            raise ConfigError("--reference is the bank of the knn score; add --method knn or both, or drop it")
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--workers", self.workers, allow_zero=True)
        _check_img_size(self.img_size)

    @property
    def evaluating(self) -> bool:
        """Whether the truth is known (--inliers/--outliers or --normal): then AUROC and friends are measured."""
        return bool(self.inliers) or self.normal is not None

    @property
    def format(self) -> str | None:
        return next((s for s in SCORE_FORMATS if self.out.lower().endswith(s)), None) if self.out else None


@dataclass(frozen=True)
class OutliersSheetConfig(_Serializable):
    """Everything `rotnet viz outliers` needs: a contact sheet of the most unusual and most typical images."""

    scores: str  # a file written by rotnet score, or WEIGHTS (then data says what to score)
    data: tuple[str, ...] = ()
    out: str = "outliers.png"
    n: int = 16  # images in each row group
    method: str = "rotation"
    img_size: int | None = None
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)
    device: str = "auto"
    precision: str = "auto"
    overwrite: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(str(p) for p in (self.data or ())))
        _check_required("SCORES", self.scores, "a file written by rotnet score, or weights followed by images")
        _check_png(self.out)
        _check_positive("-n", self.n)
        if self.n > 256:
            raise ConfigError(f"-n {self.n}: a sheet shows at most 256 images of each kind; lower -n")
        _check_choice("--method", self.method, SCORE_METHODS)
        _check_choice("--precision", self.precision, PRECISIONS)
        _check_positive("--batch-size", self.batch_size)
        _check_positive("--workers", self.workers, allow_zero=True)
        _check_img_size(self.img_size)


__all__ += ["ScoreConfig", "OutliersSheetConfig", "SCORE_METHODS", "SCORE_FORMATS", "KNN_DISTANCES"]
