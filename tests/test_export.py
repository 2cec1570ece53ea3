"""rotnet export: a folder timm loads on its own, strictly, with the features of the trained backbone."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.pretraining import pretrain
from rotnet_cli.weights import load_weights

MODELS = ["test_resnet", "test_vit", "test_convnext", "test_efficientnet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run) -> dict[str, Path]:
    """One tiny pretraining run per architecture family (a few steps each; test_resnet's is the shared run)."""
    root = tmp_path_factory.mktemp("export-runs")
    for name in MODELS[1:]:
        pretrain(
            PretrainConfig(
                model=name,
                epochs=1,
                out=str(root / name),
                max_steps_per_epoch=1,
                batch_size=8,
                val_split=0.05,
                workers=0,
            )
        )
    return {"test_resnet": tiny_run} | {name: root / name for name in MODELS[1:]}


def run_rotations(run: Path) -> list[float]:
    return json.loads((run / "config.json").read_text())["config"]["rotations"]


def rotnet(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def export_ok(*args) -> dict:
    result = rotnet("export", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def random_batch(out: Path) -> torch.Tensor:
    input_size = json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"]
    return torch.randn(3, *input_size, generator=torch.Generator().manual_seed(1))


def features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.mark.parametrize("name", MODELS)
def test_export_loads_in_timm_both_ways_with_the_trained_features(runs, tmp_path, name):
    out = tmp_path / "exported"
    report = export_ok(runs[name], "--out", out)
    trained = load_weights(str(runs[name])).backbone
    x = random_batch(out)
    expected = features(trained, x)  # (3, num_features)

    config = json.loads((out / "config.json").read_text())
    by_folder = timm.create_model(f"local-dir:{out}", pretrained=True)
    by_file = timm.create_model(
        config["architecture"], checkpoint_path=str(out / "model.safetensors"), **config["model_args"]
    )
    assert torch.equal(features(by_folder, x), expected)
    assert torch.equal(features(by_file, x), expected)

    # the file holds exactly the keys of a headless timm model, nothing of the rotation head
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == set(timm.create_model(name, num_classes=0).state_dict())
    assert meta["model"] == name and meta["rotnet_version"] and meta["source"].startswith(str(runs[name]))
    assert json.loads(meta["rotations"]) == run_rotations(runs[name])

    # config.json: what timm needs to rebuild it, with the preprocessing it was trained with
    run_config = json.loads((runs[name] / "config.json").read_text())["resolved"]
    size = run_config["img_size"]
    assert config["architecture"] == name and config["num_classes"] == 0
    assert config["num_features"] == trained.num_features
    assert config["pretrained_cfg"]["input_size"] == [3, size, size]
    assert (
        config["pretrained_cfg"]["mean"] == run_config["mean"] and config["pretrained_cfg"]["std"] == run_config["std"]
    )
    assert timm.data.resolve_model_data_config(by_folder)["input_size"] == (3, size, size)

    assert sorted(f["name"] for f in report["files"]) == ["README.md", "config.json", "model.safetensors"]
    assert all(Path(f["path"]).stat().st_size == f["bytes"] for f in report["files"])


def test_model_card_and_snippet(runs, tmp_path):
    run = runs["test_resnet"]
    out = tmp_path / "card"
    result = rotnet("export", run, "--out", out)
    assert result.exit_code == 0, result.output
    snippet = f'import timm\nmodel = timm.create_model("local-dir:{out}", pretrained=True)'
    assert snippet in result.stdout
    assert "verified (strict load, features identical)" in result.stdout  # not "equal up to 0"
    scope: dict = {}
    exec(snippet, scope)  # the printed lines work as they are
    x = random_batch(out)
    assert torch.equal(features(scope["model"], x), features(load_weights(str(run)).backbone, x))

    card = (out / "README.md").read_text()
    final = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    assert card.startswith("---\nlibrary_name: timm\n")
    rotations = ",".join(f"{a:g}" for a in run_rotations(run))
    assert "test_resnet" in card and f"{rotations} degrees" in card and "digits" in card
    assert f"{100 * final['val_rot_acc']:.2f}%" in card
    assert f'timm.create_model("local-dir:{out.name}", pretrained=True)' in card


def test_export_describes_the_rotnet_weights_not_timms_imagenet_ones(runs, tmp_path):
    # timm's config for an architecture describes timm's own weights (licence, paper, origin):
    # an export of other weights must say what they are, and timm reports that back
    export_ok(runs["test_resnet"], "--out", tmp_path / "run")
    model = timm.create_model(f"local-dir:{tmp_path / 'run'}", pretrained=True)
    cfg = model.pretrained_cfg
    assert cfg["paper_ids"] == "arXiv:1803.07728" and "Predicting Image Rotations" in cfg["paper_name"]
    assert "license" not in cfg and "origin_url" not in cfg  # test_resnet's timm config says apache-2.0
    assert any("UCI Optical Recognition of Handwritten Digits" in n and "CC BY 4.0" in n for n in cfg["notes"])
    assert any(n.endswith(" for 1 epoch") for n in cfg["notes"])  # the shared run trains one epoch: not "1 epochs"
    card = (tmp_path / "run" / "README.md").read_text()
    assert "- arxiv:1803.07728" in card and "(licence: CC BY 4.0)" in card

    export_ok("random:resnet18", "--out", tmp_path / "random")  # timm's resnet18 names arXiv:2110.00476 and its URL
    cfg = json.loads((tmp_path / "random" / "config.json").read_text())["pretrained_cfg"]
    assert not {"license", "paper_ids", "paper_name", "origin_url", "notes"} & set(cfg)
    assert "random weights" in cfg["description"]


def test_card_renders_every_probe_setting_and_survives_an_unreadable_probe_file(runs, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["test_resnet"], run)
    for args in (
        ["--head", "linear,knn", "--layers", "1,-1"],
        ["--head", "knn", "--layers", "-1", "--labels-per-class", "10"],
    ):
        probed = CliRunner().invoke(app, ["probe", str(run), "--epochs", "2", "--device", "cpu", *args])
        assert probed.exit_code == 0, probed.output
    first, second = json.loads((run / "probe.json").read_text())["results"]  # the second probe kept the first
    assert rotnet("export", run, "--out", tmp_path / "a").exit_code == 0
    card = (tmp_path / "a" / "README.md").read_text()
    assert "## Probe results" in card and "| weights | stage | C x H x W | linear | knn |" in card
    for row in first["rows"]:  # every stage with every head's accuracy, in percent
        assert (
            f"| run | {row['stage']} | " in card
            and f"{100 * row['linear']:.2f}%" in card
            and f"{100 * row['knn']:.2f}%" in card
        )
    assert f"Best: stage {first['best']['stage']} with the {first['best']['head']} head" in card
    assert "| weights | stage | C x H x W | knn |" in card and "10 labelled images per class" in card
    assert f"{100 * second['rows'][0]['knn']:.2f}%" in card

    (run / "probe.json").write_text("{ not json")
    assert rotnet("export", run, "--out", tmp_path / "b").exit_code == 0
    assert "## Probe results" not in (tmp_path / "b" / "README.md").read_text()


def test_with_head_keeps_the_rotation_head_and_timm_still_loads_strictly(runs, tmp_path):
    run = runs["test_vit"]
    out = tmp_path / "with-head"
    report = export_ok(run, "--out", out, "--with-head")
    assert "rotation_head.safetensors" in {f["name"] for f in report["files"]}

    original, again = load_weights(str(run)), load_weights(str(out))
    assert again.kind == "exported" and again.rotations == original.rotations
    assert torch.equal(again.head.weight, original.head.weight) and torch.equal(again.head.bias, original.head.bias)
    x = random_batch(out)
    assert torch.equal(features(again.rotnet(), x), features(original.rotnet(), x))
    assert torch.equal(
        features(timm.create_model(f"local-dir:{out}", pretrained=True), x), features(original.backbone, x)
    )

    # an export is itself a weights spec: exporting it again keeps every tensor and the ViT's input size
    again_out = tmp_path / "again"
    export_ok(out, "--out", again_out, "--with-head")
    for name in ("model.safetensors", "rotation_head.safetensors"):
        with safe_open(str(out / name), "pt") as a, safe_open(str(again_out / name), "pt") as b:
            assert a.keys() == b.keys() and all(torch.equal(a.get_tensor(k), b.get_tensor(k)) for k in a.keys())
            assert b.metadata()["model"] == "test_vit"
    assert json.loads((again_out / "config.json").read_text())["pretrained_cfg"]["input_size"] == list(x.shape[1:])

    without, without_again = tmp_path / "without-head", tmp_path / "without-head-again"
    export_ok(run, "--out", without)
    assert load_weights(str(without)).head is None
    assert export_ok(without, "--out", without_again)["rotations"] == list(original.rotations)
    with safe_open(str(without_again / "model.safetensors"), "pt") as f:
        assert f.metadata()["source"] == str(run)  # still names the training run


@pytest.mark.parametrize("dtype, torch_dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_dtype_stores_half_precision_that_timm_loads(runs, tmp_path, dtype, torch_dtype):
    run = runs["test_resnet"]
    out = tmp_path / dtype
    export_ok(run, "--out", out, "--dtype", dtype)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert torch_dtype in dtypes and torch.float32 not in dtypes
    x = random_batch(out)
    got = features(timm.create_model(f"local-dir:{out}", pretrained=True), x)
    expected = features(load_weights(str(run)).backbone, x)
    assert torch.allclose(got, expected, rtol=0.05, atol=0.05)


def test_existing_folder_is_kept_unless_overwrite(runs, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    refused = rotnet("export", runs["test_resnet"], "--out", out)
    assert refused.exit_code == 1 and "--overwrite" in refused.output
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"

    # --overwrite replaces rotnet's own files only: the user's file is refused, not deleted
    foreign = rotnet("export", runs["test_resnet"], "--out", out, "--overwrite")
    assert foreign.exit_code == 1 and "mine.txt was not written by rotnet" in foreign.stderr
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"

    (out / "mine.txt").unlink()
    export_ok(runs["test_resnet"], "--out", out)  # an empty folder is not "taken"
    export_ok(runs["test_resnet"], "--out", out, "--overwrite", "--with-head")  # an export of rotnet's is replaced
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "rotation_head.safetensors",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]  # no staging folder or lock left behind


def test_failed_export_changes_nothing(runs, tmp_path, monkeypatch):
    import rotnet_cli.exporting as export_lib
    from rotnet_cli.errors import WeightsError

    out = tmp_path / "previous"
    export_ok(runs["test_resnet"], "--out", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_round_trip(*args, **kwargs):
        raise WeightsError("the export did not load back")

    monkeypatch.setattr(export_lib, "_verify_round_trip", broken_round_trip)
    result = rotnet("export", runs["test_vit"], "--out", out, "--overwrite")
    assert result.exit_code == 1 and "did not load back" in result.output
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["previous"]


@pytest.mark.parametrize("case", ["missing", "into-the-run", "head-of-random", "bad-dtype"])
def test_bad_requests_are_one_line_errors_that_write_nothing(runs, tmp_path, case):
    run = runs["test_resnet"]
    args, code, says = {
        "missing": ([tmp_path / "nope", "--out", tmp_path / "out"], 1, "does not exist"),
        "into-the-run": ([run, "--out", run, "--overwrite"], 1, "overlaps the input"),
        "head-of-random": (["random:test_resnet", "--out", tmp_path / "out", "--with-head"], 1, "no rotation head"),
        "bad-dtype": ([run, "--out", tmp_path / "out", "--dtype", "int8"], 1, "--dtype"),
    }[case]
    files_before = sorted(p.name for p in run.iterdir())
    result = rotnet("export", *args)
    assert result.exit_code == code, result.output
    assert says in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in run.iterdir()) == files_before


def test_export_loads_where_rotnet_is_not_installed(runs, tmp_path):
    out = tmp_path / "exported"
    export_ok(runs["test_efficientnet"], "--out", out)
    # A fresh interpreter in which any import of rotnet_cli fails: only timm reads the folder.
    script = textwrap.dedent(f"""
        import sys
        sys.modules["rotnet_cli"] = None
        import timm, torch
        model = timm.create_model("local-dir:{out}", pretrained=True).eval()
        x = torch.randn(3, *model.pretrained_cfg["input_size"], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            torch.save(model(x), sys.argv[1])
    """)
    saved = tmp_path / "features.pt"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script, str(saved)], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    x = random_batch(out)
    assert torch.equal(
        torch.load(saved, weights_only=True), features(load_weights(str(runs["test_efficientnet"])).backbone, x)
    )
