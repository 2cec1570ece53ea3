"""How unusual each image is to a trained RotNet: outlier and novelty detection.

A network trained to tell how its training images are rotated is sure of itself on images like
them and unsure on images unlike them. ``score(config, progress)`` gives every image one number,
``score``, where higher always means more unusual, by one of three rules (``--method``):

- ``rotation`` (default; Hendrycks, Mazeika, Kadavath, Song, NeurIPS 2019, public code
  hendrycks/ss-ood): minus the sum, over every rotation the run was trained on, of the log-probability
  the head gives to the rotation actually applied to the image's rotated copy. The copies are made
  on the device, batch by batch, as pretraining makes them (normalise, then ``rotate_all``).
- ``knn``: the cosine distance of the image's features (the backbone's last stage, average-pooled,
  as ``rotnet embed`` gives them) to its k nearest features of a reference bank: the run's own
  training data (from its config.json) or ``--reference``; the mean of the k distances or the k-th.
  An image of the bank itself is not its own neighbour (scoring the training folder works).
- ``both``: the two combined on a rank scale: the mean of the two scores' percentiles among the
  scored images (0..1).

With known truth (``--inliers``/``--outliers``, or class sub-folders and ``--normal CLASS``) the
result also holds AUROC, AUPR and the FPR at 95% TPR, the outliers being the positive class.
The metrics are computed here in numpy (tests compare them with scikit-learn).

Library code: nothing here prints; progress goes to ``progress`` as typed events.
"""

from __future__ import annotations

import csv
import io
import json
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import csvfiles, jsontext, rundir
from . import data as data_lib
from ._version import __version__
from .atomicfiles import atomic_write, make_dir
from .config import ScoreConfig, format_rotations

# The feature library, in one place: it is moving from embedding.py/probing.py to features.py (issue 26);
# then this import is the one line to change.
from .embedding import check_out_file, make_embedder, require_pyarrow
from .errors import ConfigError, DataError, RotnetError, WeightsError
from .events import DeviceChosen, Message, Progress, TaskProgress, WarningMessage, ignore
from .onnx import is_onnx_spec
from .prediction import RotationModel, display_path, load_rotation_model, rotation_model
from .rotations import rotate_all
from .runtime import configure_backends, describe_device, resolve_device, resolve_precision
from .weights import LoadedWeights, load_weights

SCORES_FORMAT = "rotnet-scores"  # the marker in every scores file (a CSV's is its header)
METADATA_KEY = "rotnet"
FPR_AT_TPR = 0.95


# ----------------------------------------------------------------------------- metrics (numpy: no scikit-learn at run time)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, ties sharing their average rank (what scipy.stats.rankdata calls 'average')."""
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    starts = np.r_[True, ordered[1:] != ordered[:-1]]  # first position of each run of equal values
    group = np.cumsum(starts) - 1
    first = np.flatnonzero(starts)
    last = np.r_[first[1:], len(values)] - 1
    average = (first + last) / 2 + 1  # (groups,)
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = average[group]
    return ranks


def auroc(truth: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, positives (truth 1: outliers) scoring higher: the Mann-Whitney U, ties as half."""
    truth = np.asarray(truth, dtype=bool)
    pos, neg = int(truth.sum()), int((~truth).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    rank_sum = _ranks(np.asarray(scores, dtype=np.float64))[truth].sum()
    return float((rank_sum - pos * (pos + 1) / 2) / (pos * neg))


def _curve(truth: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(true positives, false positives) at every distinct threshold, from the highest score down."""
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="mergesort")
    ordered, hits = np.asarray(scores, dtype=np.float64)[order], np.asarray(truth, dtype=bool)[order]
    ends = np.r_[np.flatnonzero(ordered[1:] != ordered[:-1]), len(ordered) - 1]  # last index of each threshold
    tps = np.cumsum(hits)[ends]
    return tps, ends + 1 - tps


