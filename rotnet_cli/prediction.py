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

import errno
import functools
import io
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import csvfiles, predict_files, rundir
from . import data as data_lib
from .angle_words import describe_correction, describe_rotation
from .atomicfiles import make_dir, os_error_behind, write_json, write_text
from .calibration import temperature_of
from .config import DEFAULT_BACKUP_SUFFIX, PredictConfig, format_rotations
from .errors import ConfigError, DataError, OutputError
from .events import DeviceChosen, Progress, TaskProgress, WarningMessage, ignore
from .fingerprint import feature_distance, is_colour, unlike_reasons
from .predict_files import REPORT_CSV, REPORT_JSON, InputImage
from .rotations import disc_mask, needs_mask, rotate_all
from .runtime import autocast, configure_backends, describe_device, resolve_device, resolve_precision
from .upright import DiskFull, NotWritten, UnreadableImage, copy_unchanged, require_jpeg_route, write_upright
from .weights import LoadedWeights, load_weights

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


# ----------------------------------------------------------------------------- inputs


def collect_inputs(cfg: PredictConfig) -> list[InputImage]:
    """Files as given, folders recursively (several folders keep their names below --out); see predict_files."""
    return predict_files.collect_inputs(cfg.inputs, writes_copies=cfg.fix and not cfg.in_place)


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


def plan_tta(asked: bool | None, rotations: tuple[float, ...]) -> torch.Tensor | None:
    """The TTA index table, or None for one pass: --tta (an error where the set is not closed), --no-tta,
    else (None) test-time agreement wherever the rotation set allows it.

    On by default because one pass is sure of what the model has no way to know: a run on 70 grey faces
    answered a flat grey square at 94.6% and an upright crop of a photo as turned by 90 degrees at 98.3% in
    one pass; the copies' average
    gives a flat square exactly 1/R (its copies are one picture) and kept all 20 such images under 0.83.
    On the faces' held-out images it was also right more often (120 of 120 against 116) and let no
    wrong answer through --min-confidence 0.9 (one pass: 1 of 105); it costs R forward passes an image.
    """
    if asked is False:
        return None
    if asked is None:
        try:
            return tta_index_table(rotations)
        except ConfigError:  # a set like 0,90: one pass, as before
            return None
    return tta_index_table(rotations)


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


# ----------------------------------------------------------------------------- the backend seam


@dataclass
class RotationModel:
    """A rotation classifier, whatever runs it (PyTorch or onnxruntime), and what feeding it takes."""

    # (N, 3, S, S) normalised float32 -> (N, R) logits and (N, D) float32 pooled features (None where the
    # runtime gives the logits only: onnxruntime)
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    model_name: str
    rotations: tuple[float, ...]
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    device: str  # what runs it, in words
    precision: str  # resolved: fp32, bf16 or fp16 (onnxruntime: fp32)
    info: dict[str, Any] = field(default_factory=dict)  # the weights' metadata (training data, ...)
    run_dir: Path | None = None


def load_rotation_model(spec: str, device: torch.device, precision: str) -> RotationModel:
    """Any weights spec predict accepts -> a RotationModel: a .onnx file (or a folder holding model.onnx)
    runs on onnxruntime, everything else on PyTorch on ``device`` at ``precision``."""
    from .onnx import is_onnx_spec

    if is_onnx_spec(spec):
        return _onnx_rotation_model(spec, device)
    return rotation_model(load_weights(spec, device), device, precision)


