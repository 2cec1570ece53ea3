"""rotnet predict: a RotNet as an orientation detector; --fix turns rotated images upright."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import DEFAULT_BACKUP_SUFFIX, JPEG_ROUTES, PredictConfig, option_default
from ._common import (
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    PrecisionOpt,
    WeightsArg,
    WorkersOpt,
    err_console,
    error_boundary,
    note,
    out_console,
    print_json,
    print_table,
    shown,
    warn,
)
from .progress import ProgressView

EXAMPLES = """
[b]Examples[/b]

  rotnet predict runs/demo photo.jpg scans/            [dim]# a table: rotated, to fix, confidence[/dim]
  rotnet predict runs/demo scans/ --fix --out upright/ [dim]# upright copies + predictions.csv/.json[/dim]
  rotnet predict runs/demo scans/ --fix --out upright/ --copy-unchanged   [dim]# a complete upright mirror[/dim]
  rotnet predict runs/photos ~/Pictures --fix --in-place --jpeg lossless --out report/  [dim]# originals kept as *.orig[/dim]
  rotnet predict runs/demo scans/ --no-tta --json      [dim]# one pass an image (4x cheaper), machine output[/dim]
  rotnet predict exported/model.onnx scans/            [dim]# onnxruntime (rotnet export --format onnx --with-head)[/dim]
