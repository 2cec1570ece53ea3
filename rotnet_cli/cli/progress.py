"""Rendering the library's progress events: rich bars on a terminal, plain lines otherwise.

Library functions call ``progress(event)`` with the typed events of rotnet_cli.events; this
view is that callable. One ``case`` per event kind; events it does not know are ignored.
This module imports no torch (the events module does not either).

What a user sees from the first second of a run: the device, what is being done before the
first bar can move (building the model, reading and decoding the data, the first step, which
also warms up), then per-step bars for the epoch and the whole run with their ETAs, and after
the second step one line with the measured time per epoch and for the run. Piped, the same as
lines: one per phase, one per epoch, and one for a step whenever ``interval`` seconds passed
without a line (long epochs, slow first steps).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ..config import counted
from ..events import (
    Decoding,
    DeviceChosen,
    EpochEnded,
    EpochStarted,
    Event,
    FeaturesEvaluated,
    Message,
    Phase,
    Resumed,
    RunStarted,
    StepDone,
    StepFinished,
    TaskProgress,
    WarningMessage,
)
from ._common import shown

LINE_INTERVAL = 30.0  # seconds: piped output shows progress at least this often while steps finish
_KEEP_PHASE = (Message, WarningMessage, DeviceChosen, Phase)  # lines that do not end what is happening now


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def duration(seconds: float) -> str:
    """'4.2 s', '45 s', '3 min 05 s', '2 h 07 min': as long as it needs to be, no longer."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class StepClock:
    """Times one run's training steps as they are reported: seconds per step, epoch and run ETAs.

    The first step of a session (a new or resumed run) also warms up: memory is allocated,
    loader workers start, cuDNN tries its algorithms. Rates therefore come from the steps after
    it; with only the first step done, its own time is the (pessimistic) rate.
    """

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.start(total=0, done=0)

    def start(self, total: int, done: int) -> None:
        self.total = total  # steps in the whole run
        self.done = done  # steps done, a resumed run's earlier ones included
        self.epoch_started_at = self.clock()
        self.first: tuple[float, int] | None = None  # (time, done) at the session's first step
        self.last: tuple[float, int] | None = None
        self.first_step_seconds: float | None = None

    def epoch_started(self) -> None:
        self.epoch_started_at = self.clock()

    def step(self, done: int) -> None:
        now = self.clock()
        self.done = done
        if self.first is None:
            self.first = (now, done)
            self.first_step_seconds = now - self.epoch_started_at
        self.last = (now, done)

    @property
    def session_steps(self) -> int:
        return 0 if self.first is None or self.last is None else self.last[1] - self.first[1] + 1

    @property
    def seconds_per_step(self) -> float | None:
        if self.first is None or self.last is None:
            return None
        if self.session_steps > 1:  # everything after the first step: later epochs' validation included
            return (self.last[0] - self.first[0]) / (self.session_steps - 1)
        return self.first_step_seconds

    def eta(self, remaining_steps: int) -> float | None:
        rate = self.seconds_per_step
        return None if rate is None else rate * remaining_steps

    def run_eta(self) -> float | None:
        return self.eta(self.total - self.done)