def rotation_model(weights: LoadedWeights, device: torch.device, precision: str) -> RotationModel:
    """Weights already loaded on ``device`` (with a rotation head) -> the PyTorch RotationModel."""
    model = weights.rotnet()
    assert weights.rotations is not None  # rotnet() raised otherwise

    def forward(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with autocast(device, precision):
            features = model.backbone(images)  # (N, D)
            return model.head(features), features.float()  # (N, R), (N, D)

    return RotationModel(
        forward,
        weights.model_name,
        weights.rotations,
        weights.img_size,
        weights.mean,
        weights.std,
        weights.source,
        describe_device(device),
        precision,
        weights.info,
        weights.run_dir,
    )


def _onnx_rotation_model(spec: str, device: torch.device) -> RotationModel:
    from .onnx import load_onnx

    model = load_onnx(spec, device)
    if model.output != "logits":
        raise ConfigError(
            f"{model.path} returns the backbone's features, not rotations (it was exported without --with-head); "
            "export the run again with --format onnx --with-head"
        )
    assert model.rotations is not None  # required by its metadata when the output is logits
    return RotationModel(
        lambda images: (model(images), None),
        model.model_name,
        model.rotations,
        model.img_size,
        model.mean,
        model.std,
        str(model.path),
        f"onnxruntime ({model.provider})",
        "fp32",
        model.info,
    )


@torch.no_grad()
def rotation_probabilities(
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]],
    images: torch.Tensor,
    rotations: tuple[float, ...],
    tta_table: torch.Tensor | None,
    temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N, 3, S, S) normalised images -> (N, R) probabilities of each rotation (the logits divided by the
    run's calibrated ``temperature``), and (N, D) pooled features of the images as given (None where
    the runtime gives logits only)."""
    if tta_table is None:
        if needs_mask(rotations):  # the model saw every copy, the 0-degree one too, disc-masked
            images = images * disc_mask(*images.shape[-2:], device=images.device)
        logits, features = forward(images)  # (N, R), (N, D) or None
        return (logits.float() / temperature).softmax(1), features
    copies, _ = rotate_all(images, rotations)  # (R*N, 3, S, S), rotation-major
    logits, features = forward(copies)  # (R*N, R), (R*N, D) or None
    log_probs = (logits.float() / temperature).log_softmax(1).view(len(rotations), len(images), len(rotations))
    upright = [i for i, a in enumerate(rotations) if a % 360 == 0]
    if features is None:  # a runtime that gives logits only (onnxruntime)
        own = None
    elif upright:  # the copy turned by 0 is the image itself
        own = features.view(len(rotations), len(images), -1)[upright[0]]
    else:  # as the fingerprint saw them: disc-masked where the rotations need it
        masked = images * disc_mask(*images.shape[-2:], device=images.device) if needs_mask(rotations) else images
        own = forward(masked)[1]
    return combine_votes(log_probs, tta_table), own


def predict(cfg: PredictConfig, progress: Progress | None = None) -> PredictResult:
    """Predict the rotation of every input image; with ``cfg.fix`` turn them upright; see the module docstring.

    One process at a time writes an --out: two predicts started together both found it empty, both
    wrote into it and both said so, and the report named only the second's images."""
    if not cfg.out:
        return _predict(cfg, progress)
    with rundir.export_lock(Path(cfg.out).expanduser()):
        return _predict(cfg, progress)


def _predict(cfg: PredictConfig, progress: Progress | None) -> PredictResult:
    emit = progress or ignore
    require_jpeg_route(cfg.jpeg)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    inputs = collect_inputs(cfg)
    out = Path(cfg.out).expanduser() if cfg.out else None
    check_outputs(cfg, out, inputs)
    weights = load_rotation_model(cfg.weights, device, precision)
    rotations = weights.rotations
    tta_table = plan_tta(cfg.tta, rotations)
    temperature = temperature_of(weights.info)
    record = training_record(weights)
    emit(DeviceChosen(weights.device, weights.precision))

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
        probs, features = rotation_probabilities(weights.forward, x, rotations, tta_table, temperature)
        confidence, index = probs.cpu().max(1)  # (n,), (n,)
        colour = is_colour(batch.images).tolist()
        distances = features_distances(record, features, len(x))
        for j, (i, c, k) in enumerate(zip(batch.labels.tolist(), confidence.tolist(), index.tolist())):
            angle = rotations[k]
            p = ImagePrediction(str(inputs[i].path), angle, (360 - angle) % 360, c)
            p.rotated, p.to_fix = describe_rotation(angle), describe_correction(p.correction)
            if record is not None:
                side = data_lib.header_side(inputs[i].path)
                reasons = unlike_reasons(record, colour[j], side, distances[j], weights.img_size)
                if reasons:  # the answer means little: its confidence is withheld (chance), so --fix leaves it
                    p.unlike_training, p.confidence = "; ".join(reasons), 1 / len(rotations)
            predictions[i] = p
        done += len(batch.images) + len(batch.skipped)
        emit(TaskProgress("predict", "predicting", done, len(inputs)))
    if done < len(inputs):  # batches whose files were all unreadable yield nothing
        emit(TaskProgress("predict", "predicting", len(inputs), len(inputs)))
    for image, p in zip(inputs, predictions):
        if not image.supported and p.action == "unreadable":
            p.note = predict_files.UNSUPPORTED_NOTE
        elif p.action == "unreadable" and (oversized := data_lib.too_many_pixels(image.path)):
            p.note = oversized  # not broken: too large for Pillow to open
    unreadable = [p.path for p in predictions if p.action == "unreadable"]
    if unreadable:
        emit(WarningMessage(data_lib.warn_skipped([display_path(p) for p in unreadable])))
    decoded = len(inputs) - len(unreadable)
    warning = unlike_training(weights, decoded, predictions) if record is not None else unchecked(weights, decoded)
    if warning:
        emit(WarningMessage(warning))

    tta = tta_table is not None
    result = PredictResult(weights.model_name, weights.source, rotations, weights.device, tta, predictions, out)
    result.temperature = temperature
    if out is not None:
        make_dir(out)
    try:
        if cfg.fix and not cfg.in_place:
            targets = [out / i.relative for i in inputs]
            predict_files.record_started(out)
            predict_files.remove_files(p for temps in predict_files.stale_temp_files(targets).values() for p in temps)
        if cfg.fix:
            _fix_images(inputs, predictions, cfg, out, emit)
    finally:  # every image has its row, also when a full disk or Ctrl-C stopped the copies
        if out is not None:
            result.reports = write_reports(out, result)
            written = [Path(p.output) for p in predictions if p.output and not cfg.in_place]
            predict_files.record_written(out, [*written, *result.reports])
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


