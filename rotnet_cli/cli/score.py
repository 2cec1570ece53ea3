"""rotnet score: how unusual each image is to a trained RotNet (outliers, novelty, cleaning a folder)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import ScoreConfig, option_default
from ._common import (
    DataDirOpt,
    DeviceOpt,
    JsonOpt,
    OverwriteOpt,
    PrecisionOpt,
    StrictDataOpt,
    WeightsImgSizeOpt,
    WorkersOpt,
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

  rotnet score runs/demo photos/ --top 20                     [dim]# the 20 images the run finds most unusual[/dim]
  rotnet score runs/demo photos/ --out scores.csv             [dim]# one row per image: score, p_0, p_90, ...[/dim]
  rotnet score runs/demo photos/ --method both --out scores.parquet   [dim]# + the knn score, on a rank scale[/dim]
  rotnet score runs/faces --inliers held-out/ --outliers other/       [dim]# AUROC, AUPR, FPR at 95% TPR[/dim]
  rotnet score runs/digit3 digits --normal 3 --json           [dim]# class sub-folders: one class is normal[/dim]
"""

MethodOpt = Annotated[
    str,
    typer.Option(
        "--method",
        help="rotation: minus the summed log-probability of each applied rotation (Hendrycks et al. 2019); knn: cosine "
        "distance to the training features; both: the two on a rank scale.",
    ),
]


ScoreWeightsArg = Annotated[
    str,
    typer.Argument(
        help="Weights: a run directory, checkpoint.pt, model.safetensors, an exported folder, a model.onnx "
        "exported with --with-head (--method rotation), timm:NAME or random:NAME.",
        show_default=False,
    ),
]


@error_boundary
def score(
    ctx: typer.Context,
    weights: ScoreWeightsArg,
    data: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders (searched recursively) or a dataset name (digits, cifar10, ...).",
            show_default=False,
        ),
    ] = option_default(ScoreConfig, "data"),
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="File of one row per image; its extension picks the format: .csv, .parquet (parquet extra), .npz or .json.",
            show_default=False,
        ),
    ] = option_default(ScoreConfig, "out"),
    method: MethodOpt = option_default(ScoreConfig, "method"),
    top: Annotated[int, typer.Option("--top", help="Show the N most unusual images.")] = 10,
    bottom: Annotated[int, typer.Option("--bottom", help="Show the N most typical images.")] = 0,
    k: Annotated[int, typer.Option("-k", help="Neighbours of the knn score.")] = option_default(ScoreConfig, "k"),
    knn_distance: Annotated[
        str, typer.Option("--knn-distance", help="mean (of the k nearest) or kth (the k-th nearest's distance).")
    ] = option_default(ScoreConfig, "knn_distance"),
    reference: Annotated[
        str | None,
        typer.Option(
            "--reference",
            help="The knn bank: a folder or dataset name (default: the data the run trained on, from its config.json).",
        ),
    ] = option_default(ScoreConfig, "reference"),
    inliers: Annotated[
        list[str] | None,
        typer.Option("--inliers", help="Evaluation: images known to be normal (repeatable); needs --outliers."),
    ] = option_default(ScoreConfig, "inliers"),
    outliers: Annotated[
        list[str] | None,
        typer.Option("--outliers", help="Evaluation: images known to be unusual (repeatable); needs --inliers."),
    ] = option_default(ScoreConfig, "outliers"),
    normal: Annotated[
        str | None,
        typer.Option(
            "--normal", help="Evaluation on class sub-folders (or a dataset): this class is normal, the rest unusual."
        ),
    ] = option_default(ScoreConfig, "normal"),
    img_size: WeightsImgSizeOpt = option_default(ScoreConfig, "img_size"),
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", help="Images per batch (each adds one copy per rotation).")
    ] = option_default(ScoreConfig, "batch_size"),
    workers: WorkersOpt = option_default(ScoreConfig, "workers"),
    data_dir: DataDirOpt = option_default(ScoreConfig, "data_dir"),
    strict_data: StrictDataOpt = option_default(ScoreConfig, "strict_data"),
    device: DeviceOpt = option_default(ScoreConfig, "device"),
    precision: PrecisionOpt = option_default(ScoreConfig, "precision"),
    overwrite: OverwriteOpt = option_default(ScoreConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """How unusual each image is to the run (higher = more unusual); with known outliers, AUROC, AUPR and FPR@95."""
    from ..scoring import score as run_score

    if top < 0 or bottom < 0:
        raise typer.BadParameter("must be >= 0", param_hint="--top" if top < 0 else "--bottom")
    config = ScoreConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="score") as view:
        result = run_score(config, progress=view)  # the library warns of unreadable files itself
    if json_out:
        print_json(result.to_dict(rows=result.out is None))
        return
    render(result, top, bottom)


def _view(result, title: str, rows: list[int]) -> None:
    table = Table(title=shown(title), title_justify="left")
    table.add_column("rank", justify="right")
    table.add_column("image", overflow="fold")
    table.add_column("score", justify="right")
    both = result.rows.rotation is not None and result.rows.knn is not None
    if both:
        table.add_column("rotation", justify="right")
        table.add_column("knn", justify="right")
    truth = result.rows.truth is not None
    if truth:
        table.add_column("known as")
    from ..prediction import display_path

    for rank, i in enumerate(rows, start=1):
        cells = [str(rank), shown(display_path(result.rows.paths[i])), f"{result.rows.score[i]:.4g}"]
        if both:
            cells += [f"{result.rows.rotation[i]:.4g}", f"{result.rows.knn[i]:.4g}"]
        if truth:
            cells.append("[red]outlier[/]" if result.rows.truth[i] else "inlier")
        table.add_row(*cells)
    print_table(table)


def render(result, top: int, bottom: int) -> None:
    n = len(result.rows)
    if top:
        _view(
            result,
            f"The {min(top, n)} most unusual of {n:,} image(s) ({result.method} score, higher = more unusual)",
            result.top(top),
        )
    if bottom:
        _view(result, f"The {min(bottom, n)} most typical of {n:,} image(s)", result.bottom(bottom))
    if result.evaluation is not None:
        e = result.evaluation
        table = Table(
            title=f"{e.outliers:,} known outliers vs {e.inliers:,} inliers (outliers are the positive class)",
            title_justify="left",
        )
        for column in ("score", "AUROC", "AUPR", "FPR at 95% TPR"):
            table.add_column(column, justify="right" if column != "score" else "left")
        for name, figures in e.methods.items():
            label = result.method if name == "score" else name
            table.add_row(label, *(f"{figures[key]:.4f}" for key in ("auroc", "aupr", "fpr_at_95_tpr")))
        print_table(table)
    tail = f"{n:,} image(s) scored in {result.seconds:.1f}s on {shown(result.device)}"
    if result.reference:
        tail += f"; knn bank: {result.reference_images:,} images of {shown(result.reference)}"
    if result.out:
        tail += f"; all rows written to [bold]{shown(str(result.out))}[/]"
    elif n > top:
        tail += "; --out FILE.csv writes every row"
    out_console.print(tail, highlight=False, soft_wrap=True)
