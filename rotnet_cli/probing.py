"""Frozen-feature probes: how useful is each stage of a backbone for a labelled task?

``probe(config, progress)`` loads the weights (and the baselines of ``--compare``), runs
every backbone over the labelled images ONCE, in eval mode without gradients, taking every
requested stage from that single forward pass (timm's ``forward_intermediates``), and
caches the features in memory (on the GPU when they fit). The heads then train on the
cache with plain tensor indexing, so a 100-epoch probe costs little more than the one
extraction pass. The heads of one kind for all (backbone, stage) rows train together in
one loop: their losses add up and each head only receives the gradient of its own loss,
so this is exactly separate training, with the Python overhead paid once per step.

Heads (the paper's evaluation, Gidaris et al. 2018, section 3):
- linear: BatchNorm1d without affine + Linear on globally average-pooled features;
- mlp: two hidden layers of 200 units (BN + ReLU after each) on features pooled by ``--pool``;
- knn: cosine k-nearest-neighbour vote, temperature-weighted, on average-pooled features;
- conv: a NIN-block-like stack (3x3 conv 192, 1x1 conv 192, 1x1 conv 192, each BN + ReLU),
  global average pooling and a linear layer, on the spatial stage maps ("RotNet + conv").

It never prints: progress goes to the ``progress`` callback as typed events (events.py).
"""

from __future__ import annotations

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
from .config import ProbeConfig
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


@dataclass
class ProbeRow:
    """One stage of one backbone and the top-1 validation accuracy of every head on it."""

    weights: str  # "run" (the probed weights), "random", or a --compare spec
    stage: int  # 1-based, as in --layers
    shape: tuple[int, int, int]  # (C, H, W) of the stage's output
    accuracy: dict[str, float] = field(default_factory=dict)  # head -> top-1 in [0, 1]

    def to_dict(self) -> dict:
        accuracy = {head: round(acc, 4) for head, acc in self.accuracy.items()}
        return {"weights": self.weights, "stage": self.stage, "shape": list(self.shape), **accuracy}


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
    epochs: int
    num_classes: int
    train_images: int
    val_images: int
    labels_per_class: int | None
    rows: list[ProbeRow]
    extract_seconds: float
    train_seconds: dict[str, float]
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
            "weights": self.weights, "model": self.model, "data": self.data, "img_size": self.img_size,
            "heads": list(self.heads), "pool": self.pool, "epochs": self.epochs, "num_classes": self.num_classes,
            "train_images": self.train_images, "val_images": self.val_images, "labels_per_class": self.labels_per_class,
            "rows": [row.to_dict() for row in self.rows],
            "best": {"stage": best[0].stage, "head": best[1], "accuracy": round(best[0].accuracy[best[1]], 4)} if best else None,
            "device": self.device, "precision": self.precision, "extract_seconds": round(self.extract_seconds, 3),
            "train_seconds": {k: round(v, 3) for k, v in self.train_seconds.items()},
            "rotnet_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


# ----------------------------------------------------------------------------- the probe


