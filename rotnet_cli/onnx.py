"""ONNX: a backbone (or backbone + rotation head) as model.onnx, and running one with onnxruntime.

``rotnet export --format onnx`` writes ``model.onnx`` beside the export's safetensors and
config.json. Its graph takes ``images`` (N, 3, S, S) float32, normalised with the model's mean
and std, N dynamic, and returns ``features`` (N, head_hidden_size) or, with --with-head,
``logits`` (N, R). Its metadata_props say what it is, like a rotnet safetensors file's metadata
(all values JSON-encoded except the text fields): rotnet_format "onnx", output, model,
img_size, mean, std, rotations (with the head), opset, exporter, source, data.

The export is checked before it is kept: onnxruntime runs random images and real ones (the
built-in digits) at two batch sizes, and its outputs must equal PyTorch's within a tolerance.
``load_onnx`` reads such a file back for ``rotnet predict`` (see prediction.load_rotation_model).

Uses torch.onnx's torch.export-based exporter (the default since torch 2.9; it needs
onnxscript): the TorchScript one is deprecated.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import rundir
from ._version import __version__
from .config import MAX_IMG_SIZE, MIN_IMG_SIZE
from .errors import RotnetError, WeightsError

ONNX_FILE = "model.onnx"
ONNX_FORMAT = "onnx"
OPSET = 18  # the exporter's own default in torch 2.9-2.14; onnxruntime >= 1.14 runs it
EXPORTER = "torch.onnx.export(dynamo=True)"
OUTPUTS = ("features", "logits")  # what the graph returns: the backbone's features, or the rotation head's logits
INPUT_NAME = "images"
# onnxruntime fuses and reorders float operations: its outputs differ from PyTorch's by float rounding,
# a few 1e-6 relative on typical backbones; more than this means a wrong graph, not rounding
ATOL, RTOL = 1e-4, 1e-3
EXTRA = "pip install 'rotnet-cli[onnx]'"
TEXT_FIELDS = ("rotnet_format", "output", "model", "exporter", "source", "data", "rotnet_version")


def require_onnx(export: bool = False) -> None:
    """The one-line error naming the extra when onnx, onnxruntime (or, to export, onnxscript) are missing."""
    needed = ("onnx", "onnxruntime", "onnxscript") if export else ("onnx", "onnxruntime")
    import importlib
    import importlib.util

    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    what = "ONNX export" if export else "running an ONNX model"
    if missing:
        raise RotnetError(f"{what} needs {', '.join(missing)}: {EXTRA}")
    for name in needed:  # installed is not importable: a broken wheel or a missing shared library
        try:
            importlib.import_module(name)
        except Exception as e:  # ImportError, OSError from a native library, ...
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            raise RotnetError(
                f"{what} needs {name}, which is installed but cannot be imported ({reason}): "
                f"pip install --force-reinstall 'rotnet-cli[onnx]'"
            ) from None


def is_onnx_spec(spec: str) -> bool:
    """Whether a weights spec names an ONNX model: a .onnx file, or a folder holding model.onnx."""
    path = Path(str(spec)).expanduser()
    if path.suffix.lower() == ".onnx":
        return True
    return path.is_dir() and (path / ONNX_FILE).is_file()


# ----------------------------------------------------------------------------- export


def export_onnx(module: torch.nn.Module, path: Path, img_size: int, metadata: dict[str, Any]) -> None:
    """Write ``module`` (eval mode, float32) as ONNX at ``path`` with a dynamic batch and ``metadata``.

    A model the exporter cannot trace is a WeightsError naming the exporter's reason.
    """
    import warnings

    import onnx

    x = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))  # (2, 3, S, S)
    output = metadata["output"]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on its own internals are not the user's business
            program = torch.onnx.export(
                module.eval(),
                (x,),
                dynamo=True,
                opset_version=OPSET,
                input_names=[INPUT_NAME],
                output_names=[output],
                dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},),
                verbose=False,
                report=False,
            )
    except Exception as e:  # any tracing or translation failure: the model cannot be exported as it is
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(
            f"{metadata['model']} cannot be exported to ONNX by {EXPORTER} (opset {OPSET}): {reason}; "
            "export without --format onnx (safetensors) instead"
        ) from e
    model = program.model_proto
    del model.metadata_props[:]
    for key, value in metadata.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value if key in TEXT_FIELDS else json.dumps(value)
    onnx.save_model(model, str(path))


def onnx_metadata(loaded, output: str, record: dict[str, Any]) -> dict[str, Any]:
    """The metadata_props of an exported model.onnx (``loaded``: the LoadedWeights it comes from)."""
    meta: dict[str, Any] = {
        "rotnet_format": ONNX_FORMAT,
        "rotnet_version": __version__,
        "output": output,
        "model": loaded.model_name,
        "img_size": loaded.img_size,
        "mean": list(loaded.mean),
        "std": list(loaded.std),
        "opset": OPSET,
        "exporter": EXPORTER,
        "source": str(loaded.run_dir) if loaded.run_dir else loaded.info.get("source", loaded.source),
    }
    if output == "logits":
        meta["rotations"] = list(loaded.rotations)
        # predict on onnxruntime answers as on PyTorch: the calibrated temperature and the record of the
        # training images (for its warning on unlike images) travel with the classifier
        for key in ("calibration", "training_images"):
            if loaded.info.get(key) is not None:
                meta[key] = loaded.info[key]
    if record.get("data"):
        meta["data"] = str(record["data"])
    return meta


def reference_images(img_size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> dict[str, torch.Tensor]:
    """What an export is checked on: 2 random images and 3 real ones (built-in digits), normalised.

    Two batch sizes, so a graph whose batch size was frozen fails the check.
    """
    from .data import _digits, normalize

    random = torch.randn(2, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))  # (2, 3, S, S)
    digits = _digits(img_size).images[:3]  # (3, 3, S, S) uint8
    return {"random images": random, "real images": normalize(digits, mean, std)}


def verify_onnx(path: Path, module: torch.nn.Module, images: dict[str, torch.Tensor]) -> dict[str, float]:
    """Run ``path`` with onnxruntime on each batch of ``images`` and compare with ``module``.

    Returns batch name -> the largest absolute difference; a difference beyond the tolerance
    (or a run that fails) is a WeightsError.
    """
    session = _session(path)
    diffs: dict[str, float] = {}
    for name, x in images.items():
        with torch.no_grad():
            expected = module.eval()(x).float()  # (N, D)
        try:
            got = torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])
        except Exception as e:  # onnxruntime's own errors (shape, unsupported op) are not RotnetErrors
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise WeightsError(
                f"onnxruntime cannot run the exported model on {name}: {reason}; nothing was written "
                "(export without --format onnx, or run with --debug and report this)"
            ) from e
        if got.shape != expected.shape:
            raise WeightsError(
                f"the ONNX model gives outputs of shape {tuple(got.shape)} on {name}, PyTorch {tuple(expected.shape)}; "
                "nothing was written (run with --debug and report this)"
            )
        diff = (got - expected).abs().max().item()
        if not torch.allclose(got, expected, atol=ATOL, rtol=RTOL):
            raise WeightsError(
                f"the ONNX model's outputs differ from PyTorch's by up to {diff:.3g} on {name} (tolerance "
                f"{ATOL:g} + {RTOL:g} x |output|); nothing was written: export without --format onnx"
            )
        diffs[name] = diff
    return diffs


# ----------------------------------------------------------------------------- running


def _session(path: Path, providers: list[str] | None = None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


@dataclass
class OnnxModel:
    """A model.onnx read back: an onnxruntime session and what its metadata says."""

    path: Path
    session: Any
    output: str  # "features" or "logits"
    model_name: str
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    rotations: tuple[float, ...] | None
    provider: str
    info: dict[str, Any] = field(default_factory=dict)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) normalised float -> (N, D) float32 on the CPU."""
        x = images.detach().float().cpu().contiguous().numpy()
        return torch.from_numpy(np.asarray(self.session.run(None, {INPUT_NAME: x})[0]))


