"""Peak resident memory of rotnet pretraining divided by that of the bare training loop.

Each side runs in its own fresh process (peak RSS is per process): the bare loop holds the
same model, optimizer and one random batch; rotnet's loop runs `pretrain` on the same model
and batch for a few steps on the built-in digits (in memory). Goal: at most 1.3.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine, peak_rss_mb


def child(kind: str, args) -> None:
    """Run one side in this process and print its peak RSS in MB."""
    import argparse as ap

    import pipeline

    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.pretraining import pretrain
    from rotnet_cli.runtime import configure_backends, resolve_device, resolve_precision

    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    configure_backends(device)  # what rotnet's commands set: the bare figures get it too
    ns = ap.Namespace(
        model=args.model,
        img_size=args.img_size,
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=1,
        repeats=1,
        channels_last=False,
        compile=False,
    )
    if kind == "bare":
        pipeline.bare_step(ns, device, precision)
    else:
        pretrain(
            PretrainConfig(
                model=args.model,
                data="digits",
                img_size=args.img_size,
                epochs=1,
                batch_size=args.batch_size,
                max_steps_per_epoch=args.steps + 1,
                val_split=0.1,
                device=args.device,
                precision=args.precision,
                workers=0,
                out=tempfile.mkdtemp(prefix="rotnet-mem-"),
            )
        )
    print(json.dumps({"peak_rss_mb": peak_rss_mb()}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="resnet18")
    p.add_argument("--img-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--child", choices=["bare", "rotnet"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    peaks = {}
    for kind in ("bare", "rotnet"):
        cmd = [
            sys.executable,
            __file__,
            "--child",
            kind,
            "--model",
            args.model,
            "--img-size",
            str(args.img_size),
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--device",
            args.device,
            "--precision",
            args.precision,
        ]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
        peaks[kind] = json.loads(out)["peak_rss_mb"]
    emit(
        {
            "benchmark": "memory",
            **machine(),
            "model": args.model,
            "img_size": args.img_size,
            "batch_images": args.batch_size * 4,
            "bare_peak_rss_mb": round(peaks["bare"], 1),
            "rotnet_peak_rss_mb": round(peaks["rotnet"], 1),
            "rotnet_vs_bare": round(peaks["rotnet"] / peaks["bare"], 3),
        }
    )


if __name__ == "__main__":
    main()