def check_outputs(cfg: PredictConfig, out: Path | None, inputs: list[InputImage] = ()) -> None:
    """Refuse outputs that cannot work before any model is loaded; nothing is created here.

    --out must not be (or be inside) an input folder (the originals are never changed) and
    is new, empty or --overwrite, which replaces only what predict wrote there (its reports,
    and with --fix the copies it would write again); --in-place backups must not look like
    images to the next run.
    """
    if out is not None:
        if cfg.in_place:  # checked first: the copies' reason ("the originals are never changed") does not hold
            predict_files.refuse_report_among_inputs(out, cfg.inputs)
        rundir.check_out_dir(out, overwrite=cfg.overwrite, inputs=cfg.inputs, overwrite_does="write into it")
        if cfg.overwrite:
            copies = [i.relative for i in inputs] if cfg.fix and not cfg.in_place else []
            predict_files.check_replaceable(out, [Path(REPORT_CSV), Path(REPORT_JSON), *copies])
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
    repaired = _repair_interrupted_turns(inputs, cfg) if cfg.in_place else {}
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
    finally:
        for image, p in zip(inputs, predictions):
            if repaired.get(image.path):
                names = ", ".join(display_path(name) for name in repaired[image.path])
                p.note = "; ".join(filter(None, [p.note, f"{REPAIRED} {names}"]))
        for line in _in_place_warnings(predictions):
            emit(WarningMessage(line))


def _due(p: ImagePrediction, min_confidence: float) -> bool:
    return p.predicted is not None and p.correction != 0 and not _too_unsure(p, min_confidence)


def _too_unsure(p: ImagePrediction, min_confidence: float) -> bool:
    """Below --min-confidence, or unlike the training images: a withheld confidence (chance) is no
    confidence at all, so even --min-confidence 0 (or anything up to chance) never turns the image."""
    return p.confidence < min_confidence or bool(p.unlike_training)


def _fix_one(image: InputImage, p: ImagePrediction, cfg: PredictConfig, out: Path | None) -> None:
    if p.action == "unreadable":
        pass
    elif p.correction == 0:
        p.action = "skipped-upright"
    elif _too_unsure(p, cfg.min_confidence):
        p.action = "skipped-low-confidence"
    else:
        try:
            if cfg.in_place:
                _turn_in_place(image.path, p, cfg)
            else:
                target = out / image.relative
                make_dir(target.parent)
                how = write_upright(image.path, target, p.correction, jpeg=cfg.jpeg, pending=_pending(out))
                p.note = f"{_what_was_predicted(p)}; {how}"
                p.action, p.output = "fixed", str(target)
        except UnreadableImage as e:  # the file changed or broke since it was decoded
            p.action, p.note = "unreadable", str(e)
        except (NotWritten, OutputError) as e:
            p.action, p.note = "not-fixed", str(e)
    if cfg.copy_unchanged and p.action != "fixed":
        target = out / image.relative
        try:
            make_dir(target.parent)
            copy_unchanged(image.path, target, pending=_pending(out))
            p.output, p.note = str(target), "; ".join(filter(None, [p.note, "copied unchanged"]))
        except (NotWritten, OutputError, OSError) as e:
            p.note = "; ".join(filter(None, [p.note, f"not copied: {e}"]))


def _pending(out: Path):
    """Notes each copy's content in --out before it is renamed into place (see predict_files.PENDING)."""
    return functools.partial(predict_files.record_pending, out)


REPAIRED = "repaired an interrupted turn: removed"
NOT_KEPT = "owner, group and mode not kept"


def _repair_interrupted_turns(inputs: list[InputImage], cfg: PredictConfig) -> dict[Path, list[str]]:
    """image -> the temp files a killed in-place turn of it left, now removed under the image's
    lock, whatever this run then does with it (a backup it left is handled by the next turn)."""
    repaired = {}
    for path, temps in predict_files.stale_temp_files(i.path for i in inputs).items():
        with predict_files.turn_lock(path) as free:
            if free:
                repaired[path] = predict_files.remove_files(temps)
    return repaired


