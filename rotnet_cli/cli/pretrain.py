"""rotnet pretrain: RotNet pretraining of any timm backbone."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..config import PretrainConfig, counted, format_rotations, option_default
from ..intervals import SMALL_VALIDATION, accuracy_text, learned_little
from ..shell import shell_quote
from ..stopping import StopFlag
from ._common import (
    PLANNED_BY_CONFIG,
    ConfigOpt,
    DataDirOpt,
    DeviceOpt,
    DownloadOpt,
    JsonOpt,
    PrecisionOpt,
    SeedOpt,
    StrictDataOpt,
    WorkersOpt,
    err_console,
    error_boundary,
    note,
    out_console,
    print_commands,
    print_json,
    print_table,
    shown,
    warn,
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
    model: Annotated[
        str,
        typer.Option("--model", "-m", help="Any timm model name (also timm/NAME)."),
    ] = option_default(PretrainConfig, "model"),
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="digits (built in), a folder of images (flat or class sub-folders; train/ + val/ used as such), or cifar10, cifar100, stl10, mnist, fashionmnist, svhn.",
        ),
    ] = option_default(PretrainConfig, "data"),
    data_dir: DataDirOpt = option_default(PretrainConfig, "data_dir"),
    download: DownloadOpt = option_default(PretrainConfig, "download"),
    val_split: Annotated[
        float, typer.Option("--val-split", help="Share of images held out for validation rotation accuracy (seeded).")
    ] = option_default(PretrainConfig, "val_split"),
    rotations: Annotated[
        str,
        typer.Option(
            "--rotations",
            help="Angles in degrees, comma-separated; the label of a copy is its angle's index. Non-multiples of 90 are interpolated and disc-masked.",
        ),
    ] = option_default(PretrainConfig, "rotations"),
    copies: Annotated[
        str,
        typer.Option(
            "--copies",
            help="all: every rotated copy of each image in the batch (the paper); one: one sampled rotation per image.",
        ),
    ] = option_default(PretrainConfig, "copies"),
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Training epochs (the paper: 100). Default: planned from the data, enough for 500 optimizer steps and at least 10.",
        ),
    ] = option_default(PretrainConfig, "epochs"),
    batch_size: Annotated[
        int | None,
        typer.Option(
            "--batch-size",
            "-b",
            help="Images per batch (before rotation). Default: planned from the data, 128 where it makes 32 steps per epoch, smaller for a small folder.",
        ),
    ] = option_default(PretrainConfig, "batch_size"),
    accum_steps: Annotated[
        int,
        typer.Option(
            "--accum-steps",
            help="Gradient accumulation: each optimizer step adds the gradients of N batches of --batch-size, "
            "so it sees batch x N images (steps and the lr schedule count optimizer steps).",
        ),
    ] = option_default(PretrainConfig, "accum_steps"),
    lr: Annotated[
        float | None,
        typer.Option("--lr", help="Peak learning rate (default 0.1 for SGD as in the paper, 1e-3 for AdamW)."),
    ] = option_default(PretrainConfig, "lr"),
    lr_scale: Annotated[
        str,
        typer.Option(
            "--lr-scale",
            help="none: --lr as given; linear or sqrt: --lr x (global batch / --lr-ref-batch), or its square root "
            "(global batch: --batch-size x --accum-steps).",
        ),
    ] = option_default(PretrainConfig, "lr_scale"),
    lr_ref_batch: Annotated[
        int, typer.Option("--lr-ref-batch", help="The global batch --lr is meant for, with --lr-scale.")
    ] = option_default(PretrainConfig, "lr_ref_batch"),
    weight_decay: Annotated[
        float | None, typer.Option("--weight-decay", help="Weight decay (default 5e-4 SGD, 0.05 AdamW).")
    ] = option_default(PretrainConfig, "weight_decay"),
    decay_all_params: Annotated[
        bool,
        typer.Option(
            "--decay-all-params/--no-decay-all-params",
            help="Weight decay on norms and biases too (the official RotNet code); by default they are exempt, as in timm.",
        ),
    ] = option_default(PretrainConfig, "decay_all_params"),
    momentum: Annotated[
        float,
        typer.Option("--momentum", help="SGD momentum (Nesterov)."),
    ] = option_default(PretrainConfig, "momentum"),
    optimizer: Annotated[
        str, typer.Option("--optimizer", "--opt", help="sgd (Nesterov, the paper) or adamw.")
    ] = option_default(PretrainConfig, "optimizer"),
    schedule: Annotated[
        str, typer.Option("--schedule", "--sched", help="cosine, or step (with --milestones and --gamma).")
    ] = option_default(PretrainConfig, "schedule"),
    milestones: Annotated[
        str | None,
        typer.Option("--milestones", help="Epochs where a step schedule multiplies the lr by --gamma, e.g. 30,60,80."),
    ] = option_default(PretrainConfig, "milestones"),
    gamma: Annotated[
        float, typer.Option("--gamma", help="lr factor at each milestone (the paper: 0.2).")
    ] = option_default(PretrainConfig, "gamma"),
    warmup_epochs: Annotated[
        float, typer.Option("--warmup-epochs", help="Linear lr warm-up, in epochs.")
    ] = option_default(PretrainConfig, "warmup_epochs"),
    img_size: Annotated[
        int | None,
        typer.Option(
            "--img-size",
            help="Square input size in pixels. Default: planned from the data: a dataset's own size, a folder's median image size (at least 32, at most the model's own; at most 64 on a CPU).",
        ),
    ] = option_default(PretrainConfig, "img_size"),
    augment: Annotated[
        str,
        typer.Option(
            "--augment",
            help="Before rotating: none, shift (a random shift of up to 1/16 of the side, at least 1 px), crop (random crop after 1/8 of the side of padding), crop+flip (and horizontal flips, the paper's), or auto: planned from what the images are: shift for scans and digits, crop for other grey images (faces), crop+flip for colour photos.",
        ),
    ] = option_default(PretrainConfig, "augment"),
    no_augment: Annotated[bool, typer.Option("--no-augment", hidden=True, help="The same as --augment none.")] = False,
    workers: WorkersOpt = option_default(PretrainConfig, "workers"),
    seed: SeedOpt = option_default(PretrainConfig, "seed"),
    init: Annotated[
        str | None,
        typer.Option(
            "--init", help="Start from these weights (a run, checkpoint, safetensors, export, timm:NAME); a new run."
        ),
    ] = option_default(PretrainConfig, "init"),
    device: DeviceOpt = option_default(PretrainConfig, "device"),
    precision: PrecisionOpt = option_default(PretrainConfig, "precision"),
    channels_last: Annotated[
        bool,
        typer.Option("--channels-last/--no-channels-last", help="channels_last memory format (faster convs on GPU)."),
    ] = option_default(PretrainConfig, "channels_last"),
    compile: Annotated[
        bool,
        typer.Option("--compile/--no-compile", help="torch.compile the model."),
    ] = option_default(PretrainConfig, "compile"),
    cache: Annotated[
        str,
        typer.Option("--cache", help="auto, none, ram or device: keep decoded uint8 images in memory / on the GPU."),
    ] = option_default(PretrainConfig, "cache"),
    strict_data: StrictDataOpt = option_default(PretrainConfig, "strict_data"),
    out: Annotated[
        str | None, typer.Option("--out", "-o", help="Run directory (default runs/MODEL-DATE-TIME).")
    ] = option_default(PretrainConfig, "out"),
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
    ] = option_default(PretrainConfig, "overwrite"),
    resume_dir: Annotated[
        str | None,
        typer.Option(
            "--resume",
            help="Continue the run in this directory exactly where its checkpoint stopped; auto: continue the run in "
            "--out if it has a checkpoint (its options must agree), else start it (for torchrun --max-restarts, requeues).",
        ),
    ] = None,
    save_every: Annotated[
        int, typer.Option("--save-every", help="Also checkpoint every N steps (0: at the end of each epoch only).")
    ] = option_default(PretrainConfig, "save_every"),
    log_every: Annotated[
        int, typer.Option("--log-every", help="Read loss/accuracy from the device every N steps (fewer host syncs).")
    ] = option_default(PretrainConfig, "log_every"),
    max_steps_per_epoch: Annotated[
        int | None,
        typer.Option("--max-steps-per-epoch", hidden=True),
    ] = option_default(PretrainConfig, "max_steps_per_epoch"),
    logger: Annotated[
        str,
        typer.Option(
            "--logger",
            help="Where else the figures go, comma-separated: csv (logs/scalars.csv), tensorboard, wandb, mlflow (each an extra: pip install 'rotnet-cli\\[tensorboard]'), or none.",
        ),
    ] = option_default(PretrainConfig, "logger"),
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval-data",
            help="Labelled images (digits, a class folder, a torchvision name) on which the features' kNN accuracy is measured during training.",
        ),
    ] = option_default(PretrainConfig, "eval_data"),
    eval_every: Annotated[
        str,
        typer.Option(
            "--eval-every",
            help="Measure it every N epochs (and after the last); auto: as often as keeps it at about 3% of the training compute.",
        ),
    ] = option_default(PretrainConfig, "eval_every"),
    eval_layers: Annotated[
        str,
        typer.Option("--eval-layers", help="Stages to measure, 1-based (negative from the last), e.g. 2,-1, or all."),
    ] = option_default(PretrainConfig, "eval_layers"),
    eval_heads: Annotated[
        str,
        typer.Option("--eval-heads", help="knn, and/or linear (a quick linear probe: a few times the cost of knn)."),
    ] = option_default(PretrainConfig, "eval_heads"),
    keep_checkpoints: Annotated[
        int,
        typer.Option(
            "--keep-checkpoints",
            help="Keep the weights of the last N epochs (RUN:epoch-E) besides the best one (RUN:best).",
        ),
    ] = option_default(PretrainConfig, "keep_checkpoints"),
    best_metric: Annotated[
        str,
        typer.Option(
            "--best-metric",
            help="The epoch kept as RUN:best: knn, linear (the best stage; knn:3 for stage 3), val_rot_acc, val_loss, none, or auto (knn with --eval-data, else val_rot_acc with --keep-checkpoints).",
        ),
    ] = option_default(PretrainConfig, "best_metric"),
    config_file: ConfigOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Pretrain a timm backbone by predicting image rotations; writes a run directory."""
    from ..pretraining import auto_resume_config, resume_config
    from ..pretraining import pretrain as run_pretrain
    from ..runtime import dist_from_env

    params = dict(ctx.params)
    planned_again = _plan_again_for_other_data(ctx, params)
    given = {name for name in params if _given(ctx, name)} - planned_again
    if params.pop("no_augment"):  # the flag of earlier versions
        if "augment" in given:
            raise typer.BadParameter("give --augment or --no-augment, not both", param_hint="--no-augment")
        params["augment"] = "none"
        given.add("augment")
    if "lr_ref_batch" in given and params.get("lr_scale") == "none" and "lr_scale" not in given:
        # it only says what --lr-scale scales against: alone it would be silently ignored
        raise typer.BadParameter(
            "it sets what --lr-scale scales against; add --lr-scale linear or sqrt", param_hint="--lr-ref-batch"
        )
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


