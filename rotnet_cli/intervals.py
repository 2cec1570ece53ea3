"""Honest small numbers: an accuracy on a few images carries its interval and its count.

An accuracy of 71% on 7 images is anything from about 36% to 92%; printed as "71.4%" it
reads as exact. ``wilson_interval`` is the Wilson score interval (good at small n and near
0 or 1, unlike the normal approximation); ``accuracy_text`` says the figure with its count
and, when the interval is wide, the interval.
"""

from __future__ import annotations

import math

Z95 = 1.959964  # two-sided 95%
WIDE = 0.05  # a half-width above this is worth printing (the figure alone would overstate it)
SMALL_VALIDATION = 50  # fewer held-out images than this: the validation accuracy means little
# a validation accuracy surely below chance + LEARNED_LITTLE x (1 - chance) (0.75 for four rotations; the top of
# its interval over held-out images) is a run that learned little of which way is up: the benchmark's faces and
# scans end at 0.95-0.98, its 466 varied objects at 0.38-0.52 (docs/own-folder.md)
LEARNED_LITTLE = 2 / 3


def learned_little(accuracy: float, images: int, rotations: int) -> bool:
    """Whether a validation accuracy on ``images`` held-out images (each at every one of ``rotations``) is surely
    far from knowing which way is up. The interval counts images, not answers: the rotated copies of one image
    are not independent answers (one image at 12.5% of 8 answers proves nothing)."""
    chance = 1 / rotations
    return wilson_interval(accuracy * images, images)[1] < chance + LEARNED_LITTLE * (1 - chance)


def wilson_interval(correct: float, total: int, z: float = Z95) -> tuple[float, float]:
    """(low, high) of the Wilson score interval of correct/total; (0, 1) for no answers."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy_text(accuracy: float, total: int, unit: str = "images") -> str:
    """'71.4% of 28 answers (95% interval 52-85%)', or '94.0% of 1,440 images' when the interval is narrow."""
    low, high = wilson_interval(accuracy * total, total)
    text = f"{100 * accuracy:.1f}% of {total:,} {unit}"
    if (high - low) / 2 > WIDE:
        text += f" (95% interval {100 * low:.0f}-{100 * high:.0f}%)"
    return text


__all__ = ["wilson_interval", "accuracy_text", "learned_little", "SMALL_VALIDATION", "LEARNED_LITTLE"]
