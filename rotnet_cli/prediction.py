"""Rotation prediction with a trained RotNet, and turning rotated images upright.

A RotNet's rotation head is an orientation detector: for an image it says by which angle
of its rotation set the image appears rotated (counter-clockwise degrees, as everywhere
in rotnet). ``predict(config, progress)`` predicts that angle for every image, optionally
with test-time agreement over the image's rotated copies, and with ``fix`` turns each
confidently rotated image upright: as a copy under ``out`` (the originals never change), or
``in_place`` after keeping the original under a backup name. How one file is turned (and
how exactly) is upright.py's business; the report (predictions.csv/.json) has a row for
every image, written even when a full disk or Ctrl-C stops the work. It never prints;
progress goes to ``progress`` as typed events.
"""

from __future__ import annotations

import csv
import errno
import io
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data as data_lib
from . import rundir
from .checkpoint import make_dir, os_error_behind, write_json, write_text
from .config import DEFAULT_BACKUP_SUFFIX, PredictConfig, format_rotations
from .errors import ConfigError, DataError, OutputError
from .events import DeviceChosen, Progress, TaskProgress, WarningMessage, ignore
from .rotations import disc_mask, needs_mask, rotate_all
from .runtime import autocast, configure_backends, describe_device, resolve_device, resolve_precision
from .upright import DiskFull, NotWritten, UnreadableImage, copy_unchanged, require_jpeg_route, write_upright
from .angle_words import describe_correction, describe_rotation
from .calibration import temperature_of
from .fingerprint import feature_distance, is_colour, pooled_features, shorter_side, unlike_reasons
from .models import RotNet
from .weights import LoadedWeights, load_weights

REPORT_CSV = "predictions.csv"
REPORT_JSON = "predictions.json"
REPORT_FIELDS = (
    "path",
    "predicted",
    "correction",
    "rotated",
    "to_fix",
    "confidence",
    "action",
    "output",
    "note",
    "unlike_training",
    "path_hex",
)
# What happened to each image; "predicted" is the action when nothing is written (no --fix).
# not-fixed: confidently rotated, but it could not be turned (the note says why).
ACTIONS = ("fixed", "skipped-upright", "skipped-low-confidence", "not-fixed", "unreadable", "predicted")


@dataclass
class ImagePrediction:
    path: str
    predicted: float | None = None  # the angle the image appears rotated by (counter-clockwise degrees)
    correction: float | None = None  # the counter-clockwise angle that makes it upright
    confidence: float | None = None  # softmax probability of the predicted angle
    action: str = "predicted"
    output: str | None = None  # the file written: the upright copy (or, in place, the original), or an unchanged copy
    note: str = ""  # what was predicted and how the file was turned (lossless, re-encoded ...), or why it was not
    rotated: str = ""  # the predicted rotation in words, as the table says it ("90° clockwise")
    to_fix: str = ""  # the turn that makes it upright in words ("turn 90° counter-clockwise")
    unlike_training: str = ""  # why the image differs from the training images (its confidence is then chance)


@dataclass
class PredictResult:
    model: str
    weights: str
    rotations: tuple[float, ...]
    device: str
    tta: bool
    predictions: list[ImagePrediction] = field(default_factory=list)
    out_dir: Path | None = None
    reports: list[Path] = field(default_factory=list)
    temperature: float = 1.0  # the run's calibration: confidences are softmax(logits / temperature)

    def count(self, action: str) -> int:
        return sum(p.action == action for p in self.predictions)

    def counts(self) -> dict[str, int]:
        """action -> number of images, for the actions that happened (in ACTIONS order)."""
        counts = {a: self.count(a) for a in ACTIONS}
        return {a: n for a, n in counts.items() if n}

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "weights": self.weights,
            "rotations": list(self.rotations),
            "device": self.device,
            "tta": self.tta,
            "temperature": self.temperature,
            "angles": ANGLES_NOTE,
            "out_dir": str(self.out_dir) if self.out_dir else None,
            "reports": [str(p) for p in self.reports],
            "counts": self.counts(),
            "predictions": report_rows(self.predictions),
        }


