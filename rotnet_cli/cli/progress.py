"""Rendering the library's progress events: rich bars on a terminal, plain lines otherwise.

Library functions call ``progress(event)`` with the typed events of rotnet_cli.events; this
view is that callable. One ``case`` per event kind; events it does not know are ignored.
This module imports no torch (the events module does not either).
"""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from ..events import (
    Decoding, DeviceChosen, EpochEnded, Event, FeaturesEvaluated, Message, Resumed, RunStarted, StepDone, TaskProgress,
    WarningMessage,
)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


class ProgressView:
    def __init__(self, console: Console, title: str = ""):
        self.console = console
        self.title = title
        self.live = console.is_terminal
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}

    def __enter__(self) -> "ProgressView":
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.stop()

    def _line(self, text: str) -> None:
        (self.progress.console if self.progress else self.console).print(text, highlight=False, soft_wrap=True)

    def _bar(self, key: str, description: str, done: int, total: int, stats: str = "") -> None:
        if self.progress is None:
            return
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(description, total=total, stats=stats)
        self.progress.update(self.tasks[key], description=description, completed=done, total=total, stats=stats)

    def __call__(self, event: Event) -> None:
        match event:
            case DeviceChosen():
                extra = f", {event.world_size} processes" if event.world_size > 1 else ""
                self._line(f"device: {event.device}, precision {event.precision}{extra}")
            case Resumed():
                self._line(f"resuming at epoch {event.epoch + 1}, step {event.step}")
            case RunStarted():
                self._line(
                    f"{event.model} at {event.img_size} px: {event.train_images} training / {event.val_images} validation "
                    f"images, {event.steps_per_epoch} steps of {event.batch_images} rotated images per epoch -> {escape(event.out_dir)}"
                )
            case Message():
                self._line(escape(event.text))  # library text is plain: brackets in paths stay
            case WarningMessage():
                self._line("[yellow]warning:[/] " + escape(event.text))
            case Decoding():
                self._bar("decode", "decoding images", event.done, event.total)
            case StepDone():
                stats = (
                    f"loss {event.loss:.4f}  acc {_pct(event.rot_acc)}  {event.images_per_s:.0f} img/s  "
                    f"data wait {_pct(event.data_wait)}"
                )
                self._bar("epoch", f"epoch {event.epoch}/{event.epochs}", event.step, event.steps, stats)
            case EpochEnded():
                if self.progress is not None and "epoch" in self.tasks:
                    self.progress.remove_task(self.tasks.pop("epoch"))
                self._line(
                    f"epoch {event.epoch}/{event.epochs}  loss {event.loss:.4f}  rot_acc {_pct(event.rot_acc)}  "
                    f"val_rot_acc {_pct(event.val_rot_acc)}  lr {event.lr:.4g}  {event.images_per_s:.0f} img/s  "
                    f"{event.seconds:.1f}s"
                )
            case FeaturesEvaluated():
                for head, per_stage in event.accuracy.items():
                    stages = "  ".join(f"{stage}: {_pct(acc)}" for stage, acc in per_stage.items())
                    self._line(f"epoch {event.epoch} {head} accuracy by stage  {stages}  ({event.seconds:.1f}s)")
            case TaskProgress():
                if self.progress is None:
                    if event.done == event.total:
                        self._line(f"{event.description}: {event.done}/{event.total}")
                    return
                self._bar(event.task, event.description, event.done, event.total)
