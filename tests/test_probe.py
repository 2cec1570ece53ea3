"""rotnet probe as a user runs it: every stage and head, baselines, the semi-supervised
subset, an untouched backbone, probe.json, and one-line errors."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import rotnet_cli.features as features_lib
import rotnet_cli.head_training as heads_lib
import rotnet_cli.probing as probe_lib
from rotnet_cli.cli import app
from rotnet_cli.config import ProbeConfig
from rotnet_cli.models import num_stages
from rotnet_cli.weights import load_weights

FAST = ["--epochs", "4", "--device", "cpu", "--workers", "0"]


@pytest.fixture(scope="module")
def run_dir(tiny_run, tmp_path_factory) -> Path:
    """The shared run, copied: probes write probe.json into it."""
    return Path(shutil.copytree(tiny_run, tmp_path_factory.mktemp("probe") / "run"))


@pytest.fixture(scope="module")
def toy_folder(tmp_path_factory) -> Path:
    """Three colour classes (red, green, blue) with noise: separable by any features."""
    root = tmp_path_factory.mktemp("toy")
    rng = np.random.default_rng(0)
    for label, name in enumerate(["red", "green", "blue"]):
        (root / name).mkdir()
        for i in range(24):
            pixels = rng.integers(0, 90, size=(20, 20, 3))
            pixels[..., label] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def invoke(*args: str):
    return CliRunner().invoke(app, ["probe", *args])


def saved_results(run_dir: Path) -> list[dict]:
    saved = json.loads((run_dir / "probe.json").read_text())
    assert saved["format"] == "rotnet-probe-results"
    return saved["results"]


def test_every_stage_with_every_default_head(run_dir):
    result = invoke(str(run_dir), "--json", *FAST)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    stages = num_stages(load_weights(run_dir).backbone)
    assert [row["stage"] for row in report["rows"]] == list(range(1, stages + 1))
    assert report["heads"] == ["linear", "knn"]  # the quick look; mlp and conv on request
    for row in report["rows"]:
        assert row["weights"] == "run" and len(row["shape"]) == 3
        for head in ("linear", "knn"):
            assert 0 <= row[head] <= 1
    assert report["train_images"] + report["val_images"] == 1797  # digits, stratified 80/20 split
    # a run directory keeps the same result in probe.json
    saved = next(r for r in saved_results(run_dir) if r["setting"] == report["setting"])
    assert saved["rows"] == report["rows"] and saved["weights"] == str(run_dir)


def test_table_compares_with_random_weights(run_dir):
    result = invoke(str(run_dir), "--compare", "random", "--layers", "2,-1", "--head", "knn", *FAST)
    assert result.exit_code == 0, result.output
    assert "random" in result.stdout and "best: stage" in result.stdout
    saved = next(r for r in saved_results(run_dir) if r["setting"]["compare"] == ["random"])
    last = num_stages(load_weights(run_dir).backbone)
    assert [(r["weights"], r["stage"]) for r in saved["rows"]] == [
        ("run", 2),
        ("run", last),
        ("random", 2),
        ("random", last),
    ]
    # where rotation training helps and where not: the difference per stage, and how to read it
    run, random = saved["rows"][:2], saved["rows"][2:]
    gains = " / ".join(f"{100 * (ours['knn'] - theirs['knn']):+.1f}" for ours, theirs in zip(run, random))
    assert f"against random, points per stage (2, {last}): knn {gains}" in result.stdout
    assert "deeper stages" in result.stdout and "--labels-per-class 10" in result.stdout


def test_backbone_is_bitwise_unchanged(run_dir, monkeypatch):
    loaded = load_weights(run_dir)
    before = {k: v.clone() for k, v in loaded.backbone.state_dict().items()}
    monkeypatch.setattr(probe_lib, "load_weights", lambda spec, device, seed=0, img_size=None: loaded)
    probe_lib.probe(
        ProbeConfig(
            weights=str(run_dir),
            heads=("linear", "mlp", "knn", "conv"),
            pool="flatten",
            layers=(-1,),
            epochs=1,
            device="cpu",
            workers=0,
            save=False,
        )
    )
    after = loaded.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not loaded.backbone.training


def test_labels_per_class_trains_on_exactly_k_per_class(run_dir):
    result = probe_lib.probe(
        ProbeConfig(weights=str(run_dir), labels_per_class=5, heads=("knn",), device="cpu", workers=0, save=False)
    )
    assert result.train_images == 5 * 10 and result.val_images == 359  # validation keeps its full size
    keep, short = features_lib.keep_per_class(torch.arange(40) % 4, 5, seed=1)
    assert torch.bincount(torch.arange(40)[keep] % 4).tolist() == [5, 5, 5, 5] and short == []
    assert not torch.equal(keep, features_lib.keep_per_class(torch.arange(40) % 4, 5, seed=2)[0])  # seeded choice


def test_every_head_beats_chance_on_a_separable_set(run_dir, toy_folder):
    # -b 16: three steps per epoch; with one (-b 32) 30 steps leave the conv head on a 1x1 map at chance
    result = invoke(
        str(run_dir),
        "--data",
        str(toy_folder),
        "--val-split",
        "0.25",
        "--layers",
        "3,-1",
        "--head",
        "linear,mlp,knn,conv",
        "--pool",
        "flatten",
        "--epochs",
        "30",
        "-b",
        "16",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--json",
        "--no-save",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["num_classes"] == 3 and report["val_images"] == 18  # 6 per class, stratified
    for row in report["rows"]:
        for head in ("linear", "mlp", "knn", "conv"):
            assert row[head] > 0.6, (row, head)  # chance is 1/3


def test_val_data_folder_is_used_as_validation(run_dir, toy_folder):
    result = probe_lib.probe(
        ProbeConfig(
            weights=str(run_dir),
            data=str(toy_folder),
            val_data=str(toy_folder),
            layers=(-1,),
            heads=("knn",),
            device="cpu",
            workers=0,
            save=False,
        )
    )
    assert result.train_images == result.val_images == 72
    assert result.rows[0].accuracy["knn"] > 0.9  # the same images: each is its own nearest neighbour


@pytest.mark.parametrize(
    "args, message",
    [
        (["--layers", "9"], "--layers 9"),
        (["--head", "linear,svm"], "--head"),
        (["--pool", "median"], "--pool"),
        (["--img-size", "48"], "was trained at 32 px"),  # saved weights are probed at their own size
    ],
)
def test_bad_options_are_one_line_errors(run_dir, args, message):
    before = (run_dir / "probe.json").read_bytes() if (run_dir / "probe.json").exists() else None
    result = invoke(str(run_dir), *args, *FAST)
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert ((run_dir / "probe.json").read_bytes() if before is not None else None) == before


def test_img_size_sets_the_size_of_a_timm_or_random_baseline():
    # timm's test models default to 160 px; on 32 px data a user probes them at 32
    result = invoke("random:test_resnet", "--img-size", "32", "--layers", "-1", "--head", "knn", "--json", *FAST)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["img_size"] == 32
    default = invoke("random:test_resnet", "--layers", "-1", "--head", "knn", "--json", *FAST)
    assert json.loads(default.stdout)["img_size"] == 160


def test_unlabelled_flat_folder_is_a_one_line_error(run_dir, tmp_path):
    for i in range(3):
        Image.new("RGB", (12, 12), (i * 60, 0, 0)).save(tmp_path / f"{i}.png")
    result = invoke(str(run_dir), "--data", str(tmp_path), *FAST)
    assert result.exit_code == 1
    assert "no class sub-folders" in result.output and "Traceback" not in result.output


def test_stacked_linear_rows_are_independent_linears():
    # three rows of 3, 5 and 3 features side by side: each row is its own Linear on its own columns
    dims = [3, 5, 3]
    layer = heads_lib.StackedLinear(dims, 4)
    x = torch.randn(16, sum(dims))
    y = layer(x)
    columns = [slice(0, 3), slice(3, 8), slice(8, 11)]
    for r, (dim, cols) in enumerate(zip(dims, columns)):
        weight, bias = layer.row(r)
        assert weight.shape == (dim, 4)
        assert torch.allclose(y[:, r], x[:, cols] @ weight + bias, atol=1e-5)
    other = x.clone()
    other[:, columns[1]] += 1  # changing row 1's input changes no other row
    assert torch.equal(layer(other)[:, [0, 2]], y[:, [0, 2]])


@pytest.mark.parametrize("dims", [[3, 5, 3], [4, 4, 4]], ids=["unequal-widths", "equal-widths"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("padded", [False, True], ids=["packed", "padded"])
def test_stacked_linear_gpu_path_computes_what_the_cpu_path_does(dims, bias, padded):
    # a GPU applies the rows as one padded batched matmul, a CPU one matmul per row: the same heads
    # either way, whichever layout the weights have
    torch.manual_seed(0)
    layer = heads_lib.StackedLinear(dims, 4, bias=bias, padded=padded)
    torch.manual_seed(0)
    other_layout = heads_lib.StackedLinear(dims, 4, bias=bias, padded=not padded)
    for r in range(len(dims)):  # each row initialised like its own Linear, in either layout
        assert torch.equal(layer.row(r)[0], other_layout.row(r)[0])
    x = torch.randn(16, sum(dims), requires_grad=True)
    per_row, batched = layer.per_row(x), layer.batched(x)
    assert batched.shape == per_row.shape == (16, len(dims), 4)
    assert torch.allclose(batched, per_row, atol=1e-5)
    grads_per_row = torch.autograd.grad(per_row.square().sum(), [x, *layer.parameters()])
    grads_batched = torch.autograd.grad(batched.square().sum(), [x, *layer.parameters()])
    for a, b in zip(grads_per_row, grads_batched):
        assert torch.allclose(a, b, atol=1e-4)
    if padded:  # the padding past a narrow row's width is inert: no gradient reaches it
        weight_grad = grads_batched[1]
        for r, d in enumerate(dims):
            assert not weight_grad[r, d:].any()


def test_pooled_heads_on_a_cpu_hold_no_padding_for_the_optimiser_to_step():
    # rows of very different widths (resnet50's stages): padded to the widest, the optimiser would step
    # 5 x 2048 weights per class where the rows have 3904, most of them zeros, and a CPU step got slower
    dims = [64, 256, 512, 1024, 2048]
    recipe = heads_lib.HeadRecipe("adamw", 1e-3, 5e-4, 1, "cosine")
    for kind in ("linear", "mlp"):
        trainer = heads_lib.HeadTrainer(kind, [(c, 1, 1) for c in dims], 10, "avg", recipe, 0, torch.device("cpu"))
        weights = sum(
            p.numel() for name, p in trainer.heads.named_parameters() if name.endswith("weight") and p.dim() > 1
        )
        hidden = heads_lib.MLP_HIDDEN
        assert weights == (
            sum(dims) * 10 if kind == "linear" else sum(dims) * hidden + len(dims) * hidden * (hidden + 10)
        )


# ----------------------------------------------------------------------------- probe.json keeps every setting


@pytest.fixture
def own_run(run_dir, tmp_path) -> Path:
    """A copy of the module's run without probe results, for tests that count them."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run, ignore=shutil.ignore_patterns("probe.json"))
    return run


