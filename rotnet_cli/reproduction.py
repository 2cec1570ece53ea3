"""The paper's CIFAR-10 experiments with one call: pretrain the NIN, probe it, compare.

Gidaris et al. 2018, section 3.1 (CIFAR-10, Network-In-Network):
- Table 1: a non-linear classifier (the paper's MLP on flattened feature maps) on each block
  of a 4-block RotNet NIN: 85.07 / 89.06 / 86.21 / 61.73.
- Table 2: the same classifier on block 2 of NINs trained with other rotation sets:
  4 rotations 89.06, 8 rotations 88.51, 0+180 87.46, 90+270 85.52.
- Table 3: the frame: a supervised NIN 92.80, a conv classifier on a random NIN's block 2
  72.50, RotNet + non-linear 89.06, RotNet + conv 91.16.

``reproduce(config, progress)`` follows the official code (github.com/gidariss/FeatureLearningRotNet)
wherever it is known: the NIN and its init (rotnet_cli.nin), the pretraining recipe (SGD Nesterov,
momentum 0.9, weight decay 5e-4 on every parameter, 128 images x R rotations per batch, lr 0.1
divided by 5 at the ``--schedule``'s epochs, random crop 32 with padding 4 and flip, fp32), the
classifiers' protocol (ProbeConfig recipe "paper": features of cropped and flipped images
recomputed every batch, the official optimiser, schedule, epochs and init per classifier, best
and last epoch) and the supervised baseline (SupervisedConfig). The README lists what still
differs. Every experiment lands in its own directory under ``out``; a rerun reuses what is
finished and resumes what stopped, but only when the saved settings are the ones asked for.
The smoke mode runs the same steps on the built-in digits for a few steps, in its own folder.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from . import rundir
from .config import (
    PRETRAIN_SCHEDULES,
    PretrainConfig,
    ProbeConfig,
    ReproduceConfig,
    SupervisedConfig,
    format_rotations,
)
from .errors import ConfigError, DataError, OutputError
from .events import Message, Progress, ignore
from .pretraining import pretrain
from .probing import probe
from .supervised import train_supervised

FOUR = (0.0, 90.0, 180.0, 270.0)
EIGHT = tuple(float(a) for a in range(0, 360, 45))
# (experiment name, rotation set, paper's block-2 accuracy with the non-linear classifier)
ROTATION_STUDY = (
    ("4 rotations", FOUR, 89.06),
    ("8 rotations", EIGHT, 88.51),
    ("2 rotations: 0, 180", (0.0, 180.0), 87.46),
    ("2 rotations: 90, 270", (90.0, 270.0), 85.52),
)
TABLE1_PAPER = {1: 85.07, 2: 89.06, 3: 86.21, 4: 61.73}
TABLE3_PAPER = {
    "Supervised NIN": 92.80,
    "Random init + conv": 72.50,
    "RotNet + non-linear": 89.06,
    "RotNet + conv": 91.16,
}
TABLE3_CONV_PAPER = TABLE3_PAPER["RotNet + conv"]


@dataclass
class ReproduceRow:
    table: str
    experiment: str
    stage: int | None  # the probed block (None: the supervised network)
    head: str
    ours: float  # top-1 in percent after the last epoch (the honest number)
    best: float  # top-1 in percent of the best epoch, chosen on the test set (what the paper reports)
    best_epoch: int | None
    paper: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class ReproduceResult:
    out_dir: Path
    smoke: bool
    schedule: str
    rows: list[ReproduceRow] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # experiment -> run directory

    def to_dict(self) -> dict:
        return {
            "out_dir": str(self.out_dir),
            "smoke": self.smoke,
            "schedule": self.schedule,
            "runs": self.runs,
            "rows": [r.to_dict() for r in self.rows],
        }


# ----------------------------------------------------------------------------- the recipe's configs


def pretrain_config(cfg: ReproduceConfig, rotations: tuple[float, ...], out: Path) -> PretrainConfig:
    """RotNet pretraining as the official code (config/CIFAR10_RotNet_NIN4blocks.py), on the --schedule's epochs."""
    epochs, milestones = PRETRAIN_SCHEDULES[cfg.schedule]
    common = dict(
        model="rotnet_nin4",
        rotations=rotations,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
        decay_all_params=True,
        batch_size=128,
        augment="crop+flip",
        device=cfg.device,
        precision=cfg.precision,
        workers=cfg.workers,
        seed=cfg.seed,
        out=str(out),
        schedule="step",
        gamma=0.2,
    )
    if cfg.smoke:
        return PretrainConfig(
            **common | {"batch_size": 16},
            data="digits",
            img_size=8,
            epochs=2,
            milestones=(1,),
            max_steps_per_epoch=2,
            val_split=0.02,
        )
    # CIFAR-10 brings its test split, which serves as the rotation validation set (as the official code's)
    return PretrainConfig(
        **common,
        data=cfg.data,
        data_dir=cfg.data_dir,
        download=cfg.download,
        img_size=32,
        epochs=epochs,
        milestones=milestones,
        val_split=0.02,
    )


