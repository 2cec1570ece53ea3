"""Feature quality during pretraining: probe's kNN (and a quick linear head) on labelled --eval-data.

Rotation accuracy is a poor guide to the features: in the paper, block 4 gets worse while the
pretext task keeps improving. So every ``--eval-every`` epochs the backbone being trained is
probed on a labelled set, with rotnet probe's own code: ``labelled_splits`` picks the
training and validation images (the data's own split, else a seeded stratified 80/20),
``extract_features`` runs the backbone once over them in eval mode, taking every requested
stage from that one pass, ``knn_accuracy`` votes, and ``train_heads`` fits the optional
linear heads on the cached features.

The images are decoded once, when the run starts; an evaluation then costs one forward pass
without gradients over them, plus the kNN vote. It touches no random generator the training
draws from (the linear heads seed their own inside ``fork_rng``), and it leaves the model as it
found it, so a run with evaluations computes bitwise what the same run without them computes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import data as data_lib
from .config import PretrainConfig, ProbeConfig
from .errors import ConfigError, DataError
from .events import Message, Progress
from .features import extract_features, labelled_splits, plan_cache, stage_shapes
from .head_training import HeadTrainer, knn_accuracy, train_heads
from .heads import HEAD_TYPES, views_needed
from .models import RotNet, num_stages, resolve_stages
from .weights import LoadedWeights

# --eval-every auto: evaluate as often as keeps the evaluations at about this share of the training compute,
# counting a training copy as 3 forward passes (forward, backward, step) and an evaluated image as 1.
AUTO_EVAL_SHARE = 0.03
# The online linear head trains this many epochs (probe's quick recipe, shortened with its schedule):
# on cached features that is about a fifth of what a 100-epoch probe costs, and close to its accuracy.
ONLINE_LINEAR_EPOCHS = 20


@dataclass
class FeatureEval:
    """What an evaluation needs that stays fixed: probe's view of the --eval-* options and the decoded images."""

    probe_cfg: ProbeConfig  # data, heads, batch size, kNN k and temperature
    stages: list[int]  # 1-based
    every: int  # epochs between evaluations (--eval-every, auto resolved)
    train_set: data_lib.ImageSet
    val_set: data_lib.ImageSet
    num_classes: int
    skipped: tuple[str, ...]


class _Silent:
    """probe's batch counter without a bar: the epoch's line reports the evaluation."""

    def step(self) -> None:
        pass


def set_up_eval(
    cfg: PretrainConfig, model: RotNet, img_size: int, copies_per_epoch: int, report: Progress
) -> FeatureEval | None:
    """Check --eval-layers against the model, decode --eval-data once at the run's image size and resolve
    --eval-every auto for ``copies_per_epoch`` rotated training images an epoch (None without --eval-data)."""
    if not cfg.eval_data:
        return None
    count = num_stages(model.backbone)
    try:
        stages = resolve_stages(cfg.eval_layers, count)
    except ConfigError:
        raise ConfigError(
            f"--eval-layers: {cfg.model} has {count} stages; use 1..{count} or -{count}..-1, or all"
        ) from None
    check_best_metric_stage(cfg.best_metric, stages, count, cfg.model)
    probe_cfg = ProbeConfig(
        weights="the model in training",
        data=cfg.eval_data,
        data_dir=cfg.data_dir,
        download=cfg.download,
        layers=cfg.eval_layers,
        heads=cfg.eval_heads,
        epochs=ONLINE_LINEAR_EPOCHS,
        workers=cfg.workers,
        seed=cfg.seed,
    )
    try:
        train_set, val_set, num_classes, skipped = labelled_splits(probe_cfg, img_size, report)
    except DataError as e:
        raise DataError(as_eval_data_message(str(e), cfg.eval_data)) from None
    every = (
        cfg.eval_every if cfg.eval_every != "auto" else auto_eval_every(len(train_set) + len(val_set), copies_per_epoch)
    )
    report(
        Message(
            f"feature evaluation: {','.join(cfg.eval_heads)} on {cfg.eval_data} ({len(train_set)} / {len(val_set)} images), "
            f"stages {','.join(map(str, stages))}, every {'epoch' if every == 1 else f'{every} epochs'} and after the last"
            + (" (--eval-every auto: about 3% of the training compute)" if cfg.eval_every == "auto" else "")
        )
    )
    return FeatureEval(probe_cfg, stages, every, train_set, val_set, num_classes, tuple(skipped))


def as_eval_data_message(message: str, eval_data: str) -> str:
    """probe's message about its --data, said of pretrain's --eval-data (the option the user gave;
    pretrain has no --data of labelled images, no --val-data, no --val-split for them)."""
    message = message.replace(f"--data {eval_data}: ", "").replace(f"--data {eval_data} ", f"{eval_data} ")
    message = message.replace("raise --val-split or give --val-data", "give --eval-data more images per class")
    message = message.replace(
        "give --val-data with the same class folders", "give --eval-data whose splits have the same class folders"
    )
    return f"--eval-data {eval_data}: {message}"


