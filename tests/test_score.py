"""rotnet score: the rotation score of Hendrycks et al. (2019), the kNN score, their evaluation and files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.scoring import aupr, auroc, fpr_at_tpr, read_scores

CPU = ["--device", "cpu", "--workers", "0"]


def run_cli(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def _png(path: Path, pixels: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def _digit_folder(folder: Path, digit: int, n: int) -> Path:
    """n built-in digits of one class as 8x8 PNGs (grey, as a user's scans would be)."""
    from rotnet_cli.data import BUILTIN_DIGITS

    with np.load(BUILTIN_DIGITS) as d:
        images = d["images"][d["labels"] == digit][:n]
    for i, image in enumerate(images):
        _png(folder / f"{digit}-{i}.png", image)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("score")
    return {
        "zeros": _digit_folder(root / "classes" / "zero", 0, 6),
        "ones": _digit_folder(root / "classes" / "one", 1, 6),
        "root": root,
    }


# ----------------------------------------------------------------------------- the metrics, against scikit-learn


@pytest.mark.parametrize("seed", range(5))
def test_metrics_agree_with_scikit_learn(seed):
    from sklearn import metrics  # the test extra's scikit-learn; rotnet itself never imports it

    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    truth = rng.integers(0, 2, n)
    scores = np.round(rng.normal(size=n) + truth * rng.uniform(0, 2), 1)  # rounded: many ties
    assert auroc(truth, scores) == pytest.approx(metrics.roc_auc_score(truth, scores))
    assert aupr(truth, scores) == pytest.approx(metrics.average_precision_score(truth, scores))
    fpr, tpr, _ = metrics.roc_curve(truth, scores)
    assert fpr_at_tpr(truth, scores) == pytest.approx(fpr[np.searchsorted(tpr, 0.95, side="left")])


def test_metrics_on_perfect_and_reversed_scores():
    truth = np.array([0, 0, 0, 1, 1])
    assert auroc(truth, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 1.0
    assert auroc(truth, -np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 0.0
    assert fpr_at_tpr(truth, np.array([0.1, 0.2, 0.3, 0.8, 0.9])) == 0.0
    assert math.isnan(auroc(np.ones(3), np.arange(3.0)))  # one class only: no figure, not a fake one


# ----------------------------------------------------------------------------- the command


def test_rotation_score_is_minus_the_summed_log_probability_of_each_applied_rotation(tiny_run, folders, tmp_path):
    out = tmp_path / "scores.csv"
    result = run_cli("score", tiny_run, folders["zeros"], "--out", out, *CPU)
    assert result.exit_code == 0, result.output
    table = np.genfromtxt(out, delimiter=",", names=True, dtype=None, encoding="utf-8")
    assert list(table.dtype.names) == ["path", "score", "rotation_score", "p_0", "p_180"]  # the run's own set
    assert len(table) == 6

    from rotnet_cli.data import decode_file, normalize
    from rotnet_cli.weights import load_weights

    weights = load_weights(str(tiny_run))
    model = weights.rotnet()
    image = decode_file(Path(table["path"][0]), weights.img_size)[None]  # (1, 3, S, S) uint8
    x = normalize(image, weights.mean, weights.std)
    with torch.no_grad():
        upright = model(x).log_softmax(1)[0, 0]  # log p(0 | the image as it is)
        turned = model(torch.rot90(x, 2, (2, 3))).log_softmax(1)[0, 1]  # log p(180 | the image turned by 180)
    assert table["score"][0] == pytest.approx(-(upright + turned).item(), rel=1e-4)
    assert table["p_0"][0] == pytest.approx(upright.exp().item(), rel=1e-4)
    assert (table["score"] == table["rotation_score"]).all()


def test_top_and_bottom_list_the_most_unusual_and_most_typical(tiny_run, folders):
    result = run_cli(
        "score", tiny_run, folders["zeros"], folders["ones"], "--top", "2", "--bottom", "2", "--json", *CPU
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    scores = [row["score"] for row in record["rows"]]
    assert len(scores) == 12
    text = run_cli("score", tiny_run, folders["zeros"], folders["ones"], "--top", "2", "--bottom", "1", *CPU).stdout
    highest = record["rows"][int(np.argmax(scores))]["path"]
    lowest = record["rows"][int(np.argmin(scores))]["path"]
    assert "2 most unusual" in text and "1 most typical" in text
    assert Path(highest).name in text.split("most typical")[0]
    assert Path(lowest).name in text.split("most typical")[1]


def test_evaluation_reports_auroc_aupr_and_fpr(tiny_run, folders):
    result = run_cli(
        "score",
        tiny_run,
        "--inliers",
        folders["zeros"],
        "--outliers",
        folders["ones"],
        "--method",
        "both",
        "--json",
        *CPU,
    )
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    e = record["evaluation"]
    assert (e["inliers"], e["outliers"]) == (6, 6)
    truth = np.array([row["outlier"] for row in record["rows"]])
    scores = np.array([row["score"] for row in record["rows"]])
    assert e["auroc"] == pytest.approx(auroc(truth, scores))
    assert set(e["methods"]) == {"score", "rotation", "knn"}
    assert 0 <= e["aupr"] <= 1 and 0 <= e["fpr_at_95_tpr"] <= 1
    table = run_cli("score", tiny_run, "--inliers", folders["zeros"], "--outliers", folders["ones"], *CPU).stdout
    assert "AUROC" in table and "FPR at 95% TPR" in table


def test_normal_class_of_sub_folders_makes_the_others_outliers(tiny_run, folders):
    result = run_cli("score", tiny_run, folders["root"] / "classes", "--normal", "zero", "--json", *CPU)
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert {Path(r["path"]).parent.name: r["outlier"] for r in rows} == {"zero": 0, "one": 1}


def test_knn_score_is_the_cosine_distance_to_the_reference_and_never_to_itself(tiny_run, folders, tmp_path):
    out = tmp_path / "knn.json"
    result = run_cli(
        "score",
        tiny_run,
        folders["zeros"],
        "--method",
        "knn",
        "--reference",
        folders["zeros"],
        "-k",
        "1",
        "--out",
        out,
        *CPU,
    )
    assert result.exit_code == 0, result.output
    record = json.loads(out.read_text())
    assert record["reference_images"] == 6 and record["k"] == 1
    # the folder scored against itself: each image's nearest is another image, not itself (distance 0)
    assert all(row["knn_score"] > 1e-6 for row in record["rows"])
    assert all("rotation_score" not in row for row in record["rows"])


def test_knn_bank_defaults_to_the_data_the_run_trained_on(tiny_run, folders):
    result = run_cli("score", tiny_run, folders["zeros"], "--method", "knn", "--json", *CPU)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["reference"] == "digits"
    assert record["reference_images"] == 1797 - round(1797 * 0.1)  # the run's training split, not its validation


def test_weights_without_a_head_say_so_in_one_line_and_knn_still_works(folders):
    result = run_cli("score", "random:test_resnet", folders["zeros"], "--img-size", "32", *CPU)
    assert result.exit_code == 1
    assert "has no rotation head" in result.stderr and "--method knn" in result.stderr
    result = run_cli(
        "score", "random:test_resnet", folders["zeros"], "--img-size", "32", "--method", "knn",
        "--reference", folders["ones"], "--json", *CPU,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["rows"]) == 6


def test_unreadable_files_are_skipped_with_a_warning(tiny_run, folders, tmp_path):
    folder = tmp_path / "mixed"
    _digit_folder(folder, 0, 3)
    (folder / "broken.png").write_bytes(b"not a png")
    result = run_cli("score", tiny_run, folder, "--json", *CPU)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert len(record["rows"]) == 3 and record["skipped"] == [str(folder / "broken.png")]
    assert "broken.png" in result.stderr


@pytest.mark.parametrize("suffix", [".csv", ".json", ".npz", ".parquet"])
def test_every_format_reads_back_and_overwrite_replaces_only_its_own(tiny_run, folders, tmp_path, suffix):
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"scores{suffix}"
    assert run_cli("score", tiny_run, folders["zeros"], "--out", out, *CPU).exit_code == 0
    table = read_scores(out)
    assert len(table.paths) == 6 and np.isfinite(table.score).all()
    again = run_cli("score", tiny_run, folders["zeros"], "--out", out, *CPU)
    assert again.exit_code == 1 and "pass --overwrite" in again.stderr
    assert run_cli("score", tiny_run, folders["zeros"], "--out", out, "--overwrite", *CPU).exit_code == 0
    foreign = tmp_path / f"mine{suffix}"
    foreign.write_bytes(b"path,score\nmy,notes\n" if suffix == ".csv" else b"{}")
    before = foreign.read_bytes()
    refused = run_cli("score", tiny_run, folders["zeros"], "--out", foreign, "--overwrite", *CPU)
    assert refused.exit_code == 1 and "not written by rotnet" in refused.stderr
    assert foreign.read_bytes() == before


def test_python_api(tiny_run, folders):
    import rotnet_cli

    result = rotnet_cli.score(
        rotnet_cli.ScoreConfig(weights=str(tiny_run), data=(str(folders["zeros"]),), workers=0, device="cpu")
    )
    assert len(result.rows) == 6 and result.rotations == (0.0, 180.0)
    assert result.top(1)[0] == int(np.argmax(result.rows.score))


# ----------------------------------------------------------------------------- real photos


@pytest.mark.slow
def test_rotation_score_tells_faces_from_non_faces(tmp_path):
    """Real photos (skimage's lfw_subset): a tiny run pretrained briefly on 70 face crops scores 30 held-out
    faces as more typical than 100 non-face crops, clearly better than chance."""
    skimage_data = pytest.importorskip("skimage.data")
    crops = (skimage_data.lfw_subset() * 255).round().astype(np.uint8)  # 100 faces, then 100 non-faces
    for i in range(70):
        _png(tmp_path / "train" / f"{i}.png", crops[i])
    for i in range(70, 100):
        _png(tmp_path / "faces" / f"{i}.png", crops[i])
    for i in range(100, 200):
        _png(tmp_path / "other" / f"{i}.png", crops[i])
    run = tmp_path / "run"
    trained = run_cli(
        "pretrain", "--model", "test_resnet", "--data", tmp_path / "train", "--img-size", "32", "-b", "16",
        "--epochs", "20", "--augment", "crop", "--val-split", "0", "--logger", "none", "--out", run, *CPU,
    )  # fmt: skip
    assert trained.exit_code == 0, trained.output
    result = run_cli("score", run, "--inliers", tmp_path / "faces", "--outliers", tmp_path / "other", "--json", *CPU)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["evaluation"]["auroc"] > 0.75


# ----------------------------------------------------------------------------- viz outliers


def test_viz_outliers_draws_the_most_unusual_and_most_typical(tiny_run, folders, tmp_path):
    scores = tmp_path / "scores.csv"
    assert run_cli("score", tiny_run, folders["zeros"], folders["ones"], "--out", scores, *CPU).exit_code == 0
    sheet = tmp_path / "sheet.png"
    result = run_cli("viz", "outliers", scores, "-n", "3", "--out", sheet, "--json")
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    table = read_scores(scores)
    order = np.argsort(-table.score, kind="stable")
    assert [row["path"] for row in record["unusual"]] == [table.paths[i] for i in order[:3]]
    assert [row["path"] for row in record["typical"]] == [table.paths[i] for i in order[::-1][:3]]
    with Image.open(sheet) as image:
        assert image.size == (record["width"], record["height"])
        assert image.info.get("Software", "").startswith("rotnet")  # --overwrite may replace it, and only it
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 10  # thumbnails were drawn, not a blank page
    again = run_cli("viz", "outliers", tiny_run, folders["zeros"], "-n", "2", "--out", sheet, "--overwrite", *CPU[:2])
    assert again.exit_code == 0, again.output


def test_every_weights_spec_with_a_head_gives_the_same_scores(tiny_run, folders, tmp_path):
    export = tmp_path / "export"
    assert run_cli("export", tiny_run, "--out", export, "--with-head").exit_code == 0
    specs = [tiny_run, tiny_run / "model.safetensors", export]
    scores = []
    for spec in specs:
        result = run_cli("score", spec, folders["zeros"], "--json", *CPU)
        assert result.exit_code == 0, result.output
        scores.append([row["score"] for row in json.loads(result.stdout)["rows"]])
    assert np.allclose(scores[0], scores[1], rtol=1e-5) and np.allclose(scores[0], scores[2], rtol=1e-4)
