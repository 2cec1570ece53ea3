"""RotNet pretraining: the training loop, read top to bottom.

``pretrain(config, progress)`` builds everything from a validated PretrainConfig, trains
backbone + rotation head on the rotation pretext task, writes the run directory
(config.json, metrics.jsonl, checkpoint.pt, model.safetensors; see rundir/layout.py) and returns a
result. It never prints: progress goes to the ``progress`` callback as typed events.

Two objects carry the run. ``Run`` is what stays fixed once it is set up (config, device,
data, model wrappers, sizes); ``TrainState`` is what training changes (model, optimizer,
scheduler, scaler, history, position, last save) and what a checkpoint writes down. The
functions below take them as arguments, and ``_train`` calls them in the order a reader
sees: set up, restore, then per epoch: train, validate, evaluate the features (--eval-data),
log (--logger), keep checkpoints, save, report.

Exact resume: the data order is a pure function of (seed, epoch), the augmentation and
rotation randomness of a step a pure function of (seed, step, rank), and the checkpoint
holds model, optimizer, lr scheduler, scaler, the epoch's per-step sums so far and every
random generator (dropout, drop-path). So a resumed run replays the same computation as
one never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from . import data as data_lib
from . import planning, rundir
from .atomicfiles import make_dir
from .calibration import calibrate
from .checkpoint import CHECKPOINT_FORMAT
from .config import PLANNED_FIELDS, PretrainConfig, as_trained
from .errors import ConfigError, DataError, DiskFullError, InputSizeError, Interrupted, NonFiniteLossError, RotnetError
from .evaluation import FeatureEval, best_value, evaluate_features, set_up_eval, should_evaluate
from .events import (
    DeviceChosen,
    EpochEnded,
    EpochStarted,
    FeaturesEvaluated,
    Message,
    Phase,
    Progress,
    Resumed,
    RunStarted,
    StepDone,
    StepFinished,
    WarningMessage,
    ignore,
)
from .fingerprint import describe_training_images
from .loggers import Loggers, check_installed, open_loggers, step_scalars
from .models import (
    RotNet,
    create_backbone,
    data_config,
    feature_width,
    model_default_size,
    normalises_over_batch,
    rotation_head,
    takes_only_default_size,
)
from .rotations import make_rotation_batch, rotate_all
from .runtime import (
    FUSED_OPTIMIZER_DEVICES,
    DistInfo,
    all_reduce_sum,
    autocast,
    barrier,
    configure_backends,
    describe_device,
    dist_from_env,
    gather_objects,
    init_distributed,
    reduce_int,
    resolve_device,
    resolve_precision,
    rng_state,
    seed_everything,
    set_rng_state,
    shutdown_distributed,
)
from .shell import shell_quote
from .weights import load_weights, nonfinite_tensors

NO_STEP = 2**62  # "no such step" for the first non-finite loss (a MIN over ranks keeps real steps)
CPU_COMFORTABLE_SIZE = 64  # px: above it, a CPU run is told what --img-size 64 would save


@dataclass
class PretrainResult:
    out_dir: Path
    model: str
    device: str
    epochs_done: int
    history: list[dict] = field(default_factory=list)
    val_rot_acc_per_rotation: dict[str, float] = field(default_factory=dict)
    skipped_files: list[str] = field(default_factory=list)
    resumed_from: dict | None = None
    best: dict | None = None  # {"epoch", "metric", "value", "weights"} of checkpoints/best (--best-metric)
    kept: list[str] = field(default_factory=list)  # weights specs of the kept checkpoints (RUN:epoch-12, ...)
    labelled: bool = True  # the training data has classes, so probe can score its features on it
    calibration: dict | None = None  # the rotation head's temperature and ECE before/after (calibration.py)
    val_images: int = 0  # held-out images (each seen at every rotation): how much the validation figures mean
    own_validation: bool = False  # they came with the data (DIR/val, a test split), not from --val-split

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "model": self.model,
            "device": self.device,
            "epochs_done": self.epochs_done,
            "final": self.final,
            "val_rot_acc_per_rotation": self.val_rot_acc_per_rotation,
            "skipped_files": len(self.skipped_files),
            "resumed_from": self.resumed_from,
            "best": self.best,
            "kept": self.kept,
            "calibration": self.calibration,
            "val_images": self.val_images,
        }


class EpochSums:
    """One epoch's loss sums and correct counts, one slot per step, kept on the device.

    Hand-written rather than a metrics library's running mean: a step writes its slot (two
    small kernels, no host read); the host reads the slots only at log, checkpoint and
    epoch-end points. Per-step slots also tell which step first went NaN, and a resumed
    epoch restores them exactly, so its totals add up bitwise the same.
    """

    def __init__(self, steps: int, device: torch.device, saved: dict | None = None):
        self.loss = torch.zeros(steps, device=device)  # (steps,) sum of the step's per-copy losses
        self.correct = torch.zeros(steps, device=device, dtype=torch.long)  # (steps,) right predictions
        self.seen = 0  # rotated copies so far (a host number: batch sizes are known without the device)
        self.done = 0  # steps written
        if saved:
            self.done, self.seen = len(saved["loss"]), int(saved["seen"])
            self.loss[: self.done] = saved["loss"].to(device)
            self.correct[: self.done] = saved["correct"].to(device)

    def add(self, step: int, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss[step] = loss.detach() * len(labels)
        self.correct[step] = (logits.detach().argmax(1) == labels).sum()
        self.seen += len(labels)
        self.done = step + 1

    def per_copy(self) -> torch.Tensor:
        """(done,) on the host: each step's loss per rotated copy (reads the device)."""
        if not self.done:
            return torch.zeros(0)
        return (self.loss[: self.done] / (self.seen / self.done)).cpu()  # every step has as many copies

    def first_diverged_step(self, ceiling: float, before: torch.Tensor | None = None) -> int | None:
        """The first step of DIVERGED_STEPS in a row of which DIVERGED_HIGH_STEPS had a loss per rotated copy above
        ``ceiling`` (reads the device). Not all of them: a collapsed model's loss swings between huge (its one class
        is wrong) and near ln(R) (it happens to be right), so "every step high" missed it (observed).
        ``before``: the last steps of the epochs before (per copy), so that a folder of a few steps an epoch is
        judged too; a step among them comes back negative (-1: the step before this epoch's first)."""
        earlier = before if before is not None else torch.zeros(0)
        losses = torch.cat([earlier, self.per_copy()])  # (earlier + done,)
        if len(losses) < DIVERGED_STEPS:
            return None
        in_a_row = (losses > ceiling).float().unfold(0, DIVERGED_STEPS, 1).sum(1)  # (n - K + 1,)
        hit = (in_a_row >= DIVERGED_HIGH_STEPS).nonzero()
        if not len(hit):
            return None
        start = int(hit[0])
        return start + int((losses[start:] > ceiling).nonzero()[0]) - len(earlier)  # the window's first high step

    def first_nonfinite_step(self) -> int | None:
        """The first step of this epoch whose loss was NaN or inf (reads the device)."""
        bad = (~torch.isfinite(self.loss[: self.done])).nonzero()
        return int(bad[0]) if len(bad) else None

    def since(self, start: int) -> torch.Tensor:
        """(2,) float on the device: loss sum and correct count of the steps from ``start`` on (what --logger plots)."""
        return torch.stack([self.loss[start : self.done].sum(), self.correct[start : self.done].sum().float()])

    def totals(self) -> torch.Tensor:
        """(3,) float on the device: loss sum, correct count, copies seen."""
        return torch.stack(
            [self.loss.sum(), self.correct.sum().float(), torch.tensor(float(self.seen), device=self.loss.device)]
        )

    def state(self) -> dict:
        """What a checkpoint keeps to continue this epoch exactly (reads the device)."""
        return {"loss": self.loss[: self.done].cpu(), "correct": self.correct[: self.done].cpu(), "seen": self.seen}


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the rotation classes (a module-level function so tests can poison it)."""
    return F.cross_entropy(logits.float(), labels)


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """timm's optimizer factory (SGD is Nesterov; no weight decay on norms and biases unless
    --decay-all-params, as the official RotNet code), with torch's fused kernels where the device
    has them: one kernel per step instead of several per parameter group (a resnet18 SGD step on
    2 CPU cores: 7.2 -> 2.9 ms), and under fp16 the GradScaler hands the overflow check to the
    kernel instead of reading it on the host."""
    import timm.optim

    return timm.optim.create_optimizer_v2(
        model,
        opt=cfg.optimizer,
        lr=cfg.resolved_lr,
        weight_decay=cfg.resolved_weight_decay,
        filter_bias_and_bn=not cfg.decay_all_params,
        **({"momentum": cfg.momentum} if cfg.optimizer == "sgd" else {}),
        **({"fused": True} if device.type in FUSED_OPTIMIZER_DEVICES else {}),
    )


def lr_factor(step: int, cfg: PretrainConfig, steps_per_epoch: int) -> float:
    """The schedule's multiple of the peak lr at a global step: linear warm-up, then cosine, or
    the paper's step decay at epoch milestones. Per step (a warm-up of 0.5 epochs is 0.5 epochs).

    A run resumed with a larger --epochs (an extension) follows the schedule of its new length from
    the step it resumes at, as timm's train.py does: step milestones stay where they are, and the
    cosine is re-planned over the new total, so its lr rises at the resume point to where a run
    planned that long would be (from 10 to 20 epochs: from about 0 to half the peak) and decays to
    0 at the new end. The warm-up is unchanged.

    Only the shape is written here, for torch's LambdaLR to apply: timm's schedulers start the
    warm-up from a separate initial lr and by default count it as part of the decay, which
    would move the paper's milestones.
    """
    total = cfg.epochs * steps_per_epoch
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "step":
        epoch = step // steps_per_epoch
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_scheduler(
    optimizer: torch.optim.Optimizer, cfg: PretrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over lr_factor, stepped once per training step; its position is in the checkpoint."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, steps_per_epoch))


def step_generator(device: torch.device, seed: int, step: int, rank: int) -> torch.Generator:
    """The randomness of one step (crop, flip, sampled rotation) as a function of its index."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step) * 64 + rank)


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> PretrainConfig:
    """The saved config of ``run_dir``, with ``overrides`` that must not contradict it."""
    run_dir = Path(run_dir)
    if overrides.get("overwrite"):
        raise ConfigError("--overwrite and --resume contradict each other: choose one")
    if rundir.overwrite_pending(run_dir):
        _refuse_stopped_overwrite(run_dir)
    if not (run_dir / rundir.CONFIG).is_file() and (run_dir / rundir.CHECKPOINT).is_file():
        # the folder the user gave is the run: "give the run directory" would send them in circles
        raise ConfigError(
            f"--resume {run_dir}: its {rundir.CONFIG} is missing (deleted, or not copied with {rundir.CHECKPOINT}), so "
            f"the run's options are unknown; copy {rundir.CONFIG} back into {run_dir} from where the run came from"
        )
    if not (run_dir / rundir.CONFIG).is_file():
        raise ConfigError(
            f"--resume {run_dir}: no {rundir.CONFIG} there, so it is not a rotnet run; give the run directory to continue"
        )
    if rundir.folder_kind(run_dir) == "export":
        raise ConfigError(
            f"--resume {run_dir}: an exported model, not a training run; give the run directory it was exported "
            f"from (the folder that holds {rundir.CHECKPOINT}), or pass --init {shell_quote(str(run_dir))} to start "
            "a new run from its weights"
        )
    if not (run_dir / rundir.CHECKPOINT).is_file():
        _refuse_without_checkpoint(run_dir)
    try:
        saved = _as_planned(run_dir, rundir.read_run_config(run_dir))
    except DataError as e:
        raise ConfigError(f"--resume {run_dir}: {e}") from None
    # --augment auto (or a planned value left unset) asks for the plan, and a resumed run keeps the one it made:
    # the command line that started the run resumes it (a launcher's --resume auto repeats that line)
    overrides = {name: value for name, value in overrides.items() if not _asks_for_the_plan(name, value)}
    given = PretrainConfig.from_dict({**saved.to_dict(), **overrides})
    check_extension(run_dir, saved.epochs, given.epochs)
    clashes = saved.contradictions(given, [name for name in overrides if name != "epochs"])
    if clashes:
        raise ConfigError(
            f"--resume {run_dir}: options contradict the saved run: {'; '.join(clashes)}; drop them or start a new run"
        )
    return PretrainConfig.from_dict({**given.to_dict(), "out": str(run_dir), "resume": True, "overwrite": False})