ANGLES_NOTE = (
    "predicted and correction are counter-clockwise degrees; rotated and to_fix say the same in words, "
    "the short way round, as the table does"
)


@dataclass(frozen=True)
class InputImage:
    path: Path
    relative: Path  # where its upright copy goes below --out (mirrors a folder input)


# ----------------------------------------------------------------------------- inputs


def collect_inputs(specs: tuple[str, ...]) -> list[InputImage]:
    """Files as given, folders recursively; each image once, in a reproducible order."""
    found = [InputImage(path, relative) for path, relative in data_lib.image_inputs(specs)]
    targets: dict[Path, Path] = {}
    for image in found:
        other = targets.setdefault(image.relative, image.path)
        if other != image.path:
            raise ConfigError(
                f"{other} and {image.path} would both be written as {image.relative} below --out; "
                "predict them in separate runs"
            )
    return found


# ----------------------------------------------------------------------------- prediction


def tta_index_table(rotations: tuple[float, ...]) -> torch.Tensor:
    """(R, R) int64: entry [r, o] is the index of angle (o + r) mod 360.

    A copy rotated by rotations[r] of an image whose own rotation is rotations[o] appears
    rotated by their sum. The set must be closed under that sum for the votes to agree.
    """
    index = {a % 360: i for i, a in enumerate(rotations)}
    table = []
    for r in rotations:
        row = [index.get((o + r) % 360) for o in rotations]
        if None in row:
            raise ConfigError(
                f"--tta needs a rotation set closed under addition (like 0,90,180,270); the model's set is "
                f"{format_rotations(rotations)}; drop --tta"
            )
        table.append(row)
    return torch.tensor(table, dtype=torch.long)


