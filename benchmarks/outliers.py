"""The one-class protocol of Golan & El-Yaniv (2018) and Hendrycks et al. (2019), on the built-in digits.

Each digit in turn is the normal class: a RotNet is pretrained (``rotnet_cli.pretrain``) on the
training images of that digit alone, and the held-out images of all ten digits are scored; the
AUROC of telling the other nine digits (outliers) from held-out images of the normal digit
(inliers) is averaged over the ten. Side by side, computed the same way on the same split:

- pixel kNN: cosine distance of the raw pixels to the normal digit's training images;
- random kNN: the same on the features of the same architecture with random weights;
- RotNet kNN: the same on the pretrained run's features (``rotnet score --method knn``);
- RotNet rotation: minus the summed log-probability of each applied rotation (``--method rotation``);
- both: the two RotNet scores on a rank scale (``--method both``).

The kNN scores are the mean cosine distance to the k nearest training features (the last stage,
average-pooled, as ``rotnet embed`` gives them). Prints a table on stderr and ONE JSON line on stdout:

  python benchmarks/outliers.py                            # test_resnet at 16 px, 8 epochs: a few CPU minutes (idle)
  python benchmarks/outliers.py --model resnet18 --img-size 32 --epochs 60 --device cuda
  python benchmarks/outliers.py --classes 0,3 --epochs 5   # a quick look
  python benchmarks/outliers.py --faces --img-size 32 --epochs 100 --augment crop   # real photos (the issue's check)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine

from rotnet_cli import PretrainConfig, load_weights, pretrain
from rotnet_cli import data as data_lib
from rotnet_cli.embedding import make_embedder
from rotnet_cli.runtime import resolve_device
from rotnet_cli.scoring import auroc, knn_distances, percentile_ranks, rotation_scores

COLUMNS = ("pixel_knn", "random_knn", "rotnet_knn", "rotnet_rotation", "both")


def split_digits(test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(8x8 uint8 images, labels, a boolean mask of the held-out images: stratified, seeded)."""
    with np.load(data_lib.BUILTIN_DIGITS) as d:
        images, labels = d["images"], d["labels"].astype(np.int64)
    held_out = np.zeros(len(labels), dtype=bool)
    rng = np.random.default_rng(seed)
    for c in range(10):
        members = rng.permutation(np.flatnonzero(labels == c))
        held_out[members[: round(len(members) * test_fraction)]] = True
    return images, labels, held_out


def write_folder(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True)  # grey PNGs: the loader reads them as rotnet reads any folder
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:05d}.png")
    return folder


