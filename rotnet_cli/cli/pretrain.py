"""rotnet pretrain: RotNet pretraining of any timm backbone."""

from __future__ import annotations

from typing import Annotated, Any, Callable, Optional

import typer
from rich.table import Table

from ..shell import shell_quote
from ..config import PretrainConfig, default_workers, format_rotations
from ..stopping import StopFlag
from ._common import (
    printable,
    print_table,
    StrictDataOpt,
    BatchSizeOpt,
    ConfigOpt,
    DataDirOpt,
    DeviceOpt,
    DownloadOpt,
    ImgSizeOpt,
    JsonOpt,
    PrecisionOpt,
    SeedOpt,
    WorkersOpt,
    err_console,
    error_boundary,
    note,
    out_console,
    print_commands,
    print_json,
    warn_skipped,
)
from ._typer import help_panels
from .progress import ProgressView

# --help groups the options in the order a user sets a run up
HELP_PANELS = {
    "Model": ("model", "rotations", "copies", "init"),
    "Data": ("data", "data_dir", "download", "val_split", "img_size", "augment", "workers", "cache", "strict_data"),
    "Optimisation": (
        "epochs",
        "batch_size",
        "accum_steps",
        "lr",
        "lr_scale",
        "lr_ref_batch",
        "weight_decay",
        "decay_all_params",
        "momentum",
        "optimizer",
        "schedule",
        "milestones",
        "gamma",
        "warmup_epochs",
        "seed",
    ),
    "Device": ("device", "precision", "channels_last", "compile"),
    "Output": ("out", "overwrite", "resume_dir", "save_every", "log_every", "config_file", "json_out"),
    "Watching a long run": (
        "logger",
        "eval_data",
        "eval_every",
        "eval_layers",
        "eval_heads",
        "keep_checkpoints",
        "best_metric",
    ),
}

EXAMPLES = """
[b]Examples[/b]

  rotnet pretrain --out runs/demo                   [dim]# resnet18 on the built-in digits, CPU ok[/dim]
  rotnet pretrain --model resnet18 --data ~/photos --img-size 64 --device cpu  [dim]# photos on a CPU: 64 px[/dim]
  rotnet pretrain --model vit_small_patch16_224 --data ~/photos --optimizer adamw --lr 5e-4 --warmup-epochs 5 --device cuda:1
  rotnet pretrain --model resnet50 --data cifar10 --download --rotations 0,90,180,270 -b 128
  rotnet pretrain --resume runs/demo                [dim]# continue where it stopped[/dim]
  rotnet pretrain --resume runs/demo --epochs 30           [dim]# extend a finished run to 30 epochs[/dim]
  rotnet pretrain --out runs/big --resume auto             [dim]# continue it if it exists, else start it[/dim]
  rotnet pretrain --logger tensorboard --eval-data digits --keep-checkpoints 3   [dim]# watch it: tensorboard --logdir runs[/dim]
  rotnet pretrain --config runs/demo/config.json --seed 1 --out runs/seed1   [dim]# repeat a run with one change[/dim]
  torchrun --nproc-per-node 4 -m rotnet_cli pretrain --model resnet50 --data ~/photos
"""


