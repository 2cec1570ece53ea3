"""rotnet embed, rotnet neighbours and rotnet viz embeddings: the rows are the images' own features,
every format reads back the same, neighbours find what is nearest, the map is drawn."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli import data as data_lib
from rotnet_cli.cli import app
from rotnet_cli.config import EmbedConfig
from rotnet_cli.embedding import embed, read_embeddings
from rotnet_cli.embedding_map import pca, project, spread_points
from rotnet_cli.errors import RotnetError
from rotnet_cli.similarity import normalize_rows_, top_k_cosine
from rotnet_cli.weights import load_weights

FORMATS = ("npz", "safetensors", "csv", "parquet")
IMG_SIZE = 32  # the shared tiny run's size


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def ok_json(result) -> dict:
    assert result.exit_code == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return json.loads(result.stdout)


def one_line_error(result) -> str:
    assert result.exit_code == 1, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) >= 1 and lines[-1].startswith("error:") and sum(line.startswith("error:") for line in lines) == 1
    return lines[-1]


def png(path: Path, seed: int, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def classes_folder(tmp_path_factory) -> Path:
    """cats/ and dogs/ with 3 distinct images each, and birds/ with 2."""
    root = tmp_path_factory.mktemp("pets") / "pets"
    for c, (name, count) in enumerate((("birds", 2), ("cats", 3), ("dogs", 3))):
        for i in range(count):
            png(root / name / f"{i}.png", 10 * c + i)
    return root


def timm_features(run: Path, paths: list[str]) -> dict[str, np.ndarray]:
    """path -> the backbone's own pooled output (timm, num_classes=0) for that file, computed without rotnet's loop."""
    weights = load_weights(str(run))
    images = torch.stack([data_lib.decode_file(Path(p), weights.img_size) for p in paths])
    with torch.no_grad():
        pooled = weights.backbone(data_lib.normalize(images, weights.mean, weights.std))  # (N, C)
    return {p: v for p, v in zip(paths, pooled.numpy())}


def read_with_its_own_library(out: Path, fmt: str) -> tuple[list[str], list[str], np.ndarray]:
    """(paths, class names, vectors) read as a user would read the file, without rotnet."""
    if fmt == "npz":
        z = np.load(out)
        classes = z["classes"].tolist()
        return z["paths"].tolist(), [classes[i] for i in z["labels"]], z["embeddings"]
    if fmt == "safetensors":
        from safetensors import safe_open

        with safe_open(str(out), framework="np") as f:
            meta = f.metadata()
            classes = json.loads(meta["classes"])
            return json.loads(meta["paths"]), [classes[i] for i in f.get_tensor("labels")], f.get_tensor("embeddings")
    if fmt == "csv":
        with open(out, newline="") as f:
            rows = list(csv.DictReader(f))
        vectors = np.array([[float(r[k]) for k in r if k.startswith("e")] for r in rows], dtype=np.float32)
        return [r["path"] for r in rows], [r["class"] for r in rows], vectors
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pydict()
    return table["path"], table["class"], np.array(table["embedding"], dtype=np.float32)


# ----------------------------------------------------------------------------- embed


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_holds_each_images_own_features_with_its_path_and_class(tiny_run, classes_folder, tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / f"pets.{fmt}"
    summary = ok_json(
        invoke("embed", tiny_run, classes_folder, "--out", out, "-b", 3, "-j", 0, "--device", "cpu", "--json")
    )
    assert summary["rows"] == 8 and summary["classes"] == ["birds", "cats", "dogs"] and summary["skipped"] == []

    paths, classes, vectors = read_with_its_own_library(out, fmt)
    assert sorted(paths) == sorted(str(p) for p in classes_folder.rglob("*.png"))
    assert classes == [Path(p).parent.name for p in paths]
    # the default embedding (last stage, average-pooled) is the backbone's own pooled output
    expected = timm_features(tiny_run, paths)
    np.testing.assert_allclose(vectors, np.stack([expected[p] for p in paths]), rtol=1e-4, atol=1e-5)

    table = read_embeddings(out)  # rotnet reads every format back the same
    assert table.paths == paths and [table.class_of(i) for i in range(len(table))] == classes
    np.testing.assert_array_equal(table.vectors, vectors.astype(np.float32))


def test_rows_stay_with_their_files_when_some_cannot_be_read(tiny_run, tmp_path):
    # batches of 2: a broken file first, a whole batch of broken files, and one at the end
    folder = tmp_path / "mixed"
    folder.mkdir()
    names = ["a_broken.png", "b.png", "c_broken.jpg", "d_broken.png", "e.png", "f.png", "g_broken.png"]
    for i, name in enumerate(names):
        if "broken" in name:
            (folder / name).write_bytes(b"" if i % 2 else b"not an image")
        else:
            png(folder / name, i)
    (folder / "notes.txt").write_text("not an image either")
    out = tmp_path / "mixed.npz"
    summary = ok_json(invoke("embed", tiny_run, folder, "--out", out, "-b", 2, "-j", 1, "--device", "cpu", "--json"))

    broken = sorted(str(folder / n) for n in names if "broken" in n)
    assert sorted(summary["skipped"]) == sorted([*broken, str(folder / "notes.txt")])
    table = read_embeddings(out)
    assert table.paths == [str(folder / n) for n in names if "broken" not in n]
    assert table.labels is None and "classes" not in np.load(out).files  # a flat folder has no classes
    expected = timm_features(tiny_run, table.paths)
    np.testing.assert_allclose(table.vectors, np.stack([expected[p] for p in table.paths]), rtol=1e-4, atol=1e-5)


def test_train_and_val_folders_are_both_embedded_with_their_split(tiny_run, tmp_path):
    root = tmp_path / "split"
    for split, count in (("train", 3), ("val", 2)):
        for i in range(count):
            png(root / split / ("cats" if i % 2 else "dogs") / f"{i}.png", 50 + 10 * (split == "val") + i)
    out = tmp_path / "split.npz"
    ok_json(invoke("embed", tiny_run, root, "--out", out, "-j", 0, "--device", "cpu", "--json"))
    table = read_embeddings(out)
    assert table.splits == ["train"] * 3 + ["val"] * 2
    assert [Path(p).parts[-3] for p in table.paths] == table.splits
    assert [table.class_of(i) for i in range(5)] == [Path(p).parent.name for p in table.paths]


def test_a_folder_is_streamed_never_decoded_whole(tiny_run, classes_folder, tmp_path, monkeypatch):
    def decode_everything(*args, **kwargs):
        raise AssertionError("embed decoded the whole folder into memory")

    monkeypatch.setattr(data_lib, "decode_all", decode_everything)
    result = embed(
        EmbedConfig(
            weights=str(tiny_run),
            data=str(classes_folder),
            out=str(tmp_path / "e.npz"),
            batch_size=2,
            workers=0,
            device="cpu",
        )
    )
    assert result.rows == 8


def test_layer_pool_and_normalize_change_the_vectors_as_asked(tiny_run, classes_folder, tmp_path):
    weights = load_weights(str(tiny_run))
    paths = sorted(str(p) for p in classes_folder.rglob("*.png"))  # the class folders' order
    images = torch.stack([data_lib.decode_file(Path(p), weights.img_size) for p in paths])
    with torch.no_grad():
        [stage2] = weights.backbone.forward_intermediates(
            data_lib.normalize(images, weights.mean, weights.std), indices=[1], intermediates_only=True
        )  # (N, C2, H, W)

    def run(name: str, **options) -> np.ndarray:
        cfg = EmbedConfig(
            weights=str(tiny_run),
            data=str(classes_folder),
            out=str(tmp_path / name),
            workers=0,
            device="cpu",
            **options,
        )
        table = read_embeddings(embed(cfg).out)
        assert table.paths == paths
        return table.vectors

    np.testing.assert_allclose(run("avg.npz", layer=2), stage2.mean((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run("max.npz", layer=-4, pool="max"), stage2.amax((2, 3)).numpy(), rtol=1e-4, atol=1e-5)
    unit = run("unit.npz", layer=2, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)


def test_an_existing_file_is_refused_replaced_with_overwrite_and_kept_when_a_run_fails(
    tiny_run, classes_folder, tmp_path
):
    out = tmp_path / "out" / "pets.npz"
    ok_json(invoke("embed", tiny_run, classes_folder, "--out", out, "-j", 0, "--device", "cpu", "--json"))
    before = snapshot(out.parent)

    line = one_line_error(invoke("embed", tiny_run, classes_folder, "--out", out, "-j", 0, "--device", "cpu"))
    assert "--overwrite" in line
    broken = tmp_path / "broken"
    (broken / "x.png").parent.mkdir()
    (broken / "x.png").write_bytes(b"")
    line = one_line_error(invoke("embed", tiny_run, broken, "--out", out, "--overwrite", "-j", 0, "--device", "cpu"))
    assert "could be read" in line
    assert snapshot(out.parent) == before  # the old file as it was, no scratch or temporary file left

    ok_json(
        invoke(
            "embed",
            tiny_run,
            classes_folder,
            "--out",
            out,
            "--layer",
            2,
            "--overwrite",
            "-j",
            0,
            "--device",
            "cpu",
            "--json",
        )
    )
    assert read_embeddings(out).meta["layer"] == 2 and sorted(p.name for p in out.parent.iterdir()) == ["pets.npz"]


def test_parquet_without_pyarrow_names_the_extra_before_any_work(tiny_run, classes_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow` fail
    line = one_line_error(invoke("embed", tiny_run, classes_folder, "--out", tmp_path / "e.parquet", "--device", "cpu"))
    assert "rotnet-cli[parquet]" in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, fix",
    [
        (["--out", "{tmp}/e.txt"], "ending in .parquet, .npz, .safetensors, .csv"),
        (["--out", "{tmp}/e.npz", "--layer", "9"], "has 5 stages; use 1..5"),
        (["--out", "{tmp}/e.npz", "--layer", "0"], "numbered from 1"),
        (["--out", "{tmp}/e.npz", "--pool", "sum"], "--pool must be one of avg, max"),
        (["--out", "{tmp}"], "ending in"),
        (["--out", "{tmp}/folder.npz"], "is a folder"),
        (["--out", "{tmp}/e.npz", "--img-size", "64"], "drop --img-size"),
    ],
)
def test_bad_embed_options_are_one_line(tiny_run, classes_folder, tmp_path, args, fix):
    (tmp_path / "folder.npz").mkdir()
    before = snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path) for a in args]
    assert fix in one_line_error(invoke("embed", tiny_run, classes_folder, *argv, "--device", "cpu", "-j", 0))
    assert snapshot(tmp_path) == before and sorted(p.name for p in tmp_path.iterdir()) == ["folder.npz"]


# ----------------------------------------------------------------------------- neighbours


def test_top_k_cosine_equals_the_full_similarity_matrix():
    g = torch.Generator().manual_seed(0)
    bank = normalize_rows_(torch.randn(301, 16, generator=g))
    queries = normalize_rows_(torch.randn(37, 16, generator=g))
    exclude = torch.randint(-1, 301, (37,), generator=g)
    # tiles of 8 queries x 7 rows: many blocks, a last block narrower than k
    sims, index = top_k_cosine(queries, bank, 9, torch.device("cpu"), exclude, query_block=8, tile_elements=56)

    full = queries @ bank.T
    full[torch.arange(37)[exclude >= 0], exclude[exclude >= 0]] = -torch.inf
    want_sims, want_index = full.topk(9, dim=1)
    torch.testing.assert_close(sims, want_sims)
    assert torch.equal(index, want_index)
    assert not (index == exclude[:, None]).any()


def test_top_k_cosine_marks_what_it_could_not_find():
    bank = normalize_rows_(torch.randn(3, 4))
    sims, index = top_k_cosine(bank, bank, 3, torch.device("cpu"), exclude=torch.arange(3))
    assert (index[:, :2] >= 0).all() and (index[:, 2] == -1).all() and torch.isinf(sims[:, 2]).all()


@pytest.fixture(scope="module")
def planted(tiny_run, tmp_path_factory) -> tuple[Path, Path, Path, Path]:
    """(folder, original, its exact copy, embeddings.npz): 12 distinct images and a copy of one under another name."""
    root = tmp_path_factory.mktemp("planted") / "photos"
    for i in range(12):
        png(root / ("odd" if i % 2 else "even") / f"{i:02d}.png", 100 + i)
    original = root / "even" / "04.png"
    copy = root / "odd" / "zz-copy-of-04.png"
    shutil.copyfile(original, copy)
    out = root.parent / "photos.npz"
    ok_json(invoke("embed", tiny_run, root, "--out", out, "-j", 0, "--device", "cpu", "--json"))
    return root, original, copy, out


def test_the_most_alike_pair_is_a_planted_exact_duplicate(planted, tmp_path):
    _, original, copy, emb = planted
    result = ok_json(invoke("neighbours", emb, "--json", "--device", "cpu"))
    assert result["mode"] == "pairs" and result["rows"] == 13
    first = result["neighbours"][0]
    assert {first["image"], first["neighbour"]} == {str(original), str(copy)}
    assert first["similarity"] == pytest.approx(1.0, abs=1e-5) and first["rank"] == 1
    pairs = {frozenset((n["image"], n["neighbour"])) for n in result["neighbours"]}
    assert len(pairs) == len(result["neighbours"])  # each pair once
    assert [n["similarity"] for n in result["neighbours"]] == sorted(
        (n["similarity"] for n in result["neighbours"]), reverse=True
    )

    out = tmp_path / "duplicates.csv"
    duplicates = ok_json(invoke("neighbours", emb, "--threshold", 0.9999, "--out", out, "--json", "--device", "cpu"))
    assert len(duplicates["neighbours"]) == 1
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and {rows[0]["image"], rows[0]["neighbour"]} == {str(original), str(copy)}


def test_a_query_image_finds_its_duplicate_first_and_never_itself(planted):
    root, original, copy, emb = planted
    result = ok_json(invoke("neighbours", emb, "--query", original, "-k", 3, "--json", "--device", "cpu"))
    found = result["neighbours"]
    assert [n["rank"] for n in found] == [1, 2, 3] and all(n["image"] == str(original) for n in found)
    assert found[0]["neighbour"] == str(copy) and found[0]["similarity"] == pytest.approx(1.0, abs=1e-5)
    assert str(original) not in [n["neighbour"] for n in found]
    assert found[0]["image_class"] == "even" and found[0]["neighbour_class"] == "odd"

    # a folder of queries: each image's own nearest; the screen shows a table
    shown = invoke("neighbours", emb, "--query", root / "even", "-k", 1, "--device", "cpu")
    assert shown.exit_code == 0 and "1.0000" in shown.stdout


def test_queries_need_the_settings_the_file_was_embedded_with(planted, tiny_run, tmp_path):
    _, original, _, emb = planted
    table = read_embeddings(emb)
    csv_file = tmp_path / "e.csv"
    csv_file.write_text(
        "path,"
        + ",".join(f"e{i}" for i in range(table.vectors.shape[1]))
        + "\n"
        + "".join(f"{p}," + ",".join(map(str, v)) + "\n" for p, v in zip(table.paths, table.vectors))
    )
    assert "keeps no record" in one_line_error(invoke("neighbours", csv_file, "--query", original, "--device", "cpu"))
    assert "was embedded with a test_resnet" in one_line_error(
        invoke("neighbours", emb, "--query", original, "--weights", "random:test_vit", "--device", "cpu")
    )
    # without --query a CSV is searched like any other file
    assert ok_json(invoke("neighbours", csv_file, "--json", "--device", "cpu"))["neighbours"][0]["similarity"] > 0.9999


def test_a_file_embedded_with_a_kept_checkpoint_answers_queries_from_another_folder(copy_of_run, tmp_path, monkeypatch):
    (copy_of_run / "checkpoints").mkdir()
    shutil.copyfile(copy_of_run / "model.safetensors", copy_of_run / "checkpoints" / "best.safetensors")
    query = png(tmp_path / "q" / "a.png", 7)
    monkeypatch.chdir(tmp_path)
    ok_json(
        invoke(
            "embed", f"{copy_of_run.name}:best", query.parent, "--out", "e.npz", "-j", 0, "--device", "cpu", "--json"
        )
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found = ok_json(invoke("neighbours", tmp_path / "e.npz", "--query", query, "-k", 1, "--json", "--device", "cpu"))
    assert found["neighbours"] == []  # the file's only row is the query itself, never its own neighbour
    # a file that names its weights RUN:best (as files written before recorded them) is searched too
    monkeypatch.chdir(tmp_path)
    npz = dict(np.load("e.npz"))
    meta = json.loads(str(npz["rotnet"]))
    npz["rotnet"] = np.array(json.dumps({**meta, "weights": f"{copy_of_run.name}:best"}))
    np.savez("named.npz", **npz)
    ok_json(invoke("neighbours", "named.npz", "--query", query, "-k", 1, "--json", "--device", "cpu"))


@pytest.mark.parametrize(
    "key, value", [("layer", "x"), ("pool", "median"), ("normalized", "yes"), ("img_size", -3), ("weights", None)]
)
def test_hand_edited_embedding_settings_are_named_not_run(planted, tmp_path, key, value):
    _, original, _, emb = planted
    npz = dict(np.load(emb))
    meta = json.loads(str(npz["rotnet"]))
    npz["rotnet"] = np.array(json.dumps({**meta, key: value}))
    np.savez(tmp_path / "edited.npz", **npz)
    error = one_line_error(invoke("neighbours", tmp_path / "edited.npz", "--query", original, "--device", "cpu"))
    assert f"metadata has {key}=" in error and "rotnet embed" in error


# ----------------------------------------------------------------------------- the map


def test_pca_matches_numpys_svd():
    x = np.random.default_rng(0).normal(size=(200, 12)).astype(np.float32) * np.arange(1, 13, dtype=np.float32)
    coords, explained = pca(x, 2)
    centred = x - x.mean(0)
    _, s, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    for axis in range(2):
        want = centred @ vt[axis]
        assert abs(abs(np.corrcoef(coords[:, axis], want)[0, 1]) - 1) < 1e-6
    np.testing.assert_allclose(explained, (s**2 / (s**2).sum())[:2], rtol=1e-4)


def test_thumbnail_points_are_spread_over_the_map():
    coords = np.random.default_rng(0).uniform(size=(500, 2))
    chosen = spread_points(coords, 16)
    assert len(chosen) == 16 and len(set(chosen)) == 16
    cells = {(int(coords[i, 0] * 4), int(coords[i, 1] * 4)) for i in chosen}
    assert len(cells) == 16  # one per cell of a 4 x 4 grid


def test_tsne_and_umap_run_on_principal_components_through_their_libraries(monkeypatch):
    seen = {}

    class Fake:
        def __init__(self, **kwargs):
            seen["kwargs"] = kwargs

        def fit_transform(self, x):
            seen["shape"] = x.shape
            return x[:, :2]

    monkeypatch.setitem(sys.modules, "sklearn", types.ModuleType("sklearn"))
    monkeypatch.setitem(sys.modules, "sklearn.manifold", types.SimpleNamespace(TSNE=Fake))
    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=Fake))
    x = np.random.default_rng(0).normal(size=(40, 96)).astype(np.float32)
    for method in ("tsne", "umap"):
        coords, explained = project(x, method, seed=7)
        assert coords.shape == (40, 2) and explained is None
        assert seen["shape"] == (40, 50) and seen["kwargs"]["random_state"] == 7  # PCA to 50 first, seeded
    assert seen["kwargs"]["n_neighbors"] == 15
    coords, _ = project(x[:10], "tsne", seed=0)
    assert seen["kwargs"]["perplexity"] == 3.0  # below the number of points, as t-SNE requires


@pytest.mark.parametrize("method, module, extra", [("tsne", "sklearn", "tsne"), ("umap", "umap", "umap")])
def test_a_missing_projection_library_names_its_extra(method, module, extra, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)
    monkeypatch.setitem(sys.modules, f"{module}.manifold", None)
    with pytest.raises(RotnetError, match=rf"rotnet-cli\[{extra}\]"):
        project(np.random.default_rng(0).normal(size=(20, 8)).astype(np.float32), method, seed=0)


def test_the_map_without_matplotlib_names_the_plot_extra(planted, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    line = one_line_error(invoke("viz", "embeddings", planted[3], "--out", tmp_path / "map.png"))
    assert "rotnet-cli[plot]" in line and not (tmp_path / "map.png").exists()


def test_thumbnails_of_dataset_rows_are_the_datasets_own_images(tmp_path):
    from rotnet_cli.embedding import EmbeddingTable
    from rotnet_cli.embedding_map import ThumbnailSource

    table = EmbeddingTable(tmp_path / "t.npz", np.zeros((1, 2), np.float32), ["digits:train[5]"], meta={"img_size": 16})
    assert np.array_equal(
        ThumbnailSource(table).image("digits:train[5]"),
        data_lib.open_source("digits", 16).train.images[5].permute(1, 2, 0).numpy(),
    )


def test_the_map_draws_every_class_with_thumbnails(planted, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "map.png"
    result = ok_json(
        invoke("viz", "embeddings", planted[3], "--out", out, "--thumbnails", 4, "--max-points", 10, "--json")
    )
    assert result["points"] == 10 and result["rows"] == 13 and result["classes"] == 2
    assert result["thumbnails"] == 4 and result["skipped"] == []
    assert len(result["explained_variance"]) == 2 and 0 < sum(result["explained_variance"]) <= 1
    with Image.open(out) as image:
        assert image.size == (result["width"], result["height"])
        colours = {tuple(c) for c in np.asarray(image.convert("RGB")).reshape(-1, 3)[::7].tolist()}
    assert len(colours) > 50  # points in two colours, thumbnails, text: not a blank canvas


@pytest.mark.slow
def test_the_map_with_real_tsne_and_umap(tiny_run, tmp_path):
    pytest.importorskip("sklearn")
    pytest.importorskip("umap")
    emb = tmp_path / "digits.npz"
    embed(EmbedConfig(weights=str(tiny_run), data="digits", out=str(emb), workers=0, device="cpu"))
    for method in ("tsne", "umap"):
        result = ok_json(
            invoke(
                "viz",
                "embeddings",
                emb,
                "--out",
                tmp_path / f"{method}.png",
                "--method",
                method,
                "--max-points",
                300,
                "--json",
            )
        )
        assert result["points"] == 300 and result["classes"] == 10 and (tmp_path / f"{method}.png").is_file()


def test_overwrite_onto_a_runs_weights_is_refused_as_another_commands_output(copy_of_run):
    """A run's model.safetensors is rotnet's, but no embeddings file: refused, and not called a file of the user's."""
    weights = copy_of_run / "model.safetensors"
    before = weights.read_bytes()
    result = invoke("embed", copy_of_run, "digits", "--out", weights, "--overwrite")
    assert result.exit_code == 1 and "another rotnet command's output" in result.output
    assert "not written by rotnet" not in result.output and weights.read_bytes() == before


