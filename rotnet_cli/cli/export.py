"""rotnet export: a pretrained backbone as a folder timm and the Hugging Face hub load directly."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import ExportConfig, format_rotations, option_default
from ._common import (
    JsonOpt,
    OverwriteOpt,
    WeightsArg,
    err_console,
    error_boundary,
    out_console,
    print_json,
    print_table,
    shown,
)
from .progress import ProgressView

EXAMPLES = """
[b]Examples[/b]

  rotnet export runs/demo --out exported/
  [dim]# then, anywhere with timm: timm.create_model("local-dir:exported", pretrained=True)[/dim]
  rotnet export runs/demo --out exported/ --with-head  [dim]# for rotnet predict[/dim]
  rotnet export runs/demo/checkpoint.pt --out exported/ --dtype bf16 --overwrite
  rotnet export runs/demo --out exported/ --json       [dim]# paths and sizes[/dim]
  rotnet export runs/demo --out exported/ --format onnx --with-head  [dim]# + model.onnx for onnxruntime[/dim]
"""


@error_boundary
def export(
    ctx: typer.Context,
    weights: WeightsArg,
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder to write (timm / Hugging Face hub layout: model.safetensors, config.json, README.md).",
            show_default=False,
        ),
    ],
    with_head: Annotated[
        bool,
        typer.Option(
            "--with-head",
            help="Also write the rotation head (rotation_head.safetensors, needed by rotnet predict); timm still loads the backbone strictly.",
        ),
    ] = option_default(ExportConfig, "with_head"),
    dtype: Annotated[
        str, typer.Option("--dtype", help="Weights precision in the files: fp32, fp16 or bf16.")
    ] = option_default(ExportConfig, "dtype"),
    format: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors, or onnx: model.onnx as well (features; rotation logits with --with-head), "
            "checked with onnxruntime; needs pip install 'rotnet-cli\\[onnx]'.",
        ),
    ] = option_default(ExportConfig, "format"),
    overwrite: OverwriteOpt = option_default(ExportConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """Export the backbone as safetensors + config.json that timm loads with one line; verified by loading it back."""
    from ..exporting import export as run_export

    config = ExportConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="export") as view:
        result = run_export(config, progress=view)

    if json_out:
        print_json(result.to_dict())
        return
    _render(result)


def _size(n: int) -> str:
    value, unit = float(n), "B"
    for bigger in ("KB", "MB", "GB"):
        if value < 1024:
            break
        value, unit = value / 1024, bigger
    return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"


def _render(result) -> None:
    rotations = f", rotations {format_rotations(result.rotations)}" if result.rotations else ""
    out_console.print(
        f"exported {result.model} ({result.num_params:,} parameters, {result.head_hidden_size} features, "
        f"{result.img_size} px, {result.dtype}{rotations}) to [bold]{shown(str(result.out_dir))}[/]",
        highlight=False,
        soft_wrap=True,
    )
    table = Table("file", "size")
    table.columns[1].justify = "right"
    for name, size in result.files.items():
        table.add_row(name, _size(size))
    print_table(table)
    worst = max(result.round_trip.values())
    loaders = "; ".join(result.round_trip)
    out_console.print(
        f"verified (strict load, {'features identical' if worst == 0 else f'features equal within {worst:.2g}'}): {loaders}",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    if result.onnx:
        diffs = ", ".join(f"{name} {diff:.2g}" for name, diff in result.onnx["max_abs_diff"].items())
        out_console.print(
            f"{result.onnx['file']}: {result.onnx['output']}, opset {result.onnx['opset']}, dynamic batch; "
            f"onnxruntime vs PyTorch max abs difference: {diffs}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    out_console.print("load it with timm:")
    out_console.print(result.snippet, markup=False, highlight=False, soft_wrap=True)  # unwrapped: it is copied