def probe_config(
    cfg: ReproduceConfig, run: Path, layers: tuple[int, ...], heads: tuple[str, ...], compare: tuple[str, ...] = ()
) -> ProbeConfig:
    """The official classifiers' protocol (the paper recipe) on frozen feature maps, flattened for the MLP.

    The 8-rotation NIN masks every pretraining copy with a disc (so empty corners give nothing
    away); its probes see whole, unmasked images all the same: the mask is a device of the pretext
    task, and the classifiers are judged on the images the downstream task has.
    """
    common = dict(
        weights=str(run),
        layers=layers,
        heads=heads,
        pool="flatten",
        recipe="paper",
        compare=compare,
        device=cfg.device,
        precision=cfg.precision,
        workers=cfg.workers,
        seed=cfg.seed,
    )
    if cfg.smoke:
        return ProbeConfig(**common, data="digits", epochs=2, val_split=0.05, labels_per_class=10)
    return ProbeConfig(**common, data=cfg.data, data_dir=cfg.data_dir, download=cfg.download)


def supervised_config(cfg: ReproduceConfig, out: Path) -> SupervisedConfig:
    """Table 3's supervised NIN: config/CIFAR10_supervised_NIN.py (SupervisedConfig's defaults)."""
    common = dict(
        model="rotnet_nin3",
        device=cfg.device,
        precision=cfg.precision,
        workers=cfg.workers,
        seed=cfg.seed,
        out=str(out),
    )
    if cfg.smoke:
        return SupervisedConfig(
            **common,
            data="digits",
            img_size=8,
            epochs=2,
            milestones=(1,),
            batch_size=16,
            labels_per_class=10,
            val_split=0.05,
            max_steps_per_epoch=2,
        )
    return SupervisedConfig(**common, data=cfg.data, data_dir=cfg.data_dir, download=cfg.download, img_size=32)


# ----------------------------------------------------------------------------- the study


def reproduce(cfg: ReproduceConfig, progress: Progress | None = None) -> ReproduceResult:
    """Run Tables 1-3 of the paper's CIFAR-10 study; see the module docstring."""
    emit = progress or ignore
    out = Path(cfg.out_dir).expanduser()
    result = ReproduceResult(out_dir=out, smoke=cfg.smoke, schedule=cfg.schedule)
    table3: dict[str, ReproduceRow] = {}
    for name, rotations, paper_block2 in ROTATION_STUDY:
        run = out / ("nin4-rot" + format_rotations(rotations).replace(",", "-"))
        result.runs[name] = str(run)
        emit(Message(f"[{name}] pretraining rotnet_nin4 -> {run}"))
        pretrain_once(pretrain_config(cfg, rotations, run), emit, progress)
        if rotations == FOUR:
            emit(Message(f"[{name}] the non-linear classifier on every block (Tables 1-3)"))
            mlp = probe_once(probe_config(cfg, run, (1, 2, 3, 4), ("mlp",)), emit, progress)
            for stage in (1, 2, 3, 4):
                result.rows.append(_row(mlp, "1", name, "run", stage, "mlp", TABLE1_PAPER[stage]))
            result.rows.append(_row(mlp, "2", name, "run", 2, "mlp", paper_block2))
            table3["RotNet + non-linear"] = _row(
                mlp, "3", "RotNet + non-linear", "run", 2, "mlp", TABLE3_PAPER["RotNet + non-linear"]
            )
            emit(Message(f"[{name}] the conv classifier on block 2, and on a random NIN's (Table 3)"))
            conv = probe_once(probe_config(cfg, run, (2,), ("conv",), compare=("random",)), emit, progress)
            table3["RotNet + conv"] = _row(conv, "3", "RotNet + conv", "run", 2, "conv", TABLE3_PAPER["RotNet + conv"])
            table3["Random init + conv"] = _row(
                conv, "3", "Random init + conv", "random", 2, "conv", TABLE3_PAPER["Random init + conv"]
            )
        else:
            emit(Message(f"[{name}] the non-linear classifier on block 2 (Table 2)"))
            mlp = probe_once(probe_config(cfg, run, (2,), ("mlp",)), emit, progress)
            result.rows.append(_row(mlp, "2", name, "run", 2, "mlp", paper_block2))

    supervised_dir = out / "supervised-nin3"
    result.runs["Supervised NIN"] = str(supervised_dir)
    emit(Message(f"[Supervised NIN] training rotnet_nin3 on the labels -> {supervised_dir}"))
    supervised = train_supervised(supervised_config(cfg, supervised_dir), progress)
    table3["Supervised NIN"] = ReproduceRow(
        "3",
        "Supervised NIN",
        None,
        "nin3",
        _pct(supervised.accuracy),
        _pct(supervised.best_accuracy),
        supervised.best_epoch,
        TABLE3_PAPER["Supervised NIN"],
    )
    result.rows += [table3[name] for name in TABLE3_PAPER]  # in the paper's order
    result.rows.sort(key=lambda r: r.table)  # stable: the study's order within each table
    return result