def auto_resume_config(params: dict[str, Any], given: set[str]) -> PretrainConfig:
    """--resume auto: continue the run in --out when it has a checkpoint and the options given (``given``
    names those of ``params`` set on the command line) agree with it, else start it there.

    So a launcher that restarts a dead process with the same command (torchrun --max-restarts, a
    scheduler's requeue) continues the run. A run in --out that stopped before its first checkpoint
    starts again when its config is this one; options that contradict the saved run are refused.
    """
    if not params.get("out"):
        raise ConfigError("--resume auto needs --out DIR: the run directory to continue, or to start when it has none")
    out = Path(params["out"]).expanduser()
    options = {name: params[name] for name in given if name in params and name not in ("out", "resume")}
    if (out / rundir.CHECKPOINT).is_file() or rundir.overwrite_pending(out):
        return resume_config(out, options)
    fresh = PretrainConfig.from_dict({**params, "resume": False})
    if (out / rundir.CONFIG).is_file() and rundir.folder_kind(out) == "run":  # killed before its first checkpoint
        try:
            saved = rundir.read_run_config(out)
        except DataError as e:
            raise ConfigError(f"--resume auto: {e}") from None
        # a planned value left unset (None, --augment auto) is planned again from the same data: not a clash
        names = [
            f.name for f in dataclass_fields(PretrainConfig) if not _asks_for_the_plan(f.name, getattr(fresh, f.name))
        ]
        clashes = saved.contradictions(fresh, names)
        if clashes:
            raise ConfigError(
                f"--resume auto: {out} holds another run that stopped before its first checkpoint ({'; '.join(clashes)}); "
                "give another --out, or --overwrite instead of --resume auto to replace it"
            )
        return PretrainConfig.from_dict({**fresh.to_dict(), "overwrite": True})
    return fresh


def _asks_for_the_plan(name: str, value: Any) -> bool:
    """An option value that leaves a planned field to the data plan: unset (None), or --augment auto."""
    return name in PLANNED_FIELDS and value in (None, "auto")


def _as_planned(run_dir: Path, saved: PretrainConfig) -> PretrainConfig:
    """A run's config with what its plan (or, before plans, its auto choices) resolved to: runs written
    before the data plan saved img_size None and augment auto, and resume them as they were resolved."""
    values = saved.to_dict()
    trained = as_trained(values, rundir.read_config(run_dir).get("resolved"))
    if trained == values:
        return saved
    return PretrainConfig.from_dict(trained, source=f"{run_dir / rundir.CONFIG} 'resolved'")


def _start_again(run_dir: Path) -> str:
    """The command that starts the run in ``run_dir`` again, in that folder, to paste. Built from
    its config.json, not from the command line it recorded: that names the folder the run was
    started in, which for a moved or copied run is another run (--overwrite would replace it)."""
    folder = shell_quote(str(run_dir))
    return f"rotnet pretrain --config {shell_quote(str(run_dir / rundir.CONFIG))} --out {folder} --overwrite"


def _typed_again(run_dir: Path) -> str:
    """The command line that started the run in ``run_dir`` (from its config.json), with --overwrite
    and with ``run_dir`` as its --out (the folder may have been moved since)."""
    try:
        argv = rundir.read_config(run_dir).get("command")
    except DataError:
        argv = None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv) or "pretrain" not in argv:
        return _start_again(run_dir)
    kept: list[str] = []
    pending = None  # the option whose value comes next
    for arg in argv:
        if pending == "--out":
            arg = str(run_dir)
        elif pending == "--resume" or arg.startswith("--resume="):
            pending = None
            continue
        elif arg.startswith("--out="):
            arg = f"--out={run_dir}"
        pending = {"-o": "--out", "--out": "--out", "--resume": "--resume"}.get(arg) if pending is None else None
        if pending != "--resume":
            kept.append(arg)
    if not any(a in ("--out", "-o") or a.startswith("--out=") for a in kept):
        kept += ["--out", str(run_dir)]
    return rundir.suggested_command(kept + ([] if "--overwrite" in kept else ["--overwrite"]))


def _unused_folder(folder: Path) -> Path:
    """``folder``, or folder-2, folder-3 ...: the first that does not exist (a suggested --out that works)."""
    candidate, n = folder, 1
    while candidate.exists():
        n += 1
        candidate = folder.with_name(f"{folder.name}-{n}")
    return candidate


def _refuse_without_checkpoint(run_dir: Path) -> None:
    """--resume of a run without checkpoint.pt: one that stopped before its first checkpoint (start
    it again), or one that trained and lost it (copied without it, deleted): say which is true."""
    try:
        epochs = len(rundir.read_metrics(run_dir)) if (run_dir / rundir.METRICS).is_file() else 0
    except DataError:
        epochs = 0
    weights = run_dir / rundir.WEIGHTS
    if not epochs and not weights.is_file():
        raise ConfigError(
            f"--resume {run_dir}: the run stopped before its first checkpoint, so there is nothing to resume; "
            f"start it again with: {_start_again(run_dir)}"
        )
    trained = f"{rundir.METRICS} records {epochs} epoch(s)" if epochs else f"it has {rundir.WEIGHTS}"
    if weights.is_file():
        new = shell_quote(str(_unused_folder(run_dir.parent / f"{run_dir.name}-continued")))
        advice = (
            f"to train further from its weights: rotnet pretrain --config {shell_quote(str(run_dir / rundir.CONFIG))} "
            f"--init {shell_quote(str(weights))} --out {new} (a new run; the optimizer's state was in the checkpoint)"
        )
    else:
        advice = f"to start it again there: {_start_again(run_dir)}"
    raise ConfigError(
        f"--resume {run_dir}: its {rundir.CHECKPOINT} is missing ({trained}: it was deleted or not copied), so it "
        f"cannot continue; {advice}"
    )


def _refuse_stopped_overwrite(run_dir: Path) -> None:
    """--resume of a folder where --overwrite was stopped before the new run's first checkpoint:
    put the old run back (that is what the next pretrain on it does) and say what happened."""
    again = _typed_again(run_dir)  # the new run's command: the config.json put back is the old run's
    with rundir.RunDirWriter(run_dir, resume=True):
        pass  # opening it under its lock repairs it: the old run comes back
    raise ConfigError(
        f"--resume {run_dir}: the new run that --overwrite started there stopped before its first checkpoint, so "
        f"there is nothing of it to resume; the run it was replacing is back in {run_dir}, unchanged. To start the "
        f"new run again: {again} (the old run is kept until the new one writes its first checkpoint)"
    )


