"""How close rotnet's real training loop gets to the bare model step, and how it compares
with an "official-style" loader that rotates every image with numpy in the workers.

Ceiling: the bare step (forward, backward, optimizer step of the same model on the same
R x batch images, random tensors already on the device). Everything rotnet adds can only
slow it down. Prints ONE JSON line of figures:

  python benchmarks/pipeline.py                      # resnet18 at 32 px, CPU or GPU
  python benchmarks/pipeline.py --model resnet50 --img-size 224 --precision bf16 --channels-last

Figures: images/s (model inputs, i.e. rotated copies) of the bare step; of rotnet's loop on
in-memory data (digits; a CIFAR-sized random uint8 set) and on a folder of JPEG files
(streamed through loader workers, and decoded once into memory: --cache auto); of the
official-style per-sample loader on the same data; and the ratios. Each figure is the best
of --repeats measurements (the loop's: of its epochs after a warm-up epoch), so a shared
machine's slow moments do not decide a ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine

from rotnet_cli import data as data_lib
from rotnet_cli.config import PretrainConfig, default_workers
from rotnet_cli.models import RotNet, create_backbone, data_config, rotation_head
from rotnet_cli.pretraining import make_optimizer, pretrain
from rotnet_cli.runtime import autocast, configure_backends, resolve_device, resolve_precision

ROTATIONS = (0.0, 90.0, 180.0, 270.0)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_step(args, device, precision):
    """The same model, optimizer and precision the real loop uses, as one step function."""
    backbone = create_backbone(args.model, img_size=args.img_size)
    model = RotNet(backbone, rotation_head(backbone, len(ROTATIONS))).to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(model, PretrainConfig(model=args.model, batch_size=args.batch_size), device)
    forward = torch.compile(model) if args.compile else model

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with autocast(device, precision):
            logits = forward(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, model


def bare_step(args, device, precision) -> float:
    """images/s of the bare step on random tensors already on the device."""
    step, model = build_step(args, device, precision)
    n = args.batch_size * len(ROTATIONS)
    x = torch.randn(n, 3, args.img_size, args.img_size, device=device)
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, len(ROTATIONS), (n,), device=device)

    def run(steps: int) -> None:
        for _ in range(steps):
            step(x, y)

    return best_rate(run, args, device)


def best_rate(run, args, device) -> float:
    """images/s of ``run(steps)`` after a warm-up: the best of --repeats timed blocks."""
    run(args.warmup)
    rates = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        run(args.steps)
        sync(device)
        rates.append(args.steps * args.batch_size * len(ROTATIONS) / (time.perf_counter() - t0))
    return max(rates)


def rotnet_loop(args, data: str, cache: str, workdir: Path) -> float:
    """images/s of rotnet's real training loop: the best of its epochs after the first (a warm-up)."""
    out = Path(tempfile.mkdtemp(dir=workdir))
    result = pretrain(
        PretrainConfig(
            model=args.model,
            data=data,
            img_size=args.img_size,
            epochs=1 + args.repeats,
            batch_size=args.batch_size,
            val_split=0,
            max_steps_per_epoch=args.steps,
            device=args.device,
            precision=args.precision,
            channels_last=args.channels_last,
            compile=args.compile,
            cache=cache,
            workers=args.workers,
            out=str(out),
            log_every=max(10, args.steps),
        )
    )
    return max(row["images_per_s"] for row in result.history[1:])


class OfficialStyleDataset(torch.utils.data.Dataset):
    """What the official RotNet code does: per sample, in the loader workers, augment and
    rotate with numpy, convert and normalise each of the R copies, then stack them."""

    def __init__(self, images: np.ndarray | None, paths: list[Path] | None, size: int, mean, std):
        self.images, self.paths, self.size = images, paths, size
        self.mean = np.asarray(mean, dtype=np.float32)[:, None, None]
        self.std = np.asarray(std, dtype=np.float32)[:, None, None]

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.paths)

    def __getitem__(self, i):
        if self.images is not None:
            img = self.images[i]  # (S, S, 3) uint8
        else:
            img = data_lib.decode_file(self.paths[i], self.size).permute(1, 2, 0).numpy()
        pad = max(1, self.size // 8)
        padded = np.pad(img, ((pad, pad), (pad, pad), (0, 0)))
        oy, ox = np.random.randint(0, 2 * pad + 1, 2)
        img = padded[oy : oy + self.size, ox : ox + self.size]
        if np.random.rand() < 0.5:
            img = img[:, ::-1]
        copies = [np.rot90(img, k).copy() for k in range(4)]
        tensors = [
            torch.from_numpy(((c.transpose(2, 0, 1) / 255.0 - self.mean) / self.std).astype(np.float32)) for c in copies
        ]
        return torch.stack(tensors), torch.arange(4)


def official_loop(args, device, precision, images: np.ndarray | None, paths: list[Path] | None) -> float:
    step, model = build_step(args, device, precision)
    cfg = data_config(model.backbone)
    dataset = OfficialStyleDataset(images, paths, args.img_size, cfg["mean"], cfg["std"])
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args.batch_size,
        shuffle=True,
        num_workers=args.official_workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        persistent_workers=args.official_workers > 0,
    )
    batches = iter(loader)

    def run(n: int) -> None:
        nonlocal batches
        for _ in range(n):
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            x = x.view(-1, 3, args.img_size, args.img_size).to(device, non_blocking=True)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            step(x, y.view(-1).to(device, non_blocking=True))

    return best_rate(run, args, device)