def probe(cfg: ProbeConfig, progress: Progress | None = None) -> ProbeResult:
    """Probe every requested stage of ``cfg.weights`` with every head; see the module docstring."""
    emit = progress or ignore
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
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
    backbones = [("run", main)] + [
        (label, load_weights(f"random:{main.model_name}" if label == "random" else label, device, seed=cfg.seed, img_size=main.img_size))
        for label in cfg.compare
    ]
    stages = [resolve_stages(cfg.layers, num_stages(w.backbone), label) for label, w in backbones]

    # -- data: labelled uint8 train and validation sets at the size the weights were trained at
    train_set, val_set, num_classes, skipped = labelled_splits(cfg, main.img_size, emit)
    emit(Message(
        f"{main.model_name} at {main.img_size} px: {len(train_set)} training / {len(val_set)} validation images, "
        f"{num_classes} classes; stages {','.join(map(str, stages[0]))}; heads {','.join(cfg.heads)}"
    ))

    # -- features: one forward pass per batch for all stages of all backbones
    t0 = time.perf_counter()
    shapes = stage_shapes(backbones, stages, main.img_size, device)  # (C, H, W) per row
    plan = plan_cache(shapes, views_needed(cfg.heads, cfg.pool), len(train_set) + len(val_set), device)
    total_batches = sum(data_lib.num_batches(len(s), cfg.batch_size, drop_last=False) for s in (train_set, val_set))
    counter = _Counter(emit, "extract", "extracting features", total_batches)
    train = extract_features(backbones, stages, train_set, shapes, plan, cfg, device, precision, counter)
    val = extract_features(backbones, stages, val_set, shapes, plan, cfg, device, precision, counter)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    extract_seconds = time.perf_counter() - t0

    # -- heads: every kind trains on the cache, all rows at once
    keys = [(label, stage) for (label, _), row_stages in zip(backbones, stages) for stage in row_stages]
    rows = [ProbeRow(label, stage, shape) for (label, stage), shape in zip(keys, shapes)]
    train_seconds: dict[str, float] = {}
    for head in cfg.heads:
        t_head = time.perf_counter()
        if head == "knn":
            accuracies = [
                knn_accuracy(train.row_avg(r), train.labels, val.row_avg(r), val.labels, num_classes, cfg.knn_k,
                             cfg.knn_temperature, device)
                for r in range(len(rows))
            ]
            emit(TaskProgress("knn", "knn vote", 1, 1))
        else:
            counter = _Counter(emit, f"train-{head}", f"training {head} heads", cfg.epochs)
            accuracies = train_heads(head, train, val, num_classes, cfg, device, precision, counter)
        for row, acc in zip(rows, accuracies):
            row.accuracy[head] = acc
        train_seconds[head] = time.perf_counter() - t_head

    result = ProbeResult(
        weights=cfg.weights, model=main.model_name, data=cfg.data, img_size=main.img_size,
        device=describe_device(device), precision=precision, heads=cfg.heads, pool=cfg.pool, epochs=cfg.epochs,
        num_classes=num_classes, train_images=len(train.labels), val_images=len(val.labels),
        labels_per_class=cfg.labels_per_class, rows=rows, extract_seconds=extract_seconds, train_seconds=train_seconds,
        skipped_files=list(dict.fromkeys([*skipped, *train.skipped, *val.skipped])),
    )
    if cfg.save and main.run_dir is not None:
        try:
            result.saved_to = rundir.write_probe(main.run_dir, result.to_dict())
        except OutputError as e:  # the figures are computed: they are returned (and shown) all the same
            result.save_error = str(e)
    return result


class _Counter:
    """Reports one progress bar: ``step()`` advances it by one."""

    def __init__(self, emit: Progress, task_id: str, description: str, total: int):
        self.emit, self.task_id, self.description, self.total, self.done = emit, task_id, description, total, 0

    def step(self) -> None:
        self.done += 1
        self.emit(TaskProgress(self.task_id, self.description, self.done, self.total))


# ----------------------------------------------------------------------------- data


