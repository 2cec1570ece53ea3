"""Suite-wide settings and the one shared pretraining run.

One compute thread per process: the tests use tiny models, where a second thread buys
nothing and, with loader workers and subprocesses on a 2-core machine, oversubscription
makes steps many times slower. The environment variable reaches the rotnet subprocesses
the tests start.

``tiny_run``: a short run made once per session through the CLI, as a user makes one. Its
rotation set (0, 180) is not the default, so a test can tell the run's own set from a
default. Tests read it and never change it; one that writes into a run uses ``copy_of_run``.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

torch.set_num_threads(1)


import json  # noqa: E402
import pickle  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

TINY_RUN = [
    "pretrain",
    "--model",
    "test_resnet",
    "--epochs",
    "1",
    "-b",
    "32",
    "--max-steps-per-epoch",
    "3",
    "--rotations",
    "0,180",
    "--device",
    "cpu",
    "--workers",
    "0",
    "--json",
]


@pytest.fixture(scope="session")
def tiny_run_with_summary(tmp_path_factory) -> tuple[Path, dict]:
    """(run directory, the --json summary) of `rotnet pretrain` on digits: test_resnet, 32 px, 1 epoch of 3 steps."""
    from rotnet_cli.cli import app

    out = tmp_path_factory.mktemp("tiny-run") / "run"
    result = CliRunner().invoke(app, [*TINY_RUN, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


@pytest.fixture(scope="session")
def tiny_run(tiny_run_with_summary) -> Path:
    return tiny_run_with_summary[0]


@pytest.fixture
def copy_of_run(tiny_run, tmp_path) -> Path:
    """A copy of the shared run that a test may change."""
    return Path(shutil.copytree(tiny_run, tmp_path / "run-copy"))


def ramp_folder(path: Path, n: int, side: int, mode: str = "L") -> None:
    """``n`` grey ramps with a little noise, ``side`` px square, saved as PNG in a new folder ``path``
    (``mode="RGB"``: the same pixels as colour files): pictures with an up, for the data plan's tests."""
    import numpy as np
    from PIL import Image

    path.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        ramp = np.linspace(0, 255, side)[None, :] * np.linspace(0.3, 1, side)[:, None]
        noise = rng.integers(0, 30, (side, side))
        Image.fromarray((ramp * 0.8 + noise).astype(np.uint8)).convert(mode).save(path / f"{i}.png")


def files_in(folder: Path, with_times: bool = False) -> dict:
    """Every file under ``folder`` (logs/ and checkpoints/ too), by relative path: its bytes (and mtime)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) if with_times else p.read_bytes()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


class _CodeRunningPayload:
    """Unpickling this runs code (it creates a marker file): what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def write_malicious_checkpoint(tmp_path):
    """write(path, state, writer) saves ``state`` plus a code-running payload with torch.save
    or pickle.dump and returns the marker file that exists only if the payload ran."""

    def write(path: Path, state: dict, writer: str) -> Path:
        marker = tmp_path / "code-ran"
        state = {**state, "payload": _CodeRunningPayload(marker)}
        if writer == "torch.save":
            torch.save(state, path)
        else:
            path.write_bytes(pickle.dumps(state))
        return marker

    return write


@pytest.fixture(autouse=True)
def _bugs_fail_tests(request, monkeypatch):
    """An unexpected exception behind the CLI's error boundary fails the test that caused it.

    The boundary prints a bug as one line and exits 1, which a test of a clean error could
    mistake for the error it expects; here the bug itself is raised again, with its traceback.
    A test about the bug line asks for ``expect_bug`` (the list of bugs seen) instead.
    """
    from rotnet_cli.cli import _common

    bugs: list[Exception] = []
    report = _common.report_bug

    def record(error: Exception) -> None:
        bugs.append(error)
        report(error)

    monkeypatch.setattr(_common, "report_bug", record)
    yield bugs
    if bugs and "expect_bug" not in request.fixturenames:
        raise bugs[0]


@pytest.fixture
def expect_bug(_bugs_fail_tests) -> list[Exception]:
    """The unexpected exceptions the CLI reported in this test (they do not fail it)."""
    return _bugs_fail_tests


@pytest.fixture(autouse=True)
def _signal_handlers_restored():
    """Each test starts with the interpreter's own SIGINT/SIGTERM handlers and leaves them so: a command run
    in-process (CliRunner) installs its Ctrl-C handler, and one left behind turns a later test's Ctrl-C into
    a stop request instead of a KeyboardInterrupt."""
    import signal

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
