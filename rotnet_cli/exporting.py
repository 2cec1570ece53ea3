"""rotnet export: a pretrained backbone as a folder timm and the Hugging Face hub load directly.

The folder (timm's ``local-dir:`` / hub layout)::

    DIR/model.safetensors            the backbone only: keys of timm.create_model(name, num_classes=0)
    DIR/config.json                  timm's save_config_for_hf: architecture, model_args, pretrained_cfg
    DIR/README.md                    a model card
    DIR/rotation_head.safetensors    with --with-head: Linear(head_hidden_size, R) as weight/bias (timm ignores it)
    DIR/model.onnx                   with --format onnx: the backbone's features, or with --with-head the
                                     rotation logits, for onnxruntime (see onnx.py); config.json's "onnx" says which

Everything is written into a temporary sibling folder, loaded back through timm both
ways (and through rotnet's own loader; model.onnx through onnxruntime), and only then renamed into place: a failed
export leaves nothing behind and changes no existing file.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import jsontext, rundir
from ._version import __version__
from .atomicfiles import write_json, write_text
from .config import ExportConfig, counted, format_rotations
from .data import data_provenance
from .errors import DataError, DiskFullError, OutputError, WeightsError
from .events import Message, Progress, TaskProgress, ignore
from .models import feature_width
from .rundir import EXPORT_CONFIG, EXPORT_HEAD, EXPORT_WEIGHTS, MODEL_CARD
from .weights import LoadedWeights, load_weights

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
ROTNET_PAPER = {
    "paper_name": "Unsupervised Representation Learning by Predicting Image Rotations",
    "paper_ids": "arXiv:1803.07728",
}  # Gidaris, Singh, Komodakis, ICLR 2018
# What timm's pretrained_cfg says about timm's own weights for an architecture (ImageNet training,
# their paper, licence and origin). A model built without them inherits those words; an export
# of other weights must not repeat them.
TIMM_WEIGHTS_DESCRIPTION = ("license", "description", "origin_url", "paper_name", "paper_ids", "notes")


@dataclass
class ExportResult:
    out_dir: Path
    model: str
    dtype: str
    source: str
    num_features: int  # timm's num_features: channels of the last stage
    head_hidden_size: int  # the width of what the backbone returns (its features), the rotation head's input
    num_params: int
    img_size: int
    rotations: tuple[float, ...] | None
    with_head: bool
    files: dict[str, int] = field(default_factory=dict)  # file name -> bytes
    round_trip: dict[str, float] = field(default_factory=dict)  # how it was loaded back -> max |feature diff|
    onnx: dict[str, Any] | None = None  # with --format onnx: file, opset, output, and images -> max |diff| vs PyTorch

    @property
    def snippet(self) -> str:
        """The two lines that load the export in timm (no rotnet needed, unless rotnet defines the model)."""
        registration = registration_import(self.model)
        lines = [registration] if registration else []
        # json's quoting is a Python string literal too: a control character or a byte that is not
        # UTF-8 in the folder's name is escaped, so the line is safe to show and pastes as the same path
        lines += [
            "import timm",
            f"model = timm.create_model({json.dumps(f'local-dir:{self.out_dir}')}, pretrained=True)",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "model": self.model,
            "dtype": self.dtype,
            "source": self.source,
            "num_features": self.num_features,
            "head_hidden_size": self.head_hidden_size,
            "num_params": self.num_params,
            "img_size": self.img_size,
            "rotations": list(self.rotations) if self.rotations else None,
            "with_head": self.with_head,
            "files": [{"name": n, "path": str(self.out_dir / n), "bytes": b} for n, b in self.files.items()],
            "total_bytes": sum(self.files.values()),
            "round_trip_max_abs_diff": self.round_trip,
            "onnx": self.onnx,
            "snippet": self.snippet,
        }


def export(config: ExportConfig, progress: Progress | None = None) -> ExportResult:
    """Write ``config.out`` as a timm/hub folder from any weights spec, verified by loading it back."""
    emit = progress or ignore
    out = Path(config.out).expanduser()
    with rundir.export_lock(out):  # one export into a folder at a time
        for note in rundir.recover_staged(out):  # what an export killed on this --out left behind
            emit(Message(note))
        # an export may go inside the run it comes from (runs/demo/export), never over it; --overwrite
        # replaces an export rotnet wrote, never a folder with files of the user's
        rundir.check_out_dir(
            out, overwrite=config.overwrite, inputs=(config.weights,), inside_inputs=True, replaces=rundir.EVERYTHING
        )
        return _export(config, out, emit)


def _export(config: ExportConfig, out: Path, emit: Progress) -> ExportResult:
    def stage(done: int, description: str) -> None:
        emit(TaskProgress("export", description, done, 3))

    if config.format == "onnx":
        from .onnx import require_onnx

        require_onnx(export=True)  # before any work: a missing extra is one line
    stage(0, "export: loading weights")
    loaded = load_weights(config.weights, device="cpu")
    if config.with_head and (loaded.head is None or not loaded.rotations):
        raise WeightsError(
            f"--with-head: {loaded.source} has no rotation head; export a run directory, its model.safetensors "
            "or checkpoint.pt, or leave out --with-head"
        )
    record = _run_record(loaded)

    staging = rundir.staging_dir(out)
    try:
        stage(1, "export: writing")
        _write_backbone(staging, loaded, config, record)
        if config.with_head:
            _write_head(staging, loaded, config)
        hf_config = jsontext.loads((staging / EXPORT_CONFIG).read_text())  # what timm's save_config_for_hf wrote
        write_text(staging / MODEL_CARD, model_card(loaded, config, record, hf_config.get("model_args", {})))
        onnx_check = _write_onnx(staging, loaded, config, record) if config.format == "onnx" else None
        stage(2, "export: loading back")
        round_trip = _verify_round_trip(staging, hf_config, loaded, config.with_head)
        rundir.install_staged(staging, out)
    except DiskFullError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise DiskFullError(
            e.path, "disk full while writing the export; nothing was written: free space and export again"
        ) from e
    except OSError as e:  # timm's config writer and the renames raise plain OSErrors (disk full, permissions)
        shutil.rmtree(staging, ignore_errors=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise DiskFullError(
                out, "disk full while writing the export; nothing was written: free space and export again"
            ) from e
        raise OutputError(f"cannot write {out}: {e.strerror or e}; nothing was written: choose another --out") from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    stage(3, "export")
    return ExportResult(
        out_dir=out,
        model=loaded.model_name,
        dtype=config.dtype,
        source=loaded.source,
        num_features=loaded.backbone.num_features,
        head_hidden_size=feature_width(loaded.backbone),
        num_params=sum(p.numel() for p in loaded.backbone.parameters()),
        img_size=loaded.img_size,
        rotations=tuple(record["rotations"] or ()) or None,
        with_head=config.with_head,
        files={p.name: p.stat().st_size for p in sorted(out.iterdir())},
        round_trip=round_trip,
        onnx=onnx_check,
    )


# ----------------------------------------------------------------------------- files


def _rounded_state(module: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The module's state in ``dtype``, loaded back into the module itself.

    timm loads fp16/bf16 tensors into fp32 parameters, so the module rounded the same way
    is the exact reference the round trip must reproduce.
    """
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in module.state_dict().items()}
    module.load_state_dict(state)
    return state