def labelled_splits(
    cfg: ProbeConfig, img_size: int, emit: Progress,
) -> tuple[data_lib.ImageSet, data_lib.ImageSet, int, tuple[str, ...]]:
    """(train, val, number of classes, files left out): --val-data, the source's own split, or a stratified --val-split."""
    load = dict(need_labels=True, download=cfg.download, data_dir=cfg.data_dir, workers=cfg.workers, progress=emit)
    source = data_lib.open_source(cfg.data, img_size, **load)
    train_set, val_set, skipped = source.train, source.val, source.skipped
    if cfg.val_data:
        other = data_lib.open_source(cfg.val_data, img_size, **load)
        val_set = other.val if other.val is not None else other.train
        skipped += other.skipped
    if train_set.labels is None or (val_set is not None and val_set.labels is None):
        raise DataError(f"--data {cfg.data} has no labels; a probe needs class sub-folders, digits, or a labelled dataset")
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
            emit(WarningMessage(f"{len(short)} class(es) have fewer than {cfg.labels_per_class} training images "
                                f"(e.g. class {short[0]}); all of theirs are used"))
        train_set = train_set.subset(keep)
    num_classes = len(train_set.classes) if train_set.classes else int(torch.cat([train_set.labels, val_set.labels]).max()) + 1
    if len(train_set.labels.unique()) < 2:
        raise DataError(f"--data {cfg.data}: the training split has fewer than 2 classes; a classifier needs at least 2")
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
    pooled_bytes = 4 * n_images * len(shapes) * max(c for c, _, _ in shapes) * len(views - {"maps"})
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

    ``pooled[view]`` (N, R, D) for view 'avg' / 'max': row r holds its C_r channels, zero-padded
    to D = max C_r, so one index op gathers a mini-batch for all R rows at once. ``maps``: one
    (N, C_r, H_r, W_r) tensor per row, only when a head needs the spatial features.
    """

    labels: torch.Tensor  # (N,) int64
    shapes: list[tuple[int, int, int]]  # (C, H, W) per row
    pooled: dict[str, torch.Tensor]
    maps: list[torch.Tensor] | None
    skipped: list[str] = field(default_factory=list)  # files found unreadable while extracting

    @classmethod
    def allocate(cls, n: int, shapes: list[tuple[int, int, int]], plan: CachePlan) -> "FeatureCache":
        width = max(c for c, _, _ in shapes)
        pooled = {v: torch.zeros(n, len(shapes), width, device=plan.device) for v in plan.views - {"maps"}}
        maps = [torch.empty(n, *s, dtype=plan.maps_dtype, device=plan.device) for s in shapes] if "maps" in plan.views else None
        return cls(torch.empty(n, dtype=torch.long, device=plan.device), shapes, pooled, maps)

    def store(self, rows: slice, r: int, fmap: torch.Tensor) -> None:
        """Keep the views of row ``r``'s stage output fmap (B, C, H, W) for the images ``rows``."""
        channels = fmap.shape[1]
        if "avg" in self.pooled:
            self.pooled["avg"][rows, r, :channels] = fmap.mean((2, 3))
        if "max" in self.pooled:
            self.pooled["max"][rows, r, :channels] = fmap.amax((2, 3))
        if self.maps is not None:
            self.maps[r][rows] = fmap

    def truncate(self, n: int) -> "FeatureCache":
        """The first ``n`` images (when unreadable files left the end unfilled)."""
        return FeatureCache(
            self.labels[:n], self.shapes, {v: t[:n] for v, t in self.pooled.items()},
            [m[:n] for m in self.maps] if self.maps is not None else None, self.skipped,
        )

    def row_avg(self, r: int) -> torch.Tensor:
        """(N, C_r): the average-pooled features of row ``r``."""
        return self.pooled["avg"][:, r, : self.shapes[r][0]]

    def inputs(self, view: str, idx: torch.Tensor, device: torch.device) -> torch.Tensor | list[torch.Tensor]:
        """A mini-batch as float32 on ``device``: (B, R, D) for a pooled view, a list of (B, C, H, W) for 'maps'."""
        idx = idx.to(self.labels.device)
        if view == "maps":
            return [m[idx].to(device, non_blocking=True).float() for m in self.maps]
        return self.pooled[view][idx].to(device, non_blocking=True)