def onnx_path(spec: str) -> Path:
    """The .onnx file of a spec that is one or a folder holding model.onnx; a WeightsError if absent."""
    path = Path(str(spec)).expanduser()
    if path.is_dir():
        path = path / ONNX_FILE
    if not path.is_file():
        raise WeightsError(f"{path} does not exist; export one with rotnet export RUN --format onnx --out DIR")
    return path


def load_onnx(spec: str, device: torch.device | str = "cpu") -> OnnxModel:
    """A rotnet model.onnx (file or folder) as an onnxruntime session, its metadata validated like user input.

    Runs on CUDA when ``device`` is CUDA and onnxruntime has its CUDA provider, else on the CPU.
    """
    require_onnx()
    import onnx
    import onnxruntime as ort

    path = onnx_path(spec)
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as e:  # a truncated or foreign file: onnx raises DecodeError, OSError, ...
        raise WeightsError(f"{path} is not a readable ONNX model ({type(e).__name__}); export it again") from None
    meta = _read_metadata(path, {p.key: p.value for p in proto.metadata_props})
    cuda = torch.device(device).type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    try:
        session = _session(path, providers)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"onnxruntime cannot load {path}: {reason}; export it again with this rotnet") from None
    _check_signature(path, session, meta)
    return OnnxModel(
        path=path,
        session=session,
        output=meta["output"],
        model_name=meta["model"],
        img_size=meta["img_size"],
        mean=meta["mean"],
        std=meta["std"],
        rotations=meta.get("rotations"),
        provider=session.get_providers()[0],
        info=meta,
    )


