"""The RotNet pretext task: rotate a batch on its own device and label each copy.

Pure tensor functions with explicit randomness; nothing here knows about data loading.
Angles are in degrees, counter-clockwise (``torch.rot90``'s direction for dims (H, W)).
The label of a copy is the index of its angle in the rotation set.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F


def is_exact(angle: float) -> bool:
    """Multiples of 90 degrees are flips and transposes: no interpolation."""
    return float(angle) % 90 == 0


def needs_mask(angles: tuple[float, ...]) -> bool:
    """Any angle that is not a multiple of 90 leaves empty corners, which give the answer away."""
    return not all(is_exact(a) for a in angles)


def disc_mask(height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """(1, 1, H, W) float mask: 1 inside the centred disc that fits the image, 0 outside.

    Every copy, the 0-degree one included, is multiplied by the same mask, so the corners
    carry no cue about the rotation.
    """
    ys = torch.arange(height, device=device, dtype=torch.float32) - (height - 1) / 2
    xs = torch.arange(width, device=device, dtype=torch.float32) - (width - 1) / 2
    radius = min(height, width) / 2
    inside = (ys[:, None] ** 2 + xs[None, :] ** 2) <= radius**2
    return inside.to(torch.float32)[None, None]


@functools.lru_cache(maxsize=16)
def _cached_mask(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """disc_mask made once per size, device and dtype for the training step (read-only, shared)."""
    return disc_mask(height, width, device).to(dtype)


def rotate(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Rotate a (N, C, H, W) batch counter-clockwise by ``angle`` degrees.

    Multiples of 90 use ``torch.rot90`` (exact); any other angle is resampled bilinearly.
    A turn by 0 returns ``images`` itself (torch.rot90 would copy it).
    """
    if is_exact(angle):
        k = int(angle // 90) % 4
        return images if k == 0 else torch.rot90(images, k=k, dims=(2, 3))
    return rotate_resampled(images, angle)


def rotate_resampled(images: torch.Tensor, angle: float) -> torch.Tensor:
    """Bilinear rotation about the centre with ``affine_grid``/``grid_sample`` (zeros outside).

    One batched op for the whole batch; used for angles that are not multiples of 90.
    """
    n, c, h, w = images.shape
    source = images if images.is_floating_point() else images.float()
    matrix = _sampling_matrix(float(angle), h, w, source.dtype, images.device)  # (2, 3)
    grid = F.affine_grid(matrix.expand(n, 2, 3), [n, c, h, w], align_corners=False)
    out = F.grid_sample(source, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out if images.is_floating_point() else out.round().clamp(0, 255).to(images.dtype)


@functools.lru_cache(maxsize=64)
def _sampling_matrix(angle: float, h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The (2, 3) affine_grid matrix of a turn, made once per angle, size and device: building it
    from Python numbers on a GPU is a copy that waits for the GPU (a sync every step)."""
    theta = math.radians(angle)
    cos, sin = math.cos(theta), math.sin(theta)
    # affine_grid maps each output pixel to the input pixel it samples, in normalised
    # [-1, 1] (x right, y down) coordinates. A counter-clockwise turn on screen samples
    # the input at R(-angle) in the y-down frame: [[cos, -sin], [sin, cos]], with the
    # aspect ratio folded in for non-square images.
    return torch.tensor([[cos, -sin * h / w, 0.0], [sin * w / h, cos, 0.0]], dtype=dtype).to(device)


def rotate_all(images: torch.Tensor, angles: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """All R rotated copies of every image, as in the paper.

    images: (N, C, H, W) -> copies (R*N, C, H, W) rotation-major (copy r of image i is at
    r*N + i), labels (R*N,) int64 on the same device (made once per shape and shared
    between calls: read them, do not modify them in place). Square images keep their shape for
    every angle; for other angles the output is masked with the same centred disc.
    """
    copies = torch.cat([rotate(images, a) for a in angles], dim=0)
    labels = _copy_labels(len(angles), images.shape[0], images.device)
    if needs_mask(angles):
        copies = copies * _cached_mask(*copies.shape[-2:], images.device, copies.dtype)
    return copies, labels


@functools.lru_cache(maxsize=16)
def _copy_labels(num_rotations: int, n: int, device: torch.device) -> torch.Tensor:
    """(R*N,) labels 0..0, 1..1, ...: the same every step, so made once (read-only, shared)."""
    return torch.arange(num_rotations, device=device).repeat_interleave(n)


def rotate_one(
    images: torch.Tensor, angles: tuple[float, ...], generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One rotation per image, sampled uniformly from the set.

    images: (N, C, H, W) -> (N, C, H, W), labels (N,). All R rotations are computed and the
    sampled one is gathered with tensor indexing, so nothing waits on the host (boolean
    masks would force a device sync to learn their sizes).
    """
    n = images.shape[0]
    labels = torch.randint(len(angles), (n,), generator=generator, device=images.device)
    stacked = torch.stack([rotate(images, a) for a in angles], dim=0)  # (R, N, C, H, W)
    chosen = stacked[labels, torch.arange(n, device=images.device)]
    if needs_mask(angles):
        chosen = chosen * _cached_mask(*chosen.shape[-2:], images.device, chosen.dtype)
    return chosen, labels


def make_rotation_batch(
    images: torch.Tensor, angles: tuple[float, ...], copies: str = "all", generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training batch of the pretext task: ``copies`` is 'all' or 'one'."""
    if copies == "all":
        return rotate_all(images, angles)
    return rotate_one(images, angles, generator)
