"""What rotation training teaches, as pictures: first-layer filters and attention maps.

- ``draw_filters``: the stem convolution of any timm model (paper Figure 4), one tile per
  output filter, for one or several weights side by side.
- ``draw_attention``: for each image and each rotated copy of it, the attention map of each
  stage, sum over channels of |activation|^p (paper Figures 3 and 6), overlaid on the image.
- ``draw_curves``: loss and rotation accuracy per epoch of a run (needs matplotlib).

torchvision's ``make_grid`` lays tiles out, PIL writes text and PNGs; a small colour lookup
table replaces matplotlib's colour maps, so only ``draw_curves`` needs matplotlib. Library
code: nothing here prints; progress goes to ``progress`` as typed events.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data as data_lib
from . import rundir
from ._version import __version__
from .atomicfiles import atomic_write, make_dir
from .config import MAX_PICTURE_PIXELS, AttentionConfig, CurvesConfig, FiltersConfig
from .errors import ConfigError, DataError, ModelError
from .events import Message, Progress, TaskProgress, ignore
from .models import forward_stages, num_stages, resolve_stages
from .plotting import pyplot
from .rotations import disc_mask, needs_mask, rotate, rotate_all
from .runtime import resolve_device
from .weights import load_weights

TILE_PADDING = 2  # pixels between tiles (make_grid's padding)
PANEL_GAP = 16  # pixels between side-by-side panels
LABEL_BAND = 18  # pixels of text band above a panel or a column
ROW_LABEL_WIDTH = 40  # pixels of text band left of the attention rows
SCALE_BAR = 10  # pixels: height of the attention figure's colour scale
BACKGROUND = 1.0  # white, in [0, 1]
DEFAULT_ROTATIONS = (0.0, 90.0, 180.0, 270.0)  # for weights without a rotation head

# Piecewise-linear colour maps: (position in [0, 1], RGB in [0, 1]) anchors.
COLORMAPS: dict[str, tuple[tuple[float, tuple[float, float, float]], ...]] = {
    "jet": (
        (0.0, (0.0, 0.0, 0.5)),
        (0.125, (0.0, 0.0, 1.0)),
        (0.375, (0.0, 1.0, 1.0)),
        (0.625, (1.0, 1.0, 0.0)),
        (0.875, (1.0, 0.0, 0.0)),
        (1.0, (0.5, 0.0, 0.0)),
    ),
    "inferno": (
        (0.0, (0.0, 0.0, 0.016)),
        (0.25, (0.341, 0.063, 0.431)),
        (0.5, (0.737, 0.216, 0.329)),
        (0.75, (0.976, 0.557, 0.035)),
        (1.0, (0.988, 1.0, 0.643)),
    ),
}


# ----------------------------------------------------------------------------- results


@dataclass
class FilterPanel:
    label: str
    model: str
    layer: str  # the stem convolution's module name
    num_filters: int
    in_channels: int
    kernel: tuple[int, int]
    scale: int
    width: int  # pixels of the tile grid
    height: int


@dataclass
class FiltersResult:
    out: Path
    panels: list[FilterPanel]
    width: int
    height: int

    @property
    def num_filters(self) -> int:
        return sum(p.num_filters for p in self.panels)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "num_filters": self.num_filters,
            "width": self.width,
            "height": self.height,
            "panels": [vars(p) | {"kernel": list(p.kernel)} for p in self.panels],
        }


@dataclass
class AttentionImage:
    source: str
    out: Path
    agreement: list[float]  # per stage: mean correlation between the aligned maps of the rotated copies


@dataclass
class AttentionResult:
    out_dir: Path
    model: str
    rotations: tuple[float, ...]
    stages: list[int]  # 1-based, as on the command line
    powers: list[float]
    aligned: bool
    img_size: int
    images: list[AttentionImage] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    @property
    def mean_agreement(self) -> list[float]:
        """Per stage, the agreement averaged over the images."""
        return [sum(img.agreement[i] for img in self.images) / len(self.images) for i in range(len(self.stages))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "model": self.model,
            "rotations": list(self.rotations),
            "stages": self.stages,
            "powers": self.powers,
            "aligned": self.aligned,
            "img_size": self.img_size,
            "mean_agreement": self.mean_agreement,
            "images": [{"source": i.source, "out": str(i.out), "agreement": i.agreement} for i in self.images],
            "skipped": self.skipped,
        }


@dataclass
class CurvesResult:
    out: Path
    epochs: int
    final: dict[str, Any]
    panels: list[str] = field(default_factory=list)  # what each panel shows, left to right

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), "epochs": self.epochs, "final": self.final, "panels": self.panels}


# ----------------------------------------------------------------------------- shared drawing helpers


def to_pil(image: torch.Tensor):
    """(3, H, W) float in [0, 1] -> PIL RGB image."""
    from PIL import Image

    array = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(array, mode="RGB")


def save_png(image, path: Path) -> Path:
    """Write a PIL image atomically (parent folders made), so a failure leaves no half PNG. Its
    "Software" text says rotnet drew it: --overwrite replaces such pictures and no others."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("Software", f"{rundir.PICTURE_SOFTWARE} {__version__}")
    make_dir(path.parent)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=info))