def _write_backbone(folder: Path, loaded: LoadedWeights, config: ExportConfig, record: dict[str, Any]) -> None:
    from timm.models._hub import save_config_for_hf

    state = _rounded_state(loaded.backbone, DTYPES[config.dtype])
    rundir.save_weights(
        folder / EXPORT_WEIGHTS,
        state,
        rundir.EXPORT_FORMAT,
        loaded.model_name,
        # the training run; a re-export keeps naming the run its input was exported from
        source=str(loaded.run_dir) if loaded.run_dir else loaded.info.get("source", loaded.source),  # \xNN if not UTF-8
        dtype=config.dtype,
        img_size=loaded.img_size,
        mean=list(loaded.mean),
        std=list(loaded.std),
        rotations=record["rotations"],
        data=record["data"],
        epochs=record["epochs"],
        val_rot_acc=record["val_rot_acc"],
        init=record["init"],
    )
    size = loaded.img_size
    # rotnet resizes the shorter side and centre-crops, bilinear: crop_pct 1 makes timm's eval transform the same.
    save_config_for_hf(
        loaded.backbone,
        str(folder / EXPORT_CONFIG),
        model_config={"pretrained_cfg": {"tag": "rotnet"}},  # not the tag of timm's own weights for this model
        data_config={
            "input_size": (3, size, size),
            "mean": tuple(loaded.mean),
            "std": tuple(loaded.std),
            "crop_pct": 1.0,
            "interpolation": "bilinear",
        },
    )
    hf_config = jsontext.loads((folder / EXPORT_CONFIG).read_text())
    hf_config["pretrained_cfg"] = describe_weights(hf_config["pretrained_cfg"], loaded, record)
    write_json(folder / EXPORT_CONFIG, hf_config)