"""

_ACTION_STYLE = {"fixed": "green", "skipped-low-confidence": "yellow", "not-fixed": "red", "unreadable": "red"}

_JPEG_HELP = (
    "How --fix turns a JPEG: reencode (quality 95, lossy); lossless (libjpeg-turbo moves the DCT blocks, "
    "needs pip install 'rotnet-cli\\[jpeg]'; a JPEG whose moving edge is a partial block is re-encoded instead); "
    "lossless-trim (such edges are trimmed, by less than 16 px); orientation-tag (only the EXIF Orientation tag "
    "changes, pixels untouched: viewers show it upright, software that ignores EXIF does not). "
    f"One of {', '.join(JPEG_ROUTES)}."
)


@error_boundary
def predict(
    ctx: typer.Context,
    weights: WeightsArg,
    inputs: Annotated[
        list[str],
        typer.Argument(help="Image files and folders (searched recursively).", metavar="images", show_default=False),
    ],
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Test-time agreement: also predict the image's rotated copies and average their votes "
            "(default: on where the model's rotation set allows it); --no-tta: one pass, R times cheaper.",
            show_default=False,
        ),
    ] = option_default(PredictConfig, "tta"),
    fix: Annotated[
        bool,
        typer.Option(
            "--fix",
            help="Turn each confidently rotated image upright: a copy in --out (originals never change), or with --in-place the original itself.",
        ),
    ] = option_default(PredictConfig, "fix"),
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for predictions.csv/.json and, with --fix, the upright copies (folder inputs are mirrored).",
        ),
    ] = option_default(PredictConfig, "out"),
    in_place: Annotated[
        bool,
        typer.Option(
            "--in-place",
            help="With --fix: turn the originals themselves, each first kept as NAME.orig (--backup-suffix); file times are kept, unsure and upright images are not touched.",
        ),
    ] = option_default(PredictConfig, "in_place"),
    backup_suffix: Annotated[
        str | None,
        typer.Option(
            "--backup-suffix",
            help=f"With --in-place: the ending of each original's backup (default {DEFAULT_BACKUP_SUFFIX}).",
            show_default=False,
        ),
    ] = option_default(PredictConfig, "backup_suffix"),
    jpeg: Annotated[str, typer.Option("--jpeg", help=_JPEG_HELP)] = option_default(PredictConfig, "jpeg"),
    copy_unchanged: Annotated[
        bool,
        typer.Option(
            "--copy-unchanged",
            help="With --fix --out: copy the images left as they are (upright, unsure, not turnable) too, byte for byte: a complete upright mirror.",
        ),
    ] = option_default(PredictConfig, "copy_unchanged"),
    min_confidence: Annotated[
        float,
        typer.Option(
            "--min-confidence",
            help="Turn only images predicted with at least this probability (calibrated on the run's validation images; chance for images unlike its training images); the rest stay byte for byte as they were. The default keeps wrong turns rare: an image left sideways costs one manual turn, an upright photo turned wrong costs more.",
        ),
    ] = option_default(PredictConfig, "min_confidence"),
    overwrite: OverwriteOpt = option_default(PredictConfig, "overwrite"),
    batch_size: Annotated[
        int,
        typer.Option(
            "--batch-size", "-b", help="Images per forward pass (each image adds its rotated copies, unless --no-tta)."
        ),
    ] = option_default(PredictConfig, "batch_size"),
    workers: WorkersOpt = option_default(PredictConfig, "workers"),
    device: DeviceOpt = option_default(PredictConfig, "device"),
    precision: PrecisionOpt = option_default(PredictConfig, "precision"),
    json_out: JsonOpt = False,
) -> None:
    """Predict how each image is rotated (and how to turn it upright); --fix turns them upright."""
    from ..prediction import predict as run_predict

    config = PredictConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="predict") as view:
        result = run_predict(config, progress=view)
    if json_out:
        print_json(result.to_dict())
    else:
        _render(result, config)


def format_correction(angle: float) -> str:
    """How to turn the image upright, in the words of the report: none, turn 90° clockwise ..."""
    from ..angle_words import describe_correction

    return describe_correction(angle)


def format_rotation(angle: float) -> str:
    """How the image appears rotated from upright, in the words of the report: upright, 90° clockwise ..."""
    from ..angle_words import describe_rotation

    return describe_rotation(angle)


def _render(result, config: PredictConfig) -> None:
    from ..prediction import display_path

    title = f"Rotation of {len(result.predictions)} image(s): {result.model}{' with test-time agreement' if result.tta else ''}"
    table = Table(title=title, title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("rotated", justify="right")
    table.add_column("to fix", justify="right")
    table.add_column("confidence", justify="right")
    table.add_column("action")
    for p in result.predictions:
        readable = p.predicted is not None
        withheld = " [yellow](withheld)[/]" if p.unlike_training else ""
        table.add_row(
            shown(display_path(p.path)),
            format_rotation(p.predicted) if readable else "-",
            format_correction(p.correction) if readable else "-",
            f"{100 * p.confidence:.1f}%{withheld}" if readable else "-",
            f"[{_ACTION_STYLE.get(p.action, 'default')}]{p.action}[/]",
        )
    print_table(table)
    counts = ", ".join(f"{n} {action}" for action, n in result.counts().items())
    calibrated = (
        f", calibrated on its validation images (temperature {result.temperature:.2f})"
        if result.temperature != 1.0
        else ""
    )
    votes = f", averaged over the image's {len(result.rotations)} rotated copies" if result.tta else ""
    out_console.print(
        f"{counts}; confidence = probability of the predicted rotation{votes}{calibrated}", soft_wrap=True
    )
    if any(p.unlike_training for p in result.predictions):
        out_console.print(
            "(withheld) = unlike the training images: the confidence is set to chance, so --fix leaves it "
            "(the report's unlike_training column says why)",
            soft_wrap=True,
        )
    if result.reports:
        out_console.print(
            f"report: [bold]{shown(str(result.reports[0]))}[/] and {shown(result.reports[1].name)}", soft_wrap=True
        )
    fixed = [p for p in result.predictions if p.action == "fixed"]
    if config.in_place and fixed:
        note(
            f"the originals of the {len(fixed)} turned image(s) are kept beside them as NAME{config.resolved_backup_suffix}"
        )
    if any("re-encoded as JPEG" in p.note for p in fixed):
        note(
            "JPEGs were re-encoded (quality 95, EXIF and ICC profile kept); --jpeg lossless or orientation-tag leave "
            "their pixels as they were; PNG and other lossless copies have their pixels turned losslessly, checked "
            "(the report says so per image)"
        )
    not_fixed = [p for p in result.predictions if p.action == "not-fixed"]
    if not_fixed:
        warn(
            f"{len(not_fixed)} rotated image(s) could not be turned, e.g. {display_path(not_fixed[0].path)}: {not_fixed[0].note}"
        )
