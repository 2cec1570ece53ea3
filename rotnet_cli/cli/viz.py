"""rotnet viz: pictures of what rotation training teaches (filters, attention maps, curves)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import AttentionConfig, CurvesConfig, FiltersConfig, OutliersSheetConfig, counted, option_default
from ._common import (
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    WeightsArg,
    err_console,
    error_boundary,
    out_console,
    print_json,
    print_table,
    shown,
    warn,
)
from ._typer import RotnetCommand, RotnetGroup, show_help_when_bare
from .progress import ProgressView

viz_app = typer.Typer(
    name="viz",
    cls=RotnetGroup,
    help="Draw what rotation training teaches: first-layer filters, attention maps per stage, training curves, embedding maps.",
    invoke_without_command=True,  # bare `rotnet viz`: its help, exit 0
    rich_markup_mode="rich",
)


@viz_app.callback()
def _viz(ctx: typer.Context) -> None:
    show_help_when_bare(ctx)


FILTERS_EXAMPLES = """
[b]Examples[/b]

  rotnet viz filters runs/demo --out filters.png
  rotnet viz filters random:resnet18 runs/demo --out filters.png   [dim]# before / after, side by side[/dim]
  rotnet viz filters timm:vit_small_patch16_224 --cols 24 --scale 2 --out vit.png
"""

ATTENTION_EXAMPLES = """
[b]Examples[/b]

  rotnet viz attention runs/demo photos/ --out attention/
  rotnet viz attention runs/demo cat.jpg --layers 2,3,4 --align   [dim]# rotated copies turned back upright[/dim]
  rotnet viz attention random:resnet18 cat.jpg --rotations 0,90,180,270 --power 2
"""

CURVES_EXAMPLES = """
[b]Examples[/b]

  rotnet viz curves runs/demo --out curves.png   [dim]# needs: pip install 'rotnet-cli\\[plot]'[/dim]
