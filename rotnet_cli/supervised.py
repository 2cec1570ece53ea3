"""A network trained from scratch on the labels: the frame that gives a probe's number its meaning.

Table 3 of the paper puts RotNet's probes beside the same kind of network trained with the
labels ("Supervised NIN", 92.80% on CIFAR-10). ``train_supervised(config, progress)`` trains it
as the official code's config/CIFAR10_supervised_NIN.py does (see ``SupervisedConfig``): the
model's classifier is timm's (``reset_classifier``), the optimiser and the per-epoch lr steps
are the probe heads' (``head_training.make_head_optimizer``, ``head_training.head_lr``), the images are
randomly cropped and flipped on the device, and the validation images are evaluated after
every epoch, so the result holds the last epoch (honest) and the best one (chosen on the
validation images, as the official code's logs allow).

The result is written to ``out/supervised.json`` and reused, not trained again, when a later
call asks for the same setting. It never prints: progress goes through ``progress(kind, info)``.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as data_lib
from . import jsontext
from ._version import __version__
from .atomicfiles import write_json
from .config import SupervisedConfig, json_safe
from .errors import OutputError
from .events import DeviceChosen, Message, Progress, TaskProgress, ignore
from .features import labelled_splits
from .head_training import head_lr, make_head_optimizer
from .heads import HeadRecipe
from .models import create_backbone, data_config
from .runtime import autocast, configure_backends, describe_device, resolve_device, resolve_precision, seed_everything

SUPERVISED_FILE = "supervised.json"
SUPERVISED_FORMAT = "rotnet-supervised"
# SupervisedConfig fields that do not change what is measured
RUN_OPTIONS = ("data_dir", "download", "device", "workers", "out")


@dataclass
class SupervisedResult:
    model: str
    data: str
    img_size: int
    epochs: int
    accuracy: float  # top-1 on the validation images after the last epoch, in [0, 1]
    best_accuracy: float
    best_epoch: int  # 1-based
    train_images: int
    val_images: int
    device: str
    precision: str
    seconds: float
    setting: dict = field(default_factory=dict)
    saved_to: str | None = None
    reused: bool = False

    def to_dict(self) -> dict:
        return {
            "format": SUPERVISED_FORMAT,
            **asdict(self),
            "rotnet_version": __version__,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def setting(cfg: SupervisedConfig) -> dict:
    """What decides the numbers of a supervised run (a saved result is reused only for the same setting)."""
    return json_safe({k: v for k, v in cfg.to_dict().items() if k not in RUN_OPTIONS})


def saved_result(cfg: SupervisedConfig) -> SupervisedResult | None:
    """The result saved in ``cfg.out`` for this setting, None when there is none; another setting is an error."""
    path = Path(cfg.out) / SUPERVISED_FILE if cfg.out else None
    if path is None or not path.is_file():
        return None
    try:
        saved = jsontext.loads(path.read_text())
        names = set(SupervisedResult.__dataclass_fields__)
        result = SupervisedResult(**{k: v for k, v in saved.items() if k in names})
    except (OSError, ValueError, TypeError) as e:
        raise OutputError(
            f"{path} is not a readable supervised result ({str(e).splitlines()[0][:80]}); move it away"
        ) from None
    if result.setting != setting(cfg):
        raise OutputError(f"{path} holds a supervised result of other settings; give another --out, or move it away")
    result.reused = True
    return result


def train_supervised(cfg: SupervisedConfig, progress: Progress | None = None) -> SupervisedResult:
    """Train ``cfg.model`` with a fresh classifier on the labels of ``cfg.data``; see the module docstring."""
    emit = progress or ignore
    reused = saved_result(cfg)
    if reused is not None:
        emit(Message(f"supervised {cfg.model}: reusing {Path(cfg.out) / SUPERVISED_FILE}"))
        return reused
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    seed_everything(cfg.seed)
    emit(DeviceChosen(describe_device(device), precision))

    # -- model: timm's own classifier on the headless backbone
    img_size = cfg.img_size or data_lib.native_size(cfg.data)
    model = create_backbone(cfg.model, img_size=img_size)
    dcfg = data_config(model)
    img_size = img_size or int(dcfg["input_size"][-1])
    mean, std = tuple(dcfg["mean"]), tuple(dcfg["std"])
    train_set, val_set, num_classes, _ = labelled_splits(cfg, img_size, emit)
    model.reset_classifier(num_classes)
    model.to(device)

    # -- the official schedule: lr x gamma after each milestone epoch, SGD Nesterov on every parameter
    recipe = HeadRecipe("sgd", cfg.lr, cfg.weight_decay, cfg.epochs, "step", cfg.milestones, cfg.gamma)
    optimizer = make_head_optimizer(model.parameters(), recipe, device)
    n = len(train_set)
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = data_lib.num_batches(n, batch_size, drop_last=False)
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    padding = max(1, img_size // 8)  # RandomCrop(32, padding=4) at 32 px
    emit(
        Message(
            f"supervised {cfg.model} at {img_size} px: {n} training / {len(val_set)} validation images, "
            f"{num_classes} classes, {cfg.epochs} epochs"
        )
    )

    t0 = time.perf_counter()
    last = best = torch.zeros((), device=device)
    best_epoch = torch.zeros((), dtype=torch.long, device=device)
    for epoch in range(cfg.epochs):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = head_lr(recipe, epoch, 0, steps_per_epoch)
        order = data_lib.epoch_order(n, cfg.seed, epoch)
        batches = data_lib.iterate_batches(train_set, order, batch_size, device, drop_last=False, workers=cfg.workers)
        for step, batch in zip(range(steps_per_epoch), batches):
            if len(batch.images) < 2:  # a last batch of one image: BatchNorm cannot train on it
                continue
            generator = torch.Generator(device=device).manual_seed(
                cfg.seed * 1_000_003 + epoch * steps_per_epoch + step
            )
            x = data_lib.normalize(
                data_lib.random_crop_flip(batch.images, padding, generator), mean, std
            )  # (B, 3, S, S)
            with autocast(device, precision):
                logits = model(x)  # (B, K)
            loss = F.cross_entropy(logits.float(), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        last = evaluate(model, val_set, mean, std, batch_size, cfg.workers, device, precision)
        better = last > best
        best, best_epoch = torch.where(better, last, best), torch.where(better, epoch + 1, best_epoch)
        emit(
            TaskProgress(
                "supervised",
                f"training {cfg.model} on the labels (val top-1 {100 * last.item():.1f}%)",
                epoch + 1,
                cfg.epochs,
            )
        )

    result = SupervisedResult(
        model=cfg.model,
        data=cfg.data,
        img_size=img_size,
        epochs=cfg.epochs,
        accuracy=round(last.item(), 4),
        best_accuracy=round(best.item(), 4),
        best_epoch=int(best_epoch),
        train_images=n,
        val_images=len(val_set),
        device=describe_device(device),
        precision=precision,
        seconds=round(time.perf_counter() - t0, 1),
        setting=setting(cfg),
    )
    if cfg.out:
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        result.saved_to = str(write_json(Path(cfg.out) / SUPERVISED_FILE, result.to_dict()))
    return result


@torch.no_grad()
def evaluate(
    model, images: data_lib.ImageSet, mean, std, batch_size: int, workers: int, device: torch.device, precision: str
) -> torch.Tensor:
    """Top-1 of ``model`` on ``images`` (un-augmented, eval mode) as a 0-d tensor on the device."""
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=device)
    order = torch.arange(len(images))
    for batch in data_lib.iterate_batches(images, order, batch_size, device, drop_last=False, workers=workers):
        with autocast(device, precision):
            logits = model(data_lib.normalize(batch.images, mean, std))
        correct += (logits.argmax(1) == batch.labels).sum()
    return correct.float() / max(1, len(images))


__all__ = ["train_supervised", "SupervisedResult", "SUPERVISED_FILE"]