def combine_votes(log_probs: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Test-time agreement: (R, N, R) log-probabilities of the copies -> (N, R) probabilities.

    log_probs[r, i] are the predictions for image i rotated by rotations[r]. For each
    candidate own rotation o, copy r must be predicted as table[r, o]; the copies'
    probabilities of that are averaged. The copies are views of one picture by one model,
    so their errors go together: multiplying them as if independent made confidences
    near 1 for images the model gets wrong, and --min-confidence stopped protecting. The
    average is never surer than its surest copy; on a weak model it is unsure rather
    than wrong (tests/test_predict.py measures both on held-out digits).
    """
    num_copies, n, num_classes = log_probs.shape
    index = table.to(log_probs.device)[:, None, :].expand(num_copies, n, num_classes)  # (R, N, R)
    agreeing = log_probs.gather(2, index)  # [r, i, o] = log p(copy r of image i shows rotation o + r)
    return agreeing.exp().mean(0)


@torch.no_grad()
def rotation_probabilities(
    model: RotNet,
    images: torch.Tensor,
    rotations: tuple[float, ...],
    device: torch.device,
    precision: str,
    tta_table: torch.Tensor | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) normalised images -> (N, R) probabilities of each rotation (the logits divided by the
    run's calibrated ``temperature``), and (N, D) pooled features of the images as given."""
    if tta_table is None:
        if needs_mask(rotations):  # the model saw every copy, the 0-degree one too, disc-masked
            images = images * disc_mask(*images.shape[-2:], device=images.device)
        with autocast(device, precision):
            features = model.backbone(images)  # (N, D)
            logits = model.head(features)  # (N, R)
        return (logits.float() / temperature).softmax(1), features.float()
    copies, _ = rotate_all(images, rotations)  # (R*N, 3, S, S), rotation-major
    with autocast(device, precision):
        features = model.backbone(copies)  # (R*N, D)
        logits = model.head(features)  # (R*N, R)
    log_probs = (logits.float() / temperature).log_softmax(1).view(len(rotations), len(images), len(rotations))
    upright = [i for i, a in enumerate(rotations) if a % 360 == 0]
    if upright:  # the copy turned by 0 is the image itself
        own = features.float().view(len(rotations), len(images), -1)[upright[0]]
    else:
        own = pooled_features(model, images, rotations, device, precision)
    return combine_votes(log_probs, tta_table), own


def predict(cfg: PredictConfig, progress: Progress | None = None) -> PredictResult:
    """Predict the rotation of every input image; with ``cfg.fix`` turn them upright; see the module docstring."""
    emit = progress or ignore
    require_jpeg_route(cfg.jpeg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    inputs = collect_inputs(cfg.inputs)
    out = Path(cfg.out).expanduser() if cfg.out else None
    check_outputs(cfg, out)
    weights = load_weights(cfg.weights, device)
    model = weights.rotnet()
    rotations = weights.rotations
    assert rotations is not None  # rotnet() raised otherwise
    tta_table = tta_index_table(rotations) if cfg.tta else None
    temperature = temperature_of(weights.info)
    record = training_record(weights)
    emit(DeviceChosen(describe_device(device), precision))

    # labels carry each file's index, so predictions map back to files; unreadable files
    # are the indices that never come back from the loader
    files = data_lib.ImageSet(
        "predict", weights.img_size, paths=[i.path for i in inputs], labels=torch.arange(len(inputs))
    )
    predictions = [ImagePrediction(str(i.path), action="unreadable", note="could not be decoded") for i in inputs]
    batches = data_lib.iterate_batches(
        files, torch.arange(len(inputs)), cfg.batch_size, device, drop_last=False, workers=cfg.workers
    )
    done = 0
    for batch in batches:
        x = data_lib.normalize(batch.images, weights.mean, weights.std)  # (n, 3, S, S) float32
        probs, features = rotation_probabilities(model, x, rotations, device, precision, tta_table, temperature)
        confidence, index = probs.cpu().max(1)  # (n,), (n,)
        colour = is_colour(batch.images).tolist()
        distances = features_distances(record, features)
        for j, (i, c, k) in enumerate(zip(batch.labels.tolist(), confidence.tolist(), index.tolist())):
            angle = rotations[k]
            p = ImagePrediction(str(inputs[i].path), angle, (360 - angle) % 360, c)
            p.rotated, p.to_fix = describe_rotation(angle), describe_correction(p.correction)
            if record is not None:
                side = shorter_side(inputs[i].path)
                reasons = unlike_reasons(record, colour[j], side, distances[j], weights.img_size)
                if reasons:  # the answer means little: its confidence is withheld (chance), so --fix leaves it
                    p.unlike_training, p.confidence = "; ".join(reasons), 1 / len(rotations)
            predictions[i] = p
        done += len(batch.images) + len(batch.skipped)
        emit(TaskProgress("predict", "predicting", done, len(inputs)))
    if done < len(inputs):  # batches whose files were all unreadable yield nothing
        emit(TaskProgress("predict", "predicting", len(inputs), len(inputs)))
    unreadable = [p.path for p in predictions if p.action == "unreadable"]
    if unreadable:
        emit(WarningMessage(data_lib.warn_skipped([display_path(p) for p in unreadable])))
    decoded = len(inputs) - len(unreadable)
    warning = unlike_training(weights, decoded, predictions)
    if warning:
        emit(WarningMessage(warning))

    result = PredictResult(
        weights.model_name, weights.source, rotations, describe_device(device), cfg.tta, predictions, out
    )
    result.temperature = temperature
    if out is not None:
        make_dir(out)
    try:
        if cfg.fix:
            _fix_images(inputs, predictions, cfg, out, emit)
    finally:  # every image has its row, also when a full disk or Ctrl-C stopped the copies
        if out is not None:
            result.reports = write_reports(out, result)
    full = [p for p in predictions if p.action == "not-fixed" and p.note == DISK_FULL]
    if full and out is not None:
        raise OutputError(
            f"disk full: {len(full)} image(s) were not written (the report in {out} names them); "
            "free space and run predict again with --overwrite"
        )
    if full:
        raise OutputError(
            f"disk full: {len(full)} image(s) were not turned; free space and run predict again "
            "(an image already turned has its backup, so it is not turned twice)"
        )
    return result


# ----------------------------------------------------------------------------- outputs: the folder policy in one place


def check_outputs(cfg: PredictConfig, out: Path | None) -> None:
    """Refuse outputs that cannot work before any model is loaded; nothing is created here.

    --out must not be (or be inside) an input folder (the originals are never changed) and
    is new, empty or --overwrite; --in-place backups must not look like images to the next run.
    """
    if out is not None:
        rundir.check_out_dir(out, overwrite=cfg.overwrite, inputs=cfg.inputs, overwrite_does="write into it")
    if cfg.in_place and cfg.resolved_backup_suffix.lower().endswith(data_lib.IMAGE_EXTENSIONS):
        raise ConfigError(
            f"--backup-suffix {cfg.resolved_backup_suffix} ends like an image file, so the next predict would take the "
            f"backups for images; use an ending like {DEFAULT_BACKUP_SUFFIX}"
        )


# ----------------------------------------------------------------------------- turning images upright


DISK_FULL = "not written: the disk is full"
INTERRUPTED = "not written: interrupted"


def _fix_images(
    inputs: list[InputImage], predictions: list[ImagePrediction], cfg: PredictConfig, out: Path | None, emit: Progress
) -> None:
    """Decide each image's action and write what is due: upright copies under ``out``, or the
    originals in place (each kept first under its backup name); --copy-unchanged copies the rest."""
    what = "turning images in place" if cfg.in_place else "writing upright copies"
    position = 0
    try:
        for position, (image, p) in enumerate(zip(inputs, predictions)):
            _fix_one(image, p, cfg, out)
            emit(TaskProgress("fix", what, position + 1, len(inputs)))
    except (DiskFull, KeyboardInterrupt) as e:
        note = DISK_FULL if isinstance(e, DiskFull) else INTERRUPTED
        for p in predictions[position:]:
            if p.output is not None:
                continue
            if p.action != "unreadable" and _due(p, cfg.min_confidence):
                p.action, p.note = "not-fixed", note
            elif cfg.copy_unchanged:
                p.note = "; ".join(filter(None, [p.note, note.replace("not written", "not copied")]))
        if isinstance(e, KeyboardInterrupt):
            raise


def _due(p: ImagePrediction, min_confidence: float) -> bool:
    return p.predicted is not None and p.correction != 0 and p.confidence >= min_confidence


def _fix_one(image: InputImage, p: ImagePrediction, cfg: PredictConfig, out: Path | None) -> None:
    if p.action == "unreadable":
        pass
    elif p.correction == 0:
        p.action = "skipped-upright"
    elif p.confidence < cfg.min_confidence:
        p.action = "skipped-low-confidence"
    else:
        target = image.path if cfg.in_place else out / image.relative
        backup = image.path.with_name(image.path.name + cfg.resolved_backup_suffix) if cfg.in_place else None
        try:
            if cfg.in_place and image.path.is_symlink():
                raise NotWritten("a symbolic link: not turned in place (give the file it points to)")
            if backup is not None and os.path.lexists(backup):
                raise NotWritten(
                    f"its backup {display_path(str(backup))} exists; move it away or choose another --backup-suffix"
                )
            make_dir(target.parent)
            how = write_upright(image.path, target, p.correction, jpeg=cfg.jpeg, backup=backup)
            p.note = f"{p.to_fix}: predicted {p.rotated} at {100 * p.confidence:.0f}% confidence; {how}"
            p.action, p.output = "fixed", str(target)
        except UnreadableImage as e:  # the file changed or broke since it was decoded
            p.action, p.note = "unreadable", str(e)
        except (NotWritten, OutputError) as e:
            p.action, p.note = "not-fixed", str(e)
    if cfg.copy_unchanged and p.action != "fixed":
        target = out / image.relative
        try:
            make_dir(target.parent)
            copy_unchanged(image.path, target)
            p.output, p.note = str(target), "; ".join(filter(None, [p.note, "copied unchanged"]))
        except (NotWritten, OutputError, OSError) as e:
            p.note = "; ".join(filter(None, [p.note, f"not copied: {e}"]))


# ----------------------------------------------------------------------------- images unlike the training data


def training_record(weights: LoadedWeights) -> dict | None:
    """What the weights' training images looked like: the run's own record (fingerprint.py), or for
    older runs on a built-in or torchvision dataset what that dataset is known to hold; else None."""
    record = weights.info.get("training_images")
    if record is not None:
        return record
    trained_on = data_lib.dataset_images(training_data(weights))
    if trained_on is None:
        return None
    pixels, grey = trained_on
    return {"side": pixels, "colour": 0.0 if grey else 1.0}


def training_data(weights: LoadedWeights) -> str | None:
    """The --data the weights were trained on, from their metadata or their run's config.json."""
    data = weights.info.get("data")
    if data is None and weights.run_dir is not None:
        try:
            data = rundir.read_config(weights.run_dir)["config"].get("data")
        except DataError:  # a warning is not worth failing the predictions for
            return None
    return data


def features_distances(record: dict | None, features: torch.Tensor) -> list[float | None]:
    """(n, D) pooled features -> each image's distance from the training images' (None without a fingerprint)."""
    stats = (record or {}).get("features")
    if stats is None or len(stats["mean"]) != features.shape[1]:
        return [None] * len(features)
    return feature_distance(features, stats).cpu().tolist()


def unlike_training(weights: LoadedWeights, decoded: int, predictions: list[ImagePrediction]) -> str | None:
    """One warning for the images that differ clearly from the data the weights were trained on
    (colour for a model of grey images, many times its images' size, features unlike theirs):
    how many, why, and that their confidence was withheld."""
    unlike = [p.unlike_training for p in predictions if p.unlike_training]
    if not unlike or not decoded:
        return None
    parts = []
    colour = sum("in colour" in u for u in unlike)
    if colour:
        parts.append(f"{colour} of {decoded} are in colour, its training images were grey")
    sized = [r for u in unlike for r in u.split("; ") if " px" in r]
    if sized:
        parts.append(f"{len(sized)} of {decoded} differ in size (e.g. {sized[0]})")
    featured = sum("features lie" in u for u in unlike)
    if featured:
        parts.append(f"{featured} of {decoded} have features unlike its training images'")
    which = "these images" if len(unlike) == decoded else "some of these images"
    chance = 100 / len(weights.rotations or (0,))
    return (
        f"{which} differ clearly from what {weights.model_name} was trained on ({training_data(weights) or 'its data'}): "
        f"{'; '.join(parts)}. Their confidence is withheld (set to chance, {chance:.0f}%), so --fix leaves them; "
        "to orient photos, pretrain on photos like them "
        "(e.g. rotnet pretrain --data ~/photos --img-size 224; see the README's 'Orienting photos')"
    )


# ----------------------------------------------------------------------------- report


def display_path(path: str) -> str:
    """A file name as text: bytes that are not UTF-8 shown as \\xNN (the report stays valid UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def path_hex(path: str) -> str:
    """The file name's bytes in hex when they are not valid UTF-8 (then ``display_path`` escapes them), else ''."""
    raw = os.fsencode(path)
    try:
        raw.decode("utf-8")
        return ""
    except UnicodeDecodeError:
        return raw.hex()


def report_rows(predictions: list[ImagePrediction]) -> list[dict]:
    """One row per image: names as valid text whatever bytes they hold (path_hex keeps the exact bytes)."""
    rows = []
    for p in predictions:
        row = asdict(p)
        row["path"] = display_path(p.path)
        row["output"] = display_path(p.output) if p.output else None
        row["path_hex"] = path_hex(p.path)
        rows.append(row)
    return rows


def write_reports(out: Path, result: PredictResult) -> list[Path]:
    """predictions.csv and predictions.json in ``out``, each written atomically; the JSON is the object
    ``--json`` prints (its rows under "predictions"), the CSV has one line per row."""
    result.reports = [out / REPORT_CSV, out / REPORT_JSON]
    rows = report_rows(result.predictions)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    try:
        return [write_text(out / REPORT_CSV, buffer.getvalue()), write_json(out / REPORT_JSON, result.to_dict())]
    except OutputError as e:
        cause = os_error_behind(e)
        if cause is not None and cause.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OutputError(
                f"disk full while writing the report in {out}; free space and run predict again "
                "(images already written stay as they are)"
            ) from e
        raise


__all__ = [
    "predict",
    "PredictResult",
    "ImagePrediction",
    "combine_votes",
    "tta_index_table",
    "display_path",
    "check_outputs",
    "unlike_training",
]