def check_extension(run_dir: Path, planned: int | None, asked: int | None) -> None:
    """--resume with --epochs: as many as planned, or more to extend the run (see lr_factor); never fewer."""
    if planned is not None and asked is not None and asked < planned:
        raise ConfigError(
            f"--resume {run_dir} --epochs {asked}: the run plans {planned} epochs; a resumed run can be extended "
            f"(--epochs more than {planned}), not shortened; stop it where you want with Ctrl-C"
        )


# ----------------------------------------------------------------------------- the run and its state


@dataclass(frozen=True)
class Run:
    """What stays fixed once the run is set up (frozen: built once, by set_up, with every value)."""

    cfg: PretrainConfig
    dist: DistInfo
    device: torch.device
    precision: str
    out: Path
    report: Progress
    stop_requested: Callable[[], bool]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_set: data_lib.ImageSet
    val_set: data_lib.ImageSet | None
    per_rank_batch: int  # images per step on this process (before rotation)
    images_per_rank: int  # training images this process sees per epoch
    steps_per_epoch: int
    padding: int  # of the random crop
    augment: str  # none, shift, crop or crop+flip (--augment auto resolved for this data)
    plan: planning.Plan  # the data plan: each value and why (config.json's resolved.plan)
    writer: rundir.RunDirWriter | None  # rank 0's hold on the run directory (lock, --overwrite's old run)
    skipped: tuple[str, ...]  # files left out when the data was opened (not images, or unreadable)
    data_files: int  # image files the data source found (before decoding): what a resume compares
    data_names: str | None  # a digest of their names (data.files_digest; None for built-in datasets): compared too
    own_validation: bool  # the data brought its validation images (DIR/val, a test split); else --val-split
    batch_norm: bool  # the model normalises over the batch (a step needs at least 2 inputs)
    evaluator: FeatureEval | None  # --eval-data, decoded once (rank 0 evaluates)
    best_metric: str  # --best-metric resolved for this data


@dataclass
class TrainState:
    """What training changes; a checkpoint writes it down and restore() reads it back."""

    model: RotNet
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    history: list[dict] = field(default_factory=list)  # one metrics row per finished epoch
    epoch: int = 0  # the epoch to train next (0-based)
    step: int = 0  # steps of that epoch already done (a mid-epoch resume)
    partial: dict | None = None  # this rank's sums of those steps (EpochSums.state())
    # the per-copy losses of the last DIVERGED_STEPS - 1 steps before this epoch (host): with a few steps an
    # epoch the divergence rule looks across epochs (not saved: a resumed run starts the window again)
    loss_tail: torch.Tensor | None = None
    saved_at: tuple[int, int] | None = None  # (epoch, step) of the last checkpoint
    skipped: dict[str, None] = field(default_factory=dict)  # unreadable files met while training, in order
    logger_runs: dict[str, dict] = field(default_factory=dict)  # --logger runs to continue on resume (W&B, MLflow ids)
    # the last epoch's validation logits (V*R, R) and labels (V*R,) of every rank: what calibration fits (not saved)
    val_logits: tuple[torch.Tensor, torch.Tensor] | None = None
    # not saved either: the model as trained (DDP-wrapped, compiled), set once the state is restored,
    # and --logger's open loggers (rank 0, once the run directory exists)
    train_model: torch.nn.Module | None = None
    loggers: Loggers = field(default_factory=lambda: Loggers([]))


@dataclass
class EpochStats:
    """One epoch's training figures, before they are reduced over ranks."""

    sums: EpochSums
    seen_before: int  # copies a resumed epoch had seen before this process: not part of its speed
    seconds: float
    waited: float  # seconds spent waiting for batches
    lr: float  # of the epoch's last step


# ----------------------------------------------------------------------------- the loop


