"""Frozen-feature probes: how useful is each stage of a backbone for a labelled task?

``probe(config, progress)`` loads the weights (and the baselines of ``--compare``) and trains
heads on the frozen stage features, in one of two ways (``--features``, chosen by ``--recipe``):

- cached (the quick recipe): every backbone runs over the labelled images ONCE, in eval mode
  without gradients, taking every requested stage from that single forward pass (timm's
  ``forward_intermediates``), and the features are cached in memory (on the GPU when they fit).
  The heads then train on the cache with plain tensor indexing, so a 100-epoch probe costs
  little more than the one extraction pass.
- augmented (the paper recipe, as the official code trains its classifiers): every training
  batch is randomly cropped and flipped on the device and the frozen backbones recompute its
  features, so each epoch costs one forward pass over the training images (and one over the
  validation images, which are evaluated every epoch). All heads of the probe train on the
  same batches, so the forward pass is paid once for all of them.

Either way ``features.stage_features`` computes the stage maps of one batch (features.py is the
frozen-feature library: stage shapes, views, the cache, extraction). The head types and how each sees a
stage are in heads.py's registry, their modules and training in head_training.py: the heads of one
kind for all (backbone, stage) rows train together. Every trained head is evaluated after every
epoch: the result keeps the last epoch's accuracy (the honest number) and the best epoch's (what the
paper reports, chosen on the validation set itself).

Results are kept in the run directory's probe.json, one per setting (``ProbeConfig.setting``):
a probe with other settings adds its result, one with the same settings replaces it only with
``--overwrite``. It never prints: progress goes through the ``progress(kind, info)`` callback.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import data as data_lib
from . import rundir
from ._version import __version__
from .config import ProbeConfig
from .errors import ConfigError, OutputError
from .events import DeviceChosen, Message, Progress, TaskProgress, ignore
from .features import (
    FeatureCache,
    StepCounter,
    extract_features,
    labelled_splits,
    plan_cache,
    stage_features,
    stage_shapes,
)
from .head_training import HeadTrainer, knn_accuracy, one_thread_for_small_steps, train_heads
from .heads import HEAD_TYPES, views_needed
from .models import num_stages, resolve_stages
from .runtime import configure_backends, describe_device, resolve_device, resolve_precision, seed_everything
from .weights import LoadedWeights, load_weights

Backbones = list[tuple[str, LoadedWeights]]  # (label, weights): "run" first, then the --compare baselines


@dataclass
class ProbeRow:
    """One stage of one backbone and the top-1 validation accuracy of every head on it."""

    weights: str  # "run" (the probed weights), "random", or a --compare spec
    stage: int  # 1-based, as in --layers
    shape: tuple[int, int, int]  # (C, H, W) of the stage's output
    accuracy: dict[str, float] = field(default_factory=dict)  # head -> top-1 in [0, 1] after the last epoch
    best: dict[str, tuple[float, int]] = field(default_factory=dict)  # trained head -> (top-1, 1-based epoch)

    def to_dict(self) -> dict:
        accuracy = {head: round(acc, 4) for head, acc in self.accuracy.items()}
        best = {head: {"accuracy": round(acc, 4), "epoch": epoch} for head, (acc, epoch) in self.best.items()}
        return {"weights": self.weights, "stage": self.stage, "shape": list(self.shape), **accuracy, "best_epoch": best}


@dataclass
class ProbeResult:
    weights: str
    model: str
    data: str
    img_size: int
    device: str
    precision: str
    heads: tuple[str, ...]
    pool: str
    recipe: str
    features: str  # 'cached' or 'augmented' (the trained heads' inputs)
    epochs: dict[str, int]  # trained head -> epochs
    reports_best: bool  # the recipe reports the best epoch next to the last
    num_classes: int
    train_images: int
    val_images: int
    labels_per_class: int | None
    rows: list[ProbeRow]
    extract_seconds: float
    train_seconds: dict[str, float]
    setting: dict = field(default_factory=dict)
    saved_to: Path | None = None
    save_error: str | None = None  # why probe.json could not be written (the results are complete)
    skipped_files: list[str] = field(default_factory=list)

    def best(self) -> tuple[ProbeRow, str] | None:
        """The (row, head) of the highest accuracy among the probed weights' rows (the first on ties)."""
        cells = [(row, head) for row in self.rows if row.weights == "run" for head in self.heads]
        return max(cells, key=lambda cell: cell[0].accuracy[cell[1]], default=None)

    def to_dict(self) -> dict:
        best = self.best()
        return {
            "weights": self.weights,
            "model": self.model,
            "data": self.data,
            "img_size": self.img_size,
            "heads": list(self.heads),
            "pool": self.pool,
            "recipe": self.recipe,
            "features": self.features,
            "epochs": self.epochs,
            "num_classes": self.num_classes,
            "train_images": self.train_images,
            "val_images": self.val_images,
            "labels_per_class": self.labels_per_class,
            "rows": [row.to_dict() for row in self.rows],
            "best": {"stage": best[0].stage, "head": best[1], "accuracy": round(best[0].accuracy[best[1]], 4)}
            if best
            else None,
            "device": self.device,
            "precision": self.precision,
            "extract_seconds": round(self.extract_seconds, 3),
            "train_seconds": {k: round(v, 3) for k, v in self.train_seconds.items()},
            "setting": self.setting,
            "rotnet_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


# ----------------------------------------------------------------------------- the probe


def probe(cfg: ProbeConfig, progress: Progress | None = None) -> ProbeResult:
    """Probe every requested stage of ``cfg.weights`` with every head; see the module docstring."""
    emit = progress or ignore
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.resolved_precision(), device)
    configure_backends(device)
    seed_everything(cfg.seed)
    emit(DeviceChosen(describe_device(device), precision))
    main, backbones, stages, save_to = load_backbones(cfg, device)

    # -- data: labelled uint8 train and validation sets at the size the weights were trained at
    train_set, val_set, num_classes, skipped = labelled_splits(cfg, main.img_size, emit)
    trained = [h for h in cfg.heads if HEAD_TYPES[h].trains]
    augmented = trained if cfg.resolved_features == "augmented" else []
    emit(Message(describe_probe(cfg, main, train_set, val_set, num_classes, stages[0], augmented)))

    # -- features: one forward pass per batch for all stages of all backbones, cached for the heads that read a cache
    shapes = stage_shapes(backbones, stages, main.img_size, device)  # (C, H, W) per row
    keys = [(label, stage) for (label, _), row_stages in zip(backbones, stages) for stage in row_stages]
    rows = [ProbeRow(label, stage, shape) for (label, stage), shape in zip(keys, shapes)]
    on_cache = [h for h in cfg.heads if h not in augmented]  # knn always: it votes with un-augmented features
    train = val = None
    extract_seconds = 0.0
    if on_cache:
        t0 = time.perf_counter()
        splits = (train_set, val_set)
        train, val = cache_features(backbones, stages, splits, shapes, on_cache, cfg, device, precision, emit)
        extract_seconds = time.perf_counter() - t0

    # -- heads: on the cache one kind at a time; on augmented images all kinds together
    trainers = {h: HeadTrainer(h, shapes, num_classes, cfg.pool, cfg.head_recipe(h), cfg.seed, device) for h in trained}
    train_seconds = train_on_cache(on_cache, trainers, rows, train, val, num_classes, cfg, device, precision, emit)
    if augmented:
        t_heads = time.perf_counter()
        streamed = train_heads_on_augmented_images(
            [trainers[h] for h in augmented],
            backbones,
            stages,
            train_set,
            val_set,
            cfg,
            main.img_size,
            device,
            precision,
            emit,
        )
        skipped = (*skipped, *streamed)
        train_seconds["+".join(augmented)] = time.perf_counter() - t_heads
    record_accuracies(rows, trainers, augmented, cfg)

    result = ProbeResult(
        weights=cfg.weights,
        model=main.model_name,
        data=cfg.data,
        img_size=main.img_size,
        device=describe_device(device),
        precision=precision,
        heads=cfg.heads,
        pool=cfg.pool,
        recipe=cfg.recipe,
        features=cfg.resolved_features,
        epochs={h: t.recipe.epochs for h, t in trainers.items()},
        reports_best=cfg.protocol.reports_best,
        num_classes=num_classes,
        train_images=len(train_set),
        val_images=len(val_set),
        labels_per_class=cfg.labels_per_class,
        rows=rows,
        extract_seconds=extract_seconds,
        train_seconds=train_seconds,
        setting=cfg.setting(),
        skipped_files=list(dict.fromkeys([*skipped, *(train.skipped if train else []), *(val.skipped if val else [])])),
    )
    if save_to is not None:
        try:
            result.saved_to = save_result(save_to, result, cfg.overwrite)
        except OutputError as e:  # the figures are computed: they are returned (and shown) all the same
            result.save_error = str(e)
    return result


