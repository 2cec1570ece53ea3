"""What each part of the pretraining augmentation does: rotation accuracy AND probe quality.

Pretrains one model per variant (same seed, epochs and schedule), then probes every stage
with the linear and kNN heads on full labels and on 10 labels per class (mean of 3 seeded
draws of the labelled images), and prints ONE JSON line per variant:

  python benchmarks/augmentation.py --data digits --variants none,crop4,crop4+flip,flip --epochs 10
  python benchmarks/augmentation.py --make-photos runs/photos          # the natural-image set, offline
  python benchmarks/augmentation.py --data runs/photos --variants none,crop4,crop4+flip --epochs 10
  python benchmarks/augmentation.py --table runs/augment/*.jsonl      # markdown tables for the README

Variants: ``none``; ``shift`` (rotnet's: a crop after img_size // 16 px of padding); ``cropP`` (random crop after P px of zero padding); ``cropP+flip`` (and a
random horizontal flip); ``flip`` (flip only); ``random`` (no pretraining: random weights,
the probe's baseline). ``auto`` is what rotnet picks for the data. The padding is an
experiment knob, not a rotnet option: rotnet's crop pads img_size // 8 (4 px at 32 px).

The photo set: crops of the colour photos scikit-image ships (``pip install scikit-image``;
only this script needs it), the photo as the class label. Every photo is cut into a 4x4
grid of cells and 4 cells of each go to val/, so no validation crop overlaps a training crop.

Runs go to ``--out/DATA-VARIANT-eEPOCHS-sSEED`` and are reused when finished (a rerun only
probes). Use OMP_NUM_THREADS=1 to run two at a time; the thread count is in each line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine

from rotnet_cli import data as data_lib
from rotnet_cli.config import PretrainConfig, ProbeConfig
from rotnet_cli.pretraining import pretrain
from rotnet_cli.probing import probe

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "stereo_motorcycle")  # colour photos with an up and a down
HEADS = ("linear", "knn")
FEW_LABELS = 10
FEW_LABEL_SEEDS = (0, 1, 2)


def parse_variant(name: str) -> tuple[str, int | None]:
    """'crop2+flip' -> ('crop+flip', 2); 'flip' -> ('crop+flip', 0); 'none' -> ('none', None)."""
    if name in ("none", "auto", "random", "shift"):  # shift: rotnet's own 1/16 of the side
        return name, None
    if name == "flip":
        return "crop+flip", 0
    m = re.fullmatch(r"crop(\d+)(\+flip)?", name)
    if not m:
        raise SystemExit(f"unknown variant {name!r}: none, auto, random, shift, flip, cropP, cropP+flip")
    return ("crop+flip" if m.group(2) else "crop"), int(m.group(1))


def use_padding(padding: int | None) -> None:
    """Make the loop's crop use ``padding`` px (None: rotnet's own choice)."""
    original = getattr(data_lib.random_crop_flip, "original", data_lib.random_crop_flip)
    if padding is None:
        data_lib.random_crop_flip = original
        return

    def crop_flip(images, _padding, generator, flip=True):
        return original(images, padding, generator, flip=flip)

    crop_flip.original = original
    data_lib.random_crop_flip = crop_flip


def run_variant(args, variant: str) -> dict:
    augment, padding = parse_variant(variant)
    tag = Path(args.data).name
    row = {"data": tag, "variant": variant, "epochs": args.epochs, "seed": args.seed, "model": args.model}
    if augment == "random":
        weights = f"random:{args.model}"
    else:
        run = Path(args.out) / f"{tag}-{variant}-e{args.epochs}-s{args.seed}"
        if not (run / "model.safetensors").is_file():
            use_padding(padding)
            t0 = time.perf_counter()
            pretrain(
                PretrainConfig(
                    model=args.model,
                    data=args.data,
                    epochs=args.epochs,
                    augment=augment,
                    img_size=args.img_size,
                    seed=args.seed,
                    out=str(run),
                    overwrite=run.exists(),
                    max_steps_per_epoch=args.max_steps_per_epoch,
                )
            )
            use_padding(None)
            row["wall_seconds"] = round(time.perf_counter() - t0, 1)
        history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        saved = json.loads((run / "config.json").read_text())
        row.update(
            {
                "augment": saved["resolved"].get("augment", augment),
                "padding": padding,
                "train_seconds": round(sum(h["seconds"] for h in history), 1),
                "rot_acc": round(history[-1]["rot_acc"], 4),
                "val_rot_acc": round(history[-1]["val_rot_acc"], 4),
                "val_rot_acc_curve": [round(h["val_rot_acc"], 4) for h in history],
            }
        )
        weights = str(run)
    row["probe"] = {
        "full": probe_stages(weights, args, labels_per_class=None, seeds=(args.seed,)),
        f"{FEW_LABELS}": probe_stages(weights, args, labels_per_class=FEW_LABELS, seeds=FEW_LABEL_SEEDS),
    }
    return row


def probe_stages(weights: str, args, labels_per_class: int | None, seeds: tuple[int, ...]) -> dict:
    """{head: [accuracy per stage]}, averaged over ``seeds`` (each draws other labelled images)."""
    per_seed = []
    for seed in seeds:
        result = probe(
            ProbeConfig(
                weights=weights,
                data=args.probe_data or args.data,
                heads=HEADS,
                labels_per_class=labels_per_class,
                seed=seed,
                save=False,
                img_size=args.img_size if weights.startswith("random:") else None,
                epochs=args.probe_epochs,
            )
        )
        per_seed.append({head: [row.accuracy[head] for row in result.rows] for head in HEADS})
    return {
        head: [round(float(np.mean([s[head][i] for s in per_seed])), 4) for i in range(len(per_seed[0][head]))]
        for head in HEADS
    }


# ----------------------------------------------------------------------------- the photo set


def make_photos(folder: Path, size: int = 32, per_cell: int = 25, seed: int = 0) -> None:
    """Crops of scikit-image's colour photos -> folder/{train,val}/PHOTO/*.png."""
    import skimage.data
    from PIL import Image

    rng = np.random.default_rng(seed)
    for name in PHOTOS:
        photo = getattr(skimage.data, name)()
        photo = photo[0] if isinstance(photo, tuple) else photo  # (H, W, 3) uint8; the stereo pair's left view
        h, w = photo.shape[:2]
        cells = rng.permutation(16)
        for k, cell in enumerate(cells):
            split = "val" if k < 4 else "train"
            top, left, ch, cw = (cell // 4) * h // 4, (cell % 4) * w // 4, h // 4, w // 4
            out = folder / split / name
            out.mkdir(parents=True, exist_ok=True)
            for i in range(per_cell):
                side = int(min(ch, cw) * rng.uniform(0.6, 1.0))
                y, x = top + rng.integers(0, ch - side + 1), left + rng.integers(0, cw - side + 1)
                crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BICUBIC)
                crop.save(out / f"cell{cell:02d}-{i:02d}.png")


