"""What a probe costs compared with ONE bare extraction pass over the same data.

Ceiling: the bare pass (the same backbones in eval mode, no gradients, every stage from
forward_intermediates, all labelled images in memory, nothing kept). Prints ONE JSON line:

  python benchmarks/probe.py                                  # the paper's NIN (random weights) on digits
  python benchmarks/probe.py --weights runs/demo --device cuda
  python benchmarks/probe.py --weights random:resnet18 --epochs 100

Figures:
- cached mode (the quick recipe): a 100-epoch probe on every stage with the linear head, with
  the default heads (linear, knn) and with linear + mlp + knn, each divided by the bare pass
  (goal for the linear head and the defaults: at most 1.5);
- the README's first probe example (``rotnet probe runs/demo --compare random``: resnet18 at
  32 px on digits, every stage, default heads, the random baseline too) divided by the bare pass
  of both backbones (goal: at most 1.5);
- augmented mode (the paper recipe: features of cropped and flipped images recomputed every
  batch, mlp on flattened maps + conv head on block 2): head training time divided by
  epochs x the bare pass, since every epoch runs the backbone over the training and validation
  images once (goal: at most 1.5).
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
def bare_extraction_seconds(
    specs: list[str], args, device: torch.device, precision: str, img_size: int | None = None
) -> tuple[float, int]:
    """One pass of every labelled image through each backbone, all stages, nothing cached: (seconds, images)."""
    backbones = [load_weights(spec, device, img_size=img_size) for spec in specs]
    images = data_lib.open_source(args.data, backbones[0].img_size, need_labels=True).train.images.to(device)

    def one_pass(limit: int | None = None) -> None:
        for weights in backbones:
            stages = list(range(num_stages(weights.backbone)))
            for start in range(0, len(images) if limit is None else limit, args.batch_size):
                x = data_lib.normalize(images[start : start + args.batch_size], weights.mean, weights.std)
                with autocast(device, precision):
                    forward_stages(weights.backbone, x, stages)

    one_pass(limit=args.batch_size)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    one_pass()
    sync(device)
    return time.perf_counter() - t0, len(images)


def probe_seconds(args, **options) -> tuple[float, dict]:
    cfg = ProbeConfig(
        data=args.data,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        workers=0,
        save=False,
        **options,
    )
    t0 = time.perf_counter()
    result = probe(cfg)
    return time.perf_counter() - t0, {
        "extract_s": round(result.extract_seconds, 3),
        "heads_s": {k: round(v, 3) for k, v in result.train_seconds.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="random:rotnet_nin4", help="any weights spec rotnet accepts")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--epochs", type=int, default=100, help="epochs of the cached-mode probes")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument(
        "--readme-weights", default="random:resnet18", help="the README example's backbone (its demo run)"
    )
    parser.add_argument("--readme-img-size", type=int, default=32)
    parser.add_argument("--augmented-epochs", type=int, default=2, help="epochs of the augmented-mode probe")
    parser.add_argument("--cases", default="cached,readme,augmented", help="which figures to make (comma list)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()

    cases = set(args.cases.split(","))
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    configure_backends(device)  # what rotnet's commands set: the bare figures get it too
    figures = {
        "benchmark": "probe",
        "rotnet": __version__,
        **machine(),
        "device": str(device),
        "precision": precision,
        "weights": args.weights,
        "data": args.data,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
    }
    if cases & {"cached", "augmented"}:
        bare, images = bare_extraction_seconds([args.weights], args, device, precision)
        figures.update(images=images, bare_extraction_s=round(bare, 3))
    if "cached" in cases:
        common = dict(weights=args.weights, epochs=args.epochs)
        linear, linear_split = probe_seconds(args, **common, heads=("linear",))
        default, default_split = probe_seconds(args, **common, heads=ProbeConfig.heads)
        with_mlp, with_mlp_split = probe_seconds(args, **common, heads=("linear", "mlp", "knn"))
        figures.update(
            probe_linear_s=round(linear, 3),
            probe_linear_split=linear_split,
            probe_default_heads_s=round(default, 3),
            probe_default_split=default_split,
            default_heads=list(ProbeConfig.heads),
            probe_linear_mlp_knn_s=round(with_mlp, 3),
            probe_linear_mlp_knn_split=with_mlp_split,
            ratio_linear=round(linear / bare, 2),
            ratio_default_heads=round(default / bare, 2),
            ratio_linear_mlp_knn=round(with_mlp / bare, 2),
        )
    if "readme" in cases:
        # the README's first probe: a demo run (resnet18, 32 px) against random weights, default heads
        specs = [args.readme_weights, f"random:{args.readme_weights.split(':', 1)[-1]}"]
        readme_bare, _ = bare_extraction_seconds(specs, args, device, precision, img_size=args.readme_img_size)
        readme, readme_split = probe_seconds(
            args, weights=args.readme_weights, img_size=args.readme_img_size, compare=("random",), epochs=args.epochs
        )
        figures.update(
            readme_weights=args.readme_weights,
            readme_bare_extraction_s=round(readme_bare, 3),
            readme_probe_s=round(readme, 3),
            readme_split=readme_split,
            ratio_readme_example=round(readme / readme_bare, 2),
        )
    if "augmented" in cases:
        # the paper recipe: every epoch recomputes the features of cropped + flipped training images
        augmented, augmented_split = probe_seconds(
            args,
            weights=args.weights,
            recipe="paper",
            heads=("mlp", "conv"),
            layers=(2,),
            pool="flatten",
            epochs=args.augmented_epochs,  # --precision auto: the recipe's fp32
        )
        figures.update(
            augmented_epochs=args.augmented_epochs,
            augmented_probe_s=round(augmented, 3),
            augmented_split=augmented_split,
            ratio_augmented_per_epoch=round(
                sum(augmented_split["heads_s"].values()) / (args.augmented_epochs * bare), 2
            ),
        )
    emit({**figures, "goal_ratio": 1.5, "peak_rss_mb": round(peak_rss_mb())})


if __name__ == "__main__":
    main()
