"""rotnet probe: train classifiers on frozen features of each stage and compare them."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from ..config import ProbeConfig, option_default
from ..errors import OutputError
from ._common import (
    DataDirOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    PrecisionOpt,
    SeedOpt,
    WeightsArg,
    WeightsImgSizeOpt,
    WorkersOpt,
    err_console,
    error_boundary,
    out_console,
    print_json,
    print_table,
    shown,
    warn_skipped,
)
from .progress import ProgressView

EXAMPLES = """
[b]Examples[/b]

  rotnet probe runs/demo --compare random           [dim]# every stage, linear and kNN heads, vs random weights[/dim]
  rotnet probe runs/demo --layers 2,-1 --head linear,mlp --epochs 50
  rotnet probe runs/nin --data cifar10 --download --head mlp,conv --pool flatten --recipe paper  [dim]# the paper's protocol[/dim]
  rotnet probe runs/demo --labels-per-class 20      [dim]# semi-supervised: 20 labelled images per class[/dim]
  rotnet probe runs/demo --data ~/pets --val-data ~/pets-val --json
"""


@error_boundary
def probe(
    ctx: typer.Context,
    weights: WeightsArg,
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Labelled data: digits (built in), a folder of class sub-folders (train/ + val/ used as such), or cifar10, cifar100, stl10, mnist, fashionmnist, svhn.",
        ),
    ] = option_default(ProbeConfig, "data"),
    data_dir: DataDirOpt = option_default(ProbeConfig, "data_dir"),
    download: DownloadOpt = option_default(ProbeConfig, "download"),
    val_data: Annotated[
        str | None,
        typer.Option(
            "--val-data",
            help="Labelled validation data (same classes); default: the dataset's own split, else --val-split.",
        ),
    ] = option_default(ProbeConfig, "val_data"),
    val_split: Annotated[
        float,
        typer.Option("--val-split", help="Share of the labelled images held out for validation (stratified, seeded)."),
    ] = option_default(ProbeConfig, "val_split"),
    layers: Annotated[
        str,
        typer.Option(
            "--layers", help="Stages to probe: all, or 1-based indices such as 1,2,-1 (negative: from the last)."
        ),
    ] = option_default(ProbeConfig, "layers"),
    heads: Annotated[
        str,
        typer.Option(
            "--head",
            help="Comma list of linear (BN + linear on pooled features), mlp (2x200 hidden, BN + ReLU), knn (cosine k-NN vote), conv (NIN block + linear on spatial maps).",
        ),
    ] = option_default(ProbeConfig, "heads"),
    pool: Annotated[
        str,
        typer.Option(
            "--pool", help="How the mlp head sees a stage: avg or max (global pooling) or flatten (every position)."
        ),
    ] = option_default(ProbeConfig, "pool"),
    recipe: Annotated[
        str,
        typer.Option(
            "--recipe",
            help="quick: features extracted once, AdamW, cosine, 100 epochs, batch 256. paper: the official code's classifier training (features of cropped+flipped images recomputed every batch, SGD Nesterov lr 0.1, weight decay 5e-4, lr/5 steps, mlp 50 / conv 100 epochs, batch 128, fp32, best and last epoch).",
        ),
    ] = option_default(ProbeConfig, "recipe"),
    features: Annotated[
        str | None,
        typer.Option(
            "--features",
            help="cached (extracted once: fast) or augmented (recomputed every batch from cropped+flipped images: epochs x one forward pass); default: the recipe's.",
        ),
    ] = option_default(ProbeConfig, "features"),
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Training epochs of every head (default: the recipe's; a step schedule keeps its steps at the same share of the run).",
        ),
    ] = option_default(ProbeConfig, "epochs"),
    lr: Annotated[
        float | None,
        typer.Option(
            "--lr",
            help="Learning rate of the heads (default: the recipe's: quick 1e-2 linear, 1e-3 mlp and conv; paper 0.1).",
        ),
    ] = option_default(ProbeConfig, "lr"),
    weight_decay: Annotated[
        float | None,
        typer.Option(
            "--weight-decay", help="Weight decay of the heads, on every parameter (default: the recipe's, 5e-4)."
        ),
    ] = option_default(ProbeConfig, "weight_decay"),
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per batch, for extracting features and for training the heads (default: the recipe's, 256 quick, 128 paper).",
        ),
    ] = option_default(ProbeConfig, "batch_size"),
    labels_per_class: Annotated[
        int | None,
        typer.Option(
            "--labels-per-class",
            help="Keep only K labelled training images per class (seeded); the paper's semi-supervised study.",
        ),
    ] = option_default(ProbeConfig, "labels_per_class"),
    knn_k: Annotated[
        int,
        typer.Option("--knn-k", help="Neighbours that vote in the knn head."),
    ] = option_default(ProbeConfig, "knn_k"),
    compare: Annotated[
        str | None,
        typer.Option(
            "--compare",
            help="Baseline rows: random (the same architecture, random weights) and/or other weights, e.g. timm:resnet18; comma list.",
        ),
    ] = option_default(ProbeConfig, "compare"),
    img_size: WeightsImgSizeOpt = option_default(ProbeConfig, "img_size"),
    workers: WorkersOpt = option_default(ProbeConfig, "workers"),
    seed: SeedOpt = option_default(ProbeConfig, "seed"),
    device: DeviceOpt = option_default(ProbeConfig, "device"),
    precision: PrecisionOpt = option_default(ProbeConfig, "precision"),
    save: Annotated[
        bool,
        typer.Option(
            "--save/--no-save",
            help="Keep the result in the run directory's probe.json (one result per setting) when WEIGHTS is one.",
        ),
    ] = option_default(ProbeConfig, "save"),
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite",
            help="Replace a result with the same settings in probe.json (results of other settings are always kept).",
        ),
    ] = option_default(ProbeConfig, "overwrite"),
    json_out: JsonOpt = False,
) -> None:
    """Measure frozen features: a classifier per stage and head, top-1 on held-out labelled images."""
    from ..probing import probe as run_probe

    config = ProbeConfig.from_dict(ctx.params)
    with ProgressView(err_console, title="probe") as view:
        result = run_probe(config, progress=view)

    warn_skipped(result.skipped_files)
    if json_out:
        print_json(result.to_dict())
    else:
        _render(result)
    if result.save_error:  # shown after the results, which are complete: only saving them failed
        raise OutputError(
            f"probe.json was not saved: {result.save_error} (the results above are complete; --json prints them to keep)"
        )


# How to read a probe against random weights (README, "Where rotation features help"): the
# measured pattern on digits and the likely reason, in the words the table is read with.
WHY_RANDOM_IS_STRONG = (
    "reading it: a trained head on random features is a strong baseline at early stages (likely because a random "
    "convolution, averaged over the image, keeps much of the pixels' statistics); what rotation training adds shows "
    "in the deeper stages, and most where labels are few"
)


def against_baselines(result) -> list[str]:
    """One line per baseline: the probed weights' top-1 minus the baseline's, per head, stage by stage,
    in points ('linear -14.2 / -7.8 / +0.3 / +1.3 / +77.4'): where rotation training helps, and where not."""
    run = {row.stage: row for row in result.rows if row.weights == "run"}
    lines = []
    for baseline in dict.fromkeys(row.weights for row in result.rows if row.weights != "run"):
        rows = [(run[row.stage], row) for row in result.rows if row.weights == baseline and row.stage in run]
        if not rows:
            continue
        stages = ", ".join(str(ours.stage) for ours, _ in rows)
        per_head = "; ".join(
            f"{head} "
            + " / ".join(f"{100 * (ours.accuracy[head] - theirs.accuracy[head]):+.1f}" for ours, theirs in rows)
            for head in result.heads
        )
        lines.append(f"against {baseline}, points per stage ({stages}): {per_head}")
    return lines


def best_line(result, best) -> str:
    """The best run cell against each baseline's best cell (any stage, any head) and its cell at the
    same stage and head; accuracies with the count of validation images, and their interval when wide."""
    from ..intervals import accuracy_text

    row, head = best
    n = result.val_images
    line = f"best: stage {row.stage} with the {head} head, {accuracy_text(row.accuracy[head], n, 'val images')}"
    for other in dict.fromkeys(r.weights for r in result.rows if r.weights != "run"):  # in row order
        cells = [(r.accuracy[h], r, h) for r in result.rows if r.weights == other for h in result.heads]
        accuracy, top, top_head = max(cells, key=lambda cell: cell[0])
        verdict = "above" if row.accuracy[head] > accuracy else "not above"
        line += f"; {verdict} {other}'s best, stage {top.stage} with the {top_head} head, {100 * accuracy:.2f}%"
        same = next((r for r in result.rows if r.weights == other and r.stage == row.stage), None)
        if same is not None and (same is not top or top_head != head):
            line += f" ({other} at the same stage and head: {100 * same.accuracy[head]:.2f}%)"
    return line


def _render(result) -> None:
    best = result.best()
    table = Table(
        title=f"Frozen-feature probe: {result.model} on {shown(result.data)} ({result.num_classes} classes, "
        f"{result.train_images} train / {result.val_images} val, top-1, recipe {result.recipe})",
        title_justify="left",
    )
    table.add_column("weights")
    table.add_column("stage", justify="right")
    table.add_column("C x H x W", justify="right")
    for head in result.heads:
        table.add_column(f"{head} ({result.pool})" if head == "mlp" else head, justify="right")
        if result.reports_best and head in result.epochs:  # the best epoch: what the paper reports (chosen on val)
            table.add_column(f"{head} best (epoch)", justify="right")
    previous = None
    for row in result.rows:
        if previous is not None and row.weights != previous:
            table.add_section()
        previous = row.weights
        cells = []
        for head in result.heads:
            text = f"{100 * row.accuracy[head]:.2f}%"
            cells.append(f"[bold green]{text}[/]" if best and row is best[0] and head == best[1] else text)
            if result.reports_best and head in result.epochs:
                accuracy, epoch = row.best[head]
                cells.append(f"{100 * accuracy:.2f}% ({epoch})")
        style = None if row.weights == "run" else "dim"
        table.add_row(shown(row.weights), str(row.stage), " x ".join(map(str, row.shape)), *cells, style=style)
    print_table(table)
    if best:
        out_console.print(shown(best_line(result, best)), soft_wrap=True)
    for line in against_baselines(result):
        out_console.print(shown(line), soft_wrap=True)
    if any(row.weights == "random" for row in result.rows):
        out_console.print(
            f"[dim]{shown(WHY_RANDOM_IS_STRONG)}{'' if result.labels_per_class else ' (--labels-per-class 10)'}[/]",
            soft_wrap=True,
        )
    if result.reports_best and result.epochs:
        out_console.print(
            "[dim]head columns: the last epoch; 'best (epoch)': the best epoch, chosen on the validation "
            "images themselves as the official code does (optimistic)[/]"
        )
    seconds = result.extract_seconds + sum(result.train_seconds.values())
    out_console.print(
        f"[dim]features {result.extract_seconds:.1f}s, heads {sum(result.train_seconds.values()):.1f}s, "
        f"total {seconds:.1f}s on {shown(result.device)}[/]"
    )
    if result.saved_to:
        out_console.print(f"saved: {shown(str(result.saved_to))}")