def make_jpeg_folder(folder: Path, count: int, size: int) -> Path:
    """count random-texture JPEGs of size x size (made once, reused)."""
    from PIL import Image

    if folder.is_dir() and len(list(folder.glob("*.jpg"))) == count:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
        Image.fromarray(base).resize((size, size), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64, help="images before rotation (x4 per step)")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="measured steps per epoch (default 20 on CPU; 300 on a GPU, whose steps are short: per-epoch costs must not dominate)",
    )
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="measure every figure this many times and keep the best: on a shared machine the least disturbed run",
    )
    p.add_argument(
        "--workers", type=int, default=default_workers(), help="loader workers of both loops (default: rotnet's own)"
    )
    p.add_argument(
        "--official-workers",
        type=int,
        default=None,
        help="workers of the official-style loader (default: --workers, the same for both; the official code's own default is 4)",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--jpeg-count", type=int, default=5000)
    p.add_argument("--jpeg-size", type=int, default=64)
    p.add_argument("--skip", default="", help="comma list of parts to skip: digits,cifar,jpeg,official")
    args = p.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    args.steps = args.steps or (20 if device.type == "cpu" else 300)
    args.official_workers = args.workers if args.official_workers is None else args.official_workers
    configure_backends(device)  # what rotnet's commands set: the bare figures get it too
    workdir = Path(tempfile.mkdtemp(prefix="rotnet-bench-"))
    figures: dict = {
        "benchmark": "pipeline",
        **machine(),
        "device": str(device),
        "precision": precision,
        "model": args.model,
        "img_size": args.img_size,
        "batch_images": args.batch_size * 4,
        "steps": args.steps,
        "repeats": args.repeats,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "workers": args.workers,
        "official_workers": args.official_workers,
    }

    bare = bare_step(args, device, precision)
    figures["bare_images_per_s"] = round(bare, 1)

    if "digits" not in skip:
        figures["digits_images_per_s"] = round(rotnet_loop(args, "digits", "auto", workdir), 1)
        figures["digits_vs_bare"] = round(figures["digits_images_per_s"] / bare, 3)

    if "cifar" not in skip:
        # a CIFAR-sized random uint8 set served through rotnet's in-memory path (50,000 images;
        # fewer at large sizes, at most 1.5 GB: 10,000 at 224 px)
        count = min(50_000, int(1.5 * 2**30) // (3 * args.img_size**2))
        random_set = data_lib.ImageSet(
            "random",
            args.img_size,
            images=torch.randint(0, 256, (count, 3, args.img_size, args.img_size), dtype=torch.uint8),
        )
        real_open = data_lib.open_source
        data_lib.open_source = lambda *a, **k: data_lib.DataSource(random_set)
        try:
            figures["memory_images_per_s"] = round(rotnet_loop(args, "random", "auto", workdir), 1)
        finally:
            data_lib.open_source = real_open
        figures["memory_vs_bare"] = round(figures["memory_images_per_s"] / bare, 3)
        if "official" not in skip:
            hwc = random_set.images.permute(0, 2, 3, 1).numpy()
            figures["official_memory_images_per_s"] = round(official_loop(args, device, precision, hwc, None), 1)
            figures["rotnet_vs_official_memory"] = round(
                figures["memory_images_per_s"] / figures["official_memory_images_per_s"], 3
            )

    if "jpeg" not in skip:
        folder = make_jpeg_folder(
            Path(tempfile.gettempdir()) / f"rotnet-bench-jpeg-{args.jpeg_count}-{args.jpeg_size}",
            args.jpeg_count,
            args.jpeg_size,
        )
        jpeg_args = argparse.Namespace(**{**vars(args), "img_size": args.jpeg_size})
        jpeg_bare = bare_step(jpeg_args, device, precision) if args.jpeg_size != args.img_size else bare
        figures["jpeg_bare_images_per_s"] = round(jpeg_bare, 1)
        for cache in ("none", "auto"):
            rate = rotnet_loop(jpeg_args, str(folder), cache, workdir)
            figures[f"jpeg_cache_{cache}_images_per_s"] = round(rate, 1)
            figures[f"jpeg_cache_{cache}_vs_bare"] = round(rate / jpeg_bare, 3)
        if "official" not in skip:
            paths = data_lib.scan_images(folder)
            figures["official_jpeg_images_per_s"] = round(official_loop(jpeg_args, device, precision, None, paths), 1)
            figures["rotnet_vs_official_jpeg"] = round(
                figures["jpeg_cache_none_images_per_s"] / figures["official_jpeg_images_per_s"], 3
            )

    emit(figures)


if __name__ == "__main__":
    main()
