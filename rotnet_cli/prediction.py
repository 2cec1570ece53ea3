"""Rotation prediction with a trained RotNet, and upright copies of rotated images.

A RotNet's rotation head is an orientation detector: for an image it says by which angle
of its rotation set the image appears rotated (counter-clockwise degrees, as everywhere
in rotnet). ``predict(config, progress)`` predicts that angle for every image, optionally
with test-time agreement over the image's rotated copies, and with ``fix`` writes an
upright copy of each confidently rotated image to ``out``: the correction is applied to
the original full-resolution file (exact transposes for multiples of 90 degrees), never
to the originals themselves. It never prints; progress goes to ``progress`` as typed events.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from . import data as data_lib
from . import rundir
from .checkpoint import atomic_write, make_dir, write_json, write_text
from .config import PredictConfig, format_rotations
from .errors import ConfigError
from .events import DeviceChosen, Progress, TaskProgress, WarningMessage, ignore
from .rotations import disc_mask, is_exact, needs_mask, rotate_all
from .runtime import autocast, configure_backends, describe_device, resolve_device, resolve_precision
from .weights import load_weights

REPORT_CSV = "predictions.csv"
REPORT_JSON = "predictions.json"
REPORT_FIELDS = ("path", "predicted", "correction", "confidence", "action", "output", "note")
JPEG_QUALITY = 95
# What happened to each image; "predicted" is the action when nothing is written (no --fix).
ACTIONS = ("fixed", "skipped-upright", "skipped-low-confidence", "unreadable", "predicted")


@dataclass
class ImagePrediction:
    path: str
    predicted: float | None = None  # the angle the image appears rotated by (counter-clockwise degrees)
    correction: float | None = None  # the counter-clockwise angle that makes it upright
    confidence: float | None = None  # softmax probability of the predicted angle
    action: str = "predicted"
    output: str | None = None  # the upright copy, when one was written
    note: str = ""  # why an image was unreadable, or how its copy was made


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

    def count(self, action: str) -> int:
        return sum(p.action == action for p in self.predictions)

    def counts(self) -> dict[str, int]:
        """action -> number of images, for the actions that happened (in ACTIONS order)."""
        counts = {a: self.count(a) for a in ACTIONS}
        return {a: n for a, n in counts.items() if n}

    def to_dict(self) -> dict:
        return {
            "model": self.model, "weights": self.weights, "rotations": list(self.rotations), "device": self.device,
            "tta": self.tta, "out_dir": str(self.out_dir) if self.out_dir else None,
            "reports": [str(p) for p in self.reports],
            "counts": self.counts(),
            "predictions": [asdict(p) for p in self.predictions],
        }


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
    candidate own rotation o, copy r must be predicted as table[r, o]; the log-probabilities
    of those predictions are summed over the copies and renormalised with a softmax.
    """
    num_copies, n, num_classes = log_probs.shape
    index = table.to(log_probs.device)[:, None, :].expand(num_copies, n, num_classes)  # (R, N, R)
    agreeing = log_probs.gather(2, index)  # [r, i, o] = log p(copy r of image i shows rotation o + r)
    return agreeing.sum(0).softmax(1)


@torch.no_grad()
def rotation_probabilities(model: torch.nn.Module, images: torch.Tensor, rotations: tuple[float, ...],
                           device: torch.device, precision: str, tta_table: torch.Tensor | None) -> torch.Tensor:
    """(N, 3, S, S) normalised images -> (N, R) probabilities of each rotation."""
    if tta_table is None:
        if needs_mask(rotations):  # the model saw every copy, the 0-degree one too, disc-masked
            images = images * disc_mask(*images.shape[-2:], device=images.device)
        with autocast(device, precision):
            logits = model(images)  # (N, R)
        return logits.float().softmax(1)
    copies, _ = rotate_all(images, rotations)  # (R*N, 3, S, S), rotation-major
    with autocast(device, precision):
        logits = model(copies)  # (R*N, R)
    log_probs = logits.float().log_softmax(1).view(len(rotations), len(images), len(rotations))
    return combine_votes(log_probs, tta_table)