QUICK = ["--head", "knn", "--device", "cpu", "--workers", "0", "--labels-per-class", "5"]


def test_probe_json_keeps_every_setting_and_replaces_one_only_with_overwrite(own_run, monkeypatch):
    assert invoke(str(own_run), "--layers", "-1", *QUICK).exit_code == 0
    assert invoke(str(own_run), "--layers", "1", *QUICK).exit_code == 0  # another setting: kept beside the first
    results = saved_results(own_run)
    assert [r["setting"]["layers"] for r in results] == [[-1], [1]]

    # the same setting again: refused before any feature is extracted, probe.json unchanged
    before = (own_run / "probe.json").read_bytes()
    monkeypatch.setattr(probe_lib, "extract_features", lambda *a, **k: pytest.fail("extracted before refusing"))
    again = invoke(str(own_run), "--layers", "-1", *QUICK)
    assert again.exit_code == 1 and "already holds a result with these settings" in again.output
    assert "--overwrite" in again.output and "Traceback" not in again.output
    assert (own_run / "probe.json").read_bytes() == before
    monkeypatch.undo()

    replaced = invoke(str(own_run), "--layers", "-1", "--overwrite", *QUICK)
    assert replaced.exit_code == 0, replaced.output
    after = saved_results(own_run)
    assert [r["setting"]["layers"] for r in after] == [[1], [-1]]  # the other setting kept, this one replaced
    assert after[0] == results[1]


