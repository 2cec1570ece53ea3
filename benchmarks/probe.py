"""What a 100-epoch probe costs compared with ONE bare extraction pass over the same data.

Ceiling: the bare pass (the same backbone in eval mode, no gradients, every stage from
forward_intermediates, all labelled images in memory, nothing kept). A probe extracts once
and trains its heads on the cached features, so its time divided by the bare pass should
stay small (goal: at most 1.5 for the linear head on every stage, 100 epochs). Prints ONE
JSON line of figures:

  python benchmarks/probe.py                                  # the paper's NIN (random weights) on digits
  python benchmarks/probe.py --weights runs/demo --device cuda
  python benchmarks/probe.py --weights random:resnet18 --epochs 100

Figures: seconds of the bare pass, of a probe with the linear head, and of a probe with the
default heads (linear, mlp, knn); each probe's own split of extraction / head training; the ratios.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, peak_rss_mb

from rotnet_cli import __version__
from rotnet_cli import data as data_lib
from rotnet_cli.config import ProbeConfig
from rotnet_cli.models import forward_stages, num_stages
from rotnet_cli.probing import probe
from rotnet_cli.runtime import autocast, configure_backends, resolve_device, resolve_precision
from rotnet_cli.weights import load_weights


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def bare_extraction_seconds(args, device: torch.device, precision: str) -> tuple[float, int, int]:
    """One pass of every labelled image through the backbone, all stages, nothing cached: (seconds, images, stages)."""
    weights = load_weights(args.weights, device)
    images = data_lib.open_source(args.data, weights.img_size, need_labels=True).train.images.to(device)
    stages = list(range(num_stages(weights.backbone)))

    def one_pass(limit: int | None = None) -> None:
        for start in range(0, len(images) if limit is None else limit, args.batch_size):
            x = data_lib.normalize(images[start : start + args.batch_size], weights.mean, weights.std)
            with autocast(device, precision):
                forward_stages(weights.backbone, x, stages)

    one_pass(limit=args.batch_size)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    one_pass()
    sync(device)
    return time.perf_counter() - t0, len(images), len(stages)


def probe_seconds(args, heads: tuple[str, ...]) -> tuple[float, dict]:
    cfg = ProbeConfig(weights=args.weights, data=args.data, heads=heads, epochs=args.epochs, batch_size=args.batch_size,
                      device=args.device, precision=args.precision, workers=0, save=False)
    t0 = time.perf_counter()
    result = probe(cfg)
    return time.perf_counter() - t0, {"extract_s": round(result.extract_seconds, 3), "heads_s": result.train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random:rotnet_nin4", help="any weights spec rotnet accepts")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    configure_backends(device)  # what rotnet's commands set: the bare figures get it too
    bare, images, stages = bare_extraction_seconds(args, device, precision)
    linear, linear_split = probe_seconds(args, ("linear",))
    default, default_split = probe_seconds(args, ProbeConfig.heads)
    emit({
        "benchmark": "probe", "rotnet": __version__, **machine(), "device": str(device), "precision": precision,
        "weights": args.weights, "data": args.data, "images": images, "stages": stages, "epochs": args.epochs,
        "batch_size": args.batch_size, "bare_extraction_s": round(bare, 3),
        "probe_linear_s": round(linear, 3), "probe_linear_split": linear_split,
        "probe_default_heads_s": round(default, 3), "probe_default_split": default_split,
        "ratio_linear": round(linear / bare, 2), "ratio_default_heads": round(default / bare, 2), "goal_ratio_linear": 1.5,
        "peak_rss_mb": round(peak_rss_mb()),
    })


if __name__ == "__main__":
    main()