def pretrain(
    cfg: PretrainConfig,
    progress: Progress | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> PretrainResult:
    """Run RotNet pretraining as configured; see the module docstring.

    ``should_stop`` is polled at step boundaries (Ctrl-C): the loop then writes a checkpoint
    and raises Interrupted. Under torchrun only rank 0 reports progress and writes files.

    Rank 0 holds the run directory (rundir.RunDirWriter) for the whole run: locked against a
    second process, repaired if a killed one left it half-way, and, if this run fails before
    its first checkpoint, left as it was (an overwritten run comes back, a new folder goes).
    """
    check_installed(cfg.logger)  # a missing logger package is known before anything is written
    dist = dist_from_env()
    report = (progress if dist.is_main else None) or ignore
    device = resolve_device(cfg.device, dist.local_rank)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    if dist.enabled and cfg.batch_size is not None and cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide by the {dist.world_size} processes of torchrun")
    made = None
    if cfg.out:
        out = Path(cfg.out)
    elif dist.is_main:  # the default folder is claimed (made) here: two runs never share it
        out, made = rundir.claim_default_run_dir(cfg.model)
    else:
        out = rundir.default_run_dir(cfg.model)  # only rank 0 writes; the others never use it
    writer = rundir.RunDirWriter(out, made=made, resume=cfg.resume) if dist.is_main else contextlib.nullcontext()
    with writer:
        if dist.is_main and writer.recovered:
            report(Message(f"{out}: {writer.recovered}"))
        rundir.check_out_dir(
            out, overwrite=cfg.overwrite, resume=cfg.resume, resumable=True, replaces=rundir.RUN_ENTRIES
        )
        saved = rundir.read_checkpoint(out / rundir.CHECKPOINT) if cfg.resume else None
        init_distributed(dist, device)
        try:
            result = _train(
                cfg,
                dist,
                device,
                precision,
                out,
                saved,
                report,
                should_stop or (lambda: False),
                writer if dist.is_main else None,
            )
            barrier(dist)  # rank 0 writes the last files: the others wait rather than tear the group down under it
            return result
        except BaseException as e:
            if isinstance(e, (Interrupted, NonFiniteLossError)):
                barrier(dist)  # every rank stops at the same step (they agreed on it), so they leave together too
            explained = _explained(e, out, writer if dist.is_main else None)
            if explained is e:
                raise
            raise explained from e
        finally:
            shutdown_distributed()


def _explained(e: BaseException, out: Path, writer: rundir.RunDirWriter | None) -> BaseException:
    """What a failure means for the run: a second Ctrl-C or a full disk says whether and how to continue."""
    saved = writer is not None and writer.kept
    resume = f"rotnet pretrain --resume {shell_quote(str(out))}"
    if isinstance(e, KeyboardInterrupt):  # a second Ctrl-C: stopped at once
        if saved:
            return Interrupted(f"stopped at once; the last checkpoint in {out} is intact; resume with: {resume}")
        return Interrupted(
            "stopped at once, before the first checkpoint; nothing was kept (an overwritten run is back as it was)"
        )
    if isinstance(e, DiskFullError):
        if saved:
            return DiskFullError(
                e.path,
                f"disk full while writing {e.path}; the last checkpoint is intact: free space and resume with: {resume}",
            )
        return DiskFullError(
            e.path,
            f"disk full while writing {e.path}, before the first checkpoint; nothing of this run was kept (a run it replaced is back as it was): free space and run the same command again",
        )
    return e


def _train(
    cfg: PretrainConfig,
    dist: DistInfo,
    device: torch.device,
    precision: str,
    out: Path,
    saved: dict | None,
    report: Progress,
    stop_requested: Callable[[], bool],
    writer: rundir.RunDirWriter | None,
) -> PretrainResult:
    report(DeviceChosen(describe_device(device), precision, dist.world_size))
    report(Phase(f"building {cfg.model}"))
    size = plan_image_size(cfg, device)
    model, img_size, mean, std = build_model(cfg, init=saved is None, report=report, planned_size=size.value)
    if img_size != size.value:  # the model could not run on the planned size
        smallest = "its own size" if img_size == model_default_size(cfg.model) else "the smallest tried it runs on"
        size = planning.Decision(img_size, f"{smallest}: {cfg.model} cannot run on {size.value} px")
    seed_everything(cfg.seed, dist.rank)  # from here on each rank draws its own dropout/drop-path noise
    run = set_up(
        cfg, dist, device, precision, out, report, stop_requested, writer, size, mean, std, model, saved is None
    )
    cfg = run.cfg  # with the plan's values: batch size, epochs, augmentation, image size
    state = new_state(run, model)
    if saved is not None:
        restore(run, state, saved)
        report(Resumed(state.epoch, state.step, cfg.epochs))
    state.train_model = wrap_for_training(run, state.model)
    start_epoch, start_step = state.epoch, state.step
    finished_before = saved is not None and start_epoch >= cfg.epochs and (out / rundir.WEIGHTS).is_file()
    logging = dist.is_main and not finished_before
    if (
        saved is not None and logging
    ):  # a resume opens its loggers first: logs/ it cannot write leaves config.json as it was
        open_run_loggers(run, state, resume_step=start_epoch * run.steps_per_epoch + start_step)
    start_run_dir(run, state, resumed=saved is not None)
    if saved is None and logging:  # a new run's folder exists only now
        open_run_loggers(run, state, resume_step=None)
    train_epochs(run, state, start_epoch)
    if not finished_before and state.val_logits is None and run.val_set is not None and len(run.val_set):
        # a run stopped after its last epoch's checkpoint but before its weights were written (a second Ctrl-C
        # or a kill while calibrating) trains nothing when resumed: the last validation pass again, on every
        # rank, so that its weights are calibrated as they would have been
        state.val_logits = validate(run, state, keep_logits=True).get("logits")

    calibrated = None
    if finished_before:
        # a finished run resumed again (a scheduler's requeue) keeps its files as they are
        report(
            Message(
                f"{out} had already finished (epoch {cfg.epochs} of {cfg.epochs}); nothing to train, nothing changed"
            )
        )
    elif dist.is_main:
        calibrated = calibrate_head(run, state)
        report(Phase("describing the training images (for predict's check of new images)"))
        described = describe_training_images(
            state.model,
            cfg.data,
            run.train_set,
            run.val_set,
            run.mean,
            run.std,
            cfg.rotations,
            device,
            precision,
            run.per_rank_batch,
        )
        save_run_weights(run, state, out / rundir.WEIGHTS, calibration=calibrated, training_images=described)
    return PretrainResult(
        out_dir=out,
        model=cfg.model,
        device=describe_device(device),
        epochs_done=len(state.history),
        history=state.history,
        val_rot_acc_per_rotation=state.history[-1]["val_rot_acc_per_rotation"] if state.history else {},
        skipped_files=list(
            dict.fromkeys([*run.skipped, *state.skipped, *(run.evaluator.skipped if run.evaluator else ())])
        ),
        resumed_from={"epoch": start_epoch, "step": start_step} if saved is not None else None,
        best=best_checkpoint(run),
        kept=[f"{out}:{name}" for name in rundir.kept_checkpoint_names(out)],
        labelled=run.train_set.labels is not None,
        calibration=calibrated,
        val_images=len(run.val_set) if run.val_set is not None else 0,
        own_validation=run.own_validation,
    )


def train_epochs(run: Run, state: TrainState, start_epoch: int) -> None:
    """Every epoch from ``start_epoch`` on: train, validate, evaluate, log, keep and save, write the metrics.

    A stop request (Ctrl-C) ends the run after an epoch's checkpoint with Interrupted; the loggers
    are closed whatever happens.
    """
    try:
        for epoch in range(start_epoch, run.cfg.epochs):
            stats = train_one_epoch(run, state, epoch)  # raises Interrupted (after a checkpoint) when asked to stop
            row = finish_epoch(run, state, epoch, stats)
            row.update(evaluate(run, state, epoch))  # kNN (linear) accuracy on --eval-data, every --eval-every epochs
            state.history.append(row)
            state.epoch, state.step, state.partial = epoch + 1, 0, None
            state.loggers.log_epoch(state.epoch * run.steps_per_epoch, row, state.model)
            # before checkpoint.pt: a kill between them trains this epoch again, to the same weights
            keep_checkpoints(run, state)
            save_checkpoint(run, state, sums=None)
            if run.dist.is_main:  # after the checkpoint: a kill between the two leaves metrics a row short, never ahead
                rundir.write_metrics(run.out, state.history)
            run.report(
                EpochEnded(
                    epoch + 1,
                    run.cfg.epochs,
                    row["loss"],
                    row["rot_acc"],
                    row["val_loss"],
                    row["val_rot_acc"],
                    row["lr"],
                    row["images_per_s"],
                    row["seconds"],
                )
            )
            if "eval" in row:
                run.report(FeaturesEvaluated(epoch + 1, row["eval"], row["eval_seconds"]))
            if stop_now(run, sync_point=True) and epoch + 1 < run.cfg.epochs:
                raise Interrupted(
                    f"stopped after epoch {epoch + 1} of {run.cfg.epochs}; checkpoint saved; resume with: {_resume_command(run.out)}"
                )
    finally:
        state.loggers.close(finished=state.epoch >= run.cfg.epochs)


# ----------------------------------------------------------------------------- set up


def build_model(
    cfg: PretrainConfig, init: bool, report: Progress = ignore, planned_size: int | None = None
) -> tuple[RotNet, int, tuple[float, ...], tuple[float, ...]]:
    """A headless timm backbone + Linear(width, R) rotation head, the same on every rank;
    -> (model, img_size, mean, std). ``init``: start from --init weights (not on resume);
    ``planned_size``: the data plan's image size, used when --img-size is not given."""
    seed_everything(cfg.seed)  # the same initial weights on every rank
    backbone, img_size = run_backbone(cfg, report, planned_size)
    dcfg = data_config(backbone)
    img_size = img_size or int(dcfg["input_size"][-1])
    model = RotNet(backbone, rotation_head(backbone, cfg.num_rotations))
    if cfg.init and init:
        _load_init(model, cfg, img_size)
    return model, img_size, tuple(dcfg["mean"]), tuple(dcfg["std"])


def run_backbone(
    cfg: PretrainConfig, report: Progress = ignore, planned_size: int | None = None
) -> tuple[torch.nn.Module, int | None]:
    """The run's backbone and input size: --img-size, else the planned size, else the data's own size,
    else the model's (None: timm's size for it). A planned or dataset's own size (digits, CIFAR: 32 px)
    gives way to the model's when the model cannot run on it; the images are then resized to that size."""
    img_size = cfg.img_size or planned_size or data_lib.native_size(cfg.data)
    try:
        return create_backbone(cfg.model, img_size=img_size), img_size
    except InputSizeError as e:
        if cfg.img_size is not None:
            raise
        own = e.size
    # the smallest of a few larger sizes it runs on, not its own size at once: inception_v3 runs on 112 px,
    # and 25 px faces blown up to its 299 px cost 7x the pixels for nothing
    larger = [] if takes_only_default_size(cfg.model) else planning.larger_sizes(img_size, own)
    for size in larger:
        try:
            backbone = create_backbone(cfg.model, img_size=size)
        except InputSizeError:
            continue
        report(Message(f"{cfg.model} cannot run on {img_size} px images; {cfg.data} is resized to {size} px"))
        return backbone, size
    report(Message(f"{cfg.model} cannot run on {img_size} px images; {cfg.data} is resized to {own} px, its own size"))
    return create_backbone(cfg.model, img_size=own), own


def plan_image_size(cfg: PretrainConfig, device: torch.device) -> planning.Decision:
    """The data plan's image size (decided before the images are decoded at it): from the sizes in
    the image files' headers, the model's input size and the device."""
    model = planning.ModelFacts(cfg.model, model_default_size(cfg.model), takes_only_default_size(cfg.model))
    sides = data_lib.image_sides(cfg.data) if cfg.img_size is None else None
    sizes = planning.ImageSizes(tuple(sides)) if sides else None
    return planning.plan_image_size(cfg.img_size, model, device.type, data_lib.native_size(cfg.data), sizes)


def set_up(
    cfg: PretrainConfig,
    dist: DistInfo,
    device: torch.device,
    precision: str,
    out: Path,
    report: Progress,
    stop_requested: Callable[[], bool],
    writer: rundir.RunDirWriter | None,
    size: planning.Decision,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    model: RotNet,
    new_run: bool = True,
) -> Run:
    """The data (uint8 (N, 3, S, S) train and validation sets), the data plan (cfg with its values),
    the sizes of an epoch and what the model and data decide (BatchNorm, evaluation, --best-metric)."""
    img_size = size.value
    source, train_set, val_set = read_training_data(cfg, img_size, report)
    sample = data_lib.sample_images(train_set)
    plan = planning.make_plan(
        images=len(train_set),
        content=planning.measure_content(sample) if sample is not None else None,
        img_size=size,
        batch_size=cfg.batch_size,
        epochs=cfg.epochs,
        augment=cfg.augment,
        source=data_lib.dataset_key(cfg.data),
        world_size=dist.world_size,
        accum_steps=cfg.accum_steps,
        max_steps_per_epoch=cfg.max_steps_per_epoch,
    )
    cfg = dataclasses.replace(cfg, **plan.values())  # validated again: milestones against the planned epochs
    if new_run:  # a resumed run keeps the plan it was started with (config.json)
        for line in plan.lines():  # one event a line: a message's control characters are shown escaped
            report(Message(line))
    if dist.enabled and cfg.batch_size % dist.world_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} must divide by the {dist.world_size} processes of torchrun")
    per_rank_batch = max(1, cfg.batch_size // dist.world_size)
    images_per_rank = len(train_set) // dist.world_size
    if images_per_rank == 0:
        raise DataError(
            f"the training set has {len(train_set)} images, fewer than the {dist.world_size} processes of torchrun; "
            "add images or start fewer processes"
        )
    if cfg.cache == "device" or (
        cfg.cache == "auto" and device.type == "cuda" and train_set.in_memory and _fits_on(device, train_set)
    ):
        train_set = train_set.to(device)
        if val_set is not None and val_set.in_memory:
            val_set = val_set.to(device)
    # optimizer steps, the last (partial) one too: every image every epoch (planning.py)
    steps_per_epoch = math.ceil(images_per_rank / (per_rank_batch * cfg.accum_steps))
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    augment = cfg.augment
    padding = data_lib.crop_padding(augment, img_size)
    if hint := slow_device_hint(device, img_size):
        report(Message(hint))
    batch_norm = normalises_over_batch(model)
    check_batch_norm(cfg, dist, per_rank_batch, batch_norm)
    copies_per_epoch = steps_per_epoch * cfg.batch_size * cfg.copies_per_image
    evaluator = set_up_eval(cfg, model, img_size, copies_per_epoch, report) if dist.is_main else None
    return Run(
        cfg=cfg,
        dist=dist,
        device=device,
        precision=precision,
        out=out,
        report=report,
        stop_requested=stop_requested,
        img_size=img_size,
        mean=mean,
        std=std,
        train_set=train_set,
        val_set=val_set,
        per_rank_batch=per_rank_batch,
        images_per_rank=images_per_rank,
        steps_per_epoch=steps_per_epoch,
        padding=padding,
        augment=augment,
        plan=plan,
        writer=writer,
        skipped=source.skipped,
        data_files=source.files,
        data_names=source.names,
        own_validation=source.val is not None,
        batch_norm=batch_norm,
        evaluator=evaluator,
        best_metric=cfg.resolved_best_metric(has_val=val_set is not None and len(val_set) > 0),
    )


def read_training_data(
    cfg: PretrainConfig, img_size: int, report: Progress
) -> tuple[data_lib.DataSource, data_lib.ImageSet, data_lib.ImageSet | None]:
    """The data source and its train and validation sets (a --val-split held out); none left to train on is an error."""
    report(Phase(f"reading {cfg.data}"))
    source = data_lib.open_source(
        cfg.data,
        img_size,
        download=cfg.download,
        data_dir=cfg.data_dir,
        cache=cfg.cache,
        workers=cfg.workers,
        strict=cfg.strict_data,
        progress=report,
    )
    train_set, val_set = source.train, source.val
    if not train_set.in_memory:  # streamed: read while training, so prove now that something decodes
        data_lib.check_readable(train_set, strict=cfg.strict_data)
    if val_set is None and cfg.val_split > 0 and len(train_set) == 1:  # a small folder trains, even one image
        report(
            WarningMessage(
                "1 image: none can be held out for validation, so it trains on it alone (no validation accuracy, "
                "no calibration); add images for those"
            )
        )
    elif val_set is None and cfg.val_split > 0:
        train_idx, val_idx = data_lib.split_indices(len(train_set), cfg.val_split, cfg.seed)
        train_set, val_set = train_set.subset(train_idx), train_set.subset(val_idx)
    if source.skipped:
        report(WarningMessage(data_lib.warn_skipped(list(source.skipped))))
    if len(train_set) == 0:
        raise DataError(
            f"no training images are left after holding out {len(val_set or [])} for validation; add images, "
            "or pass --val-split 0 to train on all of them"
        )
    return source, train_set, val_set


def check_batch_norm(cfg: PretrainConfig, dist: DistInfo, per_rank_batch: int, batch_norm: bool) -> None:
    """BatchNorm cannot normalise a batch of one: refuse such a step size before anything is written."""
    copies = cfg.copies_per_image
    if per_rank_batch * copies < 2 and batch_norm:
        per = " per process" if dist.enabled else ""
        raise ConfigError(
            f"{cfg.model} uses BatchNorm, which cannot train on {per_rank_batch * copies} image{per} per step "
            "(--batch-size 1 with --copies one); use --batch-size 2 or more, or --copies all"
        )


def new_state(run: Run, model: RotNet) -> TrainState:
    """The model on its device with a fresh optimizer, lr schedule and grad scaler."""
    model.to(run.device)
    if run.cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, run.cfg, run.device)
    return TrainState(
        model=model,
        optimizer=optimizer,
        scheduler=make_scheduler(optimizer, run.cfg, run.steps_per_epoch),
        scaler=torch.amp.GradScaler(run.device.type, enabled=run.precision == "fp16"),
    )


