"""rotnet reproduce: the paper's CIFAR-10 experiments in one command, with its numbers beside ours."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import ReproduceConfig, option_default
from ._common import (
    DataDirOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    PrecisionOpt,
    SeedOpt,
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

  rotnet reproduce paper-cifar10 --download --device cuda   [dim]# Tables 1-3 of Gidaris et al. (GPU: hours)[/dim]
  rotnet reproduce paper-cifar10 --download --schedule official --out runs/paper-official  [dim]# 200 epochs, as the released code[/dim]
  rotnet reproduce paper-cifar10 --smoke                    [dim]# the same steps on digits, a few steps each[/dim]
"""


@error_boundary
def reproduce(
    ctx: typer.Context,
    recipe: Annotated[
        str,
        typer.Argument(help="The experiment set: paper-cifar10 (Gidaris et al. 2018, Tables 1-3, NIN on CIFAR-10)."),
    ] = option_default(ReproduceConfig, "recipe"),
    data: Annotated[
        str,
        typer.Option("--data", help="The dataset (the paper: cifar10)."),
    ] = option_default(ReproduceConfig, "data"),
    data_dir: DataDirOpt = option_default(ReproduceConfig, "data_dir"),
    download: DownloadOpt = option_default(ReproduceConfig, "download"),
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Folder for the runs (default runs/paper-cifar10, or runs/paper-cifar10-smoke); a rerun reuses finished runs and resumes stopped ones of the same settings.",
        ),
    ] = option_default(ReproduceConfig, "out"),
    schedule: Annotated[
        str,
        typer.Option(
            "--schedule",
            help="RotNet pretraining: paper (100 epochs, lr/5 after 30, 60, 80: the paper's text) or official (200 epochs, lr/5 after 60, 120, 160: the released code's config).",
        ),
    ] = option_default(ReproduceConfig, "schedule"),
    smoke: Annotated[
        bool,
        typer.Option(
            "--smoke", help="Run every step on the built-in digits for a few steps (checks the recipe, not the paper)."
        ),
    ] = option_default(ReproduceConfig, "smoke"),
    device: DeviceOpt = option_default(ReproduceConfig, "device"),
    precision: PrecisionOpt = option_default(ReproduceConfig, "precision"),
    workers: WorkersOpt = option_default(ReproduceConfig, "workers"),
    seed: SeedOpt = option_default(ReproduceConfig, "seed"),
    json_out: JsonOpt = False,
) -> None:
    """Pretrain the paper's NIN on CIFAR-10 with its recipe, probe every block, print the paper's tables beside ours."""
    from ..reproduction import reproduce as run_reproduce

    config = ReproduceConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="reproduce") as view:
        result = run_reproduce(config, progress=view)
    if json_out:
        print_json(result.to_dict())
        return
    # escaped: rich would take the bracketed smoke note for a style tag and drop it
    title = f"Gidaris et al. 2018 on CIFAR-10: ours vs the paper (top-1 %, --schedule {result.schedule})" + (
        shown("  [smoke mode: digits, a few steps]") if smoke else ""
    )
    table = Table(title=title, title_justify="left")
    numbers = ("ours (last)", "ours (best, epoch)", "paper", "last - paper")
    for column in ("table", "experiment", "block", "classifier", *numbers):
        table.add_column(column, justify="right" if column in ("block", *numbers) else "left")
    for row in result.rows:
        best = f"{row.best:.2f}" + (f" ({row.best_epoch})" if row.best_epoch else "")
        table.add_row(
            row.table,
            row.experiment,
            "-" if row.stage is None else str(row.stage),
            row.head,
            f"{row.ours:.2f}",
            best,
            f"{row.paper:.2f}",
            f"{row.ours - row.paper:+.2f}",
        )
    print_table(table)
    out_console.print(
        "[dim]last: the final epoch (honest); best: the best epoch on the test set itself, what the "
        "official code keeps and the paper reports[/]"
    )
    out_console.print(f"runs: {shown(str(result.out_dir))}")
