"""What the library reports while it works: typed progress events and the one callback type.

A long call (``pretrain``, ``probe``, ``export``, ``predict``, ...) takes ``progress:
Progress | None`` and calls it with one of the small frozen dataclasses below; library code
never prints. The CLI renders them (cli/progress.py); a Python caller can log them, collect
them, or pass nothing. A misspelt field is an error where the event is made, not a silent
gap in a terminal far away.

Adding an event is one dataclass here and one ``case`` in cli/progress.py; a renderer that
does not know an event ignores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Event:
    """The base of every progress event."""


@dataclass(frozen=True)
class Message(Event):
    """A line of information (plain text: brackets in paths are not markup)."""

    text: str


@dataclass(frozen=True)
class Lines(Message):
    """A block of information, one line per "\\n" of ``text`` (each plain text, like a Message's): the
    renderer shows the lines as lines, where a Message's own newlines (from a file name) are escaped."""


@dataclass(frozen=True)
class WarningMessage(Event):
    """Something the user should know, that does not stop the work."""

    text: str


@dataclass(frozen=True)
class Phase(Event):
    """What the work is doing now, before a bar can show it ("building resnet18", "validating"):
    a live status on a terminal until the next progress event; otherwise a line, unless the
    phase recurs every epoch."""

    text: str
    every_epoch: bool = False


@dataclass(frozen=True)
class DeviceChosen(Event):
    device: str  # e.g. 'cuda:0 (NVIDIA H100 80GB HBM3, 79.2 GiB)'
    precision: str  # resolved: fp32, bf16 or fp16
    world_size: int = 1  # processes under torchrun


@dataclass(frozen=True)
class TaskProgress(Event):
    """Progress of one named piece of work (a bar on a terminal, a line when it is done)."""

    task: str  # identifies the bar: events with the same task update it
    description: str
    done: int
    total: int


@dataclass(frozen=True)
class Decoding(Event):
    """Images decoded into memory so far."""

    done: int
    total: int


@dataclass(frozen=True)
class Resumed(Event):
    epoch: int  # 0-based epoch the run continues in (== epochs: the run had finished)
    step: int  # steps of that epoch already done
    epochs: int = 0  # the run's epochs (0: not told)


@dataclass(frozen=True)
class RunStarted(Event):
    out_dir: str
    model: str
    img_size: int
    train_images: int
    val_images: int
    steps_per_epoch: int
    epochs: int
    start_epoch: int  # 0-based: a resumed run starts later
    batch_images: int  # model inputs per step (rotated copies), over all processes
    start_step: int = 0  # steps of start_epoch already done (a run resumed mid-epoch)
    global_batch: int = 0  # images per optimizer step: per process x processes x accumulation (0: not said)
    per_process_batch: int = 0
    processes: int = 1
    accum_steps: int = 1  # micro-batches per optimizer step (--accum-steps)
    lr: float = 0.0  # the peak lr in use (after --lr-scale)


@dataclass(frozen=True)
class EpochStarted(Event):
    epoch: int  # 1-based
    epochs: int
    step: int  # steps of this epoch already done (a resumed epoch starts later)
    steps: int


@dataclass(frozen=True)
class StepFinished(Event):
    """A training step was taken: sent every step, from host counters alone (no device read)."""

    epoch: int  # 1-based
    step: int  # steps of this epoch done
    steps: int


@dataclass(frozen=True)
class StepDone(Event):
    """Running figures of the epoch so far (sent every --log-every steps)."""

    epoch: int  # 1-based
    epochs: int
    step: int  # steps of this epoch done
    steps: int
    loss: float
    rot_acc: float
    lr: float
    images_per_s: float
    data_wait: float  # share of the epoch's time spent waiting for the next batch


@dataclass(frozen=True)
class EpochEnded(Event):
    """An epoch's metrics row, as metrics.jsonl keeps it."""

    epoch: int  # 1-based
    epochs: int
    loss: float
    rot_acc: float
    val_loss: float | None
    val_rot_acc: float | None
    lr: float
    images_per_s: float
    seconds: float


@dataclass(frozen=True)
class FeaturesEvaluated(Event):
    """Feature quality measured during pretraining (--eval-data): accuracy of each head per stage."""

    epoch: int  # 1-based
    accuracy: dict[str, dict[str, float]]  # head -> stage (1-based, as text) -> top-1 in [0, 1]
    seconds: float


Progress = Callable[[Event], None]


def ignore(event: Event) -> None:
    """The progress callback of a caller that does not listen."""


__all__ = [
    "Event",
    "Message",
    "WarningMessage",
    "Phase",
    "DeviceChosen",
    "TaskProgress",
    "Decoding",
    "Resumed",
    "RunStarted",
    "EpochStarted",
    "StepFinished",
    "StepDone",
    "EpochEnded",
    "FeaturesEvaluated",
    "Progress",
    "ignore",
]
