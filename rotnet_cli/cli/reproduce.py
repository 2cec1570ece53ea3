"""rotnet reproduce: the paper's CIFAR-10 experiments in one command, with its numbers beside ours."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import ReproduceConfig, default_workers
from ._common import DataDirOpt, DeviceOpt, DownloadOpt, JsonOpt, PrecisionOpt, SeedOpt, WorkersOpt, err_console, error_boundary, out_console, print_json
from .progress import ProgressView

EXAMPLES = """
[b]Examples[/b]

  rotnet reproduce paper-cifar10 --download --device cuda   [dim]# Tables 1-3 of Gidaris et al. (GPU: hours)[/dim]
  rotnet reproduce paper-cifar10 --smoke                    [dim]# the same steps on digits, a few steps each[/dim]
"""


@error_boundary
def reproduce(
    ctx: typer.Context,
    recipe: Annotated[str, typer.Argument(help="The experiment set: paper-cifar10 (Gidaris et al. 2018, Tables 1-3, NIN on CIFAR-10).")] = "paper-cifar10",
    data: Annotated[str, typer.Option("--data", help="The dataset (the paper: cifar10).")] = "cifar10",
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    out: Annotated[Optional[str], typer.Option("--out", "-o", help="Folder for the runs (default runs/paper-cifar10, with --smoke runs/paper-cifar10-smoke); a re-run resumes or reuses runs made with the same settings.")] = None,
    smoke: Annotated[bool, typer.Option("--smoke", help="Run every step on the built-in digits for a few steps (checks the recipe, not the paper).")] = False,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    workers: WorkersOpt = default_workers(),
    seed: SeedOpt = 0,
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
    title = "Gidaris et al. 2018 on CIFAR-10: ours vs the paper (top-1 %)" + (escape("  [smoke mode: digits, a few steps]") if smoke else "")
    table = Table(title=title, title_justify="left")
    for column in ("table", "experiment", "block", "classifier", "ours", "paper", "ours - paper"):
        table.add_column(column, justify="right" if column in ("block", "ours", "paper", "ours - paper") else "left")
    for row in result.rows:
        table.add_row(row.table, row.experiment, str(row.stage), row.head, f"{row.ours:.2f}", f"{row.paper:.2f}",
                      f"{row.ours - row.paper:+.2f}")
    out_console.print(table)
    out_console.print(f"runs: {escape(str(result.out_dir))}")