def pretrain_once(wanted: PretrainConfig, emit: Progress, progress: Progress | None) -> None:
    """Train the run ``wanted`` asks for: reuse it when it finished, resume it when it stopped,
    and never take a run of other settings for it (a smoke run is not a CIFAR-10 run)."""
    run = Path(wanted.out)
    saved = _saved_pretrain_config(run)
    if saved is not None:
        differences = saved.contradictions(wanted, [f.name for f in dataclasses.fields(PretrainConfig)])
        if differences:
            raise OutputError(
                f"{run} holds a run with other settings (this recipe asks {'; '.join(differences[:3])}); "
                "give another --out, or move it away"
            )
        if (run / rundir.WEIGHTS).is_file():
            emit(Message(f"{run} has finished with these settings: reused"))
            return
    resume = (run / rundir.CHECKPOINT).is_file()
    # a run that stopped before its first checkpoint, with these settings, starts again in its folder
    pretrain(dataclasses.replace(wanted, resume=resume, overwrite=saved is not None and not resume), progress)


def _saved_pretrain_config(run: Path) -> PretrainConfig | None:
    """The settings a run directory was started with (None when it has none), validated like user input."""
    if not (run / rundir.CONFIG).is_file():
        return None
    try:
        return rundir.read_run_config(run)  # every field checked: a wrong type is named, never a traceback
    except (DataError, ConfigError) as e:
        raise OutputError(
            f"{run / rundir.CONFIG} is not a rotnet run config ({str(e).splitlines()[0][:80]}); "
            "give another --out, or move it away"
        ) from None


def probe_once(cfg: ProbeConfig, emit: Progress, progress: Progress | None) -> dict:
    """The probe's result as probe.json keeps it: the saved one of the same setting, or a new one."""
    for saved in rundir.read_probe(Path(cfg.weights)):
        if saved.get("setting") == cfg.setting():
            emit(Message(f"{Path(cfg.weights) / rundir.PROBE} holds this probe already: reused"))
            return saved
    return probe(cfg, progress).to_dict()


def _row(result: dict, table: str, experiment: str, weights: str, stage: int, head: str, paper: float) -> ReproduceRow:
    """One table row from a probe result: last and best epoch of ``head`` on ``weights``' block ``stage``."""
    try:
        row = next(r for r in result["rows"] if r["weights"] == weights and r["stage"] == stage)
        best = row.get("best_epoch", {}).get(head, {"accuracy": row[head], "epoch": None})
        return ReproduceRow(
            table, experiment, stage, head, _pct(row[head]), _pct(best["accuracy"]), best["epoch"], paper
        )
    except (KeyError, TypeError, StopIteration):
        raise OutputError(
            f"the probe result of {result.get('weights')} has no {head} accuracy for {weights} block {stage}; "
            f"move its {rundir.PROBE} away and run again"
        ) from None


def _pct(accuracy: float) -> float:
    return round(100 * accuracy, 2)