@torch.no_grad()
def extract_features(
    backbones: list[tuple[str, LoadedWeights]], stages: list[list[int]], images: data_lib.ImageSet,
    shapes: list[tuple[int, int, int]], plan: CachePlan, cfg: ProbeConfig, device: torch.device, precision: str,
    counter: _Counter,
) -> FeatureCache:
    """Run every backbone over ``images`` once, in eval mode, keeping the views of every requested stage."""
    cache = FeatureCache.allocate(len(images), shapes, plan)
    filled = 0
    order = torch.arange(len(images))
    for batch in data_lib.iterate_batches(images, order, cfg.batch_size, device, drop_last=False, workers=cfg.workers):
        cache.skipped += batch.skipped
        rows = slice(filled, filled + len(batch.images))
        cache.labels[rows] = batch.labels.to(plan.device)
        r = 0
        for (_, weights), row_stages in zip(backbones, stages):
            x = data_lib.normalize(batch.images, weights.mean, weights.std)  # (B, 3, S, S) float32
            with autocast(device, precision):
                maps = forward_stages(weights.backbone, x, [s - 1 for s in row_stages])  # [(B, C, H, W)] per stage
            for fmap in maps:
                cache.store(rows, r, fmap.float())
                r += 1
        filled = rows.stop
        counter.step()
    return cache.truncate(filled) if filled < len(images) else cache


# ----------------------------------------------------------------------------- heads


class StackedLinear(nn.Module):
    """R independent linear layers applied at once: (B, R, D) -> (B, R, K).

    Row r reads its first ``in_dims[r]`` inputs (the rest is the zero padding of narrower
    stages). Rows of the same width share one batched matmul, so no work goes into the
    padding: with resnet18's stages (64 ... 512 wide) that is 2.5x less than padding all.
    Each row is initialised like its own ``nn.Linear(in_dims[r], K)``.
    """

    def __init__(self, in_dims: list[int], out_dim: int, bias: bool = True):
        super().__init__()
        # (width, rows of that width) per group; one (G, width, K) weight per group
        self.groups = [(width, [r for r, d in enumerate(in_dims) if d == width]) for width in sorted(set(in_dims))]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(len(rows), width, out_dim).uniform_(-1 / math.sqrt(width), 1 / math.sqrt(width)))
            for width, rows in self.groups
        )
        bounds = torch.tensor([1 / math.sqrt(d) for d in in_dims])[:, None]
        self.bias = nn.Parameter((torch.rand(len(in_dims), out_dim) * 2 - 1) * bounds) if bias else None  # (R, K)
        grouped_rows = [r for _, rows in self.groups for r in rows]
        # position of every row in the groups' concatenated output (None: already in row order)
        self.register_buffer(
            "row_position", None if grouped_rows == sorted(grouped_rows) else torch.tensor(grouped_rows).argsort(),
            persistent=False,
        )
        # a group's rows as a slice when they are consecutive: a view, no gather (and no scatter in backward)
        self.row_index = [slice(rows[0], rows[-1] + 1) if rows == list(range(rows[0], rows[-1] + 1)) else rows for _, rows in self.groups]

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight (D_r, K), bias (K,)) of row r, as its own nn.Linear would hold them (transposed)."""
        for (_, rows), weight in zip(self.groups, self.weights):
            if r in rows:
                return weight[rows.index(r)], None if self.bias is None else self.bias[r]
        raise IndexError(r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [
            torch.einsum("brd,rdk->brk", x[:, rows, :width], weight)  # (B, G, K)
            for (width, _), rows, weight in zip(self.groups, self.row_index, self.weights)
        ]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if self.row_position is not None:
            y = y.index_select(1, self.row_position)  # back to row order: (B, R, K)
        return y + self.bias if self.bias is not None else y


class StackedBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over (B, R, D): separate statistics for every (row, feature)."""

    def __init__(self, rows: int, dim: int, affine: bool = True):
        super().__init__(rows * dim, affine=affine)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(len(x), -1)).view(x.shape)