def check_picture_size(width: int, height: int, option: str, fix: str) -> None:
    """Refuse a picture too large to draw before anything is allocated (PIL's decompression-bomb limit)."""
    if width * height > MAX_PICTURE_PIXELS:
        raise ConfigError(
            f"{option}: the picture would be {width:,} x {height:,} pixels, more than {MAX_PICTURE_PIXELS:,}; {fix}"
        )


def _font():
    from PIL import ImageFont

    return ImageFont.load_default()


def text_width(text: str) -> int:
    left, _, right, _ = _font().getbbox(text)
    return int(math.ceil(right - left))


def with_labels(image, top: list[tuple[int, int, str]], left: list[tuple[int, int, str]] = (), left_width: int = 0):
    """A copy of ``image`` with a LABEL_BAND text band above and ``left_width`` pixels left of it.

    ``top``: (x0, x1, text) centred over image columns x0..x1; ``left``: (y0, y1, text)
    centred beside image rows y0..y1.
    """
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (image.width + left_width, image.height + LABEL_BAND), "white")
    canvas.paste(image, (left_width, LABEL_BAND))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    for x0, x1, text in top:
        draw.text((left_width + (x0 + x1) / 2, LABEL_BAND / 2), text, fill="black", font=font, anchor="mm")
    for y0, y1, text in left:
        draw.text((left_width / 2, LABEL_BAND + (y0 + y1) / 2), text, fill="black", font=font, anchor="mm")
    return canvas


def upscale_nearest(images: torch.Tensor, scale: int) -> torch.Tensor:
    """(..., H, W) -> (..., H*scale, W*scale), every pixel a scale x scale block."""
    return images.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


# ----------------------------------------------------------------------------- filters


def stem_conv(backbone: nn.Module) -> tuple[str, torch.Tensor]:
    """(module name, weight (O, I, kh, kw)) of the model's first convolution.

    timm names it in ``pretrained_cfg['first_conv']`` (a ResNet's conv1, a ViT's
    patch_embed.proj, a ConvNeXt's stem.0); without that, the first Conv2d in module order.
    """
    first = (getattr(backbone, "pretrained_cfg", None) or {}).get("first_conv")
    names = [first] if isinstance(first, str) else list(first or [])
    for name in names:
        try:
            weight = getattr(backbone.get_submodule(name), "weight", None)
        except AttributeError:
            continue
        if isinstance(weight, torch.Tensor) and weight.ndim == 4:
            return name, weight.detach()
    for name, module in backbone.named_modules():
        if isinstance(module, nn.Conv2d):
            return name, module.weight.detach()
    raise ModelError(
        f"{type(backbone).__name__} has no convolution stem to draw (its pretrained_cfg names no first_conv "
        "and it has no Conv2d layer); choose a convolutional or patch-embedding model"
    )