class ProgressView:
    def __init__(
        self,
        console: Console,
        title: str = "",
        interval: float = LINE_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.console = console
        self.title = title
        self.live = console.is_terminal
        self.interval = interval
        self.clock = clock
        self.progress: Progress | None = None
        self.tasks: dict[str, int] = {}
        self.bar_start: dict[str, tuple[float, int]] = {}  # bar -> (time, done) when first seen: its ETA
        self.steps = StepClock(clock)
        self.steps_per_epoch = 0
        self.epochs = 0
        self.stats = ""  # the epoch's latest running figures (StepDone)
        self.last_line_at = clock()

    def __enter__(self) -> ProgressView:
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[count]}"),
                TextColumn("{task.fields[stats]}"),
                TimeElapsedColumn(),
                TextColumn("{task.fields[eta]}"),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self._remove("phase")
            self.progress.stop()

    # -- output

    def _line(self, text: str) -> None:
        # soft_wrap: a line that names a path or a command stays one line, whatever the width
        (self.progress.console if self.progress else self.console).print(text, highlight=False, soft_wrap=True)
        self.last_line_at = self.clock()

    def _due(self) -> bool:
        """Piped output: has a line been owed for ``interval`` seconds?"""
        return not self.live and self.clock() - self.last_line_at >= self.interval

    def _bar(
        self,
        key: str,
        description: str,
        done: int,
        total: int | None,
        count: str = "",
        stats: str = "",
        eta: str | None = None,
    ) -> None:
        if self.progress is None:
            return
        if eta is None:
            eta = self._eta_text(self._bar_eta(key, done, total))
        fields = dict(description=description, completed=done, total=total, count=count, stats=stats, eta=eta)
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(**fields)
        self.progress.update(self.tasks[key], **fields)

    def _remove(self, key: str) -> None:
        self.bar_start.pop(key, None)
        if self.progress is not None and key in self.tasks:
            self.progress.remove_task(self.tasks.pop(key))

    def _bar_eta(self, key: str, done: int, total: int | None) -> float | None:
        """Time left for a bar that moves at an even pace (decoding, a probe's heads), from its own start."""
        now = self.clock()
        started, done_then = self.bar_start.setdefault(key, (now, done))
        if total is None or done <= done_then:
            return None
        return (now - started) / (done - done_then) * (total - done)

    @staticmethod
    def _eta_text(seconds: float | None, first: str = "") -> str:
        return first if seconds is None else f"eta {duration(seconds)}"

    # -- events

    def __call__(self, event: Event) -> None:
        if not isinstance(event, _KEEP_PHASE):
            self._remove("phase")  # a bar or a result takes over from "what is happening now"
        match event:
            case Phase():
                if self.progress is not None:
                    self._remove("phase")  # a new phase: its elapsed time starts now
                    self._bar("phase", "now", 0, None, stats=shown(event.text), eta="")  # the text in the wide column
                elif not event.every_epoch:
                    self._line(shown(event.text))
            case DeviceChosen():
                extra = f", {event.world_size} processes" if event.world_size > 1 else ""
                self._line(f"device: {event.device}, precision {event.precision}{extra}")
            case Resumed():
                self._line(self._resumed_text(event))
            case RunStarted():
                self._run_started(event)
            case Message():
                self._line(shown(event.text))  # library text is plain: brackets in paths stay
            case WarningMessage():
                self._line("[yellow]warning:[/] " + shown(event.text))
            case Decoding():
                self._decoding(event)
            case EpochStarted():
                self._epoch_started(event)
            case StepFinished():
                self._step_finished(event)
            case StepDone():
                self.stats = (
                    f"loss {event.loss:.4f}  acc {_pct(event.rot_acc)}  {event.images_per_s:.0f} img/s  "
                    f"data wait {_pct(event.data_wait)}"
                )
                if "epoch" in self.tasks:
                    self.progress.update(self.tasks["epoch"], stats=self.stats)
            case EpochEnded():
                self._remove("epoch")
                left = self.steps.run_eta() if event.epoch < event.epochs else None
                self._line(
                    f"epoch {event.epoch}/{event.epochs}  loss {event.loss:.4f}  rot_acc {_pct(event.rot_acc)}  "
                    f"val_rot_acc {_pct(event.val_rot_acc)}  lr {event.lr:.4g}  {event.images_per_s:.0f} img/s  "
                    f"{event.seconds:.1f}s" + ("" if left is None else f"  (run: {duration(left)} left)")
                )
            case FeaturesEvaluated():
                for head, per_stage in event.accuracy.items():
                    stages = "  ".join(f"{stage}: {_pct(acc)}" for stage, acc in per_stage.items())
                    self._line(f"epoch {event.epoch} {head} accuracy by stage  {stages}  ({event.seconds:.1f}s)")
            case TaskProgress():
                if self.progress is not None:
                    self._bar(
                        event.task,
                        shown(event.description),
                        event.done,
                        event.total,
                        count=f"{event.done}/{event.total}",
                    )
                elif event.done == event.total or self._due():
                    self._line(f"{shown(event.description)}: {event.done}/{event.total}")

    @staticmethod
    def _resumed_text(event: Resumed) -> str:
        if event.epochs and event.epoch >= event.epochs:
            return f"resuming after the last epoch ({event.epoch} of {event.epochs})"
        of = f" of {event.epochs}" if event.epochs else ""
        if event.step == 0:
            return f"resuming at the start of epoch {event.epoch + 1}{of}"
        return f"resuming in epoch {event.epoch + 1}{of}, after step {event.step}"

    def _run_started(self, event: RunStarted) -> None:
        self._line(
            f"{event.model} at {event.img_size} px: {event.train_images} training / {event.val_images} validation "
            f"images, {event.steps_per_epoch} step{'s' if event.steps_per_epoch != 1 else ''} of {event.batch_images} rotated images per epoch -> {shown(event.out_dir)}"
        )
        if event.global_batch:
            self._line(
                f"global batch {event.global_batch} images per optimizer step ({event.per_process_batch} per process x "
                f"{event.processes} process{'es' if event.processes != 1 else ''} x {event.accum_steps} accumulation "
                f"step{'s' if event.accum_steps != 1 else ''}), peak lr {event.lr:.4g}"
            )
        self.steps_per_epoch, self.epochs = event.steps_per_epoch, event.epochs
        total = event.epochs * event.steps_per_epoch
        done = min(total, event.start_epoch * event.steps_per_epoch + event.start_step)
        self.steps.start(total, done)
        self._remove("epoch")
        self._remove("run")
        if done < total:
            self._bar("run", "run", done, total, count=f"{done}/{total} steps", eta="")

    def _decoding(self, event: Decoding) -> None:
        started = "decode" in self.bar_start
        eta = self._bar_eta("decode", event.done, event.total)  # (the first event starts its clock)
        if event.done == event.total:
            seconds = self.clock() - self.bar_start["decode"][0]
            self._remove("decode")
            self._line(f"decoded {counted(event.total, 'image')} in {duration(seconds)}")
        elif self.progress is not None:
            self._bar(
                "decode",
                "decoding images",
                event.done,
                event.total,
                count=f"{event.done}/{event.total}",
                eta=self._eta_text(eta),
            )
        elif not started:
            self._line(f"decoding {event.total} images into memory")
        elif self._due():
            self._line(
                f"decoding: {event.done}/{event.total} images" + ("" if eta is None else f", {duration(eta)} left")
            )

    def _epoch_started(self, event: EpochStarted) -> None:
        self.steps.epoch_started()
        self.stats = ""
        first = self.steps.session_steps == 0
        eta = "timing the first step" if first else self._eta_text(self.steps.eta(event.steps - event.step))
        self._bar(
            "epoch",
            f"epoch {event.epoch}/{event.epochs}",
            event.step,
            event.steps,
            count=f"{event.step}/{event.steps}",
            eta=eta,
        )
        if first and self.progress is None:
            self._line(f"epoch {event.epoch}/{event.epochs}: first step (it also warms up: memory, loader workers)")

    def _step_finished(self, event: StepFinished) -> None:
        self.steps.step((event.epoch - 1) * event.steps + event.step)
        epoch_eta = self.steps.eta(event.steps - event.step)
        run_eta = self.steps.run_eta()
        if self.progress is not None:
            self._bar(
                "epoch",
                f"epoch {event.epoch}/{self.epochs}",
                event.step,
                event.steps,
                count=f"{event.step}/{event.steps}",
                stats=self.stats,
                eta=self._eta_text(epoch_eta),
            )
            if "run" in self.tasks:
                self._bar(
                    "run",
                    "run",
                    self.steps.done,
                    self.steps.total,
                    count=f"{self.steps.done}/{self.steps.total} steps",
                    eta=self._eta_text(run_eta),
                )
        if self.steps.session_steps == 2 and self.steps.done < self.steps.total:
            self._line(self._estimate_text())
        elif self._due():
            stats = f"  {self.stats}" if self.stats else ""
            self._line(
                f"epoch {event.epoch}/{self.epochs} step {event.step}/{event.steps}{stats}  "
                f"epoch: {duration(epoch_eta or 0)} left, run: {duration(run_eta or 0)} left"
            )

    def _estimate_text(self) -> str:
        """After the second step: the measured pace, per epoch and to the end of the run."""
        rate, first = self.steps.seconds_per_step or 0.0, self.steps.first_step_seconds or 0.0
        return (
            f"timing: {duration(rate)} per step after a first step of {duration(first)}: about "
            f"{duration(rate * self.steps_per_epoch)} per epoch, {duration(self.steps.run_eta() or 0)} to the end of the run"
        )