def describe_weights(pretrained_cfg: dict[str, Any], loaded: LoadedWeights, record: dict[str, Any]) -> dict[str, Any]:
    """timm's pretrained_cfg for the exported weights: their paper, training data and its licence
    where known, in place of what timm says about its own weights for the architecture.

    timm:NAME weights are timm's, so they keep timm's words; random:NAME ones have no paper nor
    data; everything else was trained by rotnet. The weights' own licence is their owner's to
    choose, so rotnet names none (a licence of the training data is in the notes).
    """
    if loaded.kind == "timm":
        return pretrained_cfg
    cfg = {k: v for k, v in pretrained_cfg.items() if k not in TIMM_WEIGHTS_DESCRIPTION}
    if loaded.kind == "random":
        return {**cfg, "description": f"{loaded.model_name} with random weights (seed 0), not trained: a baseline"}
    angles = record.get("rotations")
    task = f"which of the rotations {format_rotations(angles)} degrees was applied" if angles else "image rotations"
    notes = [
        f"trained by rotnet {__version__}"
        + (f" for {counted(record['epochs'], 'epoch')}" if record.get("epochs") else "")
    ]
    if record.get("data"):
        name, licence = data_provenance(str(record["data"]))
        notes.append(f"training data: {name}; licence: {licence or 'not known to rotnet (see the data source)'}")
    if record.get("init"):
        notes.append(f"initialised from {record['init']}: the terms of those weights apply as well")
    return {
        **cfg,
        **ROTNET_PAPER,
        "description": f"{loaded.model_name} backbone pretrained without labels by predicting {task} (RotNet)",
        "notes": notes,
    }


def _write_head(folder: Path, loaded: LoadedWeights, config: ExportConfig) -> None:
    tensors = _rounded_state(loaded.head, DTYPES[config.dtype])  # weight (R, head_hidden_size), bias (R,)
    rundir.save_weights(
        folder / EXPORT_HEAD,
        tensors,
        rundir.HEAD_FORMAT,
        loaded.model_name,
        rotations=list(loaded.rotations),
        head_hidden_size=feature_width(loaded.backbone),
    )


def _write_onnx(folder: Path, loaded: LoadedWeights, config: ExportConfig, record: dict[str, Any]) -> dict[str, Any]:
    """model.onnx (features, or with the head rotation logits), checked against PyTorch with onnxruntime,
    and recorded in config.json's "onnx" entry. Returns that entry plus the check's differences."""
    from .onnx import ONNX_FILE, export_onnx, onnx_metadata, reference_images, verify_onnx

    output = "logits" if config.with_head else "features"
    module = loaded.rotnet() if config.with_head else loaded.backbone  # weights already rounded to --dtype
    meta = onnx_metadata(loaded, output, record)
    export_onnx(module.eval(), folder / ONNX_FILE, loaded.img_size, meta)
    diffs = verify_onnx(folder / ONNX_FILE, module, reference_images(loaded.img_size, loaded.mean, loaded.std))
    entry = {"file": ONNX_FILE, "opset": meta["opset"], "exporter": meta["exporter"], "output": output}
    if output == "logits":
        entry["rotations"] = meta["rotations"]
    hf_config = json.loads((folder / EXPORT_CONFIG).read_text())
    hf_config["onnx"] = entry  # timm reads only its own keys of config.json
    write_json(folder / EXPORT_CONFIG, hf_config)
    return {**entry, "max_abs_diff": diffs}