def aupr(truth: np.ndarray, scores: np.ndarray) -> float:
    """Average precision with outliers as the positive class (scikit-learn's average_precision_score)."""
    tps, fps = _curve(truth, scores)
    if len(tps) == 0 or tps[-1] == 0:
        return float("nan")
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def fpr_at_tpr(truth: np.ndarray, scores: np.ndarray, tpr: float = FPR_AT_TPR) -> float:
    """The share of inliers flagged at the lowest threshold that flags ``tpr`` of the outliers."""
    tps, fps = _curve(truth, scores)
    if len(tps) == 0 or tps[-1] == 0 or fps[-1] == 0:
        return float("nan")
    first = int(np.searchsorted(tps / tps[-1], tpr, side="left"))
    return float(fps[first] / fps[-1])


@dataclass
class Evaluation:
    """How well ``score`` separates known outliers (positives) from inliers."""

    inliers: int
    outliers: int
    auroc: float
    aupr: float
    fpr_at_95_tpr: float
    methods: dict[str, dict[str, float]] = field(default_factory=dict)  # every computed score's own figures

    def to_dict(self) -> dict[str, Any]:
        return {
            "inliers": self.inliers,
            "outliers": self.outliers,
            "auroc": self.auroc,
            "aupr": self.aupr,
            "fpr_at_95_tpr": self.fpr_at_95_tpr,
            "methods": self.methods,
        }


def evaluate(truth: np.ndarray, columns: dict[str, np.ndarray], main: str) -> Evaluation:
    """The figures of every score column; ``main``'s are the headline."""
    methods = {
        name: {"auroc": auroc(truth, s), "aupr": aupr(truth, s), "fpr_at_95_tpr": fpr_at_tpr(truth, s)}
        for name, s in columns.items()
    }
    head = methods[main]
    return Evaluation(
        int((truth == 0).sum()), int((truth == 1).sum()), head["auroc"], head["aupr"], head["fpr_at_95_tpr"], methods
    )


# ----------------------------------------------------------------------------- the two scores of a batch


@torch.no_grad()
def rotation_scores(model: RotationModel, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) uint8 on the device -> score (n,) = -sum_r log p(r | image rotated by r), and
    p(r | image rotated by r) (n, R): the Hendrycks et al. (2019) score over the run's own rotation set.
    ``model`` is predict's backend seam (PyTorch or onnxruntime); its raw logits, not calibrated ones."""
    rotations = model.rotations
    x = data_lib.normalize(images, model.mean, model.std)  # (n, 3, S, S) float32
    copies, labels = rotate_all(x, rotations)  # (R*n, 3, S, S), rotation-major; disc-masked where needed
    logits, _ = model.forward(copies)  # (R*n, R)
    labels = labels.to(logits.device)
    applied = logits.float().log_softmax(1).gather(1, labels[:, None]).view(len(rotations), len(images))  # (R, n)
    return -applied.sum(0), applied.exp().T


def knn_distances(queries: torch.Tensor, bank: torch.Tensor, k: int, how: str, exclude: torch.Tensor) -> torch.Tensor:
    """Cosine distances of L2-normalised (n, D) queries to their k nearest of the (M, D) bank -> (n,):
    their mean, or the k-th. ``exclude`` (n,) int64: the bank row that is the query itself (-1: none)."""
    similarity = queries @ bank.T  # (n, M)
    mine = exclude >= 0
    if mine.any():
        rows = torch.nonzero(mine).squeeze(1)
        similarity[rows, exclude[rows]] = -float("inf")
    # an image of the bank has one neighbour fewer: never count its own masked-out row as a neighbour
    k = min(k, bank.shape[0] - 1 if mine.any() else bank.shape[0])
    if k < 1:
        raise DataError(
            "the knn bank holds only the image being scored, so it has no neighbour; give a --reference "
            "folder with other images"
        )
    nearest = similarity.topk(k, dim=1).values  # (n, k), most similar first
    distance = 1 - nearest
    return distance.mean(1) if how == "mean" else distance[:, -1]


