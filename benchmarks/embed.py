"""What ``rotnet embed`` costs beside the bare forward pass, and what ``rotnet neighbours`` needs at 100,000 rows.

Ceiling of embedding: the bare forward pass (the same model, stage and batch, random tensors already
normalised on the device, eval mode, no gradients; nothing written). Prints ONE JSON line:

  python benchmarks/embed.py                                   # resnet18 at 32 px, CPU or GPU
  python benchmarks/embed.py --device cuda --precision bf16
  python benchmarks/embed.py --cases neighbours --rows 100000 --dim 512

Figures (each the best of --repeats runs):
- in memory: rotnet's embed loop (uint8 batches, normalisation, the stage, pooling, rows streamed
  to an .npz) over a random uint8 set served from memory / the bare pass (goal: at least 0.9);
- a JPEG folder: the same loop over a folder of JPEGs decoded by the loader workers (--cache none,
  as embed reads folders) / the bare pass at that size;
- neighbours: the most alike pairs (each row's k nearest, cosine, blockwise) of --rows random
  --dim-dimensional embeddings read from an .npz: seconds, and the peak resident memory of the
  process (measured first, before the other cases), beside the bank's own size.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, peak_rss_mb
from pipeline import make_jpeg_folder

from rotnet_cli import __version__
from rotnet_cli import data as data_lib
from rotnet_cli.config import EmbedConfig, NeighboursConfig, default_workers
from rotnet_cli.embedding import EMBEDDINGS_FORMAT, embed, make_embedder
from rotnet_cli.models import forward_stages
from rotnet_cli.runtime import autocast, configure_backends, resolve_device, resolve_precision
from rotnet_cli.similarity import neighbours
from rotnet_cli.weights import load_weights


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_forward(args, img_size: int, device: torch.device, precision: str) -> float:
    """images/s of the bare forward pass up to the embedded stage, on random normalised tensors on the device."""
    weights = load_weights(f"random:{args.model}", device, img_size=img_size)
    stage = make_embedder(weights, args.layer, "avg", False, device, precision).stage
    x = torch.randn(args.batch_size, 3, img_size, img_size, device=device)
    batches = max(1, args.images // args.batch_size)

    def run(n: int) -> None:
        for _ in range(n):
            with autocast(device, precision):
                forward_stages(weights.backbone, x, [stage - 1])

    run(2)  # warm-up
    rates = []
    for _ in range(args.repeats):
        sync(device)
        t0 = time.perf_counter()
        run(batches)
        sync(device)
        rates.append(batches * args.batch_size / (time.perf_counter() - t0))
    return max(rates)


def embed_rate(args, data: str, img_size: int, workdir: Path) -> float:
    """images/s of rotnet's embed loop (result.seconds: the loop and the file, not loading the weights)."""
    rates = []
    for repeat in range(args.repeats + 1):  # the first run warms up (allocator, loader workers, JPEG caches)
        result = embed(
            EmbedConfig(
                weights=f"random:{args.model}",
                data=data,
                out=str(workdir / f"e{repeat}.npz"),
                layer=args.layer,
                img_size=img_size,
                batch_size=args.batch_size,
                workers=args.workers,
                device=args.device,
                overwrite=True,
                precision=args.precision,
            )
        )
        if repeat:
            rates.append(result.images_per_s)
    return max(rates)


def neighbours_figures(args, device: torch.device, workdir: Path) -> dict:
    """Seconds and peak memory of the most alike pairs of --rows random embeddings of --dim dimensions."""
    path = workdir / "bank.npz"
    vectors = np.random.default_rng(0).standard_normal((args.rows, args.dim), dtype=np.float32)
    meta = {"format": EMBEDDINGS_FORMAT, "model": "random", "layer": 1, "pool": "avg", "normalized": False}
    np.savez(
        path,
        embeddings=vectors,
        paths=np.array([f"{i:07d}.jpg" for i in range(args.rows)]),
        rotnet=np.array(json.dumps(meta)),
    )
    del vectors
    rss_before = peak_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = neighbours(NeighboursConfig(embeddings=str(path), k=args.k, device=args.device))
    figures = {
        "neighbours_rows": args.rows,
        "neighbours_dim": args.dim,
        "neighbours_k": args.k,
        "neighbours_s": round(time.perf_counter() - t0, 2),
        "neighbours_pairs": len(result.neighbours),
        "neighbours_bank_mb": round(args.rows * args.dim * 4 / 2**20),
        "neighbours_peak_rss_mb": round(peak_rss_mb()),
        "peak_rss_before_neighbours_mb": round(rss_before),
    }
    if device.type == "cuda":
        figures["neighbours_peak_cuda_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
    return figures


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--layer", type=int, default=-1)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--images", type=int, default=None, help="images of the in-memory set (default 5,000 on CPU, 50,000 on a GPU)"
    )
    p.add_argument("--jpeg-count", type=int, default=2000)
    p.add_argument("--jpeg-size", type=int, default=64)
    p.add_argument("--rows", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--cases", default="neighbours,memory,jpeg", help="which figures to make (comma list)")
    args = p.parse_args()
    cases = set(args.cases.split(","))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    args.images = args.images or (5000 if device.type == "cpu" else 50_000)
    configure_backends(device)  # what rotnet's commands set: the bare figures get it too
    workdir = Path(tempfile.mkdtemp(prefix="rotnet-bench-embed-"))
    figures: dict = {
        "benchmark": "embed",
        "rotnet": __version__,
        **machine(),
        "device": str(device),
        "precision": precision,
        "model": args.model,
        "layer": args.layer,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "workers": args.workers,
    }

    if "neighbours" in cases:  # first: its peak memory must be its own
        figures.update(neighbours_figures(args, device, workdir))

    if "memory" in cases:
        bare = bare_forward(args, args.img_size, device, precision)
        random_set = data_lib.ImageSet(
            "random",
            args.img_size,
            images=torch.randint(0, 256, (args.images, 3, args.img_size, args.img_size), dtype=torch.uint8),
        )
        real_open = data_lib.open_source
        data_lib.open_source = lambda *a, **k: data_lib.DataSource(random_set)  # embed's source: the set in memory
        try:
            rate = embed_rate(args, "random", args.img_size, workdir)
        finally:
            data_lib.open_source = real_open
        figures.update(
            img_size=args.img_size,
            memory_images=args.images,
            bare_images_per_s=round(bare, 1),
            memory_images_per_s=round(rate, 1),
            memory_vs_bare=round(rate / bare, 3),
        )

    if "jpeg" in cases:
        folder = make_jpeg_folder(
            Path(tempfile.gettempdir()) / f"rotnet-bench-jpeg-{args.jpeg_count}-{args.jpeg_size}",
            args.jpeg_count,
            args.jpeg_size,
        )
        bare = bare_forward(args, args.jpeg_size, device, precision)
        rate = embed_rate(args, str(folder), args.jpeg_size, workdir)
        figures.update(
            jpeg_count=args.jpeg_count,
            jpeg_size=args.jpeg_size,
            jpeg_bare_images_per_s=round(bare, 1),
            jpeg_images_per_s=round(rate, 1),
            jpeg_vs_bare=round(rate / bare, 3),
        )

    emit({**figures, "goal_memory_vs_bare": 0.9, "peak_rss_mb": round(peak_rss_mb())})


if __name__ == "__main__":
    main()