def test_a_probe_json_of_one_result_is_kept_when_another_setting_is_added(own_run):
    old = {
        "weights": str(own_run),
        "heads": ["knn"],
        "rows": [{"weights": "run", "stage": 1, "shape": [1, 1, 1], "knn": 0.5}],
    }
    (own_run / "probe.json").write_text(json.dumps(old))  # the form written before results were kept per setting
    assert invoke(str(own_run), "--layers", "-1", *QUICK).exit_code == 0
    results = saved_results(own_run)
    assert results[0] == old and len(results) == 2
    (own_run / "probe.json").write_text("[1, 2]")  # not rotnet's: never replaced unasked
    refused = invoke(str(own_run), "--layers", "1", *QUICK)
    assert refused.exit_code == 1 and "does not hold rotnet probe results" in refused.output
    assert (own_run / "probe.json").read_text() == "[1, 2]"


# ----------------------------------------------------------------------------- the paper recipe


def test_paper_recipe_recomputes_features_of_augmented_images_and_reports_best_and_last(run_dir, monkeypatch):
    crops, forwards = [], []
    real_crop, real_forward = probe_lib.data_lib.random_crop_flip, features_lib.forward_stages

    def crop(images, padding, generator):
        crops.append((len(images), padding))
        return real_crop(images, padding, generator)

    def forward(backbone, x, indices):
        forwards.append(len(x))
        return real_forward(backbone, x, indices)

    monkeypatch.setattr(probe_lib.data_lib, "random_crop_flip", crop)
    monkeypatch.setattr(features_lib, "forward_stages", forward)
    result = probe_lib.probe(
        ProbeConfig(
            weights=str(run_dir),
            recipe="paper",
            heads=("linear", "knn"),
            layers=(-1,),
            epochs=3,
            labels_per_class=5,
            device="cpu",
            workers=0,
            save=False,
        )
    )
    assert result.features == "augmented" and result.precision == "fp32" and result.epochs == {"linear": 3}
    # every epoch crops and flips the 50 training images (4 px of padding at 32 px, as RandomCrop(32, padding=4))
    assert crops == [(50, 4)] * 3
    # the backbone sees: a blank image for the shapes, the un-augmented train + val images once (for knn),
    # then every epoch the 50 augmented training images and the 359 validation images
    assert sum(forwards) == 1 + (50 + 359) + 3 * (50 + 359)
    row = result.rows[0]
    accuracy, epoch = row.best["linear"]
    assert 1 <= epoch <= 3 and accuracy >= row.accuracy["linear"]  # the best epoch is at least as good as the last
    assert "knn" not in row.best  # nothing trained: no epochs
    assert row.to_dict()["best_epoch"] == {"linear": {"accuracy": round(accuracy, 4), "epoch": epoch}}


