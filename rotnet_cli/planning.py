"""The data plan: what a run's image size, batch, epochs and augmentation are, decided from the data.

A folder of 70 face crops and a folder of a million photos need different runs; the user gives
neither size nor batch nor epochs in the bare ``rotnet pretrain --data DIR``. Before training,
rotnet looks at the data (``DataFacts``: how many images, their sizes, grey or colour, how much
of them is ink on paper), at what the model takes (``ModelFacts``) and at the options the user
gave, and makes a frozen ``Plan``: each value with a one-line reason. Every option the user gave
wins. The functions here are pure (no files, no printing): pretraining.py gathers the facts
(data.py measures the pixels), prints the plan's lines and records ``Plan.to_dict()`` in
config.json's ``resolved.plan``.

The rules, and what they were measured on (benchmarks/own_folder.py, docs/own-folder.md):
- image size: the images' own size (the median of their shorter sides, which decoding resizes to),
  rounded up to a multiple of 8 and at least MIN_SIZE; never above the model's own size (timm's
  input size for it: 224 px for resnet18, today's size for large photos on a GPU); on a CPU never
  above CPU_MAX_SIZE (an epoch of 224 px images costs 12x one of 64 px). A model with a fixed input
  size gets that size. Built-in datasets keep their size (digits, CIFAR: 32 px).
- batch: today's 128 where the data has at least MIN_STEPS_PER_EPOCH such batches; a smaller
  folder gets the largest power of two that still makes that many steps per epoch, at least
  MIN_BATCH (and at most the number of images): a small folder trains, never an error.
- epochs: enough for STEP_BUDGET optimizer steps, at least MIN_EPOCHS (today's 10, which large
  folders keep), at most MAX_EPOCHS: 63 images in batches of 16 get 125 epochs, as many steps
  as the digits demo takes.
- every image every epoch: the last, partial batch of an epoch is trained on, not dropped.
- augmentation (--augment auto): characters and scans (grey, most pixels paper or ink) are
  shifted by up to 1/16 of the side, never mirrored (a mirrored character is no character; the
  paper's 1/8 crop cuts strokes off; no augmentation over-fits the 1,617 demo digits: 0.947
  against shift's 0.953, and features below random weights on one label draw); other grey images
  (faces, grey photos) are cropped, not mirrored; colour photos are cropped and mirrored (the
  paper's); colour images of ink on paper are cropped, not mirrored.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .config import counted

MIN_SIZE = 32  # px: below it the ResNets' stride-32 stages have nothing left to see (the demo's size)
CPU_MAX_SIZE = 64  # px: on a CPU, larger images are shrunk to this by default (pretraining.CPU_COMFORTABLE_SIZE)
DEFAULT_BATCH = 128  # today's default, the paper's: large folders keep it
MIN_BATCH = 16
MIN_STEPS_PER_EPOCH = 32  # a smaller batch is chosen until an epoch has this many steps
STEP_BUDGET = 500  # optimizer steps a run gets at least (digits at batch 32: 51 steps x 10 epochs)
MIN_EPOCHS = 10  # today's default: large folders keep it
MAX_EPOCHS = 300  # a handful of images: no more than this many passes
INK_SHARE = 0.55  # share of pixels at the ends of an image's own range above which it looks like ink on paper
CONTENT_SIZE = 256  # px: larger images are looked at shrunk to this (data.sample_images decodes files at it)
GREY_SPREAD = 4.0  # mean max-min over R, G, B (0..255) below which images count as grey (JPEG noise)
AUGMENT_BY_SOURCE = {"svhn": ("crop", "svhn holds pictures of house numbers: digits are not mirrored")}


@dataclass(frozen=True)
class Decision:
    """One planned value and why: ``why`` is one line a user reads ("asked for" when they gave it)."""

    value: Any
    why: str


@dataclass(frozen=True)
class ImageSizes:
    """The pixel sizes of a sample of the images: the shorter side of each."""

    sides: tuple[int, ...]

    @property
    def median(self) -> int:
        ordered = sorted(self.sides)
        return ordered[len(ordered) // 2]

    def describe(self) -> str:
        low, high = min(self.sides), max(self.sides)
        return f"{low} px" if low == high else f"{low}-{high} px (median {self.median})"


@dataclass(frozen=True)
class Content:
    """What a sample of the decoded images looks like."""

    colour_spread: float  # mean over pixels of max - min over R, G, B (0 for grey images)
    ink_share: float  # mean share of pixels in the outer fifths of each image's own 1-99% range

    @property
    def grey(self) -> bool:
        return self.colour_spread < GREY_SPREAD

    @property
    def ink_on_paper(self) -> bool:
        return self.ink_share >= INK_SHARE


@dataclass(frozen=True)
class ModelFacts:
    name: str
    default_size: int  # timm's input size for it
    fixed_size: bool  # it runs on that size only


@dataclass(frozen=True)
class Plan:
    img_size: Decision
    batch_size: Decision
    epochs: Decision
    augment: Decision
    partial_batch: Decision  # "kept": the last batch of an epoch is smaller and trained on ("capped": a step cap)

    def values(self) -> dict[str, Any]:
        """The config fields the plan sets (img_size, batch_size, epochs, augment)."""
        return {name: getattr(self, name).value for name in ("img_size", "batch_size", "epochs", "augment")}

    def to_dict(self) -> dict[str, dict]:
        """config.json's resolved.plan: name -> {"value", "why"}."""
        return {name: asdict(decision) for name, decision in self.__dict__.items()}

    def lines(self) -> list[str]:
        """The block printed before training: one line per value."""
        names = {"img_size": "image size", "batch_size": "batch", "epochs": "epochs", "augment": "augmentation"}
        shown = [f"  {label:<13}{_shown(name, self)}  ({getattr(self, name).why})" for name, label in names.items()]
        return ["data plan (every option you give wins):", *shown, f"  {'every image':<13}{self.partial_batch.why}"]