def test_overwrite_replaces_only_files_rotnet_wrote_for_embeddings_pairs_and_maps(planted, tiny_run, tmp_path):
    pytest.importorskip("matplotlib")
    _, _, _, emb = planted
    # the user's own files, named as outputs by mistake: --overwrite must not replace them
    theirs = {name: tmp_path / name for name in ("notes.npz", "notes.csv", "holiday.png")}
    theirs["notes.npz"].write_bytes(b"PK\x03\x04 not rotnet's")
    theirs["notes.csv"].write_text("name,amount\nrent,900\n")
    png(theirs["holiday.png"], 7)
    before = snapshot(tmp_path)
    for args in (
        ("embed", tiny_run, emb.parent / "photos", "--out", theirs["notes.npz"], "-j", 0),
        ("neighbours", emb, "--out", theirs["notes.csv"]),
        ("viz", "embeddings", emb, "--out", theirs["holiday.png"]),
    ):
        line = one_line_error(
            invoke(*args, "--overwrite", "--device", "cpu") if args[0] != "viz" else invoke(*args, "--overwrite")
        )
        assert "was not written by rotnet" in line
    assert snapshot(tmp_path) == before

    # rotnet's own: refused without --overwrite, replaced with it
    pairs, picture = tmp_path / "pairs.csv", tmp_path / "map.png"
    ok_json(invoke("neighbours", emb, "--out", pairs, "--json", "--device", "cpu"))
    ok_json(invoke("viz", "embeddings", emb, "--out", picture, "--json"))
    assert "--overwrite" in one_line_error(invoke("viz", "embeddings", emb, "--out", picture))
    assert "--overwrite" in one_line_error(invoke("neighbours", emb, "--out", pairs, "--device", "cpu"))
    ok_json(invoke("neighbours", emb, "--out", pairs, "-k", 1, "--overwrite", "--json", "--device", "cpu"))
    ok_json(invoke("viz", "embeddings", emb, "--out", picture, "--overwrite", "--json"))
