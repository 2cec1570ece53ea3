"""rotnet viz: pictures of what rotation training teaches (filters, attention maps, curves)."""

from __future__ import annotations

from typing import Annotated, List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import AttentionConfig, CurvesConfig, FiltersConfig, counted
from ._common import (
    printable,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    WeightsArg,
    err_console,
    error_boundary,
    out_console,
    print_json,
    print_table,
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
        List[str],
        typer.Argument(
            help="One or more weights (run directory, checkpoint.pt, .safetensors, export, timm:NAME, random:NAME); several are drawn side by side.",
            show_default=False,
        ),
    ],
    out: Annotated[
        str, typer.Option("--out", "-o", help="PNG file to write (an existing one only with --overwrite).")
    ] = "filters.png",
    labels: Annotated[
        Optional[List[str]],
        typer.Option("--label", help="Text above a panel, once per weights in order (default: the weights as given)."),
    ] = None,
    scale: Annotated[
        Optional[int],
        typer.Option(
            "--scale", help="Enlarge every filter pixel to SCALE x SCALE pixels (default: tiles of about 32 px)."
        ),
    ] = None,
    cols: Annotated[Optional[int], typer.Option("--cols", help="Filters per row (default: a square-ish grid).")] = None,
    overwrite: OverwriteOpt = False,
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
            f"{escape(panel.label)}: {panel.num_filters} filters of {panel.model}.{panel.layer} "
            f"({panel.in_channels} x {kernel}, scale {panel.scale})"
        )
    out_console.print(
        f"wrote [bold]{printable(result.out)}[/] ({result.width}x{result.height} px, {result.num_filters} filters)"
    )


@viz_app.command(cls=RotnetCommand, epilog=ATTENTION_EXAMPLES)
@error_boundary
def attention(
    ctx: typer.Context,
    weights: WeightsArg,
    images: Annotated[
        List[str],
        typer.Argument(help="Image files and/or folders of images (searched recursively).", show_default=False),
    ],
    out: Annotated[
        str,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the PNGs, one per image (made if missing; one that is not empty only with --overwrite).",
        ),
    ] = "attention",
    layers: Annotated[
        str, typer.Option("--layers", help="Stages to draw, 1-based (negative from the last), e.g. 1,2,3, or all.")
    ] = "all",
    power: Annotated[
        str,
        typer.Option(
            "--power",
            help="p in sum over channels of |activation|^p; auto: 1, 2, 4 for early, middle, late stages (the paper).",
        ),
    ] = "auto",
    rotations: Annotated[
        Optional[str],
        typer.Option("--rotations", help="Angles for the rows (default: the model's rotation set, else 0,90,180,270)."),
    ] = None,
    align: Annotated[
        bool,
        typer.Option("--align", help="Turn every rotated copy and its maps back upright, so the rows can be compared."),
    ] = False,
    img_size: Annotated[
        Optional[int],
        typer.Option("--img-size", help="Input size in pixels (default: the size the weights were trained at)."),
    ] = None,
    scale: Annotated[
        Optional[int], typer.Option("--scale", help="Enlarge tiles SCALE times (default: to at least 128 px).")
    ] = None,
    cmap: Annotated[str, typer.Option("--cmap", help="Colour map of the attention: jet or inferno.")] = "jet",
    alpha: Annotated[
        float, typer.Option("--alpha", help="Opacity of the attention colours over the image, 0..1.")
    ] = 0.5,
    device: DeviceOpt = "auto",
    overwrite: OverwriteOpt = False,
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
        out_console.print(f"{printable(image.source)} -> {printable(image.out)}")
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
    ] = "curves.png",
    overwrite: OverwriteOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Loss and rotation accuracy per epoch of a run, training and validation (needs matplotlib)."""
    from ..viz import draw_curves

    result = draw_curves(CurvesConfig.from_dict(ctx.params))
    if json_out:
        print_json(result.to_dict())
        return
    out_console.print(f"wrote [bold]{printable(result.out)}[/] ({counted(result.epochs, 'epoch')})")
