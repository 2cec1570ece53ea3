"""What a user sees while a run works: what is happening now, per-step bars, epoch and run ETAs,
the measured time per epoch after the first steps; piped, a line per phase and epoch and one
whenever a long epoch would otherwise stay silent."""

import io

import pytest
import torch
from rich.console import Console

from rotnet_cli.cli.progress import ProgressView, StepClock, duration
from rotnet_cli.config import PretrainConfig
from rotnet_cli.events import (
    Decoding,
    DeviceChosen,
    EpochEnded,
    EpochStarted,
    Message,
    Phase,
    Resumed,
    RunStarted,
    StepDone,
    StepFinished,
)
from rotnet_cli.pretraining import pretrain, slow_device_hint


class FakeClock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make_view(terminal: bool, interval: float = 30.0):
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=terminal, width=200, color_system=None)
    clock = FakeClock()
    return ProgressView(console, interval=interval, clock=clock), clock, buffer


def run_started(epochs: int, steps: int, start_epoch: int = 0, start_step: int = 0) -> RunStarted:
    return RunStarted("runs/demo", "resnet18", 32, 1617, 180, steps, epochs, start_epoch, 512, start_step)


def epoch_ended(epoch: int, epochs: int) -> EpochEnded:
    return EpochEnded(epoch, epochs, 0.5, 0.8, 0.6, 0.75, 0.01, 1000.0, 12.0)


def test_piped_output_says_what_happens_from_the_first_second():
    view, clock, buffer = make_view(terminal=False)
    with view:
        view(DeviceChosen("cpu (2 threads)", "fp32"))
        view(Phase("building resnet18"))
        view(Phase("reading ~/photos"))
        view(Decoding(0, 100))
        clock.t += 1
        view(Decoding(64, 100))
        clock.t += 1
        view(Decoding(100, 100))
        view(Phase("validating: 180 images x 4 rotations", every_epoch=True))  # recurs: not a line of its own
        view(run_started(epochs=2, steps=12))
        view(EpochStarted(1, 2, 0, 12))
        clock.t += 3  # the first step also warms up
        view(StepFinished(1, 1, 12))
        for step in range(2, 13):
            clock.t += 1
            view(StepFinished(1, step, 12))
        view(epoch_ended(1, 2))
    lines = buffer.getvalue().splitlines()
    assert lines[:5] == [
        "device: cpu (2 threads), precision fp32",
        "building resnet18",
        "reading ~/photos",
        "decoding 100 images into memory",
        "decoded 100 images in 2.0 s",
    ]
    assert lines[6] == "epoch 1/2: first step (it also warms up: memory, loader workers)"
    # after the second step: 1 s per step from then on, 22 steps left
    assert (
        lines[7]
        == "timing: 1.0 s per step after a first step of 3.0 s: about 12 s per epoch, 22 s to the end of the run"
    )
    assert lines[8].startswith("epoch 1/2  loss 0.5000") and lines[8].endswith("(run: 12 s left)")
    assert len(lines) == 9  # 12 short steps: no step lines between the epoch lines


def test_piped_output_prints_a_step_line_when_an_epoch_runs_long():
    view, clock, buffer = make_view(terminal=False, interval=30)
    with view:
        view(run_started(epochs=1, steps=10))
        view(EpochStarted(1, 1, 0, 10))
        view(StepDone(1, 1, 2, 10, 1.2, 0.5, 0.1, 100.0, 0.01))
        for step in range(1, 6):
            clock.t += 20  # 224 px on a CPU
            view(StepFinished(1, step, 10))
    lines = buffer.getvalue().splitlines()
    # step 2 (t=40): the estimate; step 4 (t=80): 40 s without a line -> a step line with the figures and ETAs
    assert lines[2].startswith("timing: 20 s per step")
    assert lines[3] == (
        "epoch 1/1 step 4/10  loss 1.2000  acc 50.0%  100 img/s  data wait 1.0%  "
        "epoch: 2 min 00 s left, run: 2 min 00 s left"
    )
    assert len(lines) == 4  # step 5 (t=100): only 20 s after the last line