def _check_signature(path: Path, session, meta: dict[str, Any]) -> None:
    """The graph must take what the metadata says it takes and return what it says it returns.

    Metadata and graph can disagree in a file edited (or put together) by hand: without this check
    predict would feed it images of the wrong size or read R logits as another rotation set.
    """
    inputs, outputs = session.get_inputs(), session.get_outputs()
    size = meta["img_size"]
    expected_input = [None, 3, size, size]  # None: any (the dynamic batch)
    got = list(inputs[0].shape) if len(inputs) == 1 else None
    input_ok = (
        got is not None
        and inputs[0].name == INPUT_NAME
        and len(got) == 4
        and all(want is None or not isinstance(dim, int) or dim == want for dim, want in zip(got, expected_input))
    )
    width = len(meta["rotations"]) if meta["output"] == "logits" else None
    out_shape = list(outputs[0].shape) if outputs else []
    output_ok = (
        len(outputs) >= 1
        and len(out_shape) == 2
        and (width is None or not isinstance(out_shape[1], int) or out_shape[1] == width)
    )
    if not (input_ok and output_ok):
        graph = (
            ", ".join(f"{i.name} {list(i.shape)}" for i in inputs)
            + " -> "
            + ", ".join(f"{o.name} {list(o.shape)}" for o in outputs)
        )
        want = f"{INPUT_NAME} [N, 3, {size}, {size}] -> {meta['output']} [N, {width if width is not None else 'D'}]"
        raise WeightsError(
            f"{path}: its graph ({graph}) does not match its metadata ({want}); the file was changed or "
            "not written by rotnet: export the run again with rotnet export RUN --format onnx --out DIR"
        )


def _read_metadata(path: Path, raw: dict[str, str]) -> dict[str, Any]:
    """Decode and check an ONNX model's rotnet metadata_props, field by field."""
    if raw.get("rotnet_format") != ONNX_FORMAT:
        raise WeightsError(
            f"{path} has no rotnet metadata (it was not exported by rotnet export --format onnx); "
            "export the run with rotnet export RUN --format onnx --out DIR"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = value if key in TEXT_FIELDS else json.loads(value)
        except ValueError:
            raise WeightsError(f"{path}: its metadata {key!r} is not valid ({value[:40]!r}); export it again") from None
    fields = rundir.FileFields(meta, f"{path} (metadata)")
    fields.text("model")
    if meta.get("output") not in OUTPUTS:
        fields.fail("output", f"one of {', '.join(OUTPUTS)}")
    meta["img_size"] = fields.integer("img_size", MIN_IMG_SIZE, MAX_IMG_SIZE)
    meta["mean"] = fields.channel_stats("mean", positive=False, required=True)
    meta["std"] = fields.channel_stats("std", positive=True, required=True)
    meta["rotations"] = fields.rotations("rotations", required=meta["output"] == "logits")
    fields.integer("opset", 1, required=False)
    for key in ("data", "source", "exporter"):
        fields.text(key, required=False)
    rundir.check_calibration_fields(fields)
    rundir.check_training_images_fields(fields)
    return {k: v for k, v in meta.items() if v is not None}


__all__ = ["ONNX_FILE", "OPSET", "OnnxModel", "export_onnx", "is_onnx_spec", "load_onnx", "require_onnx", "verify_onnx"]