def resolved_config(run: Run) -> dict[str, Any]:
    """What the config resolved to for this run and machine (config.json's "resolved")."""
    return {
        "out": str(run.out),
        "img_size": run.img_size,
        "mean": list(run.mean),
        "std": list(run.std),
        "lr": run.cfg.resolved_lr,  # in use: --lr scaled by --lr-scale for the global batch
        "global_batch": run.cfg.global_batch,  # images per optimizer step: per process x processes x accumulation
        "per_process_batch": run.per_rank_batch,
        "weight_decay": run.cfg.resolved_weight_decay,
        "augment": run.augment,
        "batch_size": run.cfg.batch_size,
        "epochs": run.cfg.epochs,
        "plan": run.plan.to_dict(),
        "device": str(run.device),
        "precision": run.precision,
        "world_size": run.dist.world_size,
        "threads": torch.get_num_threads(),
        "train_images": len(run.train_set),
        "val_images": len(run.val_set) if run.val_set is not None else 0,
        "data_files": run.data_files,
        "in_memory": run.train_set.in_memory,
        "best_metric": run.best_metric,
    }


def config_record(run: Run) -> dict[str, Any]:
    """The config as --logger records it: every option, with what auto and defaults resolved to."""
    return {**run.cfg.to_dict(), **resolved_config(run)}


def wrap_for_training(run: Run, model: RotNet) -> torch.nn.Module:
    """DDP under torchrun, torch.compile with --compile; the plain model is what gets saved."""
    if run.dist.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[run.device.index] if run.device.type == "cuda" else None
        )
    if run.cfg.compile:
        model = torch.compile(model)
    return model


def open_run_loggers(run: Run, state: TrainState, resume_step: int | None) -> None:
    state.loggers = open_loggers(run.cfg.logger, run.out, config_record(run), resume_step, state.logger_runs)
    state.logger_runs = {**state.logger_runs, **state.loggers.resume_state()}  # kept: a later resume continues them


def start_run_dir(run: Run, state: TrainState, resumed: bool) -> None:
    """Rank 0 writes config.json (a new run) or cleans up after a killed one (a resume)."""
    n_val = len(run.val_set) if run.val_set is not None else 0
    barrier(run.dist)  # every rank has checked --out and read the checkpoint before rank 0 writes there
    if run.dist.is_main:
        if not resumed:
            run.writer.start_new(replace=run.cfg.overwrite)  # --overwrite: the old run is set aside, not deleted
            rundir.write_config(run.out, run.cfg.to_dict(), resolved_config(run))
        else:
            rundir.remove_temp_files(run.out)  # left by a process killed while writing
            planned = rundir.read_config(run.out)["config"].get("epochs")
            if isinstance(planned, int) and run.cfg.epochs > planned:
                rundir.record_extension(run.out, run.cfg.epochs, at_epoch=state.epoch)
                run.report(
                    Message(
                        f"extending the run from {planned} to {run.cfg.epochs} epochs at epoch {state.epoch + 1}: "
                        + (
                            "the step schedule keeps its milestones"
                            if run.cfg.schedule == "step"
                            else f"the cosine schedule is re-planned over {run.cfg.epochs} epochs from here (lr now "
                            f"{run.cfg.resolved_lr * lr_factor(state.epoch * run.steps_per_epoch + state.step, run.cfg, run.steps_per_epoch):.3g})"
                        )
                    )
                )
        rundir.write_metrics(run.out, state.history)
    copies = run.cfg.copies_per_image
    run.report(
        RunStarted(
            str(run.out),
            run.cfg.model,
            run.img_size,
            len(run.train_set),
            n_val,
            run.steps_per_epoch,
            run.cfg.epochs,
            state.epoch,
            # a step's model inputs: never more than the training images hold (a small folder, --accum-steps)
            min(run.per_rank_batch * run.cfg.accum_steps, run.images_per_rank) * run.dist.world_size * copies,
            state.step,
            global_batch=run.cfg.global_batch,
            per_process_batch=run.per_rank_batch,
            processes=run.dist.world_size,
            accum_steps=run.cfg.accum_steps,
            lr=run.cfg.resolved_lr,
        )
    )


# ----------------------------------------------------------------------------- one epoch