def load_backbones(
    cfg: ProbeConfig, device: torch.device
) -> tuple[LoadedWeights, Backbones, list[list[int]], Path | None]:
    """(the probed weights, every backbone with its label, the 1-based stages of each, where probe.json
    goes or None): the probed weights first, then the baselines of --compare at their size."""
    main = load_weights(cfg.weights, device, seed=cfg.seed, img_size=cfg.img_size)
    if cfg.img_size and main.kind not in ("timm", "random") and cfg.img_size != main.img_size:
        raise ConfigError(
            f"--img-size {cfg.img_size}: {cfg.weights} was trained at {main.img_size} px and is probed at that size; "
            "drop --img-size (it sets the size of timm:NAME and random:NAME weights)"
        )
    save_to = Path(main.run_dir) if cfg.save and main.run_dir is not None else None
    if save_to is not None:
        check_saved_result(save_to, cfg)  # before the work: a clash is known now, not after an hour of training
    backbones = [("run", main)] + [
        (
            label,
            load_weights(
                f"random:{main.model_name}" if label == "random" else label,
                device,
                seed=cfg.seed,
                img_size=main.img_size,
            ),
        )
        for label in cfg.compare
    ]
    stages = [resolve_stages(cfg.layers, num_stages(w.backbone), label) for label, w in backbones]
    return main, backbones, stages, save_to