def filter_tiles(weight: torch.Tensor, scale: int) -> torch.Tensor:
    """(O, I, kh, kw) weight -> (O, 3, kh*scale, kw*scale) tiles in [0, 1].

    Each filter is min-max normalised on its own (the paper's Figure 4 does the same), so
    its pattern shows whatever its norm. 3 input channels are drawn as colour; any other
    count as grey, the mean over input channels.
    """
    w = weight.float().cpu()
    if w.shape[1] != 3:
        w = w.mean(dim=1, keepdim=True).expand(-1, 3, -1, -1)
    low = w.amin(dim=(1, 2, 3), keepdim=True)
    high = w.amax(dim=(1, 2, 3), keepdim=True)
    tiles = (w - low) / (high - low).clamp_min(1e-12)
    tiles = torch.where(high > low, tiles, torch.full_like(tiles, 0.5))  # a constant filter is mid-grey
    return upscale_nearest(tiles, scale)


def auto_scale(kernel: tuple[int, int], target: int = 32) -> int:
    """Enlargement that makes a tile about ``target`` pixels (a 7x7 kernel -> 5, 16x16 -> 2)."""
    return max(1, math.ceil(target / max(kernel)))


def grid_size(count: int, kernel: tuple[int, int], scale: int, cols: int) -> tuple[int, int]:
    """(width, height) in pixels of make_grid's grid of ``count`` tiles of ``kernel`` x ``scale``."""
    rows = math.ceil(count / cols)
    return min(cols, count) * (kernel[1] * scale + TILE_PADDING) + TILE_PADDING, rows * (
        kernel[0] * scale + TILE_PADDING
    ) + TILE_PADDING


def largest_scale(count: int, kernel: tuple[int, int], cols: int) -> int:
    """The largest --scale whose grid stays within MAX_PICTURE_PIXELS (at least 1)."""
    low, high = 1, 1 << 20
    while low < high:
        middle = (low + high + 1) // 2
        width, height = grid_size(count, kernel, middle, cols)
        low, high = (middle, high) if width * height <= MAX_PICTURE_PIXELS else (low, middle - 1)
    return low


def filters_picture(backbone: nn.Module, scale: int | None = None, cols: int | None = None):
    """The tile grid of a backbone's stem filters as a PIL image (also what --logger shows every epoch)."""
    from torchvision.utils import make_grid

    _, weight = stem_conv(backbone)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    scale = scale or auto_scale(kernel)
    count = int(weight.shape[0])
    cols = cols or math.ceil(math.sqrt(count))
    width, height = grid_size(count, kernel, scale, cols)
    check_picture_size(width, height, f"--scale {scale}", f"use --scale {largest_scale(count, kernel, cols)} or less")
    return to_pil(make_grid(filter_tiles(weight, scale), nrow=cols, padding=TILE_PADDING, pad_value=BACKGROUND))


def filter_panel(loaded, label: str, scale: int | None, cols: int | None) -> tuple[Any, FilterPanel]:
    """The tile grid of one model's stem filters as a PIL image, and its description."""
    layer, weight = stem_conv(loaded.backbone)
    kernel = (int(weight.shape[2]), int(weight.shape[3]))
    scale = scale or auto_scale(kernel)
    count = int(weight.shape[0])
    image = filters_picture(loaded.backbone, scale, cols)
    panel = FilterPanel(
        label=label,
        model=loaded.model_name,
        layer=layer,
        num_filters=count,
        in_channels=int(weight.shape[1]),
        kernel=kernel,
        scale=scale,
        width=image.width,
        height=image.height,
    )
    return image, panel