def _plan_again_for_other_data(ctx: typer.Context, params: dict[str, Any]) -> set[str]:
    """--config RUN/config.json --data OTHER: the values RUN's data plan chose for its own data (image size,
    batch, epochs, augmentation) are planned again for OTHER, unless this command line gives them; they
    were applied to OTHER and called "asked for". -> the names planned again."""
    planned, their_data = ctx.meta.get(PLANNED_BY_CONFIG, (set(), None))
    if not planned or _source(ctx, "data") != "COMMANDLINE" or _same_data(params.get("data"), their_data):
        return set()
    again = {name for name in planned if _source(ctx, name) == "DEFAULT_MAP"}
    for name in again:
        params[name] = PretrainConfig.__dataclass_fields__[name].default
    return again


def _same_data(data: Any, their_data: Any) -> bool:
    """One data source however it is spelled: ``small``, ``./small/`` and its absolute path name one folder
    (compared as text they re-planned RUN's own data as if it were other data)."""
    if data == their_data:
        return True
    if not isinstance(data, (str, Path)) or not isinstance(their_data, (str, Path)):
        return False
    try:
        return Path(data).expanduser().samefile(Path(their_data).expanduser())
    except OSError:  # a dataset name, or a folder that is not there: only the same text is the same data
        return False


def _source(ctx: typer.Context, name: str) -> str | None:
    # compared by name: typer may bring its own copy of click's ParameterSource enum
    return getattr(ctx.get_parameter_source(name), "name", None)


