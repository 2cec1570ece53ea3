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
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, peak_rss_mb

from rotnet_cli import __version__
from rotnet_cli import data as data_lib
from rotnet_cli.config import ProbeConfig
from rotnet_cli.head_training import HeadTrainer, StackedLinear
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

    one_pass()  # warm-up: every batch shape once (cuDNN autotunes per shape on CUDA)
    times = []
    for _ in range(3):  # the best of 3: a pass takes a fraction of a second on a GPU
        sync(device)
        t0 = time.perf_counter()
        one_pass()
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times), len(images)


def probe_seconds(args, **options) -> tuple[float, dict]:
    """(seconds of the probe's own work: extraction + heads, the split with the whole call's wall time).

    A warm-up probe of one epoch with the same settings runs first, as the bare pass has its
    warm-up: the one-off costs of a process (CUDA context, cuBLAS handles, cuDNN autotuning,
    building the model, reading the data set) are not the probe's per-epoch work.
    """
    settings = dict(
        data=args.data, batch_size=args.batch_size, device=args.device, precision=args.precision, workers=0, save=False
    )
    probe(ProbeConfig(**settings, **{**options, "epochs": 1}))
    t0 = time.perf_counter()
    result = probe(ProbeConfig(**settings, **options))
    wall = time.perf_counter() - t0
    work = result.extract_seconds + sum(result.train_seconds.values())
    return work, {
        "wall_s": round(wall, 3),
        "extract_s": round(result.extract_seconds, 3),
        "heads_s": {k: round(v, 3) for k, v in result.train_seconds.items()},
    }


class LaunchCounter(TorchDispatchMode):
    """Counts the aten ops that do work (a kernel launch each on a GPU), leaving out views."""

    VIEWS = {"aten." + n for n in "detach slice select t view transpose unbind expand _unsafe_view unsqueeze".split()}

    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.launches += str(func.overloadpacket) not in self.VIEWS and not str(func).startswith("profiler")
        return func(*args, **(kwargs or {}))


def head_step_cost(kind: str, dims: list[int], device: torch.device, precision: str, steps: int = 200) -> dict:
    """One head-training step on random pooled features of ``dims`` (B=256, 10 classes), as the probe runs it
    on ``device``: aten ops that launch work (counted on this device's code path) and seconds per step."""
    recipe = ProbeConfig(weights="random:resnet18", heads=(kind,)).head_recipe(kind)
    trainer = HeadTrainer(kind, [(d, 1, 1) for d in dims], 10, "avg", recipe, 0, device)
    x, y = torch.randn(256, sum(dims), device=device), torch.randint(0, 10, (256,), device=device)
    for _ in range(5):  # warm-up
        trainer.train_step(x, y, 0, 0, steps, device, precision)
    with LaunchCounter() as counter:
        trainer.train_step(x, y, 0, 0, steps, device, precision)
    sync(device)
    t0 = time.perf_counter()
    for step in range(steps):
        trainer.train_step(x, y, 0, step, steps, device, precision)
    sync(device)
    return {"launches": counter.launches, "ms": round((time.perf_counter() - t0) / steps * 1e3, 3)}


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
    parser.add_argument("--cases", default="cached,readme,augmented,steps", help="which figures to make (comma list)")
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
    if "steps" in cases:
        # one head step for the README probe's 10 rows (resnet18's 5 stages x 2 backbones): what a GPU
        # step is bound by is its launches; on a CPU the GPU's batched path is counted too
        dims = [64, 64, 128, 256, 512] * 2
        for kind in ("linear", "mlp"):
            figures[f"{kind}_head_step"] = head_step_cost(kind, dims, device, precision)
            if device.type == "cpu":
                with mock.patch.object(StackedLinear, "forward", lambda self, x: self.batched(x.flatten(1))):
                    figures[f"{kind}_head_step_gpu_path"] = head_step_cost(kind, dims, device, precision, steps=20)
    emit({**figures, "goal_ratio": 1.5, "peak_rss_mb": round(peak_rss_mb())})


if __name__ == "__main__":
    main()