def side_by_side(images: list, labels: list[str]):
    """Panels in a row, each with its label centred above it; a panel is widened to fit its label."""
    from PIL import Image

    labelled = []
    for image, label in zip(images, labels):
        width = max(image.width, text_width(label) + 8)
        padded = Image.new("RGB", (width, image.height), "white")
        padded.paste(image, ((width - image.width) // 2, 0))
        labelled.append(with_labels(padded, [(0, width, label)]))
    canvas = Image.new(
        "RGB",
        (sum(p.width for p in labelled) + PANEL_GAP * (len(labelled) - 1), max(p.height for p in labelled)),
        "white",
    )
    x = 0
    for panel in labelled:
        canvas.paste(panel, (x, 0))
        x += panel.width + PANEL_GAP
    return canvas


def draw_filters(config: FiltersConfig, progress: Progress | None = None) -> FiltersResult:
    """One PNG of the stem filters of each weights spec, side by side (labelled when several)."""
    emit = progress or ignore
    out = Path(config.out).expanduser()
    rundir.check_out_file(out, overwrite=config.overwrite)
    labels = list(config.labels) or list(config.weights)
    images, panels = [], []
    for spec, label in zip(config.weights, labels):
        emit(Message(f"loading {spec}"))
        image, panel = filter_panel(load_weights(spec, "cpu"), label, config.scale, config.cols)
        images.append(image)
        panels.append(panel)
    check_picture_size(
        sum(i.width for i in images) + PANEL_GAP * len(images),
        max(i.height for i in images) + LABEL_BAND,
        f"{len(images)} panels",
        "draw fewer weights at once, or a smaller --scale",
    )
    picture = side_by_side(images, labels) if len(images) > 1 or config.labels else images[0]
    out = save_png(picture, out)
    return FiltersResult(out=out, panels=panels, width=picture.width, height=picture.height)


# ----------------------------------------------------------------------------- attention


def colormap_lut(name: str, size: int = 256) -> torch.Tensor:
    """(size, 3) RGB lookup table in [0, 1], linear between the map's anchor colours."""
    anchors = COLORMAPS[name]
    positions = torch.tensor([p for p, _ in anchors])
    colours = torch.tensor([c for _, c in anchors])
    x = torch.linspace(0, 1, size)
    segment = (torch.searchsorted(positions, x, right=True) - 1).clamp(0, len(anchors) - 2)  # (size,)
    t = (x - positions[segment]) / (positions[segment + 1] - positions[segment])
    return torch.lerp(colours[segment], colours[segment + 1], t[:, None])


def apply_colormap(maps: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """(..., H, W) values in [0, 1] -> (..., 3, H, W) colours."""
    index = (
        (maps.nan_to_num(0.0).clamp(0, 1) * (len(lut) - 1)).round().long()
    )  # NaN (a model's inf) -> the lowest colour
    return lut.to(maps.device)[index].movedim(-1, -3)


def default_powers(stage_indices: list[int], total: int) -> list[float]:
    """p = 1, 2, 4 for early, middle and late stages (the paper: conv1 p=1, conv3 p=2, conv5 p=4)."""
    return [float((1, 2, 4)[min(2, 3 * i // total)]) for i in stage_indices]


def normalise_maps(maps: torch.Tensor) -> torch.Tensor:
    """Min-max each (H, W) map of (..., H, W) to [0, 1].

    A flat map (a 1x1 stage, upsampled) becomes 0 rather than its rounding noise stretched
    to full contrast: "flat" is a spread below 1e-4 of the map's largest value.
    """
    low = maps.amin(dim=(-2, -1), keepdim=True)
    high = maps.amax(dim=(-2, -1), keepdim=True)
    spread = high - low
    flat = spread <= 1e-4 * high.abs().clamp_min(1e-12)
    return torch.where(flat, torch.zeros_like(maps), (maps - low) / spread.clamp_min(1e-12))


@torch.no_grad()
def attention_maps(
    backbone: nn.Module,
    images: torch.Tensor,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    stage_indices: list[int],
    powers: list[float],
) -> torch.Tensor:
    """Attention maps of a batch at the images' own size.

    images: (N, 3, S, S) uint8 on the model's device -> (N, L, S, S) float in [0, 1], one map per
    requested stage (0-based ``stage_indices``): sum over channels of |activation|^p,
    upsampled bilinearly from the stage's (h, w) to (S, S), then min-max normalised.
    """
    x = data_lib.normalize(images, mean, std)
    features = forward_stages(backbone, x, stage_indices)  # L x (N, C_i, h_i, w_i)
    size = images.shape[-2:]
    maps = []
    for feature, p in zip(features, powers):
        # |activation| / its largest value per image, in [0, 1]: the power cannot overflow float32
        # (large activations of a random or unnormalised model, to the 4th), and the min-max
        # normalisation below does not see the scale
        magnitude = feature.float().abs()
        magnitude = magnitude / magnitude.amax(dim=(1, 2, 3), keepdim=True).clamp_min(1e-30)
        energy = magnitude.pow(p).sum(dim=1, keepdim=True)  # (N, 1, h, w)
        maps.append(F.interpolate(energy, size=size, mode="bilinear", align_corners=False)[:, 0])
    return normalise_maps(torch.stack(maps, dim=1))


def rotate_back(copies: torch.Tensor, angles: tuple[float, ...]) -> torch.Tensor:
    """Undo each copy's rotation: (R, ..., H, W) with copy r turned by angles[r] -> all upright."""
    flat = copies.reshape(copies.shape[0], -1, *copies.shape[-2:])  # (R, K, H, W)
    upright = torch.stack([rotate(flat[r : r + 1], (360.0 - a) % 360.0)[0] for r, a in enumerate(angles)])
    return upright.reshape(copies.shape)


def agreement(aligned: torch.Tensor, mask: torch.Tensor | None = None) -> list[float]:
    """Per stage, the mean Pearson correlation over all pairs of rotated copies.

    aligned: (R, L, H, W) maps, all rotated back upright; mask: (H, W) bool of the pixels to
    compare (the disc for interpolated angles). 1 means the copies attend to the same parts.
    """
    r = aligned.shape[0]
    values = aligned.flatten(-2) if mask is None else aligned[..., mask]  # (R, L, P)
    centred = values - values.mean(dim=-1, keepdim=True)
    unit = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    corr = torch.einsum("ilp,jlp->lij", unit, unit)  # (L, R, R)
    pairs = torch.triu_indices(r, r, offset=1)
    return corr[:, pairs[0], pairs[1]].mean(dim=1).tolist()


def overlay(images: torch.Tensor, maps: torch.Tensor, lut: torch.Tensor, alpha: float) -> torch.Tensor:
    """images (R, 3, S, S) uint8, maps (R, L, S, S) -> (R, L, 3, S, S) colour maps blended on the images."""
    base = images.float().div(255)[:, None]  # (R, 1, 3, S, S)
    return (1 - alpha) * base + alpha * apply_colormap(maps, lut)


def collect_images(inputs: tuple[str, ...]) -> list[Path]:
    """Image files given directly or found in folders (recursively), in the given order."""
    return [path for path, _ in data_lib.image_inputs(inputs)]  # never empty: AttentionConfig requires inputs


def unique_names(paths: list[Path]) -> list[str]:
    """'cat.png' for each path; a repeated name gets '-2', '-3' ... so no picture overwrites another."""
    used: set[str] = set()
    names = []
    for path in paths:
        name, number = f"{path.stem}.png", 1
        while name in used:
            number += 1
            name = f"{path.stem}-{number}.png"
        used.add(name)
        names.append(name)
    return names


def attention_figure(
    rows: torch.Tensor, scale: int, column_labels: list[str], row_labels: list[str], lut: torch.Tensor
):
    """rows (R, 1 + L, 3, S, S) -> PIL image: a row per rotated copy, labelled columns and rows,
    and the colour scale of the maps below."""
    from torchvision.utils import make_grid

    tiles = upscale_nearest(rows.flatten(0, 1), scale)
    grid = to_pil(make_grid(tiles, nrow=rows.shape[1], padding=TILE_PADDING, pad_value=BACKGROUND))
    step_x = tiles.shape[-1] + TILE_PADDING
    step_y = tiles.shape[-2] + TILE_PADDING
    top = [(i * step_x + TILE_PADDING, (i + 1) * step_x, text) for i, text in enumerate(column_labels)]
    left = [(i * step_y + TILE_PADDING, (i + 1) * step_y, text) for i, text in enumerate(row_labels)]
    return with_colour_scale(with_labels(grid, top, left, ROW_LABEL_WIDTH), lut, x0=ROW_LABEL_WIDTH + step_x)


def with_colour_scale(image, lut: torch.Tensor, x0: int):
    """A copy of ``image`` with the colour map as a bar under its columns from ``x0`` on, labelled
    as the maps are scaled: each map from its own lowest (0) to its highest (1) attention."""
    from PIL import Image, ImageDraw

    width = max(1, image.width - x0 - TILE_PADDING)
    ramp = torch.linspace(0, 1, width).expand(SCALE_BAR, width)  # (SCALE_BAR, width)
    canvas = Image.new("RGB", (image.width, image.height + SCALE_BAR + LABEL_BAND), "white")
    canvas.paste(image, (0, 0))
    canvas.paste(to_pil(apply_colormap(ramp, lut)), (x0, image.height))
    draw = ImageDraw.Draw(canvas)
    y = image.height + SCALE_BAR + LABEL_BAND / 2
    draw.text((x0, y), "0", fill="black", font=_font(), anchor="lm")
    draw.text(
        (x0 + width / 2, y),
        "attention, each map from its lowest to its highest",
        fill="black",
        font=_font(),
        anchor="mm",
    )
    draw.text((x0 + width, y), "1", fill="black", font=_font(), anchor="rm")
    return canvas


def draw_attention(config: AttentionConfig, progress: Progress | None = None) -> AttentionResult:
    """For every image: a PNG with a row per rotated copy and a column per stage's attention map."""
    emit = progress or ignore
    out_dir = Path(config.out).expanduser()
    paths = collect_images(config.images)
    names = unique_names(paths)
    # a folder that is not empty needs --overwrite, which replaces only pictures rotnet drew
    rundir.check_out_dir(out_dir, overwrite=config.overwrite, overwrite_does="write into it", replaces=names)
    device = resolve_device(config.device)
    loaded = load_weights(config.weights, device)
    rotations = config.rotations or loaded.rotations or DEFAULT_ROTATIONS
    img_size = config.img_size or loaded.img_size
    total = num_stages(loaded.backbone)
    stages = [s - 1 for s in resolve_stages(config.layers, total)]  # 0-based, as timm counts
    powers = [config.power] * len(stages) if config.power is not None else default_powers(stages, total)
    scale = config.scale or max(1, math.ceil(128 / img_size))
    lut = colormap_lut(config.cmap)
    mask = disc_mask(img_size, img_size)[0, 0].bool() if needs_mask(rotations) else None
    columns = ["input"] + [f"stage {i + 1} p={p:g}" for i, p in zip(stages, powers)]
    rows_text = [f"{a:g}°" for a in rotations]
    tile = img_size * scale + TILE_PADDING
    check_picture_size(
        ROW_LABEL_WIDTH + len(columns) * tile + TILE_PADDING,
        LABEL_BAND + len(rotations) * tile + TILE_PADDING,
        f"--scale {scale} at {img_size} px",
        "use a smaller --scale or --img-size, or fewer --layers",
    )

    result = AttentionResult(
        out_dir=out_dir,
        model=loaded.model_name,
        rotations=rotations,
        stages=[i + 1 for i in stages],
        powers=powers,
        aligned=config.align,
        img_size=img_size,
    )
    for done, (path, name) in enumerate(zip(paths, names)):
        emit(TaskProgress("attention", "attention maps", done, len(paths)))
        try:
            image = data_lib.decode_file(path, img_size)  # (3, S, S) uint8
        except Exception as e:  # PIL raises many types for broken files
            result.skipped.append(f"{path} ({type(e).__name__})")
            continue
        copies, _ = rotate_all(image[None].to(device), rotations)  # (R, 3, S, S), masked for odd angles
        try:
            maps = attention_maps(
                loaded.backbone, copies, loaded.mean, loaded.std, stages, powers
            ).cpu()  # (R, L, S, S)
        except (RuntimeError, AssertionError) as e:  # timm asserts the input size of fixed-size models (ViTs)
            raise ModelError(
                f"{loaded.model_name} could not run on {img_size}x{img_size} images ({str(e).splitlines()[0][:160]}); "
                "leave --img-size out to use the size its weights were trained at"
            ) from e
        copies = copies.cpu()
        aligned_maps = rotate_back(maps, rotations)
        if config.align:  # show every row upright: the input and its maps, rotated back
            copies, maps = rotate_back(copies, rotations), aligned_maps
        rows = torch.cat([copies.float().div(255)[:, None], overlay(copies, maps, lut, config.alpha)], dim=1)
        figure = attention_figure(rows, scale, columns, rows_text, lut)
        out = save_png(figure, out_dir / name)
        result.images.append(AttentionImage(source=str(path), out=out, agreement=agreement(aligned_maps, mask)))
    if not result.images:
        raise DataError(f"none of the {len(paths)} images could be read (e.g. {result.skipped[0]})")
    emit(TaskProgress("attention", "attention maps", len(paths), len(paths)))
    return result


# ----------------------------------------------------------------------------- curves


def read_metrics(run: str) -> tuple[Path, list[dict[str, Any]]]:
    """(run directory, rows of metrics.jsonl): RUN is a run directory or its metrics.jsonl."""
    path = Path(run).expanduser()
    rows = rundir.read_metrics(path)
    if not rows:
        raise DataError(f"{path} holds no epochs yet; draw the curves after the first epoch has finished")
    return (path if path.is_dir() else path.parent), rows


def draw_curves(config: CurvesConfig, progress: Progress | None = None) -> CurvesResult:
    """Loss and rotation accuracy per epoch (training and validation) as one PNG; with --eval-data, a panel
    per evaluation head (knn, linear) with a line per stage, at the epochs that were evaluated."""
    rundir.check_out_file(Path(config.out).expanduser(), overwrite=config.overwrite)
    run_dir, rows = read_metrics(config.run)
    plt = pyplot("rotnet viz curves")

    def figure_of(value) -> Callable[[dict], float | None]:
        return value if callable(value) else (lambda row: row.get(value))

    def stage_of(head: str, stage: str) -> Callable[[dict], float | None]:
        return lambda row: ((row.get("eval") or {}).get(head) or {}).get(stage)

    panels = [
        ("loss", "rotation loss (cross-entropy)", 1.0, [("training", "loss"), ("validation", "val_loss")]),
        ("rotation accuracy", "rotation accuracy (%)", 100.0, [("training", "rot_acc"), ("validation", "val_rot_acc")]),
    ]
    for head in dict.fromkeys(head for row in rows for head in (row.get("eval") or {})):
        stages = sorted({stage for row in rows for stage in ((row.get("eval") or {}).get(head) or {})}, key=int)
        panels.append(
            (
                f"{head} accuracy",
                f"{head} accuracy on --eval-data (%)",
                100.0,
                [(f"stage {stage}", stage_of(head, stage)) for stage in stages],
            )
        )
    figure, all_axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), layout="constrained")
    for axes, (_, ylabel, factor, lines) in zip(all_axes, panels):
        for name, value in lines:
            points = [(row["epoch"], figure_of(value)(row)) for row in rows]
            points = [(epoch, v * factor) for epoch, v in points if v is not None]  # epochs that measured it
            if points:
                axes.plot([e for e, _ in points], [v for _, v in points], marker="o", label=name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
        axes.set_ylabel(ylabel)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(f"RotNet pretraining: {run_dir.name}")
    out = Path(config.out).expanduser()
    try:
        make_dir(out.parent)
        software = {"Software": f"{rundir.PICTURE_SOFTWARE} {__version__}"}  # how --overwrite knows rotnet drew it
        atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100, metadata=software))
    finally:
        plt.close(figure)
    return CurvesResult(out=out, epochs=len(rows), final=rows[-1], panels=[title for title, *_ in panels])


__all__ = [
    "draw_filters",
    "draw_attention",
    "draw_curves",
    "attention_maps",
    "stem_conv",
    "filter_tiles",
    "filters_picture",
    "colormap_lut",
    "FiltersResult",
    "FilterPanel",
    "AttentionResult",
    "AttentionImage",
    "CurvesResult",
]