def _given(ctx: typer.Context, name: str) -> bool:
    return _source(ctx, name) in ("COMMANDLINE", "ENVIRONMENT", "DEFAULT_MAP")  # DEFAULT_MAP: --config


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


def _render_honest_figures(result, config: PretrainConfig) -> None:
    """The validation accuracy with its count and interval (a warning when the split is too small to
    mean much), and what calibration did to the confidences predict reports."""
    final = result.final
    if final.get("val_rot_acc") is not None and result.val_images:
        answers = result.val_images * config.num_rotations
        unit = f"answers on {counted(result.val_images, 'held-out image')} x {config.num_rotations} rotations"
        out_console.print(
            f"validation: {accuracy_text(final['val_rot_acc'], answers, unit)}",
            markup=False,
            soft_wrap=True,
        )
        if result.val_images < SMALL_VALIDATION:
            more = (
                f"add images to {Path(config.data).expanduser() / 'val'}"
                if result.own_validation
                else "hold out more (--val-split) or add images"
            )
            warn(
                f"the validation split holds only {counted(result.val_images, 'image')}, too few for its accuracy "
                f"to mean much (and for a sure calibration); {more}"
            )
        if learned_little(final["val_rot_acc"], result.val_images, config.num_rotations):
            _warn_learned_little(final["val_rot_acc"], config)
    # inside: calibration.py imports torch (fast --help)
    from ..calibration import MAX_TEMPERATURE, MIN_CALIBRATION_IMAGES, MIN_TEMPERATURE, NOTABLE_ECE

    calibration = result.calibration
    if not calibration and 0 < (result.val_images or 0) < MIN_CALIBRATION_IMAGES:  # too few to fit a temperature on
        out_console.print(
            f"calibration: none, {counted(result.val_images, 'held-out image')} too few to fit a temperature on; "
            "predict reports the softmax's own confidences (temperature 1)",
            markup=False,
            soft_wrap=True,
        )
    if calibration:
        # the fit stops at MIN_TEMPERATURE: an error left as it was means the answers were less sure than right
        kept = calibration["temperature"] <= MIN_TEMPERATURE and calibration["ece_after"] >= NOTABLE_ECE
        why = ""
        if kept:
            why = (
                " (the answers were less sure than right; rotnet never makes them surer than the softmax says, "
                "so they stay as they are: on the safe side)"
            )
        elif calibration["temperature"] >= MAX_TEMPERATURE:  # the fit ran to its limit: every answer near chance
            why = (
                " (the fit's limit: the held-out answers carried almost no information, so every answer is near chance)"
            )
        out_console.print(
            f"calibration: temperature {calibration['temperature']:.2f} fitted on {calibration['samples']} held-out "
            f"answers; expected calibration error {100 * calibration['ece_before']:.1f}% -> "
            f"{100 * calibration['ece_after']:.1f}%{why}; predict reports the calibrated confidences",
            markup=False,
            soft_wrap=True,
        )