def test_quick_recipe_uses_the_cache_and_no_augmentation(run_dir, monkeypatch):
    monkeypatch.setattr(probe_lib.data_lib, "random_crop_flip", lambda *a: pytest.fail("augmented in the quick recipe"))
    result = probe_lib.probe(
        ProbeConfig(
            weights=str(run_dir),
            heads=("linear",),
            layers=(-1,),
            epochs=2,
            labels_per_class=5,
            device="cpu",
            workers=0,
            save=False,
        )
    )
    assert result.features == "cached" and result.epochs == {"linear": 2} and result.rows[0].best == {}


def test_pooled_heads_train_on_one_cpu_thread_and_the_count_comes_back(run_dir, monkeypatch):
    threads, real = [], probe_lib.train_heads

    def train_heads(*args, **kwargs):
        threads.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(probe_lib, "train_heads", train_heads)
    torch.set_num_threads(2)
    try:
        probe_lib.probe(
            ProbeConfig(
                weights=str(run_dir),
                heads=("linear", "conv"),
                layers=(-1,),
                epochs=1,
                labels_per_class=5,
                device="cpu",
                workers=0,
                save=False,
            )
        )
        assert threads == [1, 2]  # linear: small steps on one thread; conv keeps the process's threads
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)  # the suite's setting (conftest)


# ----------------------------------------------------------------------------- features.py, as score and embed use it


def test_pooled_features_are_the_average_of_each_stages_maps_for_every_image():
    cpu = torch.device("cpu")
    weights = load_weights("random:test_resnet", cpu, img_size=32)
    images = probe_lib.data_lib.open_source("digits", 32, workers=0).train.subset(torch.arange(10))
    stages = [1, num_stages(weights.backbone)]
    features, skipped = features_lib.pooled_features(weights, images, stages, cpu, batch_size=4)
    assert list(features) == stages and skipped == []
    [batch] = probe_lib.data_lib.iterate_batches(images, torch.arange(10), 10, cpu, drop_last=False, workers=0)
    maps = features_lib.stage_features([("run", weights)], [stages], batch.images, cpu, "fp32")
    for stage, fmap in zip(stages, maps):
        assert features[stage].shape == (10, fmap.shape[1])  # (N, C) of the stage
        torch.testing.assert_close(features[stage], fmap.mean((2, 3)))


def test_every_registered_head_type_is_a_probe_head_and_an_unknown_one_never_gets_past_the_config():
    from rotnet_cli.config import PROBE_HEADS, TRAINED_HEADS
    from rotnet_cli.errors import ConfigError
    from rotnet_cli.heads import HEAD_TYPES

    assert PROBE_HEADS == tuple(HEAD_TYPES) and set(TRAINED_HEADS) == {h for h, t in HEAD_TYPES.items() if t.trains}
    with pytest.raises(ConfigError, match="--head"):
        ProbeConfig(weights="timm:test_resnet", heads=("linear", "cosine"))