def _shown(name: str, plan: Plan) -> str:
    value = getattr(plan, name).value
    return f"{value} px" if name == "img_size" else str(value)


# ----------------------------------------------------------------------------- the decisions


def plan_image_size(
    given: int | None, model: ModelFacts, device_type: str, native: int | None, sizes: ImageSizes | None
) -> Decision:
    """The input size: --img-size, else the model's fixed size, else the data's own (see the module docstring).
    ``native``: a built-in dataset's size; ``sizes``: a folder's measured sizes (None when unknown)."""
    if given is not None:
        return Decision(given, "asked for")
    if model.fixed_size:
        return Decision(model.default_size, f"{model.name} takes only {model.default_size} px")
    if native is not None:
        return Decision(native, "the dataset's own size")
    if sizes is None or not sizes.sides:  # no header read: the model's own size
        if device_type == "cpu" and model.default_size > CPU_MAX_SIZE:
            return Decision(
                CPU_MAX_SIZE, f"{CPU_MAX_SIZE} px keeps a CPU run short (--img-size {model.default_size} for more)"
            )
        return Decision(model.default_size, f"the model's own size ({model.name})")
    own = sizes.median
    size = max(MIN_SIZE, 8 * math.ceil(own / 8))
    why = f"the images are {sizes.describe()}"
    if device_type == "cpu" and min(size, model.default_size) > CPU_MAX_SIZE:
        larger = min(size, model.default_size)
        return Decision(CPU_MAX_SIZE, f"{why}; {CPU_MAX_SIZE} px keeps a CPU run short (--img-size {larger} for more)")
    if size > model.default_size:
        return Decision(model.default_size, f"{why}; the model's own size ({model.name})")
    if own < MIN_SIZE:
        return Decision(size, f"{why}; {MIN_SIZE} px, the smallest the model's stages see well")
    return Decision(size, why if size == own else f"{why}, rounded up to a multiple of 8")


def plan_batch_size(given: int | None, images: int, world_size: int = 1) -> Decision:
    """--batch-size, else today's 128 where it makes MIN_STEPS_PER_EPOCH steps, else smaller (a multiple of the processes)."""
    if given is not None:
        return Decision(given, "asked for")
    # batches, not steps: --accum-steps and --max-steps-per-epoch change the steps (the epochs line says them)
    steps = f"{MIN_STEPS_PER_EPOCH} batches"
    if images >= DEFAULT_BATCH * MIN_STEPS_PER_EPOCH:
        return Decision(DEFAULT_BATCH, f"{images} training images make at least {steps}")
    batch = DEFAULT_BATCH
    while batch > MIN_BATCH and images < batch * MIN_STEPS_PER_EPOCH:
        batch //= 2
    if images <= batch:
        why = f"all {images} training images in one batch" if images > 1 else "the one training image is the batch"
        batch = images
    elif batch > MIN_BATCH:
        why = f"{images} training images: at least {steps}"
    else:
        why = f"{images} training images make {counted(math.ceil(images / batch), 'batch')}"
    return Decision(max(world_size, batch - batch % world_size), why)


def plan_epochs(
    given: int | None,
    images: int,
    batch_size: int,
    world_size: int = 1,
    accum_steps: int = 1,
    max_steps_per_epoch: int | None = None,
) -> Decision:
    """--epochs, else enough for STEP_BUDGET optimizer steps, between MIN_EPOCHS and MAX_EPOCHS. A step is
    an optimizer step, as training counts it: ``accum_steps`` batches, at most ``max_steps_per_epoch``."""
    batches = images // world_size / max(1, batch_size // world_size)
    steps = max(1, math.ceil(batches / accum_steps))
    if max_steps_per_epoch:
        steps = min(steps, max_steps_per_epoch)
    per_epoch = f"{counted(steps, 'step')} per epoch"
    if given is not None:
        return Decision(given, f"asked for: {counted(given * steps, 'step')}")
    epochs = min(MAX_EPOCHS, max(MIN_EPOCHS, math.ceil(STEP_BUDGET / steps)))
    if epochs == MIN_EPOCHS:
        return Decision(epochs, f"{per_epoch}, {epochs * steps} in all")
    if epochs * steps < STEP_BUDGET:  # held at MAX_EPOCHS: the budget is not met, and the reason says so
        return Decision(
            epochs, f"{per_epoch}, {epochs * steps} in all: at most {MAX_EPOCHS} epochs, short of {STEP_BUDGET} steps"
        )
    return Decision(epochs, f"{per_epoch}, {epochs * steps} in all: a budget of at least {STEP_BUDGET}")