def train_one_epoch(run: Run, state: TrainState, epoch: int) -> EpochStats:
    """Train the steps of ``epoch`` (from state.step on); checkpoint every --save-every steps.

    A stop request (Ctrl-C) is answered at a step boundary with a checkpoint and Interrupted;
    the epoch's last step is left to the epoch-end checkpoint.
    """
    cfg, dist, device = run.cfg, run.dist, run.device
    # this rank's share of the epoch's order, dealt round-robin as DistributedSampler does
    # (rank r gets r, r+W, ...), so the ranks' k-th batches together are the k-th global batch
    order = data_lib.epoch_order(len(run.train_set), cfg.seed, epoch)
    order = order[: run.images_per_rank * dist.world_size][dist.rank :: dist.world_size]  # (images_per_rank,)
    first = state.step
    sums = EpochSums(run.steps_per_epoch, device, state.partial if first else None)
    seen_before = sums.seen
    # --logger plots the mean of the steps since the last log point; a resumed epoch's slots hold its earlier steps
    logged = first - first % cfg.log_every
    state.train_model.train()
    t0 = time.perf_counter()
    waited = 0.0
    lr = state.optimizer.param_groups[0]["lr"]
    batches = data_lib.iterate_batches(  # one batch per optimizer step: its micro-batches are split off below
        run.train_set,
        order,
        run.per_rank_batch * cfg.accum_steps,
        device,
        drop_last=False,  # every image every epoch: the last batch may be smaller (planning.py)
        workers=cfg.workers,
        start_batch=first,
        strict=cfg.strict_data,
        with_labels=False,
    )
    run.report(EpochStarted(epoch + 1, cfg.epochs, first, run.steps_per_epoch))
    step = first
    while step < run.steps_per_epoch:
        t_wait = time.perf_counter()
        batch = next(batches, None)
        waited += time.perf_counter() - t_wait
        if batch is None:
            break
        state.skipped.update(dict.fromkeys(batch.skipped))
        for _ in range(step, batch.index):  # batches without one readable image never come: their steps pass
            state.scheduler.step()
        step = batch.index
        global_step = epoch * run.steps_per_epoch + step
        lr = state.optimizer.param_groups[0]["lr"]  # the scheduler set it for this step
        x, y = rotation_inputs(run, batch.images, step_generator(device, cfg.seed, global_step, dist.rank))

        # unreadable files can leave a streamed batch of one image, which BatchNorm cannot train on: it passes
        if len(x) >= 2 or not run.batch_norm:
            loss, logits, y = optimizer_step(run, state, x, y, len(batch.images))
            # the sums stay on the device; the host reads them every log_every steps only
            sums.add(step, loss, logits, y)
        state.scheduler.step()
        step += 1
        run.report(StepFinished(epoch + 1, step, run.steps_per_epoch))  # host counters only: no device read
        log_now = step % cfg.log_every == 0 or step == run.steps_per_epoch
        if log_now:
            logged = report_step(run, state, epoch, step, sums, logged, seen_before, t0, waited, lr)
        if step == run.steps_per_epoch:
            break  # the epoch-end checkpoint follows (a Ctrl-C now is handled after it)
        state.step = step
        if cfg.save_every and (global_step + 1) % cfg.save_every == 0:
            save_checkpoint(run, state, sums)
        if stop_now(run, sync_point=log_now):
            if state.saved_at != (epoch, step):
                save_checkpoint(run, state, sums)
            raise Interrupted(
                f"stopped at {_position(epoch, step)}; checkpoint saved; resume with: {_resume_command(run.out)}"
            )

    check_finite(run, state, epoch, sums)
    earlier = state.loss_tail if state.loss_tail is not None else torch.zeros(0)
    state.loss_tail = torch.cat([earlier, sums.per_copy()])[-(DIVERGED_STEPS - 1) :]
    return EpochStats(sums, seen_before, time.perf_counter() - t0, waited, lr)