def predict(cfg: PredictConfig, progress: Progress | None = None) -> PredictResult:
    """Predict the rotation of every input image; with ``cfg.fix`` write upright copies; see the module docstring."""
    emit = progress or ignore
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    configure_backends(device)
    inputs = collect_inputs(cfg.inputs)
    out = Path(cfg.out).expanduser() if cfg.out else None
    if out is not None:  # never an input folder, nor inside one: the originals are never changed
        rundir.check_out_dir(out, overwrite=cfg.overwrite, inputs=cfg.inputs, overwrite_does="write into it")
    weights = load_weights(cfg.weights, device)
    model = weights.rotnet()
    rotations = weights.rotations
    assert rotations is not None  # rotnet() raised otherwise
    tta_table = tta_index_table(rotations) if cfg.tta else None
    emit(DeviceChosen(describe_device(device), precision))

    # labels carry each file's index, so predictions map back to files; unreadable files
    # are the indices that never come back from the loader
    files = data_lib.ImageSet("predict", weights.img_size, paths=[i.path for i in inputs], labels=torch.arange(len(inputs)))
    predictions = [ImagePrediction(str(i.path), action="unreadable", note="could not be decoded") for i in inputs]
    batches = data_lib.iterate_batches(
        files, torch.arange(len(inputs)), cfg.batch_size, device, drop_last=False, workers=cfg.workers
    )
    done = 0
    for batch in batches:
        x = data_lib.normalize(batch.images, weights.mean, weights.std)  # (n, 3, S, S) float32
        probs = rotation_probabilities(model, x, rotations, device, precision, tta_table).cpu()  # (n, R)
        confidence, index = probs.max(1)
        for i, c, k in zip(batch.labels.tolist(), confidence.tolist(), index.tolist()):
            angle = rotations[k]
            predictions[i] = ImagePrediction(str(inputs[i].path), angle, (360 - angle) % 360, c)
        done += len(batch.images) + len(batch.skipped)
        emit(TaskProgress("predict", "predicting", done, len(inputs)))
    if done < len(inputs):  # batches whose files were all unreadable yield nothing
        emit(TaskProgress("predict", "predicting", len(inputs), len(inputs)))
    unreadable = [p.path for p in predictions if p.action == "unreadable"]
    if unreadable:
        emit(WarningMessage(data_lib.warn_skipped(unreadable)))

    result = PredictResult(weights.model_name, weights.source, rotations, describe_device(device), cfg.tta, predictions, out)
    if out is not None:
        make_dir(out)
        if cfg.fix:
            _write_upright_copies(inputs, predictions, out, cfg.min_confidence, emit)
        result.reports = write_reports(out, predictions)
    return result


# ----------------------------------------------------------------------------- upright copies


def _write_upright_copies(inputs: list[InputImage], predictions: list[ImagePrediction], out: Path,
                          min_confidence: float, emit: Progress) -> None:
    """Decide each readable image's action and write the upright copies that are due."""
    due = [i for i, p in enumerate(predictions) if p.action != "unreadable"]
    for done, i in enumerate(due, 1):
        p = predictions[i]
        if p.predicted == 0:
            p.action = "skipped-upright"
        elif p.confidence < min_confidence:
            p.action = "skipped-low-confidence"
        else:
            target = out / inputs[i].relative
            try:
                p.note = write_upright(inputs[i].path, target, p.correction)
                p.action, p.output = "fixed", str(target)
            except UnreadableImage as e:  # the file changed or broke since it was decoded
                p.action, p.note = "unreadable", str(e)
        emit(TaskProgress("fix", "writing upright copies", done, len(due)))


class UnreadableImage(Exception):
    """A file that decoded for the model but cannot be read in full for its copy."""


def write_upright(source: Path, target: Path, correction: float) -> str:
    """Write ``source`` turned counter-clockwise by ``correction`` degrees to ``target``, atomically.

    EXIF orientation is applied first (as a viewer shows the file) and removed from the
    copy. Multiples of 90 are exact transposes at full resolution; other angles are
    resampled (bicubic, canvas expanded). Format, mode, palette, ICC profile and EXIF stay.
    Returns a note on how the copy was made.
    """
    from PIL import Image, ImageOps, JpegImagePlugin

    try:
        with Image.open(source) as original:
            fmt = "JPEG" if original.format in ("JPEG", "MPO") else original.format
            image = ImageOps.exif_transpose(original)  # a new image: the original's EXIF stays as it is
            params = _save_params(image, fmt, JpegImagePlugin.get_sampling(original))
    except OSError as e:  # PIL's UnidentifiedImageError and truncated-file errors are OSErrors
        raise UnreadableImage(f"could not be read for its upright copy: {e}") from e
    if is_exact(correction):
        turns = int(correction // 90) % 4  # PIL's ROTATE_90 is counter-clockwise, as rotnet's angles
        if turns:
            image = image.transpose((Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)[turns - 1])
        notes = ["exact"]
    else:
        image = image.rotate(correction, resample=Image.Resampling.BICUBIC, expand=True)
        notes = [f"resampled (bicubic) for {correction:g} degrees"]
    if fmt in ("JPEG", "WEBP"):
        notes.append(f"re-encoded as {fmt} (lossy)")
    make_dir(target.parent)
    atomic_write(target, lambda tmp: image.save(tmp, format=fmt, **params))
    return ", ".join(notes)


def _save_params(image, fmt: str, jpeg_sampling: int) -> dict:
    """Keep what describes the picture: ICC profile, transparency, dpi, EXIF without its
    orientation tag, and for JPEG a high quality with the original chroma subsampling."""
    params = {key: image.info[key] for key in ("icc_profile", "transparency", "dpi") if image.info.get(key) is not None}
    exif = image.getexif()
    if exif:
        exif.pop(0x0112, None)  # Orientation: the pixels of the copy are upright
        params["exif"] = exif.tobytes()
    if fmt in ("JPEG", "WEBP"):
        params["quality"] = JPEG_QUALITY
    if fmt == "JPEG" and jpeg_sampling != -1:
        params["subsampling"] = jpeg_sampling
    return params


# ----------------------------------------------------------------------------- report


def write_reports(out: Path, predictions: list[ImagePrediction]) -> list[Path]:
    """predictions.csv and predictions.json in ``out``, each written atomically."""
    rows = [asdict(p) for p in predictions]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=REPORT_FIELDS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return [write_text(out / REPORT_CSV, buffer.getvalue()), write_json(out / REPORT_JSON, rows)]


__all__ = ["predict", "PredictResult", "ImagePrediction", "write_upright", "combine_votes", "tta_index_table"]