"""


@viz_app.command(cls=RotnetCommand, epilog=FILTERS_EXAMPLES)
@error_boundary
def filters(
    ctx: typer.Context,
    weights: Annotated[
        list[str],
        typer.Argument(
            help="One or more weights (run directory, checkpoint.pt, .safetensors, export, timm:NAME, random:NAME); several are drawn side by side.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="PNG file to write (an existing one only with --overwrite).")
    ] = option_default(FiltersConfig, "out"),
    labels: Annotated[
        list[str] | None,
        typer.Option("--label", help="Text above a panel, once per weights in order (default: the weights as given)."),
    ] = option_default(FiltersConfig, "labels"),
    scale: Annotated[
        int | None,
        typer.Option(
            "--scale", help="Enlarge every filter pixel to SCALE x SCALE pixels (default: tiles of about 32 px)."
        ),
    ] = option_default(FiltersConfig, "scale"),
    cols: Annotated[
        int | None, typer.Option("--cols", help="Filters per row (default: a square-ish grid).")
    ] = option_default(FiltersConfig, "cols"),
    overwrite: OverwriteOpt = option_default(FiltersConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """The first-layer (stem) filters of a model as a grid of tiles (paper Figure 4)."""
    from ..viz import draw_filters

    config = FiltersConfig.from_dict(ctx.params)
    result = draw_filters(config)
    if json_out:
        print_json(result.to_dict())
        return
    for panel in result.panels:
        kernel = "x".join(map(str, panel.kernel))
        out_console.print(
            f"{shown(panel.label)}: {panel.num_filters} filters of {panel.model}.{panel.layer} "
            f"({panel.in_channels} x {kernel}, scale {panel.scale})"
        )
    out_console.print(
        f"wrote [bold]{shown(str(result.out))}[/] ({result.width}x{result.height} px, {result.num_filters} filters)"
    )


@viz_app.command(cls=RotnetCommand, epilog=ATTENTION_EXAMPLES)
@error_boundary
def attention(
    ctx: typer.Context,
    weights: WeightsArg,
    images: Annotated[
        list[str],
        typer.Argument(help="Image files and/or folders of images (searched recursively).", show_default=False),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the PNGs, one per image (made if missing; one that is not empty only with --overwrite).",
        ),
    ] = option_default(AttentionConfig, "out"),
    layers: Annotated[
        str, typer.Option("--layers", help="Stages to draw, 1-based (negative from the last), e.g. 1,2,3, or all.")
    ] = option_default(AttentionConfig, "layers"),
    power: Annotated[
        str,
        typer.Option(
            "--power",
            help="p in sum over channels of |activation|^p; auto: 1, 2, 4 for early, middle, late stages (the paper).",
        ),
    ] = option_default(AttentionConfig, "power"),
    rotations: Annotated[
        str | None,
        typer.Option("--rotations", help="Angles for the rows (default: the model's rotation set, else 0,90,180,270)."),
    ] = option_default(AttentionConfig, "rotations"),
    align: Annotated[
        bool,
        typer.Option("--align", help="Turn every rotated copy and its maps back upright, so the rows can be compared."),
    ] = option_default(AttentionConfig, "align"),
    img_size: Annotated[
        int | None,
        typer.Option("--img-size", help="Input size in pixels (default: the size the weights were trained at)."),
    ] = option_default(AttentionConfig, "img_size"),
    scale: Annotated[
        int | None, typer.Option("--scale", help="Enlarge tiles SCALE times (default: to at least 128 px).")
    ] = option_default(AttentionConfig, "scale"),
    cmap: Annotated[
        str,
        typer.Option("--cmap", help="Colour map of the attention: jet or inferno."),
    ] = option_default(AttentionConfig, "cmap"),
    alpha: Annotated[
        float, typer.Option("--alpha", help="Opacity of the attention colours over the image, 0..1.")
    ] = option_default(AttentionConfig, "alpha"),
    device: DeviceOpt = option_default(AttentionConfig, "device"),
    overwrite: OverwriteOpt = option_default(AttentionConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """Attention maps of every stage for every rotated copy of each image (paper Figures 3 and 6)."""
    from ..viz import draw_attention

    config = AttentionConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="attention") as view:
        result = draw_attention(config, progress=view)
    for skipped in result.skipped:
        warn(f"skipped unreadable image {skipped}")
    if json_out:
        print_json(result.to_dict())
        return
    for image in result.images:
        out_console.print(f"{shown(image.source)} -> {shown(str(image.out))}")
    table = Table(title=f"{result.model}, {len(result.images)} image(s)", title_justify="left")
    table.add_column("stage", justify="right")
    table.add_column("p", justify="right")
    table.add_column("agreement", justify="right")
    for stage, p, value in zip(result.stages, result.powers, result.mean_agreement):
        table.add_row(str(stage), f"{p:g}", f"{value:.3f}")
    print_table(table)
    out_console.print(
        "agreement: mean correlation between the maps of the rotated copies, turned back upright "
        "(1 = every copy attends to the same object parts)"
    )


@viz_app.command(cls=RotnetCommand, epilog=CURVES_EXAMPLES)
@error_boundary
def curves(
    ctx: typer.Context,
    run: Annotated[
        str, typer.Argument(help="A run directory made by rotnet pretrain (or its metrics.jsonl).", show_default=False)
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="PNG file to write (an existing one only with --overwrite).")
    ] = option_default(CurvesConfig, "out"),
    overwrite: OverwriteOpt = option_default(CurvesConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """Loss and rotation accuracy per epoch of a run, training and validation (needs matplotlib)."""
    from ..viz import draw_curves

    result = draw_curves(CurvesConfig.from_dict(ctx.params))
    if json_out:
        print_json(result.to_dict())
        return
    out_console.print(f"wrote [bold]{shown(str(result.out))}[/] ({counted(result.epochs, 'epoch')})")


OUTLIERS_EXAMPLES = """
[b]Examples[/b]

  rotnet viz outliers scores.csv --out outliers.png         [dim]# a file written by rotnet score[/dim]
  rotnet viz outliers runs/demo photos/ -n 24 --out outliers.png   [dim]# weights and images: scored first[/dim]
"""


@viz_app.command(cls=RotnetCommand, epilog=OUTLIERS_EXAMPLES)
@error_boundary
def outliers(
    ctx: typer.Context,
    scores: Annotated[
        str,
        typer.Argument(
            help="A file written by rotnet score (.csv, .json, .npz, .parquet), or weights followed by the images to score.",
            show_default=False,
        ),
    ],
    data: Annotated[
        list[str] | None,
        typer.Argument(help="With weights: image files, folders or a dataset name to score.", show_default=False),
    ] = option_default(OutliersSheetConfig, "data"),
    out: Annotated[
        str, typer.Option("--out", "-o", help="PNG file to write (an existing one only with --overwrite).")
    ] = option_default(OutliersSheetConfig, "out"),
    n: Annotated[
        int, typer.Option("-n", help="Images of each kind: the N most unusual and the N most typical.")
    ] = option_default(OutliersSheetConfig, "n"),
    method: Annotated[
        str, typer.Option("--method", help="With weights: rotation, knn or both (see rotnet score --help).")
    ] = option_default(OutliersSheetConfig, "method"),
    device: DeviceOpt = option_default(OutliersSheetConfig, "device"),
    overwrite: OverwriteOpt = option_default(OutliersSheetConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """A contact sheet of the most unusual and most typical images, with their scores (from rotnet score)."""
    from ..outlier_sheet import draw_outliers

    with ProgressView(err_console, title="outliers") as view:
        result = draw_outliers(OutliersSheetConfig.from_dict(ctx.params), progress=view)
    if json_out:
        print_json(result.to_dict())
        return
    out_console.print(
        f"wrote [bold]{shown(str(result.out))}[/] ({result.width}x{result.height} px: the {len(result.unusual)} most "
        f"unusual and {len(result.typical)} most typical of {result.images:,} images)",
        highlight=False,
        soft_wrap=True,
    )
