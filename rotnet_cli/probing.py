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

Either way ``stage_features`` computes the stage maps of one batch. The heads of one kind for
all (backbone, stage) rows train together: their losses add up and each head only receives the
gradient of its own loss, so this is exactly separate training, with the Python overhead paid
once per step. Every trained head is evaluated after every epoch: the result keeps the last
epoch's accuracy (the honest number) and the best epoch's (what the paper reports, chosen on
the validation set itself).

Heads (the paper's evaluation, Gidaris et al. 2018, section 3):
- linear: BatchNorm1d without affine + Linear on globally average-pooled features;
- mlp: two hidden layers of 200 units (BN + ReLU after each) on features pooled by ``--pool``;
- knn: cosine k-nearest-neighbour vote, temperature-weighted, on average-pooled features
  (always of un-augmented images: it has nothing to train);
- conv: a NIN-block-like stack (3x3 conv 192, 1x1 conv 192, 1x1 conv 192, each BN + ReLU),
  global average pooling and a linear layer, on the spatial stage maps ("RotNet + conv").

Results are kept in the run directory's probe.json, one per setting (``ProbeConfig.setting``):
a probe with other settings adds its result, one with the same settings replaces it only with
``--overwrite``. It never prints: progress goes through the ``progress(kind, info)`` callback.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_lib
from . import rundir
from ._version import __version__
from .config import TRAINED_HEADS, HeadRecipe, ProbeConfig
from .errors import ConfigError, DataError, OutputError
from .events import DeviceChosen, Message, Progress, TaskProgress, WarningMessage, ignore
from .models import forward_stages, num_stages, resolve_stages
from .runtime import autocast, configure_backends, describe_device, resolve_device, resolve_precision, seed_everything
from .weights import LoadedWeights, load_weights

MLP_HIDDEN = 200  # the paper's non-linear classifier: 2 hidden layers of 200 units
CONV_WIDTH = 192  # the paper's "RotNet + conv": a NIN block of 192 channels
# Spatial maps beyond this many bytes (float32) are cached as bfloat16, halving their memory.
SPATIAL_FP32_BYTES = 2 * 2**30
KNN_CHUNK = 1024  # validation images compared with the whole training bank at once
FUSED_OPTIMIZER_DEVICES = ("cuda", "cpu")  # where torch has fused SGD and AdamW kernels


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

    # -- backbones: the probed weights first, then the baselines, each with its stages (1-based)
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

    # -- data: labelled uint8 train and validation sets at the size the weights were trained at
    train_set, val_set, num_classes, skipped = labelled_splits(cfg, main.img_size, emit)
    trained = [h for h in cfg.heads if h in TRAINED_HEADS]
    augmented = trained if cfg.resolved_features == "augmented" else []
    emit(
        Message(
            f"{main.model_name} at {main.img_size} px: {len(train_set)} training / {len(val_set)} validation images, "
            f"{num_classes} classes; stages {','.join(map(str, stages[0]))}; heads {','.join(cfg.heads)}; "
            f"recipe {cfg.recipe}"
            + (f" ({','.join(augmented)} on augmented images, features recomputed every batch)" if augmented else "")
        )
    )

    # -- features: one forward pass per batch for all stages of all backbones, cached for the heads that read a cache
    shapes = stage_shapes(backbones, stages, main.img_size, device)  # (C, H, W) per row
    keys = [(label, stage) for (label, _), row_stages in zip(backbones, stages) for stage in row_stages]
    rows = [ProbeRow(label, stage, shape) for (label, stage), shape in zip(keys, shapes)]
    on_cache = [h for h in cfg.heads if h not in augmented]  # knn always: it votes with un-augmented features
    train = val = None
    extract_seconds = 0.0
    if on_cache:
        t0 = time.perf_counter()
        plan = plan_cache(shapes, views_needed(tuple(on_cache), cfg.pool), len(train_set) + len(val_set), device)
        batch_size = cfg.resolved_batch_size
        total_batches = sum(data_lib.num_batches(len(s), batch_size, drop_last=False) for s in (train_set, val_set))
        counter = _Counter(emit, "extract", "extracting features", total_batches)
        train = extract_features(backbones, stages, train_set, shapes, plan, cfg, device, precision, counter)
        val = extract_features(backbones, stages, val_set, shapes, plan, cfg, device, precision, counter)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        extract_seconds = time.perf_counter() - t0

    # -- heads: on the cache one kind at a time; on augmented images all kinds together
    trainers = {h: HeadTrainer(h, shapes, num_classes, cfg.pool, cfg.head_recipe(h), cfg.seed, device) for h in trained}
    train_seconds: dict[str, float] = {}
    for head in on_cache:
        t_head = time.perf_counter()
        if head == "knn":
            accuracies = [
                knn_accuracy(
                    train.row_avg(r),
                    train.labels,
                    val.row_avg(r),
                    val.labels,
                    num_classes,
                    cfg.knn_k,
                    cfg.knn_temperature,
                    device,
                )
                for r in range(len(rows))
            ]
            for row, acc in zip(rows, accuracies):
                row.accuracy[head] = acc
            emit(TaskProgress("knn", "knn vote", 1, 1))
        else:
            counter = _Counter(emit, f"train-{head}", f"training {head} heads", trainers[head].recipe.epochs)
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
    if augmented:
        t_heads = time.perf_counter()
        skipped = (
            *skipped,
            *train_heads_on_augmented_images(
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
            ),
        )
        train_seconds["+".join(augmented)] = time.perf_counter() - t_heads
    for head, trainer in trainers.items():
        for row, last, (best, epoch) in zip(rows, trainer.last_accuracy(), trainer.best_accuracy()):
            row.accuracy[head] = last
            if cfg.protocol.reports_best or head in augmented:  # evaluated after every epoch
                row.best[head] = (best, epoch)
    for row in rows:  # every row's accuracies in the order of --head
        row.accuracy = {head: row.accuracy[head] for head in cfg.heads}

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


class _Counter:
    """Reports one progress bar: ``step()`` advances it by one."""

    def __init__(self, emit: Progress, task_id: str, description: str, total: int):
        self.emit, self.task_id, self.description, self.total, self.done = emit, task_id, description, total, 0

    def step(self) -> None:
        self.done += 1
        self.emit(TaskProgress(self.task_id, self.description, self.done, self.total))


# ----------------------------------------------------------------------------- data


def labelled_splits(
    cfg: ProbeConfig,
    img_size: int,
    emit: Progress,
) -> tuple[data_lib.ImageSet, data_lib.ImageSet, int, tuple[str, ...]]:
    """(train, val, number of classes, files left out): --val-data, the source's own split, or a stratified --val-split."""
    load = dict(need_labels=True, download=cfg.download, data_dir=cfg.data_dir, workers=cfg.workers, progress=emit)
    source = data_lib.open_source(cfg.data, img_size, **load)
    train_set, val_set, skipped = source.train, source.val, source.skipped
    if cfg.val_data:
        other = data_lib.open_source(cfg.val_data, img_size, option="--val-data", **load)
        val_set = other.val if other.val is not None else other.train
        skipped += other.skipped
    if train_set.labels is None or (val_set is not None and val_set.labels is None):
        raise DataError(
            f"--data {cfg.data} has no labels; a probe needs class sub-folders, digits, or a labelled dataset"
        )
    if val_set is None:
        train_idx, val_idx = data_lib.split_indices(len(train_set), cfg.val_split, cfg.seed, labels=train_set.labels)
        train_set, val_set = train_set.subset(train_idx), train_set.subset(val_idx)
    if train_set.classes and val_set.classes and list(train_set.classes) != list(val_set.classes):
        raise DataError(
            f"the validation classes ({', '.join(val_set.classes[:5])} ...) differ from the training classes "
            f"({', '.join(train_set.classes[:5])} ...); give --val-data with the same class folders"
        )
    if cfg.labels_per_class:
        keep, short = keep_per_class(train_set.labels, cfg.labels_per_class, cfg.seed)
        if short:
            emit(
                WarningMessage(
                    f"{len(short)} class(es) have fewer than {cfg.labels_per_class} training images "
                    f"(e.g. class {short[0]}); all of theirs are used"
                )
            )
        train_set = train_set.subset(keep)
    num_classes = (
        len(train_set.classes) if train_set.classes else int(torch.cat([train_set.labels, val_set.labels]).max()) + 1
    )
    if len(train_set.labels.unique()) < 2:
        raise DataError(
            f"--data {cfg.data}: the training split has fewer than 2 classes; a classifier needs at least 2"
        )
    if len(val_set) == 0:
        raise DataError("the validation split is empty; raise --val-split or give --val-data")
    return train_set, val_set, num_classes, skipped


def keep_per_class(labels: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, list[int]]:
    """Seeded choice of ``k`` indices per class (the paper's semi-supervised study) and the classes with fewer."""
    g = torch.Generator().manual_seed(seed)
    keep, short = [], []
    for c in labels.unique(sorted=True).tolist():
        members = (labels == c).nonzero().squeeze(1)
        if len(members) < k:
            short.append(c)
        keep.append(members[torch.randperm(len(members), generator=g)[:k]])
    return torch.cat(keep).sort().values, short


# ----------------------------------------------------------------------------- features


def views_needed(heads: tuple[str, ...], pool: str) -> set[str]:
    """Which views of each stage the cache keeps: pooled vectors always, spatial maps only when a head reads them."""
    return {"avg"} | {head_view(head, pool) for head in heads}  # 'avg' (N, C) is small and feeds linear and knn


def head_view(head: str, pool: str) -> str:
    """The cached view a head trains on: 'avg' / 'max' (pooled, N x C) or 'maps' (N x C x H x W)."""
    if head == "conv" or (head == "mlp" and pool == "flatten"):
        return "maps"
    if head == "mlp":
        return pool
    return "avg"


@torch.no_grad()
def stage_shapes(backbones, stages: list[list[int]], img_size: int, device: torch.device) -> list[tuple[int, int, int]]:
    """(C, H, W) of every row (backbone x stage), from one forward pass of a single blank image each."""
    shapes = []
    for (_, weights), row_stages in zip(backbones, stages):
        blank = torch.zeros(1, 3, img_size, img_size, device=device)
        shapes += [tuple(m.shape[1:]) for m in forward_stages(weights.backbone, blank, [s - 1 for s in row_stages])]
    return shapes


@dataclass(frozen=True)
class CachePlan:
    views: frozenset[str]  # 'avg', 'max', 'maps'
    device: torch.device  # where the cached features live
    maps_dtype: torch.dtype  # storage type of the spatial maps


def plan_cache(shapes: list[tuple[int, int, int]], views: set[str], n_images: int, device: torch.device) -> CachePlan:
    """On the compute device when it fits in half its free memory, else in host memory; big spatial maps as bfloat16."""
    pooled_bytes = 4 * n_images * sum(c for c, _, _ in shapes) * len(views - {"maps"})
    maps_bytes = 4 * n_images * sum(math.prod(s) for s in shapes) if "maps" in views else 0
    maps_dtype = torch.float32 if maps_bytes <= SPATIAL_FP32_BYTES else torch.bfloat16
    total = pooled_bytes + (maps_bytes if maps_dtype == torch.float32 else maps_bytes // 2)
    if total > _host_memory() // 2:
        raise ConfigError(
            f"the feature cache would take {total / 2**30:.1f} GiB; probe fewer --layers, use --pool avg or max, "
            "or leave out the conv head"
        )
    on_device = device.type == "cuda" and total < torch.cuda.mem_get_info(device)[0] // 2
    return CachePlan(frozenset(views), device if on_device else torch.device("cpu"), maps_dtype)


def _host_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume plenty
        return 2**40


@dataclass
class FeatureCache:
    """Every row's (backbone x stage) features for one split, in memory.

    ``pooled[view]`` (N, C_1 + ... + C_R) for view 'avg' / 'max': the rows' channels side by side
    (row r in the columns ``offsets[r]:offsets[r + 1]``), so one index op gathers a mini-batch for
    all R rows at once. ``maps``: one (N, C_r, H_r, W_r) tensor per row, only when a head needs the
    spatial features.
    """

    labels: torch.Tensor  # (N,) int64
    shapes: list[tuple[int, int, int]]  # (C, H, W) per row
    pooled: dict[str, torch.Tensor]
    maps: list[torch.Tensor] | None
    skipped: list[str] = field(default_factory=list)  # files found unreadable while extracting

    @classmethod
    def allocate(cls, n: int, shapes: list[tuple[int, int, int]], plan: CachePlan) -> "FeatureCache":
        width = sum(c for c, _, _ in shapes)
        pooled = {v: torch.empty(n, width, device=plan.device) for v in plan.views - {"maps"}}
        maps = (
            [torch.empty(n, *s, dtype=plan.maps_dtype, device=plan.device) for s in shapes]
            if "maps" in plan.views
            else None
        )
        return cls(torch.empty(n, dtype=torch.long, device=plan.device), shapes, pooled, maps)

    @classmethod
    def of_batch(cls, maps: list[torch.Tensor], labels: torch.Tensor, views: set[str]) -> "FeatureCache":
        """The ``views`` of one batch's freshly computed stage maps, where they are (the maps are not copied)."""
        shapes = [tuple(m.shape[1:]) for m in maps]
        plan = CachePlan(frozenset(views - {"maps"}), labels.device, torch.float32)
        batch = cls.allocate(len(labels), shapes, plan)
        for r, fmap in enumerate(maps):
            batch.store(slice(None), r, fmap)
        batch.labels, batch.maps = labels, (list(maps) if "maps" in views else None)
        return batch

    def store(self, rows: slice, r: int, fmap: torch.Tensor) -> None:
        """Keep the views of row ``r``'s stage output fmap (B, C, H, W) for the images ``rows``."""
        columns = slice(self.offsets[r], self.offsets[r + 1])
        if "avg" in self.pooled:
            self.pooled["avg"][rows, columns] = fmap.mean((2, 3))
        if "max" in self.pooled:
            self.pooled["max"][rows, columns] = fmap.amax((2, 3))
        if self.maps is not None:
            self.maps[r][rows] = fmap

    def truncate(self, n: int) -> "FeatureCache":
        """The first ``n`` images (when unreadable files left the end unfilled)."""
        return FeatureCache(
            self.labels[:n],
            self.shapes,
            {v: t[:n] for v, t in self.pooled.items()},
            [m[:n] for m in self.maps] if self.maps is not None else None,
            self.skipped,
        )

    def row_avg(self, r: int) -> torch.Tensor:
        """(N, C_r): the average-pooled features of row ``r``."""
        return self.pooled["avg"][:, self.offsets[r] : self.offsets[r + 1]]

    @property
    def offsets(self) -> list[int]:
        """Where each row's channels start in a pooled view (and, last, where they end)."""
        return [0, *itertools.accumulate(c for c, _, _ in self.shapes)]

    def inputs(self, view: str, idx: torch.Tensor | None, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
        """A mini-batch (every image when ``idx`` is None) as float32 on ``device``: (B, C_1 + ... + C_R)
        for a pooled view, a list of (B, C_r, H_r, W_r) for 'maps'."""
        if idx is None:
            return [m.to(device).float() for m in self.maps] if view == "maps" else self.pooled[view].to(device)
        idx = idx.to(self.labels.device)
        if view == "maps":
            return [m[idx].to(device, non_blocking=True).float() for m in self.maps]
        return self.pooled[view][idx].to(device, non_blocking=True)


@torch.no_grad()
def stage_features(
    backbones: list[tuple[str, LoadedWeights]],
    stages: list[list[int]],
    images: torch.Tensor,
    device: torch.device,
    precision: str,
) -> list[torch.Tensor]:
    """The stage maps of one batch of uint8 images (B, 3, S, S) for every row (backbone x stage):
    a list of float32 (B, C_r, H_r, W_r), one forward pass per backbone, in eval mode without gradients."""
    maps = []
    for (_, weights), row_stages in zip(backbones, stages):
        x = data_lib.normalize(images, weights.mean, weights.std)  # (B, 3, S, S) float32
        with autocast(device, precision):
            maps += [fmap.float() for fmap in forward_stages(weights.backbone, x, [s - 1 for s in row_stages])]
    return maps


@torch.no_grad()
def extract_features(
    backbones: list[tuple[str, LoadedWeights]],
    stages: list[list[int]],
    images: data_lib.ImageSet,
    shapes: list[tuple[int, int, int]],
    plan: CachePlan,
    cfg: ProbeConfig,
    device: torch.device,
    precision: str,
    counter: _Counter,
) -> FeatureCache:
    """Run every backbone over ``images`` once, in eval mode, keeping the views of every requested stage."""
    cache = FeatureCache.allocate(len(images), shapes, plan)
    filled = 0
    order = torch.arange(len(images))
    for batch in data_lib.iterate_batches(
        images, order, cfg.resolved_batch_size, device, drop_last=False, workers=cfg.workers
    ):
        cache.skipped += batch.skipped
        rows = slice(filled, filled + len(batch.images))
        cache.labels[rows] = batch.labels.to(plan.device)
        for r, fmap in enumerate(stage_features(backbones, stages, batch.images, device, precision)):
            cache.store(rows, r, fmap)
        filled = rows.stop
        counter.step()
    return cache.truncate(filled) if filled < len(images) else cache


# ----------------------------------------------------------------------------- heads


class StackedLinear(nn.Module):
    """R independent linear layers applied at once: (B, D_1 + ... + D_R) -> (B, R, K).

    Row r reads its own ``in_dims[r]`` columns of the input (the rows' features side by side,
    as the cache's pooled views hold them) and is initialised like its own ``nn.Linear(in_dims[r], K)``;
    ``row(r)`` gives its (D_r, K) weight (the transpose of its Linear's) and bias.

    Two ways to apply the rows, the same numbers (``forward`` picks by device):
    - per row, on a CPU: one matmul per row on views of the input, no copies. On a CPU that is
      about 3x faster than padding and batching (resnet18's 5 stages x 2 backbones, 256 images,
      10 classes, 1 thread: 13 vs 35 ms per step), because the copies cost more than the
      small matmuls themselves;
    - batched, on a GPU: one gather pads every row's columns to D_max, one batched matmul adds
      the bias. A head step this small is bound by kernel launches, not arithmetic: a constant
      few launches whatever R, where per row costs R matmuls forward and R more backward.

    And two layouts of the weights, for the path that will use them (``padded``):
    - packed (the CPU's): the rows' (D_r, K) blocks one under the other, (D_1 + ... + D_R, K).
      Nothing but weights: the optimiser steps sum(D) x K numbers, where padded rows of unequal
      widths would make it step (and zero, and sum gradients into) R x D_max x K, most of them
      zeros: resnet50's 64 ... 2048 channels x 2 backbones, an mlp step took 64 ms padded, 54 ms
      packed (256 images, 1 thread, the fastest of 15);
    - padded (the GPU's): one (R, D_max, K) tensor, row r's block in ``weight[r, :D_r]``, which the
      batched matmul reads as it is. The entries past D_r are inert: no input reaches them (the
      batched path pads the input with zeros), so they get no gradient and change no output.
    Either path runs on either layout (the other layout costs a copy of the weights per step).
    """

    def __init__(self, in_dims: list[int], out_dim: int, bias: bool = True, padded: bool = False):
        super().__init__()
        self.in_dims = list(in_dims)
        self.offsets = [0, *itertools.accumulate(in_dims)]
        self.padded = padded
        rows, widest = len(in_dims), max(in_dims)
        self.weight = nn.Parameter(torch.zeros((rows, widest, out_dim) if padded else (self.offsets[-1], out_dim)))
        with torch.no_grad():
            for r, d in enumerate(in_dims):
                block = self.weight[r, :d] if padded else self.weight[self.offsets[r] : self.offsets[r + 1]]
                block.uniform_(-1 / math.sqrt(d), 1 / math.sqrt(d))
        bounds = torch.tensor([1 / math.sqrt(d) for d in in_dims])[:, None]
        self.bias = nn.Parameter((torch.rand(rows, out_dim) * 2 - 1) * bounds) if bias else None  # (R, K)
        # (R, D_max): the input column of row r's d-th feature; past D_r, column D_1 + ... + D_R,
        # the zero column the batched path appends (also the packed weights' rows, with a zero row
        # appended). None when every row is as wide (a plain view).
        columns = torch.tensor(
            [
                [a + d if d < b - a else self.offsets[-1] for d in range(widest)]
                for a, b in itertools.pairwise(self.offsets)
            ]
        )
        self.register_buffer("columns", None if len(set(in_dims)) == 1 else columns, persistent=False)

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (D_r, K), bias (K,)) of row r, as its own nn.Linear would hold them (transposed)."""
        a, b = self.offsets[r], self.offsets[r + 1]
        weight = self.weight[r, : b - a] if self.padded else self.weight[a:b]
        return weight, None if self.bias is None else self.bias[r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)  # (B, D_1 + ... + D_R); (B, R, H) from a previous StackedLinear: its rows side by side
        return self.per_row(x) if x.device.type == "cpu" else self.batched(x)

    def per_row(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_1 + ... + D_R) -> (B, R, K) with one matmul per row."""
        # unbind / split: one view per row whose backward is one stack / cat, where indexing each row
        # would add R full-size gradients
        if self.padded:
            weights = [w if d == len(w) else w[:d] for w, d in zip(self.weight.unbind(0), self.in_dims)]  # R x (D_r, K)
        else:
            weights = self.weight.split(self.in_dims)  # R x (D_r, K)
        y = torch.stack([x[:, a:b] @ w for (a, b), w in zip(itertools.pairwise(self.offsets), weights)], dim=1)
        return y + self.bias if self.bias is not None else y  # (B, R, K)

    def batched(self, x: torch.Tensor) -> torch.Tensor:
        """(B, D_1 + ... + D_R) -> (B, R, K) with one gather and one batched matmul."""
        rows = len(self.in_dims)
        if self.columns is None:
            padded = x.reshape(len(x), rows, -1).transpose(0, 1)  # (R, B, D)
        else:
            padded = F.pad(x, (0, 1)).t()[self.columns].transpose(1, 2)  # (R, B, D_max), zeros past D_r
        weight = self.weight
        if not self.padded:  # (R, D_max, K): the packed rows, a zero row past D_r
            weight = (
                weight.view(rows, -1, weight.shape[-1])
                if self.columns is None
                else F.pad(weight, (0, 0, 0, 1))[self.columns]
            )
        if self.bias is None:
            return torch.bmm(padded, weight).transpose(0, 1)  # (B, R, K)
        return torch.baddbmm(self.bias[:, None], padded, weight).transpose(0, 1)  # (B, R, K)


def pooled_heads(kind: str, dims: list[int], num_classes: int, padded: bool = False) -> nn.Module:
    """linear or mlp heads for all R rows of pooled features: (B, D_1 + ... + D_R) -> (B, R, K).

    A BatchNorm1d over the rows' features side by side keeps separate statistics for every
    (row, feature), so each row's head is normalised as if it were alone. ``padded``: the
    StackedLinear layout for the batched path (a GPU's).
    """
    rows = len(dims)
    if kind == "linear":
        return nn.Sequential(nn.BatchNorm1d(sum(dims), affine=False), StackedLinear(dims, num_classes, padded=padded))
    hidden = [MLP_HIDDEN] * rows
    return nn.Sequential(
        StackedLinear(dims, MLP_HIDDEN, bias=False, padded=padded),
        nn.Flatten(),
        nn.BatchNorm1d(rows * MLP_HIDDEN),
        nn.ReLU(inplace=True),
        StackedLinear(hidden, MLP_HIDDEN, bias=False, padded=padded),
        nn.Flatten(),
        nn.BatchNorm1d(rows * MLP_HIDDEN),
        nn.ReLU(inplace=True),
        StackedLinear(hidden, num_classes, padded=padded),
    )


class SpatialHeads(nn.Module):
    """conv or flatten-mlp heads, one per row: [(B, C_r, H_r, W_r)] -> (B, R, K)."""

    def __init__(self, kind: str, shapes: list[tuple[int, int, int]], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(spatial_head(kind, shape, num_classes) for shape in shapes)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(x) for head, x in zip(self.heads, maps)], dim=1)


def spatial_head(kind: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """One head on (B, C, H, W) maps: the paper's mlp on flattened maps, or its "RotNet + conv" NIN block."""
    if kind == "mlp":
        dim = math.prod(shape)
        return nn.Sequential(
            nn.Flatten(),
            nn.Linear(dim, MLP_HIDDEN, bias=False),
            nn.BatchNorm1d(MLP_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(MLP_HIDDEN, MLP_HIDDEN, bias=False),
            nn.BatchNorm1d(MLP_HIDDEN),
            nn.ReLU(inplace=True),
            nn.Linear(MLP_HIDDEN, num_classes),
        )

    def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_bn_relu(shape[0], CONV_WIDTH, 3),
        *conv_bn_relu(CONV_WIDTH, CONV_WIDTH, 1),
        *conv_bn_relu(CONV_WIDTH, CONV_WIDTH, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(CONV_WIDTH, num_classes),
    )


def official_head_init(module: nn.Module) -> None:
    """The official classifiers' init (NonLinearClassifier.py l. 86-100; LinearClassifier.py l. 36-43):
    He-normal convs (fan_out = k*k*out_channels), BatchNorm as identity, linear weights N(0, sqrt(2 / out_features))
    and zero biases. Applied with ``heads.apply``; StackedLinear rows are initialised like their own Linear."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.modules.batchnorm._BatchNorm) and module.affine:
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.Linear, StackedLinear)):
        out_features = module.weight.shape[0] if isinstance(module, nn.Linear) else module.weight.shape[-1]
        nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / out_features))
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def make_head_optimizer(params, recipe: HeadRecipe, device: torch.device) -> torch.optim.Optimizer:
    """The recipe's optimiser, with torch's fused kernel where the device has one.

    'sgd' is the official code's torch.optim.SGD (Algorithm.py l. 124-128): Nesterov momentum 0.9 and
    coupled L2 weight decay on every parameter. 'adamw' decays decoupled, also on every parameter.
    """
    fused = {"fused": True} if device.type in FUSED_OPTIMIZER_DEVICES else {}
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=0.9, nesterov=True, weight_decay=recipe.weight_decay, **fused
        )
    return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay, **fused)


def head_lr(recipe: HeadRecipe, epoch: int, step: int, steps_per_epoch: int) -> float:
    """Learning rate at (epoch, step): 'step' changes it per epoch, as the official LUT_lr (Algorithm.py
    l. 296: lr x gamma for every milestone reached); 'cosine' decays it per step to 0."""
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** sum(epoch >= m for m in recipe.milestones)
    progress = (epoch * steps_per_epoch + step) / max(1, recipe.epochs * steps_per_epoch)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


class HeadTrainer:
    """One kind of head for every row (backbone x stage): the modules, their optimiser and schedule,
    and the validation accuracy per row of the last and the best epoch (kept on the device)."""

    def __init__(
        self,
        kind: str,
        shapes: list[tuple[int, int, int]],
        num_classes: int,
        pool: str,
        recipe: HeadRecipe,
        seed: int,
        device: torch.device,
    ):
        self.kind, self.recipe, self.view, self.num_classes = kind, recipe, head_view(kind, pool), num_classes
        # Heads on pooled features train in fp32 (TF32 matmuls on CUDA): their matmuls are too small
        # to gain from bf16, whose casts would add launches to a launch-bound step (and fp16 would
        # need a gradient scaler). Heads on spatial maps do enough arithmetic to gain from autocast.
        self.autocasts = self.view == "maps"
        torch.manual_seed(seed)  # the same initial heads every time
        if self.view == "maps":
            self.heads = SpatialHeads(kind, shapes, num_classes)
        else:
            # the weights laid out for the path the device takes: packed for a CPU's matmul per row
            self.heads = pooled_heads(kind, [c for c, _, _ in shapes], num_classes, padded=device.type != "cpu")
        if recipe.init == "official":
            self.heads.apply(official_head_init)
        self.heads.to(device)
        self.optimizer = make_head_optimizer(self.heads.parameters(), recipe, device)
        self.last = torch.zeros(len(shapes), device=device)  # (R,) top-1 after the last evaluated epoch
        self.best = torch.full((len(shapes),), -1.0, device=device)  # (R,) best top-1 so far
        self.best_epoch = torch.zeros(len(shapes), dtype=torch.long, device=device)  # (R,) 1-based

    def train_step(
        self,
        inputs,
        labels: torch.Tensor,
        epoch: int,
        step: int,
        steps_per_epoch: int,
        device: torch.device,
        precision: str,
    ) -> None:
        """One optimiser step on a mini-batch: inputs (B, R, D) or [(B, C, H, W)] per row, labels (B,)."""
        for group in self.optimizer.param_groups:
            group["lr"] = head_lr(self.recipe, epoch, step, steps_per_epoch)
        with autocast(device, precision if self.autocasts else "fp32"):
            logits = self.heads(inputs)  # (B, R, K)
        rows = logits.shape[1]
        # the sum over rows of each row's mean cross-entropy: classes on dim 1, the label of each image for all rows
        loss = F.cross_entropy(logits.float().transpose(1, 2), labels[:, None].expand(-1, rows)) * rows
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    @torch.no_grad()
    def count_correct(self, inputs, labels: torch.Tensor, device: torch.device, precision: str) -> torch.Tensor:
        """(R,) right answers of every row's head on a validation batch (BatchNorm on its running statistics)."""
        with autocast(device, precision if self.autocasts else "fp32"):
            logits = self.heads(inputs)  # (B, R, K)
        return (logits.argmax(2) == labels[:, None]).sum(0)

    def record(self, epoch: int, correct: torch.Tensor, total: int) -> None:
        """Keep an evaluated epoch's accuracy (no host read: the comparison stays on the device)."""
        self.last = correct.float() / max(1, total)
        better = self.last > self.best
        self.best = torch.where(better, self.last, self.best)
        self.best_epoch = torch.where(better, torch.full_like(self.best_epoch, epoch + 1), self.best_epoch)

    def last_accuracy(self) -> list[float]:
        return self.last.tolist()

    def best_accuracy(self) -> list[tuple[float, int]]:
        return list(zip(self.best.tolist(), self.best_epoch.tolist()))


@contextlib.contextmanager
def one_thread_for_small_steps(device: torch.device, view: str):
    """Train heads on pooled features with one CPU thread.

    Their steps are a few small matmuls: split over threads, every op waits for the slowest
    thread, and on a loaded machine a thread that lost its core stalls them all. The README's
    first probe (resnet18 at 32 px, 10 stages, 100 epochs of linear heads) on 2 cores under
    load: 87-130 s with 2 threads, 6 s with one. Spatial heads (conv, flattened mlp) do enough
    work per op to gain from threads and keep them.
    """
    if device.type != "cpu" or view == "maps":
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def train_heads(
    trainer: HeadTrainer,
    train: FeatureCache,
    val: FeatureCache,
    batch_size: int,
    seed: int,
    device: torch.device,
    precision: str,
    counter: _Counter,
    every_epoch: bool = False,
) -> None:
    """Train one kind of head for every row on the cached features; evaluate after the last epoch, or
    after every epoch when the best one is wanted (about a tenth more time for a linear head)."""
    n = len(train.labels)
    batch_size = min(batch_size, n)
    steps_per_epoch = n // batch_size  # full batches only: BatchNorm needs more than one sample
    order = torch.Generator(device=train.labels.device).manual_seed(seed)
    for epoch in range(trainer.recipe.epochs):
        trainer.heads.train()
        perm = torch.randperm(n, generator=order, device=train.labels.device)
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            labels = train.labels[idx].to(device, non_blocking=True)
            trainer.train_step(
                train.inputs(trainer.view, idx, device), labels, epoch, step, steps_per_epoch, device, precision
            )
        if every_epoch or epoch == trainer.recipe.epochs - 1:
            trainer.record(
                epoch, evaluate_on_cache(trainer, val, max(batch_size, 1024), device, precision), len(val.labels)
            )
        counter.step()


@torch.no_grad()
def evaluate_on_cache(
    trainer: HeadTrainer, val: FeatureCache, batch_size: int, device: torch.device, precision: str
) -> torch.Tensor:
    """(R,) right answers of every row's head on the cached validation features."""
    trainer.heads.eval()
    correct = torch.zeros(len(val.shapes), dtype=torch.long, device=device)
    for start in range(0, len(val.labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(val.labels)))
        labels = val.labels[idx.to(val.labels.device)].to(device)
        correct += trainer.count_correct(val.inputs(trainer.view, idx, device), labels, device, precision)
    return correct


def train_heads_on_augmented_images(
    trainers: list[HeadTrainer],
    backbones: list[tuple[str, LoadedWeights]],
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
    counter = _Counter(emit, "train-augmented", f"training {names} heads on augmented images", epochs)
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


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    num_classes: int,
    k: int,
    temperature: float,
    device: torch.device,
) -> float:
    """Top-1 of a cosine k-NN vote: each of the k nearest training images votes exp(similarity / T) for its class."""
    bank = F.normalize(train_x.to(device).float(), dim=1)  # (N, C)
    bank_labels = train_y.to(device)
    k = min(k, len(bank))
    correct = torch.zeros((), device=device, dtype=torch.long)  # summed on the device, read once
    for start in range(0, len(val_x), KNN_CHUNK):
        query = F.normalize(val_x[start : start + KNN_CHUNK].to(device).float(), dim=1)  # (B, C)
        similarity, nearest = (query @ bank.T).topk(k, dim=1)  # (B, k)
        votes = torch.zeros(len(query), num_classes, device=device)
        votes.scatter_add_(1, bank_labels[nearest], (similarity / temperature).exp())
        correct += (votes.argmax(1) == val_y[start : start + KNN_CHUNK].to(device)).sum()
    return correct.item() / max(1, len(val_x))


__all__ = [
    "probe",
    "ProbeResult",
    "ProbeRow",
    "keep_per_class",
    "knn_accuracy",
    "stage_features",
    "extract_features",
    "train_heads",
    "train_heads_on_augmented_images",
    "HeadTrainer",
]