def check_best_metric_stage(metric: str, stages: list[int], count: int, model: str) -> None:
    """--best-metric knn:S names an evaluated stage: one the run never measures would keep no best
    checkpoint, silently, to the end of the run."""
    head, _, stage = metric.partition(":")
    if not stage:
        return
    s = int(stage)
    if (s > 0 and s in stages) or (s < 0 and -len(stages) <= s):
        return
    raise ConfigError(
        f"--best-metric {metric}: {model} has {count} stages and the run evaluates stages "
        f"{','.join(map(str, stages))}; use {head}:S with S among them, or {head} (the best stage)"
    )


def auto_eval_every(eval_images: int, copies_per_epoch: int) -> int:
    """The fewest epochs between evaluations that keep them at AUTO_EVAL_SHARE of the training compute:
    an evaluation is one forward pass over ``eval_images``, an epoch three over ``copies_per_epoch``."""
    return max(1, math.ceil(eval_images / (AUTO_EVAL_SHARE * 3 * copies_per_epoch)))


def should_evaluate(ev: FeatureEval | None, epoch: int, epochs: int) -> bool:
    """After ``epoch`` (0-based): every ``ev.every`` epochs, and after the last."""
    return ev is not None and ((epoch + 1) % ev.every == 0 or epoch + 1 == epochs)


def evaluate_features(
    ev: FeatureEval,
    model: RotNet,
    model_name: str,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    precision: str,
) -> dict[str, dict[str, float]]:
    """head -> stage (1-based, as text) -> top-1 accuracy on the validation images of --eval-data.

    Inside fork_rng: loader workers draw their seeds from the global generator and the linear heads
    seed it, and the training's dropout and drop-path must not see either."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        return _evaluate(ev, model, model_name, img_size, mean, std, device, precision)


@torch.no_grad()
def _evaluate(
    ev: FeatureEval,
    model: RotNet,
    model_name: str,
    img_size: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    device: torch.device,
    precision: str,
) -> dict[str, dict[str, float]]:
    cfg, backbone = ev.probe_cfg, model.backbone
    backbones = [
        (
            "run",
            LoadedWeights(
                model_name,
                backbone,
                None,
                None,
                img_size,
                tuple(mean),
                tuple(std),
                source="the model in training",
                kind="run",
            ),
        )
    ]
    stages = [ev.stages]
    was_training = backbone.training
    backbone.eval()  # BatchNorm on its running statistics, which the evaluation leaves as they are
    try:
        shapes = stage_shapes(backbones, stages, img_size, device)
        plan = plan_cache(shapes, views_needed(cfg.heads, "avg"), len(ev.train_set) + len(ev.val_set), device)
        batch_size, workers = cfg.resolved_batch_size, cfg.workers
        train = extract_features(backbones, stages, ev.train_set, shapes, plan, batch_size, workers, device, precision)
        val = extract_features(backbones, stages, ev.val_set, shapes, plan, batch_size, workers, device, precision)
    finally:
        backbone.train(was_training)
    names = [str(stage) for stage in ev.stages]
    accuracy: dict[str, dict[str, float]] = {}
    for head in cfg.heads:
        if not HEAD_TYPES[head].trains:  # knn: a vote of the nearest training images
            accuracy[head] = {
                name: knn_accuracy(
                    train.row_avg(r),
                    train.labels,
                    val.row_avg(r),
                    val.labels,
                    ev.num_classes,
                    cfg.knn_k,
                    cfg.knn_temperature,
                    device,
                )
                for r, name in enumerate(names)
            }
        else:  # a quick linear head per stage on the cached features
            with torch.enable_grad():
                trainer = HeadTrainer(head, shapes, ev.num_classes, "avg", cfg.head_recipe(head), cfg.seed, device)
                train_heads(trainer, train, val, cfg.resolved_batch_size, cfg.seed, device, precision, _Silent())
            accuracy[head] = dict(zip(names, trainer.last_accuracy()))
    return accuracy


def best_value(row: dict, metric: str) -> float | None:
    """The value of --best-metric in a metrics row (None when the epoch did not measure it).

    knn and linear: the best stage's accuracy; knn:S / linear:S: stage S's; val_loss is negated,
    so that higher is always better."""
    head, _, stage = metric.partition(":")
    if head in ("val_rot_acc", "val_loss"):
        value = row.get(head)
        return None if value is None else (-value if head == "val_loss" else value)
    per_stage = (row.get("eval") or {}).get(head)
    if not per_stage:
        return None
    if not stage:
        return max(per_stage.values())
    key = stage if stage in per_stage else None
    if key is None and stage.startswith("-"):  # -1: the last evaluated stage
        ordered = sorted(per_stage, key=int)
        key = ordered[int(stage)] if -len(ordered) <= int(stage) <= -1 else None
    return per_stage.get(key) if key else None


__all__ = [
    "FeatureEval",
    "set_up_eval",
    "evaluate_features",
    "should_evaluate",
    "auto_eval_every",
    "best_value",
    "ONLINE_LINEAR_EPOCHS",
    "AUTO_EVAL_SHARE",
]