def to_batch(images: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """(N, 8, 8) uint8 -> (N, 3, size, size) uint8, upsampled as rotnet reads the built-in digits."""
    x = torch.from_numpy(images).unsqueeze(1).expand(-1, 3, -1, -1).contiguous()
    return data_lib.resize_uint8(x, size).to(device)


def features(weights, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    embedder = make_embedder(weights, -1, "avg", True, device, "fp32")
    return torch.cat([embedder(chunk) for chunk in images.split(256)])


def knn_score(train: torch.Tensor, test: torch.Tensor, k: int) -> np.ndarray:
    none = torch.full((len(test),), -1, dtype=torch.long, device=test.device)
    return knn_distances(test, train, k, "mean", none).cpu().double().numpy()


def compare(name: str, train_images: np.ndarray, test_images: np.ndarray, truth: np.ndarray, args, device, root: Path):
    """Pretrain on ``train_images`` (N, h, w) uint8, score ``test_images``: AUROC of every column (truth 1 = outlier)."""
    folder = write_folder(root / name, train_images)
    t0 = time.perf_counter()
    pretrain(
        PretrainConfig(
            model=args.model,
            data=str(folder),
            img_size=args.img_size,
            epochs=args.epochs,
            batch_size=args.batch_size,
            val_split=0.0,
            augment=args.augment,
            device=args.device,
            workers=0,
            seed=args.seed,
            logger=(),
            out=str(root / f"run-{name}"),
        )
    )
    seconds = time.perf_counter() - t0
    run = load_weights(str(root / f"run-{name}"), device)
    rand = load_weights(f"random:{args.model}", device, img_size=run.img_size)
    train_x, test_x = to_batch(train_images, run.img_size, device), to_batch(test_images, run.img_size, device)

    pixels = lambda x: torch.nn.functional.normalize(x.flatten(1).float(), dim=1)  # noqa: E731
    rotation = torch.cat([rotation_scores(run, chunk, device, "fp32")[0] for chunk in test_x.split(128)])
    figures = {
        "pixel_knn": knn_score(pixels(train_x), pixels(test_x), args.k),
        "random_knn": knn_score(features(rand, train_x, device), features(rand, test_x, device), args.k),
        "rotnet_knn": knn_score(features(run, train_x, device), features(run, test_x, device), args.k),
        "rotnet_rotation": rotation.cpu().double().numpy(),
    }
    figures["both"] = (percentile_ranks(figures["rotnet_rotation"]) + percentile_ranks(figures["rotnet_knn"])) / 2
    row = {column: auroc(truth, s) for column, s in figures.items()}
    row["pretrain_s"] = seconds
    return row


def one_class_digits(c: int, digits, args, device: torch.device, root: Path) -> dict[str, float]:
    images, labels, held_out = digits
    train = images[(labels == c) & ~held_out]
    truth = (labels[held_out] != c).astype(np.int8)
    return compare(f"digit-{c}", train, images[held_out], truth, args, device, root)


def faces(args, device: torch.device, root: Path) -> dict[str, float]:
    """Real photos: pretrain on 70 face crops of skimage's lfw_subset; 30 held-out faces vs its 100 non-faces."""
    from skimage.data import lfw_subset

    crops = (lfw_subset() * 255).round().astype(np.uint8)  # (200, 25, 25): 100 faces, then 100 non-faces
    order = np.random.default_rng(args.seed).permutation(100)
    train, held_out = crops[order[:70]], crops[order[70:]]
    test = np.concatenate([held_out, crops[100:]])
    truth = np.r_[np.zeros(len(held_out)), np.ones(100)].astype(np.int8)
    return compare("faces", train, test, truth, args, device, root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="test_resnet")
    parser.add_argument("--img-size", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("-k", type=int, default=5)
    parser.add_argument("--test-fraction", type=float, default=0.3)
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--augment", default="none", help="pretrain's --augment (faces: crop)")
    parser.add_argument("--faces", action="store_true", help="the real-image check instead: faces vs non-faces")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = resolve_device(args.device)
    digits = split_digits(args.test_fraction, args.seed)
    classes = [int(c) for c in args.classes.split(",")]
    rows = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="score-outliers-") as tmp:
        if args.faces:
            rows["faces"] = faces(args, device, Path(tmp))
            classes = []
        for c in classes:
            rows[c] = one_class_digits(c, digits, args, device, Path(tmp))
            print(f"digit {c}: " + "  ".join(f"{rows[c][n]:.3f}" for n in COLUMNS), file=sys.stderr, flush=True)
    for name, row in rows.items():
        cells = "  ".join(f"{row[column]:.3f}" for column in COLUMNS)
        print(f"{name}: {cells}  ({row['pretrain_s']:.0f}s pretraining)", file=sys.stderr, flush=True)
    mean = {name: float(np.mean([r[name] for r in rows.values()])) for name in COLUMNS}
    print("mean AUROC  " + "  ".join(f"{name} {mean[name]:.3f}" for name in COLUMNS), file=sys.stderr)
    emit(
        {
            "benchmark": "outliers",
            "protocol": (
                "faces vs non-faces (lfw_subset): pretrain on 70 faces, score 30 held-out faces and 100 non-faces"
                if args.faces
                else "one-class digits: pretrain on one digit's training images, score held-out images of all ten"
            ),
            "settings": vars(args),
            "mean_auroc": mean,
            "per_class": {str(c): {k: round(v, 4) for k, v in r.items()} for c, r in rows.items()},
            "seconds": round(time.perf_counter() - t0, 1),
            "machine": machine(),
        }
    )


if __name__ == "__main__":
    main()