# ----------------------------------------------------------------------------- tables


def tables(paths: list[str]) -> str:
    rows = [json.loads(line) for p in paths for line in Path(p).read_text().splitlines() if line.strip()]
    lines = []
    for data in dict.fromkeys(r["data"] for r in rows):
        these = [r for r in rows if r["data"] == data]
        stages = len(these[0]["probe"]["full"]["linear"])
        lines += [
            f"\n{data} ({these[0]['model']}, {these[0]['epochs']} epochs; probe: linear / kNN per stage 1-{stages})\n"
        ]
        lines += [
            "| augmentation | val rot acc | "
            + " | ".join(f"{n} labels: {h}" for n in ("all", "10/class") for h in HEADS)
            + " |"
        ]
        lines += ["|---|---|" + "---|" * (2 * len(HEADS))]
        for r in these:
            cells = [
                " / ".join(f"{100 * a:.1f}" for a in r["probe"][k][h]) for k in ("full", str(FEW_LABELS)) for h in HEADS
            ]
            rot = f"{r['val_rot_acc']:.3f}" if "val_rot_acc" in r else "-"
            lines += [f"| {r['variant']} | {rot} | " + " | ".join(cells) + " |"]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits")
    ap.add_argument("--probe-data", default=None, help="labelled data for the probe (default: --data)")
    ap.add_argument("--variants", default="none,crop4,crop4+flip,flip")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--img-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/augment")
    ap.add_argument("--probe-epochs", type=int, default=100, help="epochs of each probe head (rotnet probe's default)")
    ap.add_argument("--max-steps-per-epoch", type=int, default=None, help="a smoke test's shortcut")
    ap.add_argument("--make-photos", metavar="FOLDER")
    ap.add_argument("--table", nargs="+", metavar="JSONL")
    args = ap.parse_args()
    if args.make_photos:
        make_photos(Path(args.make_photos))
        return
    if args.table:
        print(tables(args.table))
        return
    for variant in args.variants.split(","):
        emit({**run_variant(args, variant), "machine": machine()})


if __name__ == "__main__":
    main()
