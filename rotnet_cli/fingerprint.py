"""What a run's training images looked like, and which new images are unlike them.

A rotation head's confidence only means something on images like those it was trained
on: a model of grey 25 px faces answers large colour photos at 95-100% confidence, and
mostly wrongly. At the end of pretraining ``describe_training_images`` records, on a
sample of the training images, their typical size (the shorter side of the files), how
many are in colour, their colour statistics, and a fingerprint of the backbone's pooled
features (a mean and spread per feature, and how far held-out images of the same data
lie from them). It goes into model.safetensors as ``training_images``.

predict compares each image with it (``unlike_reasons``): a colour image for a model of
grey images, an image many times larger or smaller than the training images, or pooled
features farther from the training images' than held-out ones ever lie. Such an image
keeps its predicted angle, but its confidence is withheld: lowered to chance (1/R), so
--min-confidence never lets --fix turn it, and the report says why.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from . import data as data_lib
from .rotations import disc_mask, needs_mask, rotate_all
from .runtime import autocast

SAMPLE_IMAGES = 256  # training images described, at every rotation (and as many held-out ones for the threshold)
SIZE_RATIO = 8  # an image this many times larger (or smaller) than the training images is unlike them
FEATURE_MARGIN = 2.0  # x the held-out images' 99th-percentile distance: beyond it, unlike the training images
GREY_TRAINING = 0.02  # at most this fraction of colour images: a model of grey images
MIN_REFERENCE = 5  # held-out images needed to set the threshold from them (else the training sample's own)


# ----------------------------------------------------------------------------- image-level facts


def is_colour(images: torch.Tensor) -> torch.Tensor:
    """(n, 3, S, S) uint8 -> (n,) bool: images whose channels clearly differ. Grey pictures
    saved as colour JPEGs differ by a few levels of chroma noise, far below this."""
    spread = images.amax(1).float() - images.amin(1).float()  # (n, S, S)
    return spread.mean((1, 2)) > 8


def typical_side(paths: list[Path], sample: int = 32) -> int | None:
    """The median shorter side of up to ``sample`` of the files, read from their headers."""
    step = max(1, len(paths) // sample)
    sides = [s for s in (data_lib.header_side(p) for p in paths[::step][:sample]) if s is not None]
    return int(np.median(sides)) if sides else None


def training_side(data: str, train_set: data_lib.ImageSet) -> int | None:
    """The typical shorter side of the training images as stored (not as the model saw them)."""
    known = data_lib.dataset_images(data)
    if known is not None:
        return known[0]
    paths = train_set.paths
    if paths is None and Path(data).expanduser().is_dir():
        paths = [path for path, _ in data_lib.image_inputs((data,))]
    return typical_side(paths or [], sample=64)


# ----------------------------------------------------------------------------- features


@torch.no_grad()
def pooled_features(model: torch.nn.Module, x: torch.Tensor, rotations, device, precision: str) -> torch.Tensor:
    """(n, 3, S, S) normalised images -> (n, D) float32 pooled backbone features, as predict sees them."""
    if needs_mask(rotations):
        x = x * disc_mask(*x.shape[-2:], device=x.device)
    with autocast(device, precision):
        return model.backbone(x).float()


def feature_distance(features: torch.Tensor, stats: dict) -> torch.Tensor:
    """(n, D) features -> (n,) root mean squared z-score against the training images' per-feature mean and std."""
    mean = torch.tensor(stats["mean"], dtype=torch.float32, device=features.device)  # (D,)
    std = torch.tensor(stats["std"], dtype=torch.float32, device=features.device)  # (D,)
    return ((features.float() - mean) / std).pow(2).mean(1).sqrt()


