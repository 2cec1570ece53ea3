"""What --eval-data costs: the seconds of a kNN evaluation against the seconds of the epoch it follows.

Runs `rotnet pretrain` (by default the demo: resnet18 on digits at 32 px, batch 128) with
--eval-data digits (1,438 training and 359 validation images, every stage) and reads, from the
run's metrics.jsonl, each epoch's training seconds and each evaluation's seconds. The first
epoch is left out (it pays one-off costs: allocation, cuDNN autotuning). Goal: an evaluation
every epoch costs at most a few percent of the epoch on a real pretraining set; the demo's
set is tiny (13 steps an epoch), so its ratio is the worst case: --eval-every N divides it by N.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data", default="digits")
    parser.add_argument("--eval-data", default="digits")
    parser.add_argument("--eval-heads", default="knn")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--img-size", type=int, default=None)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--max-steps-per-epoch", type=int, default=None)
    args = parser.parse_args()

    from rotnet_cli import rundir
    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.pretraining import pretrain

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        result = pretrain(PretrainConfig(
            model=args.model, data=args.data, epochs=args.epochs, batch_size=args.batch_size, img_size=args.img_size,
            device=args.device, eval_data=args.eval_data, eval_heads=args.eval_heads, logger="none",
            max_steps_per_epoch=args.max_steps_per_epoch, out=str(out),
        ))
        rows = rundir.read_metrics(out)[1:]
    epoch_s = statistics.median(row["seconds"] for row in rows)
    eval_s = statistics.median(row["eval_seconds"] for row in rows)
    emit({
        "benchmark": "online_eval", "model": args.model, "data": args.data, "eval_data": args.eval_data,
        "eval_heads": args.eval_heads, "batch_size": args.batch_size, "device": result.device,
        "epoch_seconds": round(epoch_s, 3), "eval_seconds": round(eval_s, 3), "eval_per_epoch": round(eval_s / epoch_s, 4),
        "epochs_measured": len(rows), **machine(),
    })


if __name__ == "__main__":
    main()