def describe_probe(
    cfg: ProbeConfig,
    main: LoadedWeights,
    train_set: data_lib.ImageSet,
    val_set: data_lib.ImageSet,
    num_classes: int,
    stages: list[int],
    augmented: list[str],
) -> str:
    """The line that says what is about to be probed."""
    return (
        f"{main.model_name} at {main.img_size} px: {len(train_set)} training / {len(val_set)} validation images, "
        f"{num_classes} classes; stages {','.join(map(str, stages))}; heads {','.join(cfg.heads)}; "
        f"recipe {cfg.recipe}"
        + (f" ({','.join(augmented)} on augmented images, features recomputed every batch)" if augmented else "")
    )


def cache_features(
    backbones: Backbones,
    stages: list[list[int]],
    splits: tuple[data_lib.ImageSet, data_lib.ImageSet],
    shapes: list[tuple[int, int, int]],
    heads: list[str],
    cfg: ProbeConfig,
    device: torch.device,
    precision: str,
    emit: Progress,
) -> tuple[FeatureCache, FeatureCache]:
    """The (train, val) feature caches, with the views ``heads`` read, each split in one pass of every backbone."""
    plan = plan_cache(shapes, views_needed(tuple(heads), cfg.pool), sum(len(s) for s in splits), device)
    batch_size = cfg.resolved_batch_size
    total_batches = sum(data_lib.num_batches(len(s), batch_size, drop_last=False) for s in splits)
    counter = StepCounter(emit, "extract", "extracting features", total_batches)
    train, val = (
        extract_features(backbones, stages, s, shapes, plan, batch_size, cfg.workers, device, precision, counter)
        for s in splits
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return train, val


def train_on_cache(
    heads: list[str],
    trainers: dict[str, HeadTrainer],
    rows: list[ProbeRow],
    train: FeatureCache,
    val: FeatureCache,
    num_classes: int,
    cfg: ProbeConfig,
    device: torch.device,
    precision: str,
    emit: Progress,
) -> dict[str, float]:
    """Train (or, for a head with nothing to train, vote with) each of ``heads`` on the cached features,
    one kind at a time; returns the seconds each took. A vote's accuracy goes straight into ``rows``."""
    train_seconds: dict[str, float] = {}
    for head in heads:
        t_head = time.perf_counter()
        if not HEAD_TYPES[head].trains:  # knn: a vote of the nearest training images
            for r, row in enumerate(rows):
                row.accuracy[head] = knn_accuracy(
                    train.row_avg(r),
                    train.labels,
                    val.row_avg(r),
                    val.labels,
                    num_classes,
                    cfg.knn_k,
                    cfg.knn_temperature,
                    device,
                )
            emit(TaskProgress(head, f"{head} vote", 1, 1))
        else:
            counter = StepCounter(emit, f"train-{head}", f"training {head} heads", trainers[head].recipe.epochs)
            with one_thread_for_small_steps(device, trainers[head].view):
                train_heads(
                    trainers[head],
                    train,
                    val,
                    cfg.resolved_batch_size,
                    cfg.seed,
                    device,
                    precision,
                    counter,
                    every_epoch=cfg.protocol.reports_best,
                )
        train_seconds[head] = time.perf_counter() - t_head
    return train_seconds


def record_accuracies(
    rows: list[ProbeRow], trainers: dict[str, HeadTrainer], augmented: list[str], cfg: ProbeConfig
) -> None:
    """Every trained head's last (and, when evaluated every epoch, best) accuracy into its rows; then
    every row's accuracies in the order of --head."""
    for head, trainer in trainers.items():
        for row, last, (best, epoch) in zip(rows, trainer.last_accuracy(), trainer.best_accuracy()):
            row.accuracy[head] = last
            if cfg.protocol.reports_best or head in augmented:  # evaluated after every epoch
                row.best[head] = (best, epoch)
    for row in rows:
        row.accuracy = {head: row.accuracy[head] for head in cfg.heads}


# ----------------------------------------------------------------------------- probe.json


def check_saved_result(run_dir: Path, cfg: ProbeConfig) -> None:
    """Refuse, before any work, a probe whose setting probe.json already holds (unless --overwrite)."""
    same = [r for r in rundir.read_probe(run_dir) if r.get("setting") == cfg.setting()]
    if same and not cfg.overwrite:
        raise OutputError(
            f"{Path(run_dir) / rundir.PROBE} already holds a result with these settings (from "
            f"{same[0].get('created', 'an earlier probe')}); pass --overwrite to replace it, or --no-save"
        )


def save_result(run_dir: Path, result: ProbeResult, overwrite: bool) -> Path:
    """Add ``result`` to probe.json, replacing a result of the same setting only when ``overwrite``."""
    new = result.to_dict()

    def merged(
        results: list[dict],
    ) -> list[dict]:  # read again under the lock: another probe may have saved since the check
        if any(r.get("setting") == new["setting"] for r in results) and not overwrite:
            raise OutputError(
                f"{Path(run_dir) / rundir.PROBE} already holds a result with these settings; "
                "pass --overwrite to replace it, or --no-save"
            )
        return [r for r in results if r.get("setting") != new["setting"]] + [new]

    return rundir.update_probe(run_dir, merged)


def train_heads_on_augmented_images(
    trainers: list[HeadTrainer],
    backbones: Backbones,
    stages: list[list[int]],
    train_set: data_lib.ImageSet,
    val_set: data_lib.ImageSet,
    cfg: ProbeConfig,
    img_size: int,
    device: torch.device,
    precision: str,
    emit: Progress,
) -> list[str]:
    """Train every head on features recomputed for each batch of randomly cropped and flipped images;
    returns the files that could not be read while streaming (none for images in memory).

    The official classifiers' protocol: RandomCrop(32, padding=4) + horizontal flip (dataloader.py l. 152-153),
    frozen backbones in eval mode (Algorithm.py l. 253), every partial last batch kept (tnt's loader does not drop
    it), evaluation on the un-augmented validation images after every epoch (Algorithm.py l. 240-243). The crop
    and flip run on the device, batched (data.random_crop_flip, as in pretraining). Heads with fewer epochs stop
    earlier; every epoch costs one forward pass of the backbones over the training and the validation images.
    """
    n = len(train_set)
    batch_size = min(cfg.resolved_batch_size, n)
    steps_per_epoch = data_lib.num_batches(n, batch_size, drop_last=False)
    padding = max(1, img_size // 8)  # 4 px at 32 px
    views = {trainer.view for trainer in trainers}
    epochs = max(trainer.recipe.epochs for trainer in trainers)
    names = "+".join(trainer.kind for trainer in trainers)
    counter = StepCounter(emit, "train-augmented", f"training {names} heads on augmented images", epochs)
    skipped: list[str] = []
    for epoch in range(epochs):
        active = [trainer for trainer in trainers if epoch < trainer.recipe.epochs]
        for trainer in active:
            trainer.heads.train()
        order = data_lib.epoch_order(n, cfg.seed, epoch)
        batches = data_lib.iterate_batches(train_set, order, batch_size, device, drop_last=False, workers=cfg.workers)
        for step, batch in enumerate(batches):
            skipped += [path for path in batch.skipped if path not in skipped]
            if len(batch.images) < 2:  # a last batch of one image: BatchNorm cannot train on it
                continue
            # the crop and flip of a step are a function of (seed, epoch, step), like pretraining's
            generator = torch.Generator(device=device).manual_seed(
                cfg.seed * 1_000_003 + epoch * steps_per_epoch + step
            )
            images = data_lib.random_crop_flip(batch.images, padding, generator)  # (B, 3, S, S) uint8
            features = FeatureCache.of_batch(
                stage_features(backbones, stages, images, device, precision), batch.labels, views
            )
            for trainer in active:
                trainer.train_step(
                    features.inputs(trainer.view, None, device),
                    batch.labels,
                    epoch,
                    step,
                    steps_per_epoch,
                    device,
                    precision,
                )
        evaluate_on_images(active, backbones, stages, val_set, views, epoch, cfg, device, precision)
        counter.step()
    return skipped


@torch.no_grad()
def evaluate_on_images(
    trainers: list[HeadTrainer],
    backbones,
    stages: list[list[int]],
    images: data_lib.ImageSet,
    views: set[str],
    epoch: int,
    cfg: ProbeConfig,
    device: torch.device,
    precision: str,
) -> None:
    """Evaluate every trainer's heads on the features of the un-augmented ``images`` and record the epoch."""
    for trainer in trainers:
        trainer.heads.eval()
    correct = [torch.zeros(len(trainer.last), dtype=torch.long, device=device) for trainer in trainers]
    seen = 0
    order = torch.arange(len(images))
    for batch in data_lib.iterate_batches(
        images, order, cfg.resolved_batch_size, device, drop_last=False, workers=cfg.workers
    ):
        features = FeatureCache.of_batch(
            stage_features(backbones, stages, batch.images, device, precision), batch.labels, views
        )
        for trainer, right in zip(trainers, correct):
            right += trainer.count_correct(features.inputs(trainer.view, None, device), batch.labels, device, precision)
        seen += len(batch.labels)
    for trainer, right in zip(trainers, correct):
        trainer.record(epoch, right, seen)


__all__ = [
    "probe",
    "ProbeResult",
    "ProbeRow",
    "load_backbones",
    "cache_features",
    "train_on_cache",
    "train_heads_on_augmented_images",
]