def percentile_ranks(values: np.ndarray) -> np.ndarray:
    """Each value's rank among ``values`` on a 0..1 scale (ties share theirs)."""
    if len(values) < 2:
        return np.full(len(values), 0.5)
    return (_ranks(values) - 1) / (len(values) - 1)


# ----------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class Part:
    """Images to score from one input: files (decoded by loader workers) or a dataset in memory."""

    images: data_lib.ImageSet
    names: list[str]  # the row's path, per image
    truth: np.ndarray | None  # (n,) 1 = known outlier, 0 = known inlier; None when unknown


def _dataset_name(spec: str) -> bool:
    key = data_lib._dataset_key(spec)
    return (key == "digits" or key in data_lib.TORCHVISION_DATASETS) and not Path(spec).expanduser().exists()


def _source_parts(spec: str, img_size: int, cfg: ScoreConfig, need_labels: bool, emit: Progress) -> list[Part]:
    """A dataset name or a folder, as open_source reads it (its train split, then val): rows carry class labels."""
    source = data_lib.open_source(
        spec,
        img_size,
        need_labels=need_labels,
        data_dir=cfg.data_dir,
        cache="none",
        workers=cfg.workers,
        strict=cfg.strict_data,
        progress=emit,
        option="DATA",
    )
    if source.skipped:
        emit(WarningMessage(data_lib.warn_skipped(list(source.skipped))))
    parts = []
    for split, images in (("train", source.train), ("val", source.val)):
        if images is None:
            continue
        if images.paths is not None:
            names = [str(p) for p in images.paths]
        else:
            names = [f"{spec}:{split}[{i}]" for i in range(len(images))]
        parts.append(Part(images, names, None))
    return parts


def _file_part(specs: tuple[str, ...], img_size: int, truth: int | None) -> Part:
    """Image files and folders (recursive), as predict reads them."""
    paths = [path for path, _ in data_lib.image_inputs(specs)]
    images = data_lib.ImageSet("score", img_size, paths=paths)
    return Part(images, [str(p) for p in paths], None if truth is None else np.full(len(paths), truth, np.int8))


def collect_parts(cfg: ScoreConfig, img_size: int, emit: Progress) -> list[Part]:
    """What to score, with the truth where it is known."""
    if cfg.inliers:
        return [_file_part(cfg.inliers, img_size, 0), _file_part(cfg.outliers, img_size, 1)]
    if cfg.normal is not None:
        if len(cfg.data) != 1:
            raise ConfigError("--normal CLASS takes one DATA: a folder of class sub-folders, or a dataset name")
        parts = _source_parts(cfg.data[0], img_size, cfg, True, emit)
        classes = parts[0].images.classes or []
        if cfg.normal not in classes:
            raise ConfigError(f"--normal {cfg.normal}: {cfg.data[0]} has the classes {', '.join(classes)}; name one")
        normal = classes.index(cfg.normal)
        return [
            Part(p.images, p.names, (p.images.labels.numpy() != normal).astype(np.int8)) for p in parts
        ]  # labels are required above
    parts, files = [], []
    for spec in cfg.data:
        if _dataset_name(spec):
            parts += _source_parts(spec, img_size, cfg, False, emit)
        else:
            files.append(spec)
    if files:
        parts.append(_file_part(tuple(files), img_size, None))
    return parts