def pooled_heads(kind: str, dims: list[int], num_classes: int) -> nn.Module:
    """linear or mlp heads for all R rows of pooled features: (B, R, D) -> (B, R, K)."""
    rows = len(dims)
    if kind == "linear":
        return nn.Sequential(StackedBatchNorm(rows, max(dims), affine=False), StackedLinear(dims, num_classes))
    hidden = [MLP_HIDDEN] * rows
    return nn.Sequential(
        StackedLinear(dims, MLP_HIDDEN, bias=False), StackedBatchNorm(rows, MLP_HIDDEN), nn.ReLU(inplace=True),
        StackedLinear(hidden, MLP_HIDDEN, bias=False), StackedBatchNorm(rows, MLP_HIDDEN), nn.ReLU(inplace=True),
        StackedLinear(hidden, num_classes),
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
            nn.Linear(dim, MLP_HIDDEN, bias=False), nn.BatchNorm1d(MLP_HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(MLP_HIDDEN, MLP_HIDDEN, bias=False), nn.BatchNorm1d(MLP_HIDDEN), nn.ReLU(inplace=True),
            nn.Linear(MLP_HIDDEN, num_classes),
        )

    def conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

    return nn.Sequential(
        *conv_bn_relu(shape[0], CONV_WIDTH, 3), *conv_bn_relu(CONV_WIDTH, CONV_WIDTH, 1), *conv_bn_relu(CONV_WIDTH, CONV_WIDTH, 1),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(CONV_WIDTH, num_classes),
    )


def train_heads(
    kind: str, train: FeatureCache, val: FeatureCache, num_classes: int, cfg: ProbeConfig, device: torch.device,
    precision: str, counter: _Counter,
) -> list[float]:
    """Train one ``kind`` head per row on the cached features; their top-1 validation accuracies.

    All rows see the same mini-batches and their losses are summed; no parameter is shared,
    so each head gets exactly the gradient it would get alone. AdamW, cosine decay per step.
    """
    view = head_view(kind, cfg.pool)
    torch.manual_seed(cfg.seed)  # the same initial heads every time
    if view == "maps":
        heads = SpatialHeads(kind, train.shapes, num_classes)
    else:
        heads = pooled_heads(kind, [c for c, _, _ in train.shapes], num_classes)
    heads.to(device)
    optimizer = torch.optim.AdamW(heads.parameters(), lr=cfg.head_lr(kind), weight_decay=cfg.weight_decay)
    n, rows = len(train.labels), len(train.shapes)
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = n // batch_size  # full batches only: BatchNorm needs more than one sample
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs * steps_per_epoch)
    order = torch.Generator(device=train.labels.device).manual_seed(cfg.seed)
    heads.train()
    for _ in range(cfg.epochs):
        perm = torch.randperm(n, generator=order, device=train.labels.device)
        for step in range(steps_per_epoch):
            idx = perm[step * batch_size : (step + 1) * batch_size]
            y = train.labels[idx].to(device, non_blocking=True)
            with autocast(device, precision):
                logits = heads(train.inputs(view, idx, device))  # (B, R, K)
            # the sum over rows of each row's mean cross-entropy
            loss = F.cross_entropy(logits.float().reshape(-1, num_classes), y.repeat_interleave(rows)) * rows
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        counter.step()
    return evaluate_heads(heads, view, val, max(cfg.batch_size, 1024), device, precision)


@torch.no_grad()
def evaluate_heads(heads: nn.Module, view: str, val: FeatureCache, batch_size: int, device: torch.device, precision: str) -> list[float]:
    """Top-1 accuracy of every row's head on ``val`` (heads in eval mode: BatchNorm uses its running statistics)."""
    heads.eval()
    correct = torch.zeros(len(val.shapes), device=device)
    for start in range(0, len(val.labels), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(val.labels)))
        with autocast(device, precision):
            logits = heads(val.inputs(view, idx, device))  # (B, R, K)
        correct += (logits.argmax(2) == val.labels[idx.to(val.labels.device)].to(device)[:, None]).sum(0)
    return (correct / max(1, len(val.labels))).tolist()


@torch.no_grad()
def knn_accuracy(
    train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor, num_classes: int,
    k: int, temperature: float, device: torch.device,
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


__all__ = ["probe", "ProbeResult", "ProbeRow", "keep_per_class", "knn_accuracy"]
