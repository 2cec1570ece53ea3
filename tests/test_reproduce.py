"""The paper's recipe runs end to end (smoke mode: digits, a few steps, the paper's probe protocol
on augmented images), reuses its finished work, and never takes a run of other settings for its own."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.config import ReproduceConfig
from rotnet_cli.reproduction import TABLE1_PAPER, TABLE3_PAPER

SMOKE = ["reproduce", "paper-cifar10", "--smoke", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("paper") / "smoke"
    first = CliRunner().invoke(app, [*SMOKE, "--out", str(out), "--json"])
    assert first.exit_code == 0, first.output
    return out, json.loads(first.stdout)


def test_smoke_recipe_runs_every_experiment_of_the_three_tables(smoke):
    out, result = smoke
    rows = result["rows"]
    assert [r["stage"] for r in rows if r["table"] == "1"] == [1, 2, 3, 4]
    assert {r["stage"]: r["paper"] for r in rows if r["table"] == "1"} == TABLE1_PAPER
    assert [r["paper"] for r in rows if r["table"] == "2"] == [89.06, 88.51, 87.46, 85.52]
    assert [(r["experiment"], r["paper"]) for r in rows if r["table"] == "3"] == list(TABLE3_PAPER.items())
    assert [r["head"] for r in rows if r["table"] == "3"] == ["nin3", "conv", "mlp", "conv"]
    for r in rows:  # last and best epoch of every classifier, each evaluated after every epoch
        assert 0 <= r["ours"] <= r["best"] <= 100 and r["best_epoch"] in (1, 2), r

    weights = [Path(run) / "model.safetensors" for name, run in result["runs"].items() if name != "Supervised NIN"]
    assert len(weights) == 4 and all(w.is_file() and w.parent.parent == out for w in weights)
    # the classifiers trained as the official code trains them: features of cropped and flipped images
    probes = json.loads((out / "nin4-rot0-90-180-270" / "probe.json").read_text())["results"]
    assert [(p["recipe"], p["features"], p["heads"]) for p in probes] == [
        ("paper", "augmented", ["mlp"]),
        ("paper", "augmented", ["conv"]),
    ]
    assert [r["weights"] for r in probes[1]["rows"]] == ["run", "random"]  # Table 3's random init + conv
    assert (out / "supervised-nin3" / "supervised.json").is_file()


def test_a_rerun_reuses_every_finished_result(smoke):
    out, result = smoke
    files = [Path(run) / "model.safetensors" for name, run in result["runs"].items() if name != "Supervised NIN"]
    files += [out / "nin4-rot0-90-180-270" / "probe.json", out / "supervised-nin3" / "supervised.json"]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = CliRunner().invoke(app, [*SMOKE, "--out", str(out)])
    assert again.exit_code == 0, again.output
    # the table says these are not the paper's numbers (the title may wrap)
    assert "[smoke mode: digits, a few steps]" in " ".join(again.stdout.split())
    # piped (a log, CI) the table keeps every word: rich squeezed it into 80 columns ("4 rotatio…")
    assert "…" not in again.stdout and "Supervised NIN" in again.stdout
    assert [f.stat().st_mtime_ns for f in files] == stamps


def test_the_full_recipe_never_takes_a_smoke_run_for_its_own(smoke):
    out, _ = smoke
    assert ReproduceConfig(smoke=True).out_dir != ReproduceConfig().out_dir  # they do not even meet by default
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    full = CliRunner().invoke(app, ["reproduce", "paper-cifar10", "--out", str(out), "--device", "cpu"])
    assert full.exit_code == 1
    assert "holds a run with other settings" in full.output and "--data cifar10 (the run used digits)" in full.output
    assert "Traceback" not in full.output
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before