# ----------------------------------------------------------------------------- round trip


def _verify_round_trip(folder: Path, cfg: dict[str, Any], loaded: LoadedWeights, with_head: bool) -> dict[str, float]:
    """Load ``folder`` (whose config.json holds ``cfg``) back three ways; each must load strictly
    and give the reference's features.

    Returns how each was loaded -> the largest absolute feature difference (0.0 when identical).
    """
    import timm

    model_args = cfg.get("model_args", {})  # num_classes=0 and, for fixed-size models, img_size
    input_size = cfg["pretrained_cfg"]["input_size"]  # (C, H, W)
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = loaded.backbone.eval()(x)  # (2, head_hidden_size)

    def through_rotnet() -> torch.nn.Module:
        again = load_weights(str(folder))
        if with_head and (
            again.head is None
            or not all(
                torch.equal(a, b) for a, b in zip(again.head.state_dict().values(), loaded.head.state_dict().values())
            )
        ):
            raise WeightsError("the rotation head did not load back")
        return again.backbone

    with utf8_alias(folder) as alias:  # safetensors' file reader refuses paths that are not UTF-8
        loaders = {
            'timm.create_model("local-dir:DIR", pretrained=True)': lambda: timm.create_model(
                f"local-dir:{alias}", pretrained=True
            ),
            f'timm.create_model("{cfg["architecture"]}", checkpoint_path="DIR/{EXPORT_WEIGHTS}", **model_args)': lambda: (
                timm.create_model(cfg["architecture"], checkpoint_path=str(alias / EXPORT_WEIGHTS), **model_args)
            ),
            "rotnet_cli.load_weights(DIR)": through_rotnet,
        }
        return _compare_loaders(loaders, x, expected)


@contextlib.contextmanager
def utf8_alias(folder: Path):
    """``folder``, or a link to it under a UTF-8 name when its own path is not valid UTF-8 (which a
    file system allows but safetensors' file functions, and so timm's loaders, refuse)."""
    try:
        str(folder.resolve()).encode("utf-8")
        yield folder
        return
    except UnicodeEncodeError:
        pass
    holder = Path(tempfile.mkdtemp(prefix="rotnet-export-check-"))
    try:
        os.symlink(folder.resolve(), holder / "export")
        yield holder / "export"
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _compare_loaders(loaders: dict, x: torch.Tensor, expected: torch.Tensor) -> dict[str, float]:
    diffs: dict[str, float] = {}
    for how, build in loaders.items():
        try:
            model = build().eval()
            with torch.no_grad():
                got = model(x)
        except Exception as e:  # any failure here means the export is broken; nothing is kept
            raise WeightsError(
                f"the export did not load back with {how}: {(str(e).splitlines() or [type(e).__name__])[0][:200]}; nothing was written "
                "(run with --debug and report this)"
            ) from e
        if got.shape != expected.shape or not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
            raise WeightsError(
                f"the export loaded back with {how} gives other features ({tuple(got.shape)} vs {tuple(expected.shape)}); "
                "nothing was written (run with --debug and report this)"
            )
        diffs[how] = (got - expected).abs().max().item()
    return diffs


# ----------------------------------------------------------------------------- model card