@help_panels(HELP_PANELS)
@error_boundary
def pretrain(
    ctx: typer.Context,
    model: Annotated[str, typer.Option("--model", "-m", help="Any timm model name (also timm/NAME).")] = "resnet18",
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="digits (built in), a folder of images (flat or class sub-folders; train/ + val/ used as such), or cifar10, cifar100, stl10, mnist, fashionmnist, svhn.",
        ),
    ] = "digits",
    data_dir: DataDirOpt = None,
    download: DownloadOpt = False,
    val_split: Annotated[
        float, typer.Option("--val-split", help="Share of images held out for validation rotation accuracy (seeded).")
    ] = 0.1,
    rotations: Annotated[
        str,
        typer.Option(
            "--rotations",
            help="Angles in degrees, comma-separated; the label of a copy is its angle's index. Non-multiples of 90 are interpolated and disc-masked.",
        ),
    ] = "0,90,180,270",
    copies: Annotated[
        str,
        typer.Option(
            "--copies",
            help="all: every rotated copy of each image in the batch (the paper); one: one sampled rotation per image.",
        ),
    ] = "all",
    epochs: Annotated[int, typer.Option("--epochs", help="Training epochs (the paper: 100).")] = 10,
    batch_size: BatchSizeOpt = 128,
    accum_steps: Annotated[
        int,
        typer.Option(
            "--accum-steps",
            help="Gradient accumulation: each optimizer step adds the gradients of N batches of --batch-size, "
            "so it sees batch x N images (steps and the lr schedule count optimizer steps).",
        ),
    ] = 1,
    lr: Annotated[
        Optional[float],
        typer.Option("--lr", help="Peak learning rate (default 0.1 for SGD as in the paper, 1e-3 for AdamW)."),
    ] = None,
    lr_scale: Annotated[
        str,
        typer.Option(
            "--lr-scale",
            help="none: --lr as given; linear or sqrt: --lr x (global batch / --lr-ref-batch), or its square root "
            "(global batch: --batch-size x --accum-steps).",
        ),
    ] = "none",
    lr_ref_batch: Annotated[
        int, typer.Option("--lr-ref-batch", help="The global batch --lr is meant for, with --lr-scale.")
    ] = 128,
    weight_decay: Annotated[
        Optional[float], typer.Option("--weight-decay", help="Weight decay (default 5e-4 SGD, 0.05 AdamW).")
    ] = None,
    decay_all_params: Annotated[
        bool,
        typer.Option(
            "--decay-all-params/--no-decay-all-params",
            help="Weight decay on norms and biases too (the official RotNet code); by default they are exempt, as in timm.",
        ),
    ] = False,
    momentum: Annotated[float, typer.Option("--momentum", help="SGD momentum (Nesterov).")] = 0.9,
    optimizer: Annotated[str, typer.Option("--optimizer", "--opt", help="sgd (Nesterov, the paper) or adamw.")] = "sgd",
    schedule: Annotated[
        str, typer.Option("--schedule", "--sched", help="cosine, or step (with --milestones and --gamma).")
    ] = "cosine",
    milestones: Annotated[
        Optional[str],
        typer.Option("--milestones", help="Epochs where a step schedule multiplies the lr by --gamma, e.g. 30,60,80."),
    ] = None,
    gamma: Annotated[float, typer.Option("--gamma", help="lr factor at each milestone (the paper: 0.2).")] = 0.2,
    warmup_epochs: Annotated[float, typer.Option("--warmup-epochs", help="Linear lr warm-up, in epochs.")] = 0.0,
    img_size: ImgSizeOpt = None,
    augment: Annotated[
        str,
        typer.Option(
            "--augment",
            help="Before rotating: none, crop (random crop with padding), crop+flip (and horizontal flips, the paper's), or auto: none for grey images (digits, scans), crop+flip for colour ones.",
        ),
    ] = "auto",
    no_augment: Annotated[bool, typer.Option("--no-augment", hidden=True, help="The same as --augment none.")] = False,
    workers: WorkersOpt = default_workers(),
    seed: SeedOpt = 0,
    init: Annotated[
        Optional[str],
        typer.Option(
            "--init", help="Start from these weights (a run, checkpoint, safetensors, export, timm:NAME); a new run."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    precision: PrecisionOpt = "auto",
    channels_last: Annotated[
        bool,
        typer.Option("--channels-last/--no-channels-last", help="channels_last memory format (faster convs on GPU)."),
    ] = False,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile the model.")] = False,
    cache: Annotated[
        str,
        typer.Option("--cache", help="auto, none, ram or device: keep decoded uint8 images in memory / on the GPU."),
    ] = "auto",
    strict_data: StrictDataOpt = False,
    out: Annotated[
        Optional[str], typer.Option("--out", "-o", help="Run directory (default runs/MODEL-DATE-TIME).")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite/--no-overwrite",
            help=(
                "Replace the run in --out: its config.json, metrics, checkpoints, logs, probe.json and its export/ "
                "(an export of the old weights would pass for the new run's); files rotnet did not write are never "
                "replaced. The old run is kept until the new one writes its first checkpoint."
            ),
        ),
    ] = False,
    resume_dir: Annotated[
        Optional[str],
        typer.Option(
            "--resume",
            help="Continue the run in this directory exactly where its checkpoint stopped; auto: continue the run in "
            "--out if it has a checkpoint (its options must agree), else start it (for torchrun --max-restarts, requeues).",
        ),
    ] = None,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Also checkpoint every N steps (0: at the end of each epoch only).")
    ] = 0,
    log_every: Annotated[
        int, typer.Option("--log-every", help="Read loss/accuracy from the device every N steps (fewer host syncs).")
    ] = 10,
    max_steps_per_epoch: Annotated[Optional[int], typer.Option("--max-steps-per-epoch", hidden=True)] = None,
    logger: Annotated[
        str,
        typer.Option(
            "--logger",
            help="Where else the figures go, comma-separated: csv (logs/scalars.csv), tensorboard, wandb, mlflow (each an extra: pip install 'rotnet-cli\\[tensorboard]'), or none.",
        ),
    ] = "csv",
    eval_data: Annotated[
        Optional[str],
        typer.Option(
            "--eval-data",
            help="Labelled images (digits, a class folder, a torchvision name) on which the features' kNN accuracy is measured during training.",
        ),
    ] = None,
    eval_every: Annotated[
        str,
        typer.Option(
            "--eval-every",
            help="Measure it every N epochs (and after the last); auto: as often as keeps it at about 3% of the training compute.",
        ),
    ] = "auto",
    eval_layers: Annotated[
        str,
        typer.Option("--eval-layers", help="Stages to measure, 1-based (negative from the last), e.g. 2,-1, or all."),
    ] = "all",
    eval_heads: Annotated[
        str,
        typer.Option("--eval-heads", help="knn, and/or linear (a quick linear probe: a few times the cost of knn)."),
    ] = "knn",
    keep_checkpoints: Annotated[
        int,
        typer.Option(
            "--keep-checkpoints",
            help="Keep the weights of the last N epochs (RUN:epoch-E) besides the best one (RUN:best).",
        ),
    ] = 0,
    best_metric: Annotated[
        str,
        typer.Option(
            "--best-metric",
            help="The epoch kept as RUN:best: knn, linear (the best stage; knn:3 for stage 3), val_rot_acc, val_loss, none, or auto (knn with --eval-data, else val_rot_acc with --keep-checkpoints).",
        ),
    ] = "auto",
    config_file: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pretrain a timm backbone by predicting image rotations; writes a run directory."""
    from ..pretraining import auto_resume_config, pretrain as run_pretrain, resume_config
    from ..runtime import dist_from_env

    params = dict(ctx.params)
    given = {name for name in params if _given(ctx, name)}
    if params.pop("no_augment"):  # the flag of earlier versions
        if "augment" in given:
            raise typer.BadParameter("give --augment or --no-augment, not both", param_hint="--no-augment")
        params["augment"] = "none"
        given.add("augment")
    if resume_dir == "auto":  # continue --out when it has a checkpoint, else start it (torchrun --max-restarts)
        config = auto_resume_config(params, given)
    elif resume_dir:  # the saved config, with the options given on this command line (they must agree with it)
        config = resume_config(resume_dir, {name: params[name] for name in given if name in params})
    else:
        config = PretrainConfig.from_dict(params)

    main_rank = dist_from_env().is_main
    # the other ranks see no events: they keep the checkpointing stop
    stop = StopFlag(lambda line: err_console.print(f"[yellow]{line}[/]"), training=not main_rank)
    view = ProgressView(err_console, title="pretrain")
    with stop.installed(), view:
        result = run_pretrain(config, progress=_telling_when_training(stop, view), should_stop=stop)
    if not main_rank:  # under torchrun, rank 0 alone reports
        return

    warn_skipped(result.skipped_files)
    if json_out:
        print_json(result.to_dict())
        return
    _render_summary(result, config)


def _given(ctx: typer.Context, name: str) -> bool:
    # compared by name: typer may bring its own copy of click's ParameterSource enum
    source = ctx.get_parameter_source(name)
    return getattr(source, "name", None) in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")  # DEFAULT_MAP: --config


def _telling_when_training(stop: StopFlag, progress: Callable[[Any], None]) -> Callable[[Any], None]:
    """``progress``, also telling the stop flag when the first epoch starts (from then on a first
    Ctrl-C checkpoints instead of stopping at once)."""
    from ..events import EpochStarted

    def report(event: Any) -> None:
        if isinstance(event, EpochStarted):
            stop.training_started()
        progress(event)

    return report


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.2f}%" if pct else f"{value:.4f}"


SUMMARY_EPOCHS = 10  # rows of the closing table; metrics.jsonl has them all


def _best_stage(per_stage: dict | None) -> str:
    if not per_stage:
        return "-"
    stage, acc = max(per_stage.items(), key=lambda item: item[1])
    return f"{100 * acc:.2f}% ({stage})"


def _render_summary(result, config: PretrainConfig) -> None:
    from ..rundir import METRICS

    final = result.final
    shown = result.history[-SUMMARY_EPOCHS:]
    table = Table(title=f"RotNet pretraining: {config.model} on {printable(config.data)}", title_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("rot acc", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column("val rot acc", justify="right")
    table.add_column("img/s", justify="right")
    heads = list(dict.fromkeys(head for row in result.history for head in (row.get("eval") or {})))
    for head in heads:  # --eval-data: the best stage's accuracy
        table.add_column(f"{head} (best stage)", justify="right")
    for row in shown:
        evaluated = row.get("eval") or {}
        table.add_row(
            str(row["epoch"]),
            _fmt(row["loss"]),
            _fmt(row["rot_acc"], True),
            _fmt(row["val_loss"]),
            _fmt(row["val_rot_acc"], True),
            f"{row['images_per_s']:.0f}",
            *(_best_stage(evaluated.get(head)) for head in heads),
        )
    print_table(table)
    if len(shown) < len(result.history):
        out_console.print(
            f"the last {len(shown)} of {len(result.history)} epochs; all of them: {result.out_dir / METRICS}",
            markup=False,
            soft_wrap=True,
        )
    if result.val_rot_acc_per_rotation:
        per = "  ".join(f"{angle}°: {100 * acc:.1f}%" for angle, acc in result.val_rot_acc_per_rotation.items())
        out_console.print(
            f"validation accuracy per rotation ({format_rotations(config.rotations)}): {per}", soft_wrap=True
        )
    if final.get("val_rot_acc") is None:
        note("no validation split (--val-split 0); accuracy above is on training images")
    out_console.print(f"run directory: [bold]{printable(result.out_dir)}[/]", soft_wrap=True)
    if result.best:  # --best-metric: the epoch worth probing
        best = result.best
        value = f"{best['value']:.4f}" if best["metric"] == "val_loss" else f"{100 * best['value']:.2f}%"
        out_console.print(
            f"best epoch {best['epoch']} by {best['metric']} ({value}): {best['weights']}", markup=False, soft_wrap=True
        )
    run = shell_quote(str(result.out_dir))
    # The probe needs labels: digits have them, a folder only with class sub-folders.
    data = (
        ""
        if config.data == "digits"
        else f" --data {shell_quote(config.data) if result.labelled else 'LABELLED_FOLDER'}"
    )
    labels_note = "" if result.labelled else " (on labelled images: a folder of class sub-folders)"
    print_commands(
        f"next: its features at every stage against random weights{labels_note}, then the backbone for timm:",
        [
            f"rotnet probe {run}{data} --compare random",
            f"rotnet export {run} --out {shell_quote(str(result.out_dir / 'export'))}",
        ],
    )
