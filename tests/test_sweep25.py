"""Hostile sweep of rotnet score (issue 25): what a new user broke, held to its fix."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_score import CPU, folders, run_cli  # noqa: F401 (folders is a fixture)


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "export"
    result = run_cli("export", tiny_run, "--out", out, "--format", "onnx", "--with-head")
    assert result.exit_code == 0, result.output
    return out


def test_an_onnx_file_with_the_head_scores_as_pytorch_does(tiny_run, folders, onnx_export):  # noqa: F811
    scores = []
    for spec in (tiny_run, onnx_export / "model.onnx"):
        result = run_cli("score", spec, folders["zeros"], folders["ones"], "--json", *CPU)
        assert result.exit_code == 0, result.output
        scores.append([row["score"] for row in json.loads(result.stdout)["rows"]])
    assert len(scores[0]) == 12
    assert np.allclose(scores[0], scores[1], rtol=1e-3, atol=1e-4)


def test_an_onnx_file_with_knn_is_one_line_naming_the_run(folders, onnx_export):  # noqa: F811
    result = run_cli("score", onnx_export / "model.onnx", folders["zeros"], "--method", "knn", *CPU)
    assert result.exit_code == 1
    assert "Traceback" not in result.output and "--method rotation" in result.output


def test_a_bank_of_only_the_image_itself_is_one_line_not_infinite_scores(tiny_run, folders, tmp_path):  # noqa: F811
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.png").write_bytes(next(folders["zeros"].glob("*.png")).read_bytes())
    result = run_cli("score", tiny_run, one, "--method", "knn", "--reference", one, "--json", *CPU)
    assert result.exit_code == 1, result.output
    assert "--reference" in result.output and "Traceback" not in result.output


def test_k_beyond_the_bank_less_the_image_itself_uses_the_others(tiny_run, folders):  # noqa: F811
    result = run_cli(
        "score",
        tiny_run,
        folders["zeros"],
        "--method",
        "knn",
        "--reference",
        folders["zeros"],
        "-k",
        "50",
        "--json",
        *CPU,
    )
    assert result.exit_code == 0, result.output
    assert all(math.isfinite(row["score"]) for row in json.loads(result.stdout)["rows"])


def test_an_unreadable_file_is_warned_of_once(tiny_run, folders, tmp_path):  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(next(folders["zeros"].glob("*.png")).read_bytes())
    (data / "broken.png").write_bytes(b"not an image")
    result = run_cli("score", tiny_run, data, *CPU)
    assert result.exit_code == 0, result.output
    assert result.output.count("broken.png") == 1, result.output