def _run_record(loaded: LoadedWeights) -> dict[str, Any]:
    """What the card tells about the training run: rotations, data, epochs, final accuracy, probe results.

    Weights without a run directory (a re-export, a lone safetensors) tell what their metadata
    holds. A run directory adds what its files say; a file that is missing or unreadable (a
    partial run, a probe.json from elsewhere) leaves its facts out of the card, not the export.
    """
    info = loaded.info or {}
    rotations = loaded.rotations or info.get("rotations")  # validated when read: a tuple of angles, or absent
    record: dict[str, Any] = {
        "rotations": list(rotations) if rotations else None,
        "data": info.get("data"),
        "epochs": info.get("epochs"),
        "val_rot_acc": info.get("val_rot_acc"),
        "init": info.get("init"),
        "probes": [],
    }
    if loaded.run_dir is None:
        return record
    try:  # checked field by field like user input: a hand-edited "data": 5 is no crash in the card
        config = rundir.read_run_config(loaded.run_dir)
        record["data"] = config.data or record["data"]
        record["init"] = config.init or None
    except DataError:
        pass
    try:
        rows = rundir.read_metrics(loaded.run_dir)
    except DataError:
        rows = []
    if rows:
        record["epochs"] = rows[-1].get("epoch", len(rows))
        record["val_rot_acc"] = rows[-1].get("val_rot_acc")
    try:
        record["probes"] = rundir.read_probe(loaded.run_dir)  # every setting probed
    except DataError:
        pass
    return record


def _cell(value: Any) -> str:
    if isinstance(value, float):
        text = f"{value:.4g}" if math.isfinite(value) else str(value)
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value)
    else:
        text = "" if value is None else str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def probe_section(probe: Any) -> list[str]:
    """Markdown for one result of probe.json: top-1 per stage and head, in %, under a line naming its setting."""
    rows, heads = (probe.get("rows"), probe.get("heads")) if isinstance(probe, dict) else (None, None)
    if not isinstance(rows, list) or not rows or not isinstance(heads, list) or not heads:
        return []
    epochs = probe.get("epochs")
    if isinstance(epochs, dict):  # per trained head
        trained = ", ".join(f"{h} {counted(n, 'epoch')}" for h, n in epochs.items()) or "no trained head"
    else:
        trained = f"each head {counted(epochs if epochs is not None else '?', 'epoch')}"
    recipe = probe.get("recipe")
    lines = [
        f"Frozen-feature probes (`rotnet probe{f' --recipe {recipe}' if recipe else ''}`) on {probe.get('data', '?')}"
        f"{_labels_note(probe.get('labels_per_class'))}: top-1 accuracy on {probe.get('val_images', '?')} held-out images "
        f"after the last epoch ({trained}{_features_note(probe.get('features'))}), each head on the frozen features of one stage.",
        "",
        "| weights | stage | C x H x W | " + " | ".join(map(_cell, heads)) + " |",
        "|" + "---|" * (3 + len(heads)),
    ]
    for row in rows:
        if not isinstance(row, dict):
            continue
        accuracy = [f"{100 * row[h]:.2f}%" if isinstance(row.get(h), (int, float)) else "-" for h in heads]
        shape = row.get("shape") if isinstance(row.get("shape"), list) else []
        lines.append(
            f"| {_cell(row.get('weights'))} | {_cell(row.get('stage'))} | {' x '.join(map(_cell, shape))} | "
            + " | ".join(accuracy)
            + " |"
        )
    best = probe.get("best")
    if isinstance(best, dict) and isinstance(best.get("accuracy"), (int, float)):
        lines += [
            "",
            f"Best: stage {_cell(best.get('stage'))} with the {_cell(best.get('head'))} head, {100 * best['accuracy']:.2f}%.",
        ]
    return lines


def _labels_note(labels_per_class: Any) -> str:
    return f", {labels_per_class} labelled images per class" if isinstance(labels_per_class, int) else ""


def _features_note(features: Any) -> str:
    return "; features of cropped and flipped images recomputed every batch" if features == "augmented" else ""


def _data_text(data: Any) -> str:
    if not data:
        return "-"
    name, licence = data_provenance(str(data))
    described = str(data) if name == str(data) else f"{data}: {name}"
    return f"{described} (licence: {licence})" if licence else described


def registration_import(model_name: str) -> str | None:
    """The import that registers a model rotnet itself defines (the paper's NIN) with timm, else None."""
    import timm

    arch = timm.models.split_model_name_tag(model_name)[0]
    module = timm.models.model_entrypoint(arch).__module__
    if module.startswith("rotnet_cli"):
        return f"import {module}  # registers {arch} with timm; pip install rotnet-cli"
    return None