def reference_images(
    cfg: ScoreConfig, weights: LoadedWeights, emit: Progress
) -> tuple[data_lib.ImageSet, list[str], str]:
    """The knn bank: its images, their row names, and what it is: --reference, or the training split of
    the run's own data (as its config.json names it)."""
    if cfg.reference is not None:
        spec, seed, val_split = cfg.reference, 0, 0.0
    else:
        record = rundir.read_config(weights.run_dir)["config"] if weights.run_dir is not None else None
        if not record or not isinstance(record.get("data"), str):
            raise ConfigError(
                f"{weights.source} does not name the data it was trained on; give the knn bank with --reference DIR"
            )
        checked = rundir.read_run_config(weights.run_dir)  # seed and split validated like user input
        spec, seed, val_split = checked.data, checked.seed, checked.val_split
        if not _dataset_name(spec) and not Path(spec).expanduser().is_dir():
            raise ConfigError(
                f"the data {weights.source} was trained on ({spec}) is not here; give the knn bank with --reference DIR"
            )
    source = data_lib.open_source(
        spec,
        weights.img_size,
        data_dir=cfg.data_dir,
        cache="none",
        workers=cfg.workers,
        strict=cfg.strict_data,
        progress=emit,
        option="--reference",
    )
    images = source.train
    names = (
        [str(p) for p in images.paths]
        if images.paths is not None
        else [f"{spec}:train[{i}]" for i in range(len(images))]
    )
    if cfg.reference is None and source.val is None and isinstance(val_split, float) and 0 < val_split < 1:
        train, _ = data_lib.split_indices(len(images), val_split, int(seed))  # the images the run trained on
        images, names = images.subset(train), [names[i] for i in train.tolist()]
    return images, names, spec


def _row_keys(images: data_lib.ImageSet, names: list[str]) -> list[str]:
    """How a row is matched with the bank (an image is not its own neighbour): a file by its resolved path."""
    if images.paths is not None:
        return [str(Path(p).resolve()) for p in images.paths]
    return names


# ----------------------------------------------------------------------------- scoring


@dataclass
class ScoreRows:
    """Every scored image, in input order."""

    paths: list[str]
    score: np.ndarray  # (N,) float64, higher = more unusual
    rotation: np.ndarray | None  # (N,) the Hendrycks score
    probabilities: np.ndarray | None  # (N, R) p(r | image rotated by r)
    knn: np.ndarray | None  # (N,) cosine distance to the bank
    truth: np.ndarray | None  # (N,) 1 = known outlier

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class ScoreResult:
    method: str
    model: str
    weights: str
    rotations: tuple[float, ...] | None
    rows: ScoreRows
    k: int | None = None
    knn_distance: str | None = None
    reference: str | None = None
    reference_images: int = 0
    evaluation: Evaluation | None = None
    out: Path | None = None
    format: str | None = None
    device: str = ""
    precision: str = ""
    seconds: float = 0.0
    skipped: list[str] = field(default_factory=list)

    def order(self) -> np.ndarray:
        """Row indices from the most unusual to the most typical (ties in input order)."""
        return np.argsort(-self.rows.score, kind="stable")

    def top(self, n: int) -> list[int]:
        return self.order()[:n].tolist()

    def bottom(self, n: int) -> list[int]:
        return self.order()[::-1][:n].tolist()

    def to_dict(self, rows: bool = True) -> dict[str, Any]:
        record = {
            "method": self.method,
            "model": self.model,
            "weights": self.weights,
            "rotations": list(self.rotations) if self.rotations else None,
            "k": self.k,
            "knn_distance": self.knn_distance,
            "reference": self.reference,
            "reference_images": self.reference_images,
            "images": len(self.rows),
            "evaluation": self.evaluation.to_dict() if self.evaluation else None,
            "out": str(self.out) if self.out else None,
            "out_format": self.format,
            "device": self.device,
            "precision": self.precision,
            "seconds": round(self.seconds, 3),
            "skipped": [display_path(p) for p in self.skipped],
        }
        if rows:
            record["rows"] = table_rows(self)
        return record


