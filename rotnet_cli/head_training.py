"""The torch side of the probe heads (heads.py is their registry): the stacked layers that train one
head per row (backbone x stage) at once, ``HeadTrainer`` (modules, optimiser, schedule, the accuracy of
the last and the best epoch), the training loop on cached features and the kNN vote.

The heads of one kind for all rows train together: their losses add up and each head only receives
the gradient of its own loss, so this is exactly separate training, with the Python overhead paid
once per step. Used by the probe, the online evaluation during pretraining and the supervised
baseline (its optimiser and schedule).
"""

from __future__ import annotations

import contextlib
import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .features import FeatureCache, StepCounter
from .heads import HEAD_TYPES, HeadRecipe
from .runtime import FUSED_OPTIMIZER_DEVICES, autocast

MLP_HIDDEN = 200  # the paper's non-linear classifier: 2 hidden layers of 200 units
CONV_WIDTH = 192  # the paper's "RotNet + conv": a NIN block of 192 channels
KNN_CHUNK = 1024  # validation images compared with the whole training bank at once


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


def linear_heads(dims: list[int], num_classes: int, padded: bool = False) -> nn.Module:
    """linear heads for all R rows of pooled features: (B, D_1 + ... + D_R) -> (B, R, K).

    A BatchNorm1d over the rows' features side by side keeps separate statistics for every
    (row, feature), so each row's head is normalised as if it were alone. ``padded``: the
    StackedLinear layout for the batched path (a GPU's).
    """
    return nn.Sequential(nn.BatchNorm1d(sum(dims), affine=False), StackedLinear(dims, num_classes, padded=padded))


def pooled_mlp_heads(dims: list[int], num_classes: int, padded: bool = False) -> nn.Module:
    """The paper's mlp heads for all R rows of pooled features: (B, D_1 + ... + D_R) -> (B, R, K)."""
    rows = len(dims)
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
    """One head per row on spatial maps: [(B, C_r, H_r, W_r)] -> (B, R, K)."""

    def __init__(self, heads: list[nn.Module]):
        super().__init__()
        self.heads = nn.ModuleList(heads)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([head(x) for head, x in zip(self.heads, maps)], dim=1)


def flat_mlp_head(shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The paper's mlp on one stage's flattened (B, C, H, W) maps (--pool flatten)."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(shape), MLP_HIDDEN, bias=False),
        nn.BatchNorm1d(MLP_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Linear(MLP_HIDDEN, MLP_HIDDEN, bias=False),
        nn.BatchNorm1d(MLP_HIDDEN),
        nn.ReLU(inplace=True),
        nn.Linear(MLP_HIDDEN, num_classes),
    )


def conv_head(shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """The paper's "RotNet + conv" on one stage's (B, C, H, W) maps: a NIN block, global pooling, linear."""

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


def spatial_head(kind: str, shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """One ``kind`` head (a registered type that sees the spatial maps) on one stage's (B, C, H, W) maps."""
    [head] = HEAD_TYPES[kind].build([shape], num_classes, "maps", False).heads
    return head


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
        head_type = HEAD_TYPES[kind]
        self.kind, self.recipe, self.view, self.num_classes = kind, recipe, head_type.sees(pool), num_classes
        # Heads on pooled features train in fp32 (TF32 matmuls on CUDA): their matmuls are too small
        # to gain from bf16, whose casts would add launches to a launch-bound step (and fp16 would
        # need a gradient scaler). Heads on spatial maps do enough arithmetic to gain from autocast.
        self.autocasts = self.view == "maps"
        torch.manual_seed(seed)  # the same initial heads every time
        # the weights laid out for the path the device takes: packed for a CPU's matmul per row
        self.heads = head_type.build(shapes, num_classes, self.view, device.type != "cpu")
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
    counter: StepCounter,
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
    "StackedLinear",
    "linear_heads",
    "pooled_mlp_heads",
    "SpatialHeads",
    "flat_mlp_head",
    "conv_head",
    "spatial_head",
    "official_head_init",
    "make_head_optimizer",
    "head_lr",
    "HeadTrainer",
    "one_thread_for_small_steps",
    "train_heads",
    "evaluate_on_cache",
    "knn_accuracy",
]