def _what_was_predicted(p: ImagePrediction) -> str:
    """The first words of a written image's note: which turn, and why (whether the turn was right,
    rotnet cannot know; it says what it predicted and how sure it was)."""
    return f"{p.to_fix}: predicted {p.rotated} at {100 * p.confidence:.0f}% confidence"


def _turn_in_place(path: Path, p: ImagePrediction, cfg: PredictConfig) -> None:
    """Turn the original itself, kept first under its backup name, with its owner, group and mode;
    one process at a time."""
    backup = path.with_name(path.name + cfg.resolved_backup_suffix)
    if path.is_symlink():
        raise NotWritten("a symbolic link: not turned in place (give the file it points to)")
    with predict_files.turn_lock(path) as free:
        if not free:
            raise NotWritten("another rotnet predict is turning it; run again when that one has finished")
        if predict_files.backup_is_the_original(path, backup):  # a killed turn's: the file was never replaced
            backup.unlink()
            p.note = f"{REPAIRED} {display_path(backup.name)}"
        if os.path.lexists(backup):
            raise NotWritten(
                f"its backup {display_path(str(backup))} exists; move it away or choose another --backup-suffix"
            )
        before = predict_files.ownership(path)
        how = write_upright(path, path, p.correction, jpeg=cfg.jpeg, backup=backup)
        note = f"{_what_was_predicted(p)}; {how}"
        after = predict_files.ownership(path)
    extra = []
    if before and after and before != after:
        extra.append(predict_files.describe_ownership(before, after))
    p.note = "; ".join(filter(None, [note, *extra, p.note]))
    p.action, p.output = "fixed", str(path)


def _in_place_warnings(predictions: list[ImagePrediction]) -> list[str]:
    """One line per kind of trouble an in-place run met on turned files."""
    lines = []
    for marker, what in (
        (REPAIRED, "had what an interrupted turn left removed"),
        (NOT_KEPT, "lost their owner, group or mode"),
    ):
        hit = [p for p in predictions if marker in p.note]
        if hit:
            detail = next(part for part in hit[0].note.split("; ") if marker in part)
            lines.append(f"{len(hit)} image(s) {what}, e.g. {display_path(hit[0].path)}: {detail}")
    return lines


# ----------------------------------------------------------------------------- images unlike the training data


def training_record(weights: RotationModel) -> dict | None:
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


def training_data(weights: RotationModel) -> str | None:
    """The --data the weights were trained on, from their metadata or their run's config.json."""
    data = weights.info.get("data")
    if data is None and weights.run_dir is not None:
        try:
            data = rundir.read_config(weights.run_dir)["config"].get("data")
        except DataError:  # a warning is not worth failing the predictions for
            return None
    return data


def features_distances(record: dict | None, features: torch.Tensor | None, n: int) -> list[float | None]:
    """(n, D) pooled features -> each image's distance from the training images' (None without a
    fingerprint, or without features: onnxruntime gives the logits only)."""
    stats = (record or {}).get("features")
    if features is None or stats is None or len(stats["mean"]) != features.shape[1]:
        return [None] * n
    return feature_distance(features, stats).cpu().tolist()


def unlike_training(weights: RotationModel, decoded: int, predictions: list[ImagePrediction]) -> str | None:
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
        "(e.g. rotnet pretrain --data ~/photos --img-size 224; see docs/predict.md, 'Orienting photos')"
    )


def unchecked(weights: RotationModel, decoded: int) -> str | None:
    """One warning when the weights hold no record of their training images: nothing then tells an
    image unlike them (a large colour photo for a model of grey faces) from one like them, and its
    confidence, which can be high and wrong there, is not withheld."""
    if not decoded:
        return None
    source = Path(weights.source)
    if source.name == rundir.CHECKPOINT and weights.run_dir is not None:
        return (
            f"{weights.run_dir} stopped before its end, so it holds no record of its training images and no "
            "calibration: images unlike them are not found and their confidences are not withheld; finish it "
            f"first (rotnet pretrain --resume {weights.run_dir})"
        )
    return (
        f"{weights.source} holds no record of its training images (kept checkpoints, exports and runs made "
        "before rotnet kept one have none): images unlike them are not found and their confidences are not "
        "withheld; predict with the finished run directory for that check"
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
    writer = csvfiles.DictWriter(buffer, REPORT_FIELDS)
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
    "load_rotation_model",
    "RotationModel",
    "PredictResult",
    "ImagePrediction",
    "combine_votes",
    "tta_index_table",
    "plan_tta",
    "display_path",
    "check_outputs",
    "unlike_training",
]
