"""rotnet predict: a RotNet as an orientation detector; --fix writes upright copies."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import PredictConfig, default_workers
from ._common import (
    BatchSizeOpt, DeviceOpt, JsonOpt, OverwriteOpt, PrecisionOpt, WeightsArg, WorkersOpt, err_console, error_boundary,
    note, out_console, print_json,
)
from .progress import ProgressView

EXAMPLES = """
[b]Examples[/b]

  rotnet predict runs/demo photo.jpg scans/            [dim]# a table: rotation, correction, confidence[/dim]
  rotnet predict runs/demo scans/ --fix --out upright/ [dim]# upright copies + predictions.csv/.json[/dim]
  rotnet predict runs/demo scans/ --tta --json         [dim]# agreement over rotated copies, machine output[/dim]
  rotnet predict runs/demo scans/ --fix --out upright/ --min-confidence 0.9 --device cuda
"""

_ACTION_STYLE = {"fixed": "green", "skipped-low-confidence": "yellow", "unreadable": "red"}


@error_boundary
def predict(
    ctx: typer.Context,
    weights: WeightsArg,
    inputs: Annotated[list[str], typer.Argument(help="Image files and folders (searched recursively).", metavar="images", show_default=False)],
    tta: Annotated[bool, typer.Option("--tta", help="Test-time agreement: also predict the image's rotated copies and combine their votes.")] = False,
    fix: Annotated[bool, typer.Option("--fix", help="Write an upright copy of each rotated image to --out (exact for multiples of 90; originals never change).")] = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for the upright copies and predictions.csv/.json (folder inputs are mirrored).")] = None,
    min_confidence: Annotated[float, typer.Option("--min-confidence", help="Fix only images predicted with at least this probability.")] = 0.5,
    overwrite: OverwriteOpt = False,
    batch_size: BatchSizeOpt = 64,
    workers: WorkersOpt = default_workers(),
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    json_out: JsonOpt = False,
) -> None:
    """Predict how each image is rotated (and how to turn it upright); --fix writes upright copies."""
    from ..prediction import predict as run_predict

    config = PredictConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="predict") as view:
        result = run_predict(config, progress=view)
    if json_out:
        print_json(result.to_dict())
        return
    _render(result)


def _render(result) -> None:
    title = f"Rotation of {len(result.predictions)} image(s): {result.model}{' with test-time agreement' if result.tta else ''}"
    table = Table(title=title, title_justify="left")
    table.add_column("image", overflow="fold")
    table.add_column("rotated by", justify="right")
    table.add_column("correction", justify="right")
    table.add_column("confidence", justify="right")
    table.add_column("action")
    for p in result.predictions:
        readable = p.predicted is not None
        table.add_row(
            escape(p.path),
            f"{p.predicted:g}°" if readable else "-",
            f"{p.correction:g}° ccw" if readable else "-",
            f"{100 * p.confidence:.1f}%" if readable else "-",
            f"[{_ACTION_STYLE.get(p.action, 'default')}]{p.action}[/]",
        )
    out_console.print(table)
    counts = ", ".join(f"{n} {action}" for action, n in result.counts().items())
    out_console.print(f"{counts}; angles counter-clockwise, confidence = softmax probability")
    if result.reports:
        out_console.print(f"report: [bold]{escape(str(result.reports[0]))}[/] and {escape(result.reports[1].name)}")
    if any("lossy" in p.note for p in result.predictions if p.action == "fixed"):
        note("JPEG/WebP copies were re-encoded (quality 95, EXIF and ICC profile kept); PNG and other lossless copies are exact")