def rotation_inputs(run: Run, images: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """On-device: crop (and flip) on uint8, normalise, then the rotated copies and their labels.

    images (B, 3, S, S) uint8 -> inputs (R*B or B, 3, S, S) float32, labels (R*B or B,)
    """
    cfg = run.cfg
    x = images
    if run.augment != "none":
        x = data_lib.random_crop_flip(x, run.padding, gen, flip=run.augment == "crop+flip")
    x = data_lib.normalize(x, run.mean, run.std)  # (B, 3, S, S) float32
    x, y = make_rotation_batch(x, cfg.rotations, cfg.copies, gen)  # (R*B or B, 3, S, S), labels
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y


def report_step(
    run: Run,
    state: TrainState,
    epoch: int,
    step: int,
    sums: EpochSums,
    logged: int,
    seen_before: int,
    t0: float,
    waited: float,
    lr: float,
) -> int:
    """A log point (every --log-every steps): the epoch's figures so far as a StepDone event, and the
    mean of the steps since the last log point to --logger (``t0``: the epoch's start, perf_counter;
    ``waited``: seconds spent waiting for batches since). Returns the step logged last."""
    check_finite(run, state, epoch, sums)
    figures = sums.totals()
    if state.loggers.loggers:  # and the steps since the last log, in the same read from the device
        figures = torch.cat([figures, sums.since(logged)])
    loss_total, correct_total, seen_total, *loss_correct_recent = figures.tolist()
    elapsed = max(time.perf_counter() - t0, 1e-9)  # after the read: the device has finished the steps timed
    seen = max(seen_total, 1.0)  # every batch so far unreadable: report zeros, not a division by zero
    images_per_s = (seen_total - seen_before) * run.dist.world_size / elapsed
    run.report(
        StepDone(
            epoch + 1,
            run.cfg.epochs,
            step,
            run.steps_per_epoch,
            loss_total / seen,
            correct_total / seen,
            lr,
            images_per_s,
            waited / elapsed,
        )
    )
    if not loss_correct_recent:
        return logged
    loss_recent, correct_recent = loss_correct_recent
    copies = sums.seen * (step - logged) / step  # about: the epoch's last batch may be smaller
    state.loggers.log_step(
        epoch * run.steps_per_epoch + step,
        step_scalars(loss_recent / copies, correct_recent / copies, lr, images_per_s, waited / elapsed),
    )
    return step


def micro_batches(rows: int, images: int, accum_steps: int) -> list[torch.Tensor]:
    """The rows of a step's rotation batch that each of its ``accum_steps`` micro-batches trains on.

    Row j shows image j % images (all copies are rotation-major, one copy is one row per image), so a
    micro-batch takes every copy of its slice of the images, as a step of that many images would.
    """
    size = -(-images // accum_steps)  # ceil: an uneven streamed batch gives a smaller last micro-batch
    part = torch.arange(rows) % images // size  # (rows,) the micro-batch of each row
    return [(part == k).nonzero().squeeze(1) for k in range(accum_steps) if bool((part == k).any())]


def optimizer_step(
    run: Run, state: TrainState, x: torch.Tensor, y: torch.Tensor, images: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step on the step's rotation batch ``x`` (R*B or B, 3, S, S) with labels ``y``, in
    --accum-steps micro-batches whose gradients add up to the whole batch's (each loss weighted by its
    share of the rows, so a model without BatchNorm gets the gradient of one step of the whole batch).

    Under DDP the gradients are averaged over processes once, at the last micro-batch (no_sync before).
    Returns the step's mean loss, its logits (R*B, R) and their labels, in micro-batch order.
    """
    accum = run.cfg.accum_steps
    parts = [torch.arange(len(x))] if accum == 1 else micro_batches(len(x), images, accum)
    state.optimizer.zero_grad(set_to_none=True)
    losses, outputs, labels = [], [], []
    for k, rows in enumerate(parts):
        xs, ys = (x, y) if accum == 1 else (x[rows.to(x.device)], y[rows.to(y.device)])
        last = k == len(parts) - 1
        syncing = contextlib.nullcontext() if last or not run.dist.enabled else state.train_model.no_sync()
        with syncing:
            with autocast(run.device, run.precision):
                logits = state.train_model(xs)  # (rows, R)
            loss = rotation_loss(logits, ys)
            state.scaler.scale(loss * (len(ys) / len(y))).backward()
        losses.append(loss.detach() * (len(ys) / len(y)))
        outputs.append(logits.detach())
        labels.append(ys)
    state.scaler.step(state.optimizer)  # fp16: skips the update when the scaled gradients overflowed
    state.scaler.update()
    return torch.stack(losses).sum(), torch.cat(outputs), torch.cat(labels)


def finish_epoch(run: Run, state: TrainState, epoch: int, stats: EpochStats) -> dict[str, Any]:
    """The epoch's metrics row: its training sums over all ranks, and the validation figures."""
    totals = stats.sums.totals()
    all_reduce_sum(totals, dist=run.dist)
    loss_total, correct_total, seen_total = totals.tolist()
    if seen_total == 0:  # every batch unreadable, or left too small for BatchNorm by its unreadable files
        then = f"resume with: {_resume_command(run.out)}" if state.saved_at else "start again"
        raise DataError(
            f"no step of epoch {epoch + 1} had 2 or more readable images to train on ({len(state.skipped)} unreadable "
            f"file(s) so far, e.g. {next(iter(state.skipped), '-')}); remove or restore them, then {then}"
        )
    last = epoch + 1 == run.cfg.epochs
    val = validate(run, state, keep_logits=last) if run.val_set is not None and len(run.val_set) else {}
    if last:
        state.val_logits = val.pop("logits", None)
    if val and not math.isfinite(val["loss"]):
        raise NonFiniteLossError(
            f"the validation loss became NaN or infinite after epoch {epoch + 1}: the weights diverged; "
            f"{_kept(run, state)}; lower --lr, add --warmup-epochs or use --precision fp32"
        )
    return {
        "epoch": epoch + 1,
        "loss": loss_total / seen_total,
        "rot_acc": correct_total / seen_total,
        "val_loss": val.get("loss"),
        "val_rot_acc": val.get("acc"),
        "lr": stats.lr,
        "images_per_s": (seen_total - stats.seen_before * run.dist.world_size) / max(stats.seconds, 1e-9),
        "seconds": stats.seconds,
        "data_wait": stats.waited / max(stats.seconds, 1e-9),
        "val_rot_acc_per_rotation": val.get("per_rotation", {}),
    }


@torch.no_grad()
def validate(run: Run, state: TrainState, keep_logits: bool = False) -> dict:
    """Rotation accuracy on every rotated copy of the held-out images (no augmentation); with
    ``keep_logits`` also this rank's (logits, labels) under "logits", for calibration."""
    cfg, device = run.cfg, run.device
    R = cfg.num_rotations
    run.report(Phase(f"validating: {len(run.val_set)} images x {R} rotations", every_epoch=True))
    # the plain model, not its DDP wrapper: DDP's forward syncs buffers with every rank, so a rank with
    # fewer validation images than another (1 image, 2 processes) would leave the others waiting forever
    model = state.model
    model.eval()
    order = torch.arange(len(run.val_set))[run.dist.rank :: run.dist.world_size]
    correct = torch.zeros(R, device=device)
    count = torch.zeros(R, device=device)
    loss_sum = torch.zeros((), device=device)
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    batches = data_lib.iterate_batches(
        run.val_set,
        order,
        run.per_rank_batch,
        device,
        drop_last=False,
        workers=cfg.workers,
        with_labels=False,
    )
    for batch in batches:
        state.skipped.update(dict.fromkeys(batch.skipped))
        x, y = rotate_all(data_lib.normalize(batch.images, run.mean, run.std), cfg.rotations)
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device, run.precision):
            logits = model(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        correct += torch.bincount(y, weights=(logits.argmax(1) == y).float(), minlength=R)
        count += torch.bincount(y, minlength=R).float()
        if keep_logits:
            kept.append((logits.detach().float(), y))  # (n*R, R), (n*R,): stay on the device until the end
    all_reduce_sum(correct, count, loss_sum, dist=run.dist)
    total = count.sum().item()
    if total == 0:
        return {}
    per_rotation = {f"{a:g}": (correct[i] / count[i]).item() for i, a in enumerate(cfg.rotations)}
    result = {"loss": loss_sum.item() / total, "acc": correct.sum().item() / total, "per_rotation": per_rotation}
    if keep_logits:  # every rank's share: calibration fits on all the held-out images, not rank 0's part
        logits = torch.cat([k[0] for k in kept]).cpu() if kept else torch.zeros((0, R))
        labels = torch.cat([k[1] for k in kept]).cpu() if kept else torch.zeros((0,), dtype=torch.long)
        shares = gather_objects((logits, labels), run.dist)  # once per run: pickled CPU tensors will do
        result["logits"] = (torch.cat([share[0] for share in shares]), torch.cat([share[1] for share in shares]))
    return result


def calibrate_head(run: Run, state: TrainState) -> dict | None:
    """The rotation head's temperature, fitted on the last validation pass's logits (every rank's share
    under torchrun); None without a validation split, or with too few images to fit one."""
    if state.val_logits is None:
        return None
    fitted = calibrate(*state.val_logits)
    return fitted.to_dict() if fitted is not None else None


def evaluate(run: Run, state: TrainState, epoch: int) -> dict[str, Any]:
    """{"eval": head -> stage -> accuracy, "eval_seconds": ...} after the epochs --eval-every asks for; else {}.
    Rank 0 evaluates the plain model (not its DDP or compiled wrapper); the other ranks go on to the checkpoint."""
    if not should_evaluate(run.evaluator, epoch, run.cfg.epochs):
        return {}
    t0 = time.perf_counter()
    accuracy = evaluate_features(
        run.evaluator, state.model, run.cfg.model, run.img_size, run.mean, run.std, run.device, run.precision
    )
    seconds = time.perf_counter() - t0  # knn_accuracy read its results from the device: nothing is left queued
    return {"eval": accuracy, "eval_seconds": seconds}


# A diverged run: DIVERGED_STEPS steps in a row (across epochs: a small folder has a few steps an epoch)
# whose loss per copy is above DIVERGED_FACTOR x the loss of guessing, ln(number of rotations). A run
# starts near that loss and only goes down; a healthy run's spikes last a step or two and stay within a
# few times it, while 10x means the true rotation gets a probability below e^-10*ln(R) on average
# (--momentum 1.5 reached loss 6540).
# Counting 7 of 10 rather than all 10: --momentum 0.999 --lr 10 gave per-step losses like 1929, 68498, ...,
# then 9.5e6, 2.4e7, 3.2, 2.6, 1.1e6, 5.9e7 (a collapsed model is sometimes right), and ran to exit 0.
DIVERGED_STEPS = 10
DIVERGED_HIGH_STEPS = 7
DIVERGED_FACTOR = 10.0


def check_finite(run: Run, state: TrainState, epoch: int, sums: EpochSums) -> None:
    """Stop before anything is saved from a diverged model; all ranks agree on the step."""
    first_bad = sums.first_nonfinite_step()
    spe = run.steps_per_epoch
    bad = reduce_int(NO_STEP if first_bad is None else epoch * spe + first_bad, "min", run.device, run.dist)
    if bad != NO_STEP:
        raise NonFiniteLossError(
            f"the loss became NaN or infinite at step {bad + 1} (epoch {bad // spe + 1}, step {bad % spe + 1}); "
            f"{_kept(run, state)}; lower --lr, add --warmup-epochs or use --precision fp32"
        )
    ceiling = DIVERGED_FACTOR * math.log(run.cfg.num_rotations)
    first_high = sums.first_diverged_step(ceiling, before=state.loss_tail)
    high = reduce_int(NO_STEP if first_high is None else epoch * spe + first_high, "min", run.device, run.dist)
    if high != NO_STEP:
        raise NonFiniteLossError(
            f"the loss diverged: {DIVERGED_HIGH_STEPS} of {DIVERGED_STEPS} steps in a row from step {high + 1} "
            f"(epoch {high // spe + 1}) were above "
            f"{ceiling:.1f}, {DIVERGED_FACTOR:g}x the loss of guessing; {_kept(run, state, since=high)}; "
            "lower --lr or --momentum, or add --warmup-epochs"
        )


def stop_if_weights_diverged(run: Run, state: TrainState) -> None:
    """No weights are saved that hold NaN or infinity: a step can blow them up while the loss it
    reported was still finite (the loss is computed before the update). One host read per save."""
    bad = nonfinite_tensors(state.model.state_dict())
    if not bad:
        return
    raise NonFiniteLossError(
        f"the weights became NaN or infinite by epoch {state.epoch + 1}, step {state.step} (e.g. {bad[0]}); "
        f"{_kept(run, state)}; lower --lr, add --warmup-epochs or use --precision fp32"
    )


def _kept(run: Run, state: TrainState, since: int | None = None) -> str:
    """What of the run is kept after it went wrong at global step ``since`` (None: at the current step). A rule
    that looks across epochs can find it went wrong before the last checkpoint, which then holds those weights."""
    saved = state.saved_at
    if saved and since is not None and saved[0] * run.steps_per_epoch + saved[1] > since:
        return (
            f"the checkpoint {run.out / rundir.CHECKPOINT} ({_position(*saved)}) was written after the "
            "loss rose, so it is kept but not worth resuming: start again with --overwrite"
        )
    if state.saved_at:
        return f"the last good checkpoint {run.out / rundir.CHECKPOINT} ({_position(*state.saved_at)}) is kept"
    if run.cfg.overwrite and not run.cfg.resume:
        return "no checkpoint had been written yet, so nothing of this run was kept and the run it replaced is back as it was"
    return "no checkpoint had been written yet, so nothing was kept"


def _resume_command(out: Path) -> str:
    return f"rotnet pretrain --resume {shell_quote(str(out))}"


def stop_now(run: Run, sync_point: bool) -> bool:
    """Ctrl-C seen (on any rank; ranks compare only at sync points so they stop together)."""
    if not run.dist.enabled:
        return run.stop_requested()
    return sync_point and bool(reduce_int(int(run.stop_requested()), "max", run.device, run.dist))


# ----------------------------------------------------------------------------- save and restore


def save_run_weights(run: Run, state: TrainState, path: Path, **facts: Any) -> None:
    """Backbone + rotation head as safetensors with the metadata every loader reads (the run's model.safetensors,
    and the kept checkpoints, which add their epoch). Never weights that hold NaN or infinity."""
    stop_if_weights_diverged(run, state)
    rundir.save_weights(
        path,
        state.model.state_dict(),
        rundir.RUN_FORMAT,
        run.cfg.model,
        rotations=list(run.cfg.rotations),
        img_size=run.img_size,
        mean=list(run.mean),
        std=list(run.std),
        num_features=state.model.backbone.num_features,
        head_hidden_size=feature_width(state.model.backbone),  # what the backbone returns: the head's input
        data=run.cfg.data,
        epochs=run.cfg.epochs,
        **facts,
    )


def keep_checkpoints(run: Run, state: TrainState) -> None:
    """After an epoch (rank 0): its weights as checkpoints/epoch-E (the last --keep-checkpoints epochs are kept),
    and as checkpoints/best when it is the best epoch so far by --best-metric (ties keep the earlier)."""
    if not run.dist.is_main or not (run.cfg.keep_checkpoints or run.best_metric != "none"):
        return
    epoch, row = state.epoch, state.history[-1]  # 1-based: the epoch just finished
    make_dir(run.out / rundir.CHECKPOINTS)
    if run.cfg.keep_checkpoints:
        save_run_weights(run, state, rundir.kept_checkpoint(run.out, rundir.epoch_checkpoint_name(epoch)), epoch=epoch)
        for name in rundir.kept_checkpoint_names(run.out):
            if name != rundir.BEST and int(name.split("-")[1]) <= epoch - run.cfg.keep_checkpoints:
                rundir.kept_checkpoint(run.out, name).unlink(missing_ok=True)
    value = best_value(row, run.best_metric) if run.best_metric != "none" else None
    earlier = [v for v in (best_value(r, run.best_metric) for r in state.history[:-1]) if v is not None]
    if value is not None and (not earlier or value > max(earlier)):
        save_run_weights(
            run,
            state,
            rundir.kept_checkpoint(run.out, rundir.BEST),
            epoch=epoch,
            best_metric=run.best_metric,
            best_value=abs(value),
        )


def best_checkpoint(run: Run) -> dict | None:
    """What checkpoints/best holds, from its own metadata (epoch, metric, value), None when there is none."""
    path = rundir.kept_checkpoint(run.out, rundir.BEST)
    if not run.dist.is_main or not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = rundir.read_weights_metadata(path, dict(f.metadata() or {}))
    return {
        "epoch": meta.get("epoch"),
        "metric": meta.get("best_metric"),
        "value": meta.get("best_value"),
        "weights": f"{run.out}:{rundir.BEST}",
    }


def save_checkpoint(run: Run, state: TrainState, sums: EpochSums | None) -> None:
    """Everything needed to continue at (state.epoch, state.step); rank 0 writes it atomically.

    Mid-epoch (``sums`` given) the epoch's sums so far go with it, once they are known to
    be finite; they and the RNG state differ per rank, so every rank sends its own. At an
    epoch's end the caller has checked the finished epoch already.
    """
    if sums is not None:
        check_finite(run, state, state.epoch, sums)
    stop_if_weights_diverged(run, state)  # the same weights on every rank (DDP), so every rank agrees
    per_rank = gather_objects({"partial": sums.state() if sums is not None else None, "rng": rng_state()}, run.dist)
    if run.dist.is_main:
        state.loggers.flush()  # the figures up to this checkpoint are on disk before it: a resume after a kill misses none
        rundir.write_checkpoint(
            run.out,
            {
                "config": run.cfg.to_dict(),
                "model": state.model.state_dict(),
                "optimizer": state.optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict(),
                "epoch": state.epoch,
                "step": state.step,
                "history": state.history,
                "img_size": run.img_size,
                "mean": list(run.mean),
                "std": list(run.std),
                "train_images": len(run.train_set),
                "world_size": run.dist.world_size,
                "threads": torch.get_num_threads(),
                "data_files": run.data_files,
                "data_names": run.data_names,
                "in_memory": run.train_set.in_memory,
                "partial": [r["partial"] for r in per_rank],
                "rng": [r["rng"] for r in per_rank],
                "loggers": state.logger_runs,
            },
        )
        if run.writer is not None:
            run.writer.checkpointed()  # the new run can now be resumed: an overwritten old one is gone for good
    state.saved_at = (state.epoch, state.step)


def restore(run: Run, state: TrainState, saved: dict) -> None:
    """Continue where ``saved`` (a checkpoint) stopped, or refuse what could not continue the same computation."""
    checkpoint = run.out / rundir.CHECKPOINT
    if saved.get("format") != CHECKPOINT_FORMAT:  # newer ones were refused when read
        raise ConfigError(
            f"--resume {run.out}: {checkpoint} was written by an earlier rotnet development build and cannot be resumed; "
            f"start a new run (--init {checkpoint} starts from its weights)"
        )
    written_for = saved["run_config"]
    differ = [
        f.name
        for f in dataclass_fields(PretrainConfig)
        if not f.metadata.get("resume_free")
        and f.name != "epochs"  # a larger --epochs extends the run: check_extension below
        and not _asks_for_the_plan(f.name, getattr(written_for, f.name))  # a run from before plans
        and getattr(written_for, f.name) != getattr(run.cfg, f.name)
    ]
    if differ:
        raise ConfigError(
            f"--resume {run.out}: {rundir.CONFIG} and {rundir.CHECKPOINT} there describe different runs "
            f"({', '.join(f'{n}: {getattr(run.cfg, n)!r} vs {getattr(written_for, n)!r}' for n in differ[:3])}); "
            f"one of them was replaced by hand: put back the {rundir.CONFIG} of this run, or start a new run"
        )
    try:
        epoch, step, train_images = int(saved["epoch"]), int(saved["step"]), int(saved["train_images"])
        saved_world = int(saved["world_size"])
        if train_images != len(run.train_set):
            raise DataError(_data_changed(run, saved, train_images))
        names_then = saved.get("data_names")  # None: a checkpoint from before it was kept, or a built-in dataset
        if isinstance(names_then, str) and run.data_names is not None and names_then != run.data_names:
            # as many files, but others: the seeded split would be drawn anew over them, and the validation
            # and calibration could hold images the run trained on
            raise DataError(
                f"--resume {run.out}: the training data changed ({run.data_files} image files when the run started "
                "and now, but not the same files); restore the data or start a new run"
            )
        threads = saved.get("threads")
        if run.device.type == "cpu" and threads and threads != torch.get_num_threads():
            run.report(
                WarningMessage(
                    f"the run used {threads} CPU threads, this process {torch.get_num_threads()}: the result will not be "
                    f"bitwise that of an uninterrupted run (set OMP_NUM_THREADS={threads} for that)"
                )
            )
        if step and saved_world != run.dist.world_size:
            raise ConfigError(
                f"--resume {run.out}: this checkpoint is from the middle of an epoch of a run on {saved_world} process(es); "
                f"resume it with {saved_world} (here: {run.dist.world_size})"
            )
        check_extension(run.out, int(saved["config"]["epochs"]), run.cfg.epochs)
        state.model.load_state_dict(saved["model"])
        state.optimizer.load_state_dict(saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        state.scaler.load_state_dict(saved["scaler"])
        state.history = list(saved["history"])
        state.logger_runs = _logger_runs(saved.get("loggers"))
        state.partial = saved["partial"][run.dist.rank] if step else None
        if run.dist.rank < len(
            saved["rng"]
        ):  # a run resumed on more processes than it had: new ranks keep their fresh seeds
            set_rng_state(saved["rng"][run.dist.rank])
    except RotnetError:
        raise
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"{checkpoint} does not fit this run's model or optimizer: {str(e).splitlines()[0][:160]}"
        ) from None
    state.epoch, state.step, state.saved_at = epoch, step, (epoch, step)


def _data_changed(run: Run, saved: dict, train_images: int) -> str:
    """Why the training set has another size than when the run started: other files, or files read another way."""
    files_then, files_now = saved.get("data_files"), run.data_files
    if files_then is None or files_then != files_now:
        counted = f"{files_then} image files" if files_then is not None else f"{train_images} training images"
        now = f"{files_now} now" if files_then is not None else f"{len(run.train_set)} now"
        return f"--resume {run.out}: the training data changed ({counted} when the run started, {now}); restore the data or start a new run"
    if saved.get("in_memory") is not None and saved["in_memory"] != run.train_set.in_memory:
        cache = "ram" if saved["in_memory"] else "none"
        how = (
            "decoded them into memory, leaving out unreadable files before the split"
            if saved["in_memory"]
            else "read them from disk while training, where unreadable files count until they are met"
        )
        return (
            f"--resume {run.out}: the data is unchanged ({files_now} image files), but the run {how}; "
            f"resume with --cache {cache} to continue the same computation"
        )
    return (
        f"--resume {run.out}: the same {files_now} image files are there, but {len(run.train_set)} of them are "
        f"readable now and {train_images} were when the run started; restore the unreadable files or start a new run"
    )


def _load_init(model: RotNet, cfg: PretrainConfig, img_size: int) -> None:
    """--init: start from existing weights (backbone; the head too when the rotations match)."""
    loaded = load_weights(cfg.init, img_size=img_size)  # timm:/random: models are built for this run's size
    try:
        model.backbone.load_state_dict(loaded.backbone.state_dict(), strict=True)
    except RuntimeError:
        raise ConfigError(
            f"--init {cfg.init} holds {loaded.model_name} weights for {loaded.img_size} px, which do not fit "
            f"--model {cfg.model} at {img_size} px; pass --model {loaded.model_name} --img-size {loaded.img_size}, or other --init weights"
        ) from None
    if loaded.head is not None and loaded.rotations == cfg.rotations:
        model.head.load_state_dict(loaded.head.state_dict())


def _logger_runs(saved: Any) -> dict[str, dict]:
    """The checkpoint's logger run ids, checked like any data read from a file (a bad entry is dropped:
    that logger then starts a new run)."""
    if not isinstance(saved, dict):
        return {}
    return {
        name: {"id": entry["id"]}
        for name, entry in saved.items()
        if isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("id"), str)
    }


def slow_device_hint(device: torch.device, img_size: int) -> str | None:
    """On a CPU, a step's cost grows with the pixels of every image: from twice 64 px on, say what a
    smaller --img-size saves (the time per epoch follows after the first steps)."""
    if device.type != "cpu" or img_size < 2 * CPU_COMFORTABLE_SIZE:
        return None
    factor = (img_size / CPU_COMFORTABLE_SIZE) ** 2
    return (
        f"{img_size} px on a CPU: every image costs about {factor:.0f}x what it costs at {CPU_COMFORTABLE_SIZE} px; "
        f"for a first look on a CPU train with --img-size {CPU_COMFORTABLE_SIZE} (a GPU: --device cuda)"
    )


def _position(epoch: int, step: int) -> str:
    return f"epoch {epoch + 1}, step {step}"


def _fits_on(device: torch.device, images: data_lib.ImageSet) -> bool:
    """Keep a uint8 dataset on the GPU when it takes under a quarter of the free memory."""
    free, _ = torch.cuda.mem_get_info(device)
    return images.images.numel() < free // 4


__all__ = [
    "pretrain",
    "PretrainResult",
    "resume_config",
    "auto_resume_config",
    "EpochSums",
    "make_optimizer",
    "make_scheduler",
    "lr_factor",
]
