"""What --eval-data costs: the seconds of a kNN evaluation against the seconds of the epoch it follows.

Runs `rotnet pretrain` (by default the demo: resnet18 on digits at 32 px, batch 128) with
--eval-data digits (1,438 training and 359 validation images, every stage) and reads, from the
run's metrics.jsonl, each epoch's training seconds and each evaluation's seconds. The first
epoch is left out (it pays one-off costs: allocation, cuDNN autotuning). It evaluates every
epoch to time each evaluation, and reports what the default --eval-every auto would cost:
auto picks the interval from counted images (an evaluation: one forward pass per image; an
epoch: three per rotated copy) so that evaluations take about 3% of the training compute;
eval_share_auto is the measured cost per epoch divided by that interval. The demo's set is
tiny (11 steps an epoch), so its eval_per_epoch is the worst case. Prints one JSON line.
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

    from rotnet_cli import pretraining, rundir
    from rotnet_cli.config import PretrainConfig
    from rotnet_cli.evaluation import auto_eval_every
    from rotnet_cli.events import RunStarted

    # what auto counts: the evaluated images (the run's FeatureEval) and the rotated copies an epoch
    evaluators, started = [], []
    set_up_eval = pretraining.set_up_eval
    pretraining.set_up_eval = lambda *a: evaluators.append(set_up_eval(*a)) or evaluators[-1]

    def progress(event) -> None:
        if isinstance(event, RunStarted):
            started.append(event)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        result = pretraining.pretrain(
            PretrainConfig(
                model=args.model,
                data=args.data,
                epochs=args.epochs,
                batch_size=args.batch_size,
                img_size=args.img_size,
                device=args.device,
                eval_data=args.eval_data,
                eval_heads=args.eval_heads,
                eval_every=1,
                logger="none",
                max_steps_per_epoch=args.max_steps_per_epoch,
                out=str(out),
            ),
            progress=progress,
        )
        rows = rundir.read_metrics(out)[1:]
    eval_images = len(evaluators[0].train_set) + len(evaluators[0].val_set)
    auto_every = auto_eval_every(eval_images, started[0].steps_per_epoch * started[0].batch_images)
    epoch_s = statistics.median(row["seconds"] for row in rows)
    eval_s = statistics.median(row["eval_seconds"] for row in rows)
    emit(
        {
            "benchmark": "online_eval",
            "model": args.model,
            "data": args.data,
            "eval_data": args.eval_data,
            "eval_heads": args.eval_heads,
            "batch_size": args.batch_size,
            "device": result.device,
            "epoch_seconds": round(epoch_s, 3),
            "eval_seconds": round(eval_s, 3),
            "eval_per_epoch": round(eval_s / epoch_s, 4),
            "eval_images": eval_images,
            "auto_eval_every": auto_every,
            "eval_share_auto": round(eval_s / epoch_s / auto_every, 4),
            "epochs_measured": len(rows),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