def larger_sizes(size: int, own: int) -> list[int]:
    """Sizes to try, smallest first, for a model that cannot run on ``size``: about 1.5x apart (multiples
    of 8), below ``own`` (the model's own size, tried last by the caller)."""
    sizes, step = [], size
    while True:
        step = 8 * math.ceil(step * 1.5 / 8)
        if step >= own:
            return sizes
        sizes.append(step)


def plan_augment(given: str, content: Content | None, source: str | None = None) -> Decision:
    """--augment, else decided by what the images are (see the module docstring)."""
    if given != "auto":
        return Decision(given, "asked for")
    if source in AUGMENT_BY_SOURCE:
        return Decision(*AUGMENT_BY_SOURCE[source])
    if content is None:  # nothing readable to look at: training itself will say so
        return Decision("none", "no image could be looked at")
    ink = f"{100 * content.ink_share:.0f}% of pixels paper or ink"
    if content.grey and content.ink_on_paper:
        return Decision("shift", f"grey, {ink}: like scans and digits, shifted a little, never mirrored")
    if content.ink_on_paper:
        return Decision("crop", f"colour, {ink}: cropped, not mirrored (it may hold writing)")
    if content.grey:
        return Decision("crop", f"grey, {ink}: like faces and grey photos, cropped, not mirrored")
    return Decision("crop+flip", f"colour photos ({ink}): cropped and mirrored, as in the paper")


def plan_partial_batch(
    images: int, batch_size: int, world_size: int = 1, accum_steps: int = 1, max_steps_per_epoch: int | None = None
) -> Decision:
    """The last batch of an epoch is trained on; what a torchrun split leaves over is said, and so is an
    epoch that --max-steps-per-epoch ends before every image came (an optimizer step takes ``accum_steps``
    batches, as training counts it)."""
    per_rank = images // world_size
    per_step = max(1, batch_size // world_size) * accum_steps  # images a step takes on one process
    over = images - per_rank * world_size
    if max_steps_per_epoch and max_steps_per_epoch * per_step < per_rank:
        seen = max_steps_per_epoch * per_step * world_size
        return Decision(
            "capped",
            f"{seen} of {images} each epoch (--max-steps-per-epoch {max_steps_per_epoch}); "
            "each epoch's order brings others",
        )
    left = per_rank % per_step
    why = "all of them each epoch" if not left else f"all of them each epoch (the last batch holds {left * world_size})"
    if over:
        why += f"; {over} left over by the {world_size} processes wait for the next epoch's order"
    return Decision("kept", why)


def make_plan(
    *,
    images: int,
    content: Content | None,
    img_size: Decision,
    batch_size: int | None,
    epochs: int | None,
    augment: str,
    source: str | None = None,
    world_size: int = 1,
    accum_steps: int = 1,
    max_steps_per_epoch: int | None = None,
) -> Plan:
    """The whole plan, once the training images are known (``img_size`` was planned before decoding them)."""
    batch = plan_batch_size(batch_size, images, world_size)
    return Plan(
        img_size=img_size,
        batch_size=batch,
        epochs=plan_epochs(epochs, images, batch.value, world_size, accum_steps, max_steps_per_epoch),
        augment=plan_augment(augment, content, source),
        partial_batch=plan_partial_batch(images, batch.value, world_size, accum_steps, max_steps_per_epoch),
    )


# ----------------------------------------------------------------------------- measuring pixels


def measure_content(sample: torch.Tensor) -> Content:
    """Content of uint8 images (n, 3, S, S): colour spread and the share of pixels that are paper or ink.
    Images larger than CONTENT_SIZE are looked at shrunk to it, one at a time (floats at full size cost
    4x the sample's own memory)."""
    if sample.shape[-1] > CONTENT_SIZE or sample.shape[-2] > CONTENT_SIZE:
        shrunk = [F.interpolate(image[None].float(), size=CONTENT_SIZE, mode="area") for image in sample]
        sample = torch.cat(shrunk).round().to(torch.uint8)
    pixels = sample.float()
    spread = (pixels.amax(1) - pixels.amin(1)).mean().item()
    grey = pixels.mean(1).flatten(1)  # (n, S*S)
    low = torch.quantile(grey, 0.01, dim=1, keepdim=True)
    high = torch.quantile(grey, 0.99, dim=1, keepdim=True)
    scaled = ((grey - low) / (high - low).clamp_min(1.0)).clamp(0, 1)
    flat = (high - low).squeeze(1) < 1.0  # a blank image: all paper
    ends = ((scaled < 0.2) | (scaled > 0.8)).float().mean(1)
    ends = torch.where(flat, torch.ones_like(ends), ends)
    return Content(colour_spread=spread, ink_share=ends.mean().item())