def _warn_learned_little(accuracy: float, config: PretrainConfig) -> None:
    """What to do about a run that ended far from knowing which way is up (surely below LEARNED_LITTLE)."""
    ways = "add images or train longer (--epochs)"
    if config.init is None:  # from random weights: pretrained ones are the likeliest help
        ways = (
            "from random weights, even a few hundred pictures of varied things were too few in our measurements "
            f"(docs/own-folder.md): add images, train longer (--epochs), or start from pretrained weights "
            f"(--init timm:{config.model})"
        )
    warn(
        f"the run learned little of which way is up ({100 * accuracy:.1f}% right, chance "
        f"{100 / config.num_rotations:.3g}%): its features and predict's answers will be weak; {ways}"
    )


def _render_summary(result, config: PretrainConfig) -> None:
    from ..rundir import METRICS

    final = result.final
    recent = result.history[-SUMMARY_EPOCHS:]
    table = Table(title=f"RotNet pretraining: {config.model} on {shown(config.data)}", title_justify="left")
    table.add_column("epoch", justify="right")
    table.add_column("loss", justify="right")
    table.add_column("rot acc", justify="right")
    table.add_column("val loss", justify="right")
    table.add_column("val rot acc", justify="right")
    table.add_column("img/s", justify="right")
    heads = list(dict.fromkeys(head for row in result.history for head in (row.get("eval") or {})))
    for head in heads:  # --eval-data: the best stage's accuracy
        table.add_column(f"{head} (best stage)", justify="right")
    for row in recent:
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
    if len(recent) < len(result.history):
        out_console.print(
            f"the last {len(recent)} of {len(result.history)} epochs; all of them: {result.out_dir / METRICS}",
            markup=False,
            soft_wrap=True,
        )
    if result.val_rot_acc_per_rotation:
        per = "  ".join(f"{angle}°: {100 * acc:.1f}%" for angle, acc in result.val_rot_acc_per_rotation.items())
        out_console.print(
            f"validation accuracy per rotation ({format_rotations(config.rotations)}): {per}"
            + (f" ({counted(result.val_images, 'image')} each)" if result.val_images < SMALL_VALIDATION else ""),
            soft_wrap=True,
        )
    if final.get("val_rot_acc") is None:
        why = "--val-split 0" if config.val_split == 0 else "one image: all of it trains"
        note(f"no validation split ({why}); accuracy above is on training images")
    _render_honest_figures(result, config)
    out_console.print(f"run directory: [bold]{shown(str(result.out_dir))}[/]", soft_wrap=True)
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
