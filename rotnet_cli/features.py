"""The frozen-feature library: what a stage of a frozen backbone looks like, and its features
for a set of images, taken in one forward pass per batch.

Public functions (used by probe, the online evaluation, supervised, embed and score alike):
- ``labelled_splits(cfg, img_size, emit) -> (train, val, num_classes, skipped)``: the labelled images
  of a probe-like config (--data, --val-data or a stratified --val-split, --labels-per-class);
- ``stage_shapes(backbones, stages, img_size, device) -> [(C, H, W)]``: one per row (backbone x stage);
- ``stage_features(backbones, stages, images, device, precision) -> [(B, C_r, H_r, W_r)]``: the stage
  maps of one batch of uint8 images, every row from one forward pass per backbone (eval, no gradients);
- ``extract_features(backbones, stages, images, shapes, plan, batch_size, workers, device, precision,
  counter=None) -> FeatureCache``: the whole ImageSet through every backbone once, keeping the views
  of ``plan`` (``plan_cache(shapes, views, n_images, device)``): 'avg' / 'max' pooled vectors and,
  when asked, the spatial 'maps'. ``cache.row_avg(r)`` is row r's (N, C_r) average-pooled features,
  ``cache.labels`` (N,), ``cache.inputs(view, idx, device)`` a mini-batch for a head;
- ``pooled_features(weights, images, stages, device, precision, ...) -> {stage: (N, C)}``: the simple
  case, one backbone's average- (or max-) pooled features per 1-based stage.

``backbones`` is a list of (label, weights.LoadedWeights), ``stages`` one list of 1-based stages per
backbone. Features are extracted either once and cached (probe's quick recipe, the online evaluation)
or recomputed from augmented images every batch (probe's paper recipe, in probing.py); either way
``stage_features`` computes them.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass, field

import torch

from . import data as data_lib
from .config import ProbeConfig
from .errors import ConfigError, DataError
from .events import Progress, TaskProgress, WarningMessage
from .models import forward_stages
from .runtime import autocast
from .weights import LoadedWeights

# Spatial maps beyond this many bytes (float32) are cached as bfloat16, halving their memory.
SPATIAL_FP32_BYTES = 2 * 2**30


class StepCounter:
    """Reports one progress bar: ``step()`` advances it by one."""

    def __init__(self, emit: Progress, task_id: str, description: str, total: int):
        self.emit, self.task_id, self.description, self.total, self.done = emit, task_id, description, total, 0

    def step(self) -> None:
        self.done += 1
        self.emit(TaskProgress(self.task_id, self.description, self.done, self.total))


# ----------------------------------------------------------------------------- labelled images


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
    def allocate(cls, n: int, shapes: list[tuple[int, int, int]], plan: CachePlan) -> FeatureCache:
        width = sum(c for c, _, _ in shapes)
        pooled = {v: torch.empty(n, width, device=plan.device) for v in plan.views - {"maps"}}
        maps = (
            [torch.empty(n, *s, dtype=plan.maps_dtype, device=plan.device) for s in shapes]
            if "maps" in plan.views
            else None
        )
        return cls(torch.empty(n, dtype=torch.long, device=plan.device), shapes, pooled, maps)

    @classmethod
    def of_batch(cls, maps: list[torch.Tensor], labels: torch.Tensor, views: set[str]) -> FeatureCache:
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

    def truncate(self, n: int) -> FeatureCache:
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
    batch_size: int,
    workers: int,
    device: torch.device,
    precision: str,
    counter: StepCounter | None = None,
) -> FeatureCache:
    """Run every backbone over ``images`` once, in eval mode, keeping the views of every requested stage.

    ``counter`` (optional) steps once per batch. Images without labels get label -1."""
    cache = FeatureCache.allocate(len(images), shapes, plan)
    filled = 0
    order = torch.arange(len(images))
    for batch in data_lib.iterate_batches(images, order, batch_size, device, drop_last=False, workers=workers):
        cache.skipped += batch.skipped
        rows = slice(filled, filled + len(batch.images))
        cache.labels[rows] = batch.labels.to(plan.device) if batch.labels is not None else -1
        for r, fmap in enumerate(stage_features(backbones, stages, batch.images, device, precision)):
            cache.store(rows, r, fmap)
        filled = rows.stop
        if counter is not None:
            counter.step()
    return cache.truncate(filled) if filled < len(images) else cache


def pooled_features(
    weights: LoadedWeights,
    images: data_lib.ImageSet,
    stages: list[int],
    device: torch.device,
    precision: str = "fp32",
    batch_size: int = 256,
    workers: int = 0,
    pool: str = "avg",
    counter: StepCounter | None = None,
) -> tuple[dict[int, torch.Tensor], list[str]]:
    """One backbone's ``pool`` ('avg' or 'max') pooled features of every image at every 1-based stage:
    ({stage: (N, C_stage) float32}, the files that could not be read and are left out of the N rows)."""
    backbones, rows = [("run", weights)], [list(stages)]
    shapes = stage_shapes(backbones, rows, weights.img_size, device)
    plan = plan_cache(shapes, {pool}, len(images), device)
    cache = extract_features(backbones, rows, images, shapes, plan, batch_size, workers, device, precision, counter)
    offsets = cache.offsets
    pooled = cache.pooled[pool]
    return {s: pooled[:, offsets[r] : offsets[r + 1]] for r, s in enumerate(stages)}, list(cache.skipped)


__all__ = [
    "StepCounter",
    "labelled_splits",
    "keep_per_class",
    "stage_shapes",
    "CachePlan",
    "plan_cache",
    "FeatureCache",
    "stage_features",
    "extract_features",
    "pooled_features",
]