def score(cfg: ScoreConfig, progress: Progress | None = None) -> ScoreResult:
    """Score every image of ``cfg`` (and evaluate when the truth is known); see the module docstring."""
    emit = progress or ignore
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None:
        check_out_file(out, cfg.overwrite, ours=is_scores_file)
        if cfg.format == ".parquet":
            require_pyarrow()  # before any work
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    emit(DeviceChosen(describe_device(device), precision))
    weights, model = load_scorer(cfg, device, precision)
    about = model if model is not None else weights  # names, size and rotations: either has them
    parts = collect_parts(cfg, about.img_size, emit)
    t0 = time.perf_counter()
    result = ScoreResult(
        cfg.method,
        about.model_name,
        about.source,
        about.rotations,
        None,  # type: ignore[arg-type]
        device=model.device if model is not None else describe_device(device),
        precision=model.precision if model is not None else precision,
    )
    bank = knn_bank(cfg, weights, device, precision, emit) if cfg.method in ("knn", "both") else None
    if bank is not None:
        result.k, result.knn_distance = cfg.k, cfg.knn_distance
        result.reference, result.reference_images = bank.source, len(bank.vectors)
    total = sum(len(p.images) for p in parts)
    emit(Message(_describe(cfg, about, total)))
    result.rows, result.skipped = _score_parts(parts, model, bank, cfg, device, total, emit)
    if len(result.rows) == 0:
        raise DataError(f"none of the {total} images could be read; nothing was scored")
    if result.skipped:
        emit(WarningMessage(data_lib.warn_skipped([display_path(p) for p in result.skipped])))
    if result.rows.truth is not None:
        result.evaluation = _evaluate(result.rows, cfg.method, emit)
    result.seconds = time.perf_counter() - t0
    if out is not None:
        make_dir(out.parent)
        atomic_write(out, lambda tmp: WRITERS[cfg.format](tmp, result))
        result.out, result.format = out, cfg.format.lstrip(".")
    return result


def _runs_on_onnx(spec: str) -> bool:
    """A .onnx file, or a folder holding model.onnx and no PyTorch weights (an export with both is read
    on PyTorch, which also gives the features --method knn needs)."""
    path = Path(str(spec)).expanduser()
    return is_onnx_spec(spec) and (path.suffix.lower() == ".onnx" or not (path / "model.safetensors").is_file())


def load_scorer(cfg: ScoreConfig, device, precision: str) -> tuple[LoadedWeights | None, RotationModel | None]:
    """(PyTorch weights for the knn features, or None on onnxruntime; the rotation model through
    predict's backend seam, or None for --method knn)."""
    if _runs_on_onnx(cfg.weights):
        if cfg.method != "rotation":
            raise ConfigError(
                f"{cfg.weights} runs on onnxruntime, which gives the rotation logits only, not the features "
                f"--method {cfg.method} needs; use --method rotation, or give the run directory the ONNX file came from"
            )
        if cfg.img_size:
            raise ConfigError(f"--img-size {cfg.img_size}: an ONNX model scores at its own size; drop --img-size")
        return None, load_rotation_model(cfg.weights, device, precision)
    weights = load_weights(cfg.weights, device, img_size=cfg.img_size)
    if cfg.img_size and weights.kind not in ("timm", "random") and cfg.img_size != weights.img_size:
        raise ConfigError(
            f"--img-size {cfg.img_size}: {cfg.weights} was trained at {weights.img_size} px and scores at that size; "
            "drop --img-size (it sets the size of timm:NAME and random:NAME weights)"
        )
    if cfg.method == "knn":
        return weights, None
    if weights.head is None:
        raise WeightsError(
            f"{weights.source} has no rotation head, so it has no rotation score; score with features: --method knn "
            "(or give a run directory, its model.safetensors, or an export that kept its rotation head)"
        )
    return weights, rotation_model(weights, device, precision)


def _describe(cfg: ScoreConfig, weights, total: int) -> str:
    rule = {
        "rotation": f"rotation score over {format_rotations(weights.rotations or ())}",
        "knn": f"knn score (k={cfg.k}, {cfg.knn_distance} cosine distance)",
        "both": "rotation and knn scores on a rank scale",
    }[cfg.method]
    return f"{weights.model_name} at {weights.img_size} px, {rule}: {total} image(s)"


