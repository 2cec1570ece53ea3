"""The paper's CIFAR-10 experiments with one call: pretrain the NIN, probe it, compare.

Gidaris et al. 2018, section 3.1 (CIFAR-10, Network-In-Network):
- Table 1: a non-linear classifier (the paper's MLP on flattened feature maps) on each block
  of a 4-block RotNet NIN: 85.07 / 89.06 / 86.21 / 61.73.
- Table 2: the same classifier on block 2 of NINs trained with other rotation sets:
  4 rotations 89.06, 8 rotations 88.51, 0+180 87.46, 90+270 85.52.
- Table 3: "RotNet + conv", a NIN-block classifier on block 2: 91.16.

``reproduce(config, progress)`` runs the four pretrainings (the paper's schedule: SGD with
Nesterov momentum 0.9, weight decay 5e-4, 128 images x R rotations per batch, lr 0.1 divided
by 5 after epochs 30, 60 and 80 of 100, random crop 32 with padding 4 and flip), probes them
as the paper did, and returns one table with the paper's numbers beside ours. Every run
lands in its own run directory under ``out`` and is resumed, not redone, when the recipe is
run again. The smoke mode runs the same steps on the built-in digits for a few steps.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from . import rundir
from .config import PretrainConfig, ProbeConfig, ReproduceConfig, format_rotations
from .errors import ConfigError, DataError
from .events import Message, Progress, ignore
from .pretraining import pretrain
from .probing import probe

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
TABLE3_CONV_PAPER = 91.16


@dataclass
class ReproduceRow:
    table: str
    experiment: str
    stage: int
    head: str
    ours: float  # top-1 in percent
    paper: float

    def to_dict(self) -> dict:
        return {"table": self.table, "experiment": self.experiment, "stage": self.stage, "head": self.head,
                "ours": self.ours, "paper": self.paper}


@dataclass
class ReproduceResult:
    out_dir: Path
    smoke: bool
    rows: list[ReproduceRow] = field(default_factory=list)
    runs: dict[str, str] = field(default_factory=dict)  # experiment -> run directory

    def to_dict(self) -> dict:
        return {"out_dir": str(self.out_dir), "smoke": self.smoke, "runs": self.runs,
                "rows": [r.to_dict() for r in self.rows]}


def pretrain_config(cfg: ReproduceConfig, rotations: tuple[float, ...], out: Path) -> PretrainConfig:
    """The paper's pretraining schedule (shortened in smoke mode)."""
    common = dict(
        model="rotnet_nin4", rotations=rotations, optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
        batch_size=128, augment=True, device=cfg.device, precision=cfg.precision, workers=cfg.workers,
        seed=cfg.seed, out=str(out), resume=(out / rundir.CHECKPOINT).is_file(),
        # a run of the recipe killed before its first checkpoint is started again (its old files set aside)
        overwrite=out.is_dir() and any(out.iterdir()) and not (out / rundir.CHECKPOINT).is_file(),
    )
    if cfg.smoke:
        return PretrainConfig(**common | {"batch_size": 16}, data="digits", img_size=8, epochs=2, schedule="step",
                              milestones=(1,), gamma=0.2, max_steps_per_epoch=2, val_split=0.02)
    return PretrainConfig(**common, data=cfg.data, data_dir=cfg.data_dir, download=cfg.download, img_size=32,
                          epochs=100, schedule="step", milestones=(30, 60, 80), gamma=0.2, val_split=0.02)


def probe_config(cfg: ReproduceConfig, run: Path, layers: tuple[int, ...], heads: tuple[str, ...]) -> ProbeConfig:
    """The paper's evaluation: classifiers on frozen feature maps, flattened for the MLP."""
    common = dict(weights=str(run), layers=layers, heads=heads, pool="flatten", device=cfg.device,
                  precision=cfg.precision, workers=cfg.workers, seed=cfg.seed)
    if cfg.smoke:
        return ProbeConfig(**common, data="digits", epochs=2, val_split=0.05, labels_per_class=10)
    return ProbeConfig(**common, data=cfg.data, data_dir=cfg.data_dir, download=cfg.download, epochs=100)


def reproduce(cfg: ReproduceConfig, progress: Progress | None = None) -> ReproduceResult:
    """Run Tables 1-3 of the paper's CIFAR-10 study; see the module docstring."""
    emit = progress or ignore
    out = Path(cfg.out).expanduser()
    result = ReproduceResult(out_dir=out, smoke=cfg.smoke)
    for name, rotations, paper_block2 in ROTATION_STUDY:
        run = out / ("nin4-rot" + format_rotations(rotations).replace(",", "-"))
        result.runs[name] = str(run)
        emit(Message(f"[{name}] pretraining rotnet_nin4 -> {run}"))
        wanted = pretrain_config(cfg, rotations, run)
        check_same_recipe(run, wanted)
        if not (run / rundir.WEIGHTS).is_file():  # a finished run is reused, a stopped one resumed
            pretrain(wanted, progress)
        if rotations == FOUR:
            emit(Message(f"[{name}] probing every block (mlp on flattened maps, conv head)"))
            probed = probe(probe_config(cfg, run, (1, 2, 3, 4), ("mlp", "conv")), progress)
            blocks = {r.stage: r for r in probed.rows if r.weights == "run"}
            for stage, row in sorted(blocks.items()):
                result.rows.append(ReproduceRow("1", name, stage, "mlp", _pct(row.accuracy["mlp"]), TABLE1_PAPER[stage]))
            result.rows.append(ReproduceRow("2", name, 2, "mlp", _pct(blocks[2].accuracy["mlp"]), paper_block2))
            result.rows.append(ReproduceRow("3", "RotNet + conv", 2, "conv", _pct(blocks[2].accuracy["conv"]), TABLE3_CONV_PAPER))
        else:
            emit(Message(f"[{name}] probing block 2 (mlp on flattened maps)"))
            probed = probe(probe_config(cfg, run, (2,), ("mlp",)), progress)
            row = next(r for r in probed.rows if r.weights == "run")
            result.rows.append(ReproduceRow("2", name, 2, "mlp", _pct(row.accuracy["mlp"]), paper_block2))
    result.rows.sort(key=lambda r: r.table)  # stable: the study's order within each table
    return result


def check_same_recipe(run: Path, wanted: PretrainConfig) -> None:
    """A run found under --out is reused or resumed only when it was made with what the recipe asks
    (a --smoke run is not the paper's 100-epoch run)."""
    if not (run / rundir.CHECKPOINT).is_file() and not (run / rundir.WEIGHTS).is_file():
        return
    try:
        saved = rundir.read_run_config(run)
    except DataError as e:
        raise ConfigError(f"{run} holds a run rotnet cannot read ({e}); give another --out, or move that run away") from None
    clashes = saved.contradictions(wanted, [f.name for f in fields(PretrainConfig)])
    if clashes:
        raise ConfigError(
            f"{run} holds a run made with other settings than this recipe asks for ({'; '.join(clashes[:4])}); "
            "give another --out, or move that run away"
        )


def _pct(accuracy: float) -> float:
    return round(100 * accuracy, 2)
