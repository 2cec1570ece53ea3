"""The paper's recipe runs end to end (smoke mode: digits, a few steps) and reuses its runs."""

import json
from pathlib import Path

from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.reproduction import TABLE1_PAPER, TABLE3_CONV_PAPER


def test_smoke_recipe_runs_every_experiment_and_reuses_runs(tmp_path):
    out = tmp_path / "paper"
    args = ["reproduce", "paper-cifar10", "--smoke", "--out", str(out), "--device", "cpu", "--workers", "0", "--json"]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    result = json.loads(first.stdout)
    rows = result["rows"]
    assert [r["stage"] for r in rows if r["table"] == "1"] == [1, 2, 3, 4]
    assert {r["stage"]: r["paper"] for r in rows if r["table"] == "1"} == TABLE1_PAPER
    assert [r["paper"] for r in rows if r["table"] == "2"] == [89.06, 88.51, 87.46, 85.52]
    assert [(r["head"], r["paper"]) for r in rows if r["table"] == "3"] == [("conv", TABLE3_CONV_PAPER)]
    assert all(0 <= r["ours"] <= 100 for r in rows)

    weights = [Path(run) / "model.safetensors" for run in result["runs"].values()]
    assert len(weights) == 4 and all(w.is_file() and w.parent.parent == out for w in weights)
    stamps = [w.stat().st_mtime_ns for w in weights]
    table_args = [a for a in args if a != "--json"]
    again = CliRunner().invoke(app, table_args)  # finished runs are reused, not trained again
    assert again.exit_code == 0, again.output
    # the table says these are not the paper's numbers (the title may wrap)
    assert "[smoke mode: digits, a few steps]" in " ".join(again.stdout.split())
    assert [w.stat().st_mtime_ns for w in weights] == stamps