def _evaluate(rows: ScoreRows, method: str, emit: Progress) -> Evaluation:
    truth = rows.truth
    if truth.min() == truth.max():
        which = "outliers" if truth[0] == 0 else "inliers"
        raise DataError(f"none of the {which} could be read, so there is nothing to compare; check those images")
    columns = {"score": rows.score}
    if method == "both":
        columns.update(rotation=rows.rotation, knn=rows.knn)
    return evaluate(truth, columns, "score")


@dataclass
class KnnBank:
    """The features the knn score measures distances to."""

    embedder: Any  # the feature extractor (embedding.Embedder): L2-normalised last-stage features
    vectors: torch.Tensor  # (M, D) on the device
    index: dict[str, int]  # row key -> bank row, so an image of the bank is not its own neighbour
    source: str  # what the bank is: --reference, or the data the run trained on


def knn_bank(cfg: ScoreConfig, weights: LoadedWeights, device, precision: str, emit: Progress) -> KnnBank:
    images, names, source = reference_images(cfg, weights, emit)
    embedder = make_embedder(weights, -1, "avg", True, device, precision)
    vectors, keys, skipped = _features(embedder, images, names, cfg, emit)
    if skipped:
        emit(WarningMessage(f"the knn bank: {data_lib.warn_skipped(skipped)}"))
    return KnnBank(embedder, vectors, {key: i for i, key in enumerate(keys)}, source)


def _features(embedder, images: data_lib.ImageSet, names: list[str], cfg: ScoreConfig, emit: Progress):
    """L2-normalised (M, D) features of every readable image, their row keys, and the unreadable files."""
    keys_all = _row_keys(images, names)
    vectors, keys, skipped, done = [], [], [], 0
    for batch in data_lib.iterate_batches(
        images,
        torch.arange(len(images)),
        cfg.batch_size,
        embedder.device,
        drop_last=False,
        workers=cfg.workers,
        strict=cfg.strict_data,
        with_labels=False,
    ):
        vectors.append(embedder(batch.images))  # (n, D)
        keys += [keys_all[i] for i in batch.indices.tolist()]
        skipped += batch.skipped
        done += len(batch.images) + len(batch.skipped)
        emit(TaskProgress("bank", "knn bank", min(done, len(images)), len(images)))
    if done < len(images):
        emit(TaskProgress("bank", "knn bank", len(images), len(images)))
    if not vectors:
        raise DataError(f"none of the {len(images)} images of the knn bank could be read; give another --reference")
    return torch.cat(vectors), keys, skipped


def _score_parts(parts, model: RotationModel | None, bank: KnnBank | None, cfg: ScoreConfig, device, total: int, emit):
    """(ScoreRows in input order, unreadable files)."""
    paths, truth, rotation, probabilities, knn, skipped = [], [], [], [], [], []
    done = 0
    for part in parts:
        keys = _row_keys(part.images, part.names) if bank is not None else None
        for batch in data_lib.iterate_batches(
            part.images,
            torch.arange(len(part.images)),
            cfg.batch_size,
            device,
            drop_last=False,
            workers=cfg.workers,
            strict=cfg.strict_data,
            with_labels=False,
        ):
            idx = batch.indices.tolist()
            paths += [part.names[i] for i in idx]
            if part.truth is not None:
                truth.append(part.truth[idx])
            if cfg.method in ("rotation", "both"):
                s, p = rotation_scores(model, batch.images)
                rotation.append(s.cpu().double().numpy())
                probabilities.append(p.cpu().double().numpy())
            if bank is not None:
                exclude = torch.tensor([bank.index.get(keys[i], -1) for i in idx], device=bank.vectors.device)
                distances = knn_distances(bank.embedder(batch.images), bank.vectors, cfg.k, cfg.knn_distance, exclude)
                knn.append(distances.cpu().double().numpy())
            skipped += batch.skipped
            done += len(batch.images) + len(batch.skipped)
            emit(TaskProgress("score", "scoring", min(done, total), total))
    if done < total:  # files the loader dropped before any batch: the bar still ends full
        emit(TaskProgress("score", "scoring", total, total))
    join = lambda chunks: np.concatenate(chunks) if chunks else None  # noqa: E731
    rows = ScoreRows(paths, np.zeros(len(paths)), join(rotation), join(probabilities), join(knn), join(truth))
    if cfg.method == "rotation":
        rows.score = rows.rotation if rows.rotation is not None else rows.score
    elif cfg.method == "knn":
        rows.score = rows.knn if rows.knn is not None else rows.score
    elif len(paths):
        rows.score = (percentile_ranks(rows.rotation) + percentile_ranks(rows.knn)) / 2
    return rows, skipped