def test_terminal_bars_move_every_step_and_show_epoch_and_run_etas():
    view, clock, _ = make_view(terminal=True)
    with view:
        view(Phase("building resnet18"))
        assert view.progress.tasks[-1].fields["stats"] == "building resnet18"  # what is happening now, live
        view(run_started(epochs=2, steps=12))
        assert "phase" not in view.tasks  # the run's bars take over
        view(EpochStarted(1, 2, 0, 12))
        epoch = view.progress._tasks[view.tasks["epoch"]]
        assert epoch.completed == 0 and epoch.fields["eta"] == "timing the first step"  # a bar from step 0
        clock.t += 3
        view(StepFinished(1, 1, 12))
        clock.t += 1
        view(StepFinished(1, 2, 12))  # between two log steps (--log-every): the bar still moves
        run = view.progress._tasks[view.tasks["run"]]
        epoch = view.progress._tasks[view.tasks["epoch"]]
        assert (epoch.completed, epoch.fields["eta"]) == (2, "eta 10 s")
        assert (run.completed, run.total, run.fields["eta"]) == (2, 24, "eta 22 s")
        view(Phase("validating: 180 images x 4 rotations", every_epoch=True))
        assert "phase" in view.tasks
        view(epoch_ended(1, 2))
        assert "phase" not in view.tasks and "epoch" not in view.tasks and "run" in view.tasks


def test_a_resumed_run_counts_its_earlier_steps_and_says_where_it_continues():
    view, clock, buffer = make_view(terminal=False)
    with view:
        view(Resumed(1, 4, 3))
        view(run_started(epochs=3, steps=10, start_epoch=1, start_step=4))
        view(EpochStarted(2, 3, 4, 10))
        for step in (5, 6):
            clock.t += 2
            view(StepFinished(2, step, 10))
    lines = buffer.getvalue().splitlines()
    assert lines[0] == "resuming in epoch 2 of 3, after step 4"
    assert lines[-1].endswith("about 20 s per epoch, 28 s to the end of the run")  # 16 of 30 steps done: 14 left
    assert ProgressView._resumed_text(Resumed(30, 0, 30)) == "resuming after the last epoch (30 of 30)"
    assert ProgressView._resumed_text(Resumed(2, 0, 30)) == "resuming at the start of epoch 3 of 30"


def test_step_clock_leaves_the_warm_up_step_out_of_the_rate():
    clock = FakeClock()
    steps = StepClock(clock)
    steps.start(total=100, done=0)
    assert steps.seconds_per_step is None and steps.run_eta() is None
    clock.t = 30
    steps.step(1)
    assert steps.seconds_per_step == 30  # one step: its own time, warm-up included
    for done in range(2, 6):
        clock.t += 2
        steps.step(done)
    assert steps.seconds_per_step == 2 and steps.run_eta() == 190 and steps.eta(5) == 10


@pytest.mark.parametrize("seconds, text", [(4.24, "4.2 s"), (45, "45 s"), (185, "3 min 05 s"), (7620, "2 h 07 min")])
def test_durations_read_as_a_person_says_them(seconds, text):
    assert duration(seconds) == text


def test_a_cpu_run_at_photo_size_says_what_a_smaller_img_size_saves():
    hint = slow_device_hint(torch.device("cpu"), 224)
    assert "--img-size 64" in hint and "12x" in hint
    assert slow_device_hint(torch.device("cpu"), 32) is None
    assert slow_device_hint(torch.device("cuda"), 224) is None


def test_pretraining_reports_every_step_and_what_it_is_doing(tmp_path):
    events = []
    pretrain(
        PretrainConfig(
            model="test_resnet",
            epochs=2,
            batch_size=8,
            max_steps_per_epoch=3,
            val_split=0.05,
            device="cpu",
            workers=0,
            log_every=10,
            out=str(tmp_path / "run"),
        ),
        progress=events.append,
    )
    kinds = [type(e).__name__ for e in events]
    assert events[kinds.index("Phase")].text == "building test_resnet"
    assert kinds.index("Phase") < kinds.index("RunStarted") < kinds.index("EpochStarted")
    steps = [(e.epoch, e.step) for e in events if isinstance(e, StepFinished)]
    assert steps == [(1, 1), (1, 2), (1, 3), (2, 1), (2, 2), (2, 3)]  # every step, whatever --log-every says
    for i, e in enumerate(events):
        if isinstance(e, EpochEnded):  # validation is announced before the epoch's line
            assert isinstance(events[i - 1], Phase) and events[i - 1].every_epoch and "validating" in events[i - 1].text
    messages = [e.text for e in events if isinstance(e, Message)]
    plan = [text for text in messages if text.startswith("data plan")]
    assert len(plan) == 1 and any(text.startswith("  augmentation") for text in messages)  # the plan, once
