"""rotnet export --format onnx and rotnet predict on onnxruntime: what a user shipping a model relies on.

The ONNX model must give PyTorch's outputs (checked by the export itself, and here again at
other batch sizes), predict must give the same answers through either backend, and every way
it can go wrong is one line that leaves nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rotnet_cli.cli import app
from rotnet_cli.data import _digits, normalize
from rotnet_cli.weights import load_weights


def rotnet(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def export_ok(*args) -> dict:
    result = rotnet("export", *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="module")
def onnx_export(tiny_run, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("onnx") / "exported"
    return out, export_ok(tiny_run, "--out", out, "--format", "onnx", "--with-head")


@pytest.fixture(scope="module")
def digit_files(tmp_path_factory) -> Path:
    """12 real digit images as PNG files, turned by 0, 90, 180 and 270 degrees in turn."""
    folder = tmp_path_factory.mktemp("digit-files")
    images = _digits(32).images[:12]  # (12, 3, 32, 32) uint8
    for i, image in enumerate(images):
        pixels = np.rot90(image.permute(1, 2, 0).numpy(), k=i % 4)
        Image.fromarray(np.ascontiguousarray(pixels)).save(folder / f"digit-{i:02d}.png")
    return folder


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_model(str(path), load_external_data=False).metadata_props}


def test_onnx_export_records_its_opset_and_gives_pytorchs_logits_at_any_batch_size(tiny_run, onnx_export):
    out, summary = onnx_export
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.json",
        "model.onnx",
        "model.safetensors",
        "rotation_head.safetensors",
    ]
    recorded = json.loads((out / "config.json").read_text())["onnx"]
    meta = metadata(out / "model.onnx")
    assert recorded["opset"] == json.loads(meta["opset"]) == summary["onnx"]["opset"]
    assert recorded["output"] == meta["output"] == "logits"
    rotations = json.loads((tiny_run / "config.json").read_text())["config"]["rotations"]
    assert json.loads(meta["rotations"]) == rotations
    opsets = {o.domain: o.version for o in onnx.load_model(str(out / "model.onnx")).opset_import}
    assert opsets[""] == recorded["opset"]
    # the export printed what it measured: random and real images, each within the tolerance
    assert set(summary["onnx"]["max_abs_diff"]) == {"random images", "real images"}
    assert all(d <= 1e-4 for d in summary["onnx"]["max_abs_diff"].values())

    reference = load_weights(str(tiny_run)).rotnet().eval()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7):  # batch sizes the export never ran
        x = normalize(_digits(32).images[20 : 20 + n], reference_mean(out), reference_std(out))
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        with torch.no_grad():
            expected = reference(x)  # (n, R)
        assert got.shape == (n, len(rotations))
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-3)


def reference_mean(out: Path) -> tuple[float, ...]:
    return tuple(json.loads(metadata(out / "model.onnx")["mean"]))


def reference_std(out: Path) -> tuple[float, ...]:
    return tuple(json.loads(metadata(out / "model.onnx")["std"]))


def test_default_onnx_export_gives_the_backbones_features(tiny_run, tmp_path, digit_files):
    out = tmp_path / "features"
    summary = export_ok(tiny_run, "--out", out, "--format", "onnx")
    assert summary["onnx"]["output"] == "features"
    backbone = load_weights(str(tiny_run)).backbone.eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        torch.testing.assert_close(
            torch.from_numpy(session.run(None, {"images": x.numpy()})[0]), backbone(x), atol=1e-4, rtol=1e-3
        )
    # predict needs the rotation head: one line saying how to get it
    result = rotnet("predict", out, digit_files)
    assert result.exit_code == 1 and "--with-head" in result.output
    assert len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("tta", [False, True])
def test_predict_on_onnxruntime_gives_the_pytorch_answers(tiny_run, onnx_export, digit_files, tta):
    out, _ = onnx_export
    flags = ["--tta"] if tta else []
    answers = {}
    for weights in (tiny_run, out, out / "model.onnx"):
        result = rotnet("predict", weights, digit_files, "--json", *flags)
        assert result.exit_code == 0, result.output
        answers[weights] = json.loads(result.stdout)
    pytorch, folder, file = answers.values()
    assert folder["device"].startswith("onnxruntime") and file["device"].startswith("onnxruntime")
    assert not pytorch["device"].startswith("onnxruntime")
    for other in (folder, file):
        assert [p["predicted"] for p in other["predictions"]] == [p["predicted"] for p in pytorch["predictions"]]
        np.testing.assert_allclose(
            [p["confidence"] for p in other["predictions"]],
            [p["confidence"] for p in pytorch["predictions"]],
            atol=1e-5,
        )


def test_a_missing_extra_is_one_line_naming_it(tiny_run, tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else find_spec(name, *a)
    )
    result = rotnet("export", tiny_run, "--out", tmp_path / "out", "--format", "onnx")
    assert result.exit_code == 1 and "pip install 'rotnet-cli[onnx]'" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_export_whose_onnx_model_differs_from_pytorch_is_refused(tiny_run, tmp_path, monkeypatch):
    import rotnet_cli.onnx as onnx_lib

    real_session = onnx_lib._session

    class Off:  # onnxruntime outputs shifted by 0.01: what a wrongly translated operator looks like
        def __init__(self, *args):
            self.session = real_session(*args)

        def run(self, names, feeds):
            return [y + np.float32(0.01) for y in self.session.run(names, feeds)]

    monkeypatch.setattr(onnx_lib, "_session", Off)
    result = rotnet("export", tiny_run, "--out", tmp_path / "out", "--format", "onnx")
    assert result.exit_code == 1 and "differ from PyTorch's by up to 0.01" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_model_the_exporter_cannot_trace_is_one_line_naming_the_reason(tiny_run, tmp_path, monkeypatch):
    def refuses(*args, **kwargs):
        raise RuntimeError("Unsupported: data-dependent control flow\nmore detail")

    monkeypatch.setattr(torch.onnx, "export", refuses)
    result = rotnet("export", tiny_run, "--out", tmp_path / "out", "--format", "onnx")
    assert result.exit_code == 1, result.output
    assert "test_resnet cannot be exported to ONNX" in result.output and "data-dependent control flow" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_an_onnx_file_rotnet_did_not_write_is_refused_in_one_line(tmp_path, digit_files):
    foreign = tmp_path / "foreign.onnx"
    torch.onnx.export(torch.nn.Linear(4, 2), (torch.randn(1, 4),), str(foreign), dynamo=True, verbose=False)
    result = rotnet("predict", foreign, digit_files)
    assert result.exit_code == 1 and "no rotnet metadata" in result.output
    assert len(result.output.strip().splitlines()) == 1
    (tmp_path / "broken.onnx").write_bytes(b"not a model")
    result = rotnet("predict", tmp_path / "broken.onnx", digit_files)
    assert result.exit_code == 1 and "not a readable ONNX model" in result.output
