"""The probe head types, in one registry: ``HEAD_TYPES``, name -> ``HeadType``.

A head type says how it sees a stage (``sees(pool)``: a pooled view 'avg' / 'max', (N, C), or
the spatial maps 'maps', (N, C, H, W)), how its modules are built for every row (backbone x
stage) at once (``build``; None for a head with nothing to train: knn votes with the cached
features), whether it normalises over a batch (BatchNorm cannot normalise one image), and how
each recipe of ``rotnet probe --recipe`` trains it (``recipes``). Everything that reads a head's
name reads this registry: the config validates ``--head`` against its keys (so an unknown name
never gets past the command line), the probe, the online evaluation and the trainer
(head_training.HeadTrainer) look the type up here. Adding a head type is one entry below (see
docs/architecture.md, "add a head type").

This module does not import torch (the CLI validates its options before it pays torch's
import time): the builders import head_training, where the modules are, when they are called.
The paper's heads (Gidaris et al. 2018, section 3):
- linear: BatchNorm1d without affine + Linear on globally average-pooled features;
- mlp: two hidden layers of 200 units (BN + ReLU after each) on features pooled by ``--pool``
  (avg, max, or flatten: the spatial maps flattened);
- knn: cosine k-nearest-neighbour vote, temperature-weighted, on average-pooled features;
- conv: a NIN-block-like stack (3x3 conv 192, 1x1 conv 192, 1x1 conv 192, each BN + ReLU),
  global average pooling and a linear layer, on the spatial stage maps ("RotNet + conv").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

Shape = tuple[int, int, int]  # (C, H, W) of a stage's output


@dataclass(frozen=True)
class HeadRecipe:
    """How one kind of probe head is trained: optimiser, learning-rate schedule, epochs, init."""

    optimizer: str  # 'sgd' (Nesterov, momentum 0.9, coupled L2 on every parameter) or 'adamw' (decoupled)
    lr: float
    weight_decay: float
    epochs: int
    schedule: str  # 'step': lr x gamma after each milestone epoch; 'cosine': per step, to 0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.2
    init: str = "torch"  # 'torch' (PyTorch's defaults) or 'official' (NonLinearClassifier.py's initilize)

    def with_epochs(self, epochs: int) -> HeadRecipe:
        """The same recipe for ``epochs``: lr steps keep their place as a share of the run."""
        if epochs == self.epochs:
            return self
        scaled = sorted({round(m * epochs / self.epochs) for m in self.milestones})
        return dataclasses.replace(self, epochs=epochs, milestones=tuple(m for m in scaled if 0 < m < epochs))


# build(shapes, num_classes, view, padded) -> a module mapping a mini-batch of every row's inputs to
# logits (B, R, K): (B, C_1 + ... + C_R) for a pooled view, [(B, C_r, H_r, W_r)] for 'maps'.
# ``padded``: the StackedLinear layout for a GPU's batched path (head_training.StackedLinear).
HeadBuilder = Callable[[list[Shape], int, str, bool], "nn.Module"]


@dataclass(frozen=True)
class HeadType:
    """One kind of probe head; see the module docstring."""

    sees: Callable[[str], str]  # --pool -> the view it trains on: 'avg', 'max' or 'maps'
    build: HeadBuilder | None  # None: nothing to train
    batchnorm: bool  # normalises over each batch: needs at least 2 images per batch
    recipes: dict[str, HeadRecipe] = field(default_factory=dict)  # --recipe -> its training (trained heads)

    @property
    def trains(self) -> bool:
        return self.build is not None


def _linear(shapes: list[Shape], num_classes: int, view: str, padded: bool) -> nn.Module:
    from .head_training import linear_heads

    return linear_heads([c for c, _, _ in shapes], num_classes, padded)


def _mlp(shapes: list[Shape], num_classes: int, view: str, padded: bool) -> nn.Module:
    from .head_training import SpatialHeads, flat_mlp_head, pooled_mlp_heads

    if view == "maps":
        return SpatialHeads([flat_mlp_head(shape, num_classes) for shape in shapes])
    return pooled_mlp_heads([c for c, _, _ in shapes], num_classes, padded)


def _conv(shapes: list[Shape], num_classes: int, view: str, padded: bool) -> nn.Module:
    from .head_training import SpatialHeads, conv_head

    return SpatialHeads([conv_head(shape, num_classes) for shape in shapes])


# The paper's classifiers as the official code trains them (github.com/gidariss/FeatureLearningRotNet):
# config/CIFAR10_MultLayerClassifier_on_RotNet_NIN4blocks_Conv2_feats.py (l. 1, 23, 30) for the non-linear
# classifier ("mlp": 50 epochs, lr 0.1 / 5 after epochs 20, 40, 45) and
# config/CIFAR10_ConvClassifier_on_RotNet_NIN4blocks_Conv2_feats.py (l. 1, 23, 30) for the conv classifier
# (100 epochs, steps after 35, 70, 85): SGD, Nesterov, momentum 0.9, weight decay 5e-4 on every parameter
# (algorithms/Algorithm.py l. 118-128), batch 128, RandomCrop(32, padding=4) + flip on the training images
# (dataloader.py l. 151-153) with the frozen features recomputed every batch (FeatureClassificationModel.py
# l. 69), the LUT_lr read per epoch (Algorithm.py l. 296), fp32. The official CIFAR code has no linear
# classifier: 'linear' takes the non-linear classifier's schedule.
# The quick recipe's fast looks (features extracted once) use AdamW with cosine decay: a BN + linear head
# on normalised features converges within 100 epochs only with the larger step; mlp and conv like 1e-3.
_PAPER_MLP = HeadRecipe("sgd", 0.1, 5e-4, 50, "step", (20, 40, 45), 0.2, init="official")
_PAPER_CONV = HeadRecipe("sgd", 0.1, 5e-4, 100, "step", (35, 70, 85), 0.2, init="official")

HEAD_TYPES: dict[str, HeadType] = {
    "linear": HeadType(
        sees=lambda pool: "avg",
        build=_linear,
        batchnorm=True,
        recipes={"quick": HeadRecipe("adamw", 1e-2, 5e-4, 100, "cosine"), "paper": _PAPER_MLP},
    ),
    "mlp": HeadType(
        sees=lambda pool: "maps" if pool == "flatten" else pool,
        build=_mlp,
        batchnorm=True,
        recipes={"quick": HeadRecipe("adamw", 1e-3, 5e-4, 100, "cosine"), "paper": _PAPER_MLP},
    ),
    "knn": HeadType(sees=lambda pool: "avg", build=None, batchnorm=False),  # it votes: always un-augmented images
    "conv": HeadType(
        sees=lambda pool: "maps",
        build=_conv,
        batchnorm=True,
        recipes={"quick": HeadRecipe("adamw", 1e-3, 5e-4, 100, "cosine"), "paper": _PAPER_CONV},
    ),
}


def head_view(head: str, pool: str) -> str:
    """The cached view a head trains on: 'avg' / 'max' (pooled, N x C) or 'maps' (N x C x H x W)."""
    return HEAD_TYPES[head].sees(pool)


def views_needed(heads: tuple[str, ...], pool: str) -> set[str]:
    """Which views of each stage the cache keeps: pooled vectors always, spatial maps only when a head reads them."""
    return {"avg"} | {head_view(head, pool) for head in heads}  # 'avg' (N, C) is small and feeds linear and knn


def trained_heads(recipe: str) -> dict[str, HeadRecipe]:
    """Every head with something to train -> its training under ``recipe`` (a --recipe name)."""
    return {name: kind.recipes[recipe] for name, kind in HEAD_TYPES.items() if kind.trains}


__all__ = ["HEAD_TYPES", "HeadType", "HeadRecipe", "head_view", "views_needed", "trained_heads"]