def _features_of(images: data_lib.ImageSet, model, mean, std, rotations, device, precision, batch_size) -> tuple:
    """(features (R*n, D) of every rotated copy, colour (n,) bool, (n, 3) channel means) of up to
    SAMPLE_IMAGES images of ``images``. predict sees rotated images: a fingerprint of upright ones
    alone would call every sideways image unlike them."""
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:SAMPLE_IMAGES]
    feats, colour, pixels = [], [], []
    for batch in data_lib.iterate_batches(images, order, batch_size, device, drop_last=False, workers=0):
        copies, _ = rotate_all(data_lib.normalize(batch.images, mean, std), rotations)  # (R*n, 3, S, S)
        feats.append(pooled_features(model, copies, rotations, device, precision).cpu())
        colour.append(is_colour(batch.images).cpu())
        pixels.append(batch.images.float().div(255).mean((2, 3)).cpu())  # (n, 3) per-image channel means
    if not feats:
        return None, None, None
    return torch.cat(feats), torch.cat(colour), torch.cat(pixels)


def describe_training_images(
    model: torch.nn.Module,
    data: str,
    train_set: data_lib.ImageSet,
    val_set: data_lib.ImageSet | None,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    rotations: tuple[float, ...],
    device: torch.device,
    precision: str,
    batch_size: int,
) -> dict | None:
    """The ``training_images`` record of a run (see the module docstring); None when nothing decodes."""
    model.eval()
    feats, colour, pixels = _features_of(train_set, model, mean, std, rotations, device, precision, batch_size)
    if feats is None:
        return None
    centre = feats.mean(0)  # (D,)
    # a feature that hardly varies on the training images would make any change look enormous
    spread = feats.std(0, unbiased=False)
    spread = spread.clamp_min(max(float(spread.median()) * 0.1, 1e-6))
    stats = {"mean": centre.tolist(), "std": spread.tolist()}
    reference, stats["reference"] = feats, "training"
    if val_set is not None and len(val_set) >= MIN_REFERENCE:
        held_out = _features_of(val_set, model, mean, std, rotations, device, precision, batch_size)[0]
        if held_out is not None and len(held_out) >= MIN_REFERENCE:
            reference, stats["reference"] = held_out, "held-out"
    distances = feature_distance(reference, stats)
    stats["threshold"] = float(torch.quantile(distances, 0.99)) * FEATURE_MARGIN
    return {
        "images": len(colour),
        "side": training_side(data, train_set),
        "colour": float(colour.float().mean()),
        "mean": pixels.mean(0).tolist(),
        "std": pixels.std(0, unbiased=False).tolist(),
        "features": stats,
    }


# ----------------------------------------------------------------------------- new images against the record


# what the threshold's distances were measured on (a record from before "reference" names neither)
_REFERENCE_WORDS = {"held-out": "held-out ones do", "training": "the training images themselves do"}


def unlike_reasons(record: dict, colour: bool, side: int | None, distance: float | None, seen_at: int) -> list[str]:
    """Why one image is unlike the training images described by ``record`` (empty: it is like them)."""
    reasons = []
    if colour and record["colour"] <= GREY_TRAINING:
        reasons.append("in colour, the training images grey")
    trained = record.get("side")
    if side is not None and trained:
        if side >= SIZE_RATIO * max(trained, seen_at):  # a blown-up small image is still that image
            reasons.append(f"{side} px on the shorter side, the training images {trained} px")
        elif side * SIZE_RATIO <= trained:
            reasons.append(f"{side} px on the shorter side, the training images {trained} px")
    features = record.get("features")
    if distance is not None and features is not None and distance > features["threshold"]:
        # a limit of 0 (every image the record was measured on had the same features) has no ratio
        farther = f"{distance / features['threshold'] * FEATURE_MARGIN:.1f}x " if features["threshold"] > 0 else ""
        reasons.append(
            f"its features lie {farther}farther from the training "
            f"images' than {_REFERENCE_WORDS.get(features.get('reference'), 'the images its limit was set on do')}"
        )
    return reasons


__all__ = [
    "describe_training_images",
    "unlike_reasons",
    "feature_distance",
    "pooled_features",
    "is_colour",
    "typical_side",
]