# ----------------------------------------------------------------------------- the file: one row per image


def column_names(result: ScoreResult) -> list[str]:
    names = ["path", "score"]
    if result.rows.rotation is not None:
        names.append("rotation_score")
        names += [f"p_{a:g}" for a in result.rotations or ()]
    if result.rows.knn is not None:
        names.append("knn_score")
    if result.rows.truth is not None:
        names.append("outlier")
    return names


def table_rows(result: ScoreResult) -> list[dict[str, Any]]:
    """One dict per image, in column_names order."""
    r = result.rows
    out = []
    for i, path in enumerate(r.paths):
        row: dict[str, Any] = {"path": display_path(path), "score": float(r.score[i])}
        if r.rotation is not None:
            row["rotation_score"] = float(r.rotation[i])
            for a, p in zip(result.rotations or (), r.probabilities[i]):
                row[f"p_{a:g}"] = float(p)
        if r.knn is not None:
            row["knn_score"] = float(r.knn[i])
        if r.truth is not None:
            row["outlier"] = int(r.truth[i])
        out.append(row)
    return out


def scores_metadata(result: ScoreResult) -> dict[str, Any]:
    return {
        "format": SCORES_FORMAT,
        "rotnet_version": __version__,
        **result.to_dict(rows=False),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_csv(path: Path, result: ScoreResult) -> None:
    names = column_names(result)
    buffer = io.StringIO()
    writer = csvfiles.DictWriter(buffer, fieldnames=names)
    writer.writeheader()
    for row in table_rows(result):
        writer.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in row.items()})
    path.write_text(buffer.getvalue(), encoding="utf-8")


def _write_json(path: Path, result: ScoreResult) -> None:
    record = {**scores_metadata(result), "rows": table_rows(result)}
    path.write_text(json.dumps(record, indent=1, allow_nan=True) + "\n", encoding="utf-8")


def _write_npz(path: Path, result: ScoreResult) -> None:
    columns = _arrays(result)
    with open(path, "wb") as f:
        np.savez(f, **columns, **{METADATA_KEY: np.array(json.dumps(scores_metadata(result)))})


def _write_parquet(path: Path, result: ScoreResult) -> None:
    pa, pq = require_pyarrow()
    columns = _arrays(result)
    table = pa.table({k: v.tolist() if k == "path" else v for k, v in columns.items() if k != "probabilities"})
    if "probabilities" in columns:
        for j, a in enumerate(result.rotations or ()):
            table = table.append_column(f"p_{a:g}", pa.array(columns["probabilities"][:, j]))
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(scores_metadata(result))})
    pq.write_table(table, str(path))


def _arrays(result: ScoreResult) -> dict[str, np.ndarray]:
    r = result.rows
    arrays = {"path": np.array([display_path(p) for p in r.paths], dtype=str), "score": r.score}
    if r.rotation is not None:
        arrays.update(rotation_score=r.rotation, probabilities=r.probabilities)
    if r.knn is not None:
        arrays["knn_score"] = r.knn
    if r.truth is not None:
        arrays["outlier"] = r.truth.astype(np.int8)
    return arrays