def model_card(loaded: LoadedWeights, config: ExportConfig, record: dict[str, Any], model_args: dict[str, Any]) -> str:
    """README.md in the hub's model-card format (YAML front matter, then markdown)."""
    name = loaded.model_name
    registration = registration_import(name)
    folder = Path(config.out).name or "exported"
    angles = record.get("rotations")
    rotations = f"{format_rotations(angles)} degrees ({len(angles)} classes)" if angles else "-"
    acc = record.get("val_rot_acc")
    facts = {
        "model": f"`{name}` ({feature_width(loaded.backbone)} features, "
        f"{sum(p.numel() for p in loaded.backbone.parameters()):,} parameters)",
        "rotations": rotations,
        "data": _data_text(record.get("data")),
        "epochs": record.get("epochs") if record.get("epochs") is not None else "-",
        "final validation rotation accuracy": f"{100 * acc:.2f}%" if isinstance(acc, (int, float)) else "-",
        "input": f"{loaded.img_size} x {loaded.img_size} px, mean {_cell(list(loaded.mean))}, std {_cell(list(loaded.std))}",
        "weights": f"{config.dtype}, exported by rotnet {__version__} from `{loaded.source}`",
        "rotation head": f"`{EXPORT_HEAD}`" if config.with_head else "not included (export with --with-head)",
    }
    if config.format == "onnx":  # onnx.py writes it after the card, under this name
        facts["ONNX"] = f"`model.onnx`: {'rotation logits' if config.with_head else 'features'}, for onnxruntime"
    lines = [
        "---",
        "library_name: timm",
        "pipeline_tag: image-feature-extraction",
        "tags:",
        "- image-feature-extraction",
        "- timm",
        "- rotnet",
        "- self-supervised-learning",
        f"- {ROTNET_PAPER['paper_ids'].lower()}",
        "---",
        "",  # the hub links the paper from this tag
        f"# {name}: RotNet self-supervised backbone",
        "",
        f"A `{name}` backbone trained without labels by predicting which rotation was applied to an image "
        "(RotNet: Gidaris, Singh, Komodakis, *Unsupervised Representation Learning by Predicting Image "
        f"Rotations*, ICLR 2018), with rotnet {__version__}.",
        "",
        "| | |",
        "|---|---|",
        *[f"| {k} | {_cell(v)} |" for k, v in facts.items()],
        "",
    ]
    probes = [section for section in map(probe_section, record.get("probes") or []) if section]
    if probes:
        lines += ["## Probe results", ""]
        for section in probes:  # every setting probe.json keeps, in the order they were probed
            lines += [*section, ""]
    # the arguments timm recorded to rebuild this backbone (num_classes=0, img_size for fixed-size models, ...)
    build_args = "".join(f", {k}={v!r}" for k, v in model_args.items())
    lines += [
        "## How to load",
        "",
        "With timm alone (this folder, or the hub repository it is uploaded to):",
        "",
        "```python",
        *([registration] if registration else []),
        "import timm",
        "",
        f'model = timm.create_model("local-dir:{folder}", pretrained=True)  # or "hf-hub:USER/REPO"',
        "model.eval()",
        "data_config = timm.data.resolve_model_data_config(model)",
        "transform = timm.data.create_transform(**data_config, is_training=False)",
        "features = model(transform(image).unsqueeze(0))  # (1, model.head_hidden_size)",
        "```",
        "",
        "Or the weights file on its own:",
        "",
        "```python",
        f'model = timm.create_model("{name}", checkpoint_path="{folder}/{EXPORT_WEIGHTS}"{build_args})',
        "```",
        "",
    ]
    if config.with_head:
        lines += [
            f"The rotation head is `{EXPORT_HEAD}` (`weight` (R, head_hidden_size), `bias` (R,), metadata `rotations`):",
            "`torch.nn.Linear(model.head_hidden_size, R)` loads it with `safetensors.torch.load_file`. "
            f"`rotnet predict {folder}` uses it.",
            "",
        ]
    return "\n".join(lines)