WRITERS = {".csv": _write_csv, ".json": _write_json, ".npz": _write_npz, ".parquet": _write_parquet}


# ----------------------------------------------------------------------------- reading a scores file back


@dataclass
class ScoresTable:
    """A scores file in memory: what viz outliers draws."""

    path: Path
    paths: list[str]
    score: np.ndarray  # (N,) float64
    method: str | None


def read_scores(path: str | Path) -> ScoresTable:
    """Read a file written by rotnet score (.csv, .json, .npz, .parquet); a DataError names what is wrong."""
    readers = {".csv": _read_csv, ".json": _read_json, ".npz": _read_npz, ".parquet": _read_parquet}
    path = Path(path).expanduser()
    paths, scores, method = rundir.read_table_file(path, readers, "scores", "rotnet score")
    scores = np.asarray(scores, dtype=np.float64)
    if len(paths) != len(scores) or len(scores) == 0 or not np.isfinite(scores).all():
        raise DataError(
            f"{path} holds no usable scores (empty, or not finite numbers); write it again with rotnet score"
        )
    return ScoresTable(path, [str(p) for p in paths], scores, method)


def _not_ours(path: Path) -> DataError:
    return DataError(f"{path} was not written by rotnet score; write scores with rotnet score WEIGHTS DATA --out FILE")


def _checked_meta(path: Path, text: Any) -> dict[str, Any]:
    meta = jsontext.loads(text) if isinstance(text, (str, bytes)) else text
    if not isinstance(meta, dict) or meta.get("format") != SCORES_FORMAT:
        raise _not_ours(path)
    return meta


def _read_csv(path: Path):
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        known = {"rotation_score", "knn_score", "outlier"}
        if (
            not header
            or header[:2] != ["path", "score"]
            or not all(h in known or h.startswith("p_") for h in header[2:])
        ):
            raise _not_ours(path)
        rows = list(reader)
    if any(len(row) != len(header) for row in rows):
        raise DataError(f"{path}: a line's fields do not match the header; is the file complete?")
    return [r[0] for r in rows], [float(r[1]) for r in rows], None


def _read_json(path: Path):
    record = _checked_meta(path, json.loads(path.read_text(encoding="utf-8")))
    rows = record.get("rows")
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "path" in r and "score" in r for r in rows):
        raise _not_ours(path)
    return [r["path"] for r in rows], [r["score"] for r in rows], record.get("method")


def _read_npz(path: Path):
    with open(path, "rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise _not_ours(path)
    with np.load(path, allow_pickle=False) as npz:
        if METADATA_KEY not in npz.files or "path" not in npz.files or "score" not in npz.files:
            raise _not_ours(path)
        meta = _checked_meta(path, str(npz[METADATA_KEY]))
        return npz["path"].tolist(), npz["score"], meta.get("method")


def _read_parquet(path: Path):
    _, pq = require_pyarrow()
    table = pq.read_table(path)
    meta = _checked_meta(path, (table.schema.metadata or {}).get(METADATA_KEY.encode()))
    if "path" not in table.column_names or "score" not in table.column_names:
        raise _not_ours(path)
    return table.column("path").to_pylist(), table.column("score").to_numpy(), meta.get("method")


def is_scores_file(path: Path) -> bool:
    """Whether rotnet score wrote ``path`` (what --overwrite may replace)."""
    try:
        read_scores(path)
    except RotnetError:
        return False
    return True


__all__ = [
    "score",
    "ScoreResult",
    "ScoreRows",
    "Evaluation",
    "evaluate",
    "auroc",
    "aupr",
    "fpr_at_tpr",
    "rotation_scores",
    "knn_distances",
    "read_scores",
    "ScoresTable",
]
