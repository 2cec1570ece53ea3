"""timm backbone + rotation head, stage features, and the one weight loader.

The backbone is ``timm.create_model(name, num_classes=0)`` and the rotation head a
separate ``Linear(num_features, R)``, so the backbone's state dict has exactly timm's keys
and exports load into timm strictly. Only timm's uniform API is used; nothing here
branches on an architecture name.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .checkpoint import load_checkpoint, load_safetensors
from .errors import ConfigError, ModelError, WeightsError

# Files of a run directory and of an exported folder (the contract between commands).
RUN_WEIGHTS = "model.safetensors"
RUN_CHECKPOINT = "checkpoint.pt"
RUN_CONFIG = "config.json"
EXPORT_CONFIG = "config.json"
EXPORT_WEIGHTS = "model.safetensors"
EXPORT_HEAD = "rotation_head.safetensors"


def canonical_model_name(name: str) -> str:
    """'timm/resnet18.a1_in1k' -> 'resnet18.a1_in1k'; unknown names fail with suggestions."""
    import timm

    _register_builtin_models()
    text = name.strip()
    if text.startswith("timm/"):
        text = text[len("timm/"):]
    arch = timm.models.split_model_name_tag(text)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; list models with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
        raise ModelError(f"unknown timm model {name!r}{hint}")
    return text


def _register_builtin_models() -> None:
    """rotnet's own timm models (the paper's NIN) register on import."""
    import_module(".nin", __package__)


def create_backbone(name: str, img_size: int | None = None, pretrained: bool = False, **kwargs: Any) -> nn.Module:
    """A headless timm model (``num_classes=0``): ``model(x)`` gives pooled (N, num_features).

    Models with a fixed input size (ViTs) are built for ``img_size``; models that take
    any size do not accept that argument, which is how they are told apart (no name
    checks).
    """
    import timm

    name = canonical_model_name(name)
    try:
        if img_size is not None:
            try:
                return timm.create_model(name, num_classes=0, pretrained=pretrained, img_size=img_size, **kwargs)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise
        return timm.create_model(name, num_classes=0, pretrained=pretrained, **kwargs)
    except (RuntimeError, ValueError, OSError) as e:
        if pretrained:
            raise WeightsError(
                f"could not get timm's pretrained weights for {name} from the Hugging Face hub ({type(e).__name__}); "
                f"connect to the internet, point HF_HOME at a cache that holds them, or compare with random:{name}"
            ) from e
        raise ModelError(f"timm could not build {name!r}: {str(e).splitlines()[0][:200]}") from e


class RotNet(nn.Module):
    """Backbone + rotation head. ``forward``: (N, 3, H, W) -> rotation logits (N, R)."""

    def __init__(self, backbone: nn.Module, num_rotations: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_rotations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def data_config(backbone: nn.Module) -> dict[str, Any]:
    """timm's resolved preprocessing for the model: input_size, mean, std, ..."""
    import timm

    return timm.data.resolve_model_data_config(backbone)


def num_stages(backbone: nn.Module) -> int:
    info = getattr(backbone, "feature_info", None)
    if not info:
        raise ModelError(f"{type(backbone).__name__} has no feature_info, so its stages are unknown")
    return len(info)


def resolve_stages(layers: tuple[int, ...] | None, count: int, label: str = "run") -> list[int]:
    """--layers (1-based, negative from the end; None = all) -> sorted 1-based stage numbers."""
    if layers is None:
        return list(range(1, count + 1))
    bad = [s for s in layers if not -count <= s <= count]
    if bad:
        whose = "the model" if label == "run" else f"the {label} baseline"
        raise ConfigError(
            f"--layers {','.join(map(str, bad))}: {whose} has {count} stages; use 1..{count} or -{count}..-1, or all"
        )
    return sorted({s if s > 0 else count + 1 + s for s in layers})


def forward_stages(backbone: nn.Module, x: torch.Tensor, indices: list[int]) -> list[torch.Tensor]:
    """The (N, C_i, H_i, W_i) output of each requested stage, from ONE forward pass."""
    if not hasattr(backbone, "forward_intermediates"):
        raise ModelError(
            f"{type(backbone).__name__} does not implement timm's forward_intermediates; stage features need it"
        )
    return backbone.forward_intermediates(x, indices=indices, intermediates_only=True)


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, model_name: str) -> None:
    """load_state_dict(strict) with a one-line error naming up to five missing/unexpected keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong_shape = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong_shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:5])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({', '.join(unexpected[:5])})")
        if wrong_shape:
            parts.append(f"{len(wrong_shape)} with other shapes ({', '.join(wrong_shape[:5])})")
        raise WeightsError(f"weights in {source} do not fit {model_name}: " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


@dataclass
class LoadedWeights:
    """What every command needs from a weights spec."""

    model_name: str
    backbone: nn.Module
    head: nn.Linear | None
    rotations: tuple[float, ...] | None
    img_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str
    kind: str  # run | checkpoint | safetensors | exported | timm | random
    run_dir: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def rotnet(self) -> RotNet:
        """Backbone and head as one module (needs a head)."""
        if self.head is None or self.rotations is None:
            raise WeightsError(
                f"{self.source} has no rotation head; use a run directory, its model.safetensors, "
                "or an export made with --with-head"
            )
        model = RotNet.__new__(RotNet)
        nn.Module.__init__(model)
        model.backbone, model.head = self.backbone, self.head
        return model


def _split_prefixed(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    return backbone, head


def _build(model_name: str, img_size: int | list[int] | None, rotations: tuple[float, ...] | None,
           backbone_state: dict[str, torch.Tensor], head_state: dict[str, torch.Tensor] | None, source: str
           ) -> tuple[nn.Module, nn.Linear | None]:
    backbone = create_backbone(model_name, img_size=img_size)
    load_state_dict_strict(backbone, backbone_state, source, model_name)
    head = None
    if head_state and rotations:
        head = nn.Linear(backbone.num_features, len(rotations))
        load_state_dict_strict(head, head_state, source, f"the rotation head ({len(rotations)} rotations)")
    return backbone, head


def _finish(backbone: nn.Module, head: nn.Linear | None, device: torch.device | str, **fields_: Any) -> LoadedWeights:
    backbone.to(device).eval()
    if head is not None:
        head.to(device).eval()
    cfg = data_config(backbone)
    img_size = fields_.pop("img_size", None) or int(cfg["input_size"][-1])
    mean = tuple(fields_.pop("mean", None) or cfg["mean"])
    std = tuple(fields_.pop("std", None) or cfg["std"])
    return LoadedWeights(backbone=backbone, head=head, img_size=int(img_size), mean=mean, std=std, **fields_)


def _meta_json(metadata: dict[str, str], key: str, default: Any = None) -> Any:
    return json.loads(metadata[key]) if key in metadata else default


def _load_rotnet_safetensors(path: Path, device, kind: str, run_dir: Path | None) -> LoadedWeights:
    tensors, meta = load_safetensors(path)
    if "model" not in meta:
        raise WeightsError(
            f"{path} has no rotnet metadata naming its model; load plain timm weights with "
            "timm.create_model(NAME, checkpoint_path=...) or export a rotnet run first"
        )
    rotations = tuple(_meta_json(meta, "rotations", [])) or None
    backbone_state, head_state = _split_prefixed(tensors)
    if not backbone_state:  # an exported backbone-only file with rotnet metadata
        backbone_state, head_state = tensors, {}
    img_size = _meta_json(meta, "img_size")
    backbone, head = _build(meta["model"], img_size, rotations, backbone_state, head_state, str(path))
    return _finish(
        backbone, head, device, model_name=meta["model"], rotations=rotations,
        img_size=img_size, mean=_meta_json(meta, "mean"), std=_meta_json(meta, "std"),
        source=str(path), kind=kind, run_dir=run_dir, info=meta,
    )


def _load_checkpoint_file(path: Path, device, run_dir: Path | None) -> LoadedWeights:
    try:
        state = load_checkpoint(path)
    except WeightsError:
        raise
    except Exception as e:  # torch's unpickler trips over foreign bytes in its own ways (KeyError, struct.error, ...)
        raise WeightsError(
            f"{path} is not a checkpoint (torch.load failed: {type(e).__name__}); give a run directory, "
            "checkpoint.pt, .safetensors file or an exported folder"
        ) from e
    config = state.get("config")
    model_state = state.get("model")
    if not isinstance(config, dict) or not isinstance(model_state, dict) or "model" not in config:
        raise WeightsError(f"{path} is not a rotnet checkpoint (no 'config' and 'model' entries)")
    rotations = tuple(float(a) for a in config.get("rotations", ())) or None
    backbone_state, head_state = _split_prefixed(model_state)
    img_size = state.get("img_size") or config.get("img_size")
    backbone, head = _build(config["model"], img_size, rotations, backbone_state, head_state, str(path))
    return _finish(
        backbone, head, device, model_name=config["model"], rotations=rotations, img_size=img_size,
        mean=state.get("mean"), std=state.get("std"), source=str(path), kind="checkpoint", run_dir=run_dir,
        info={"epoch": state.get("epoch"), "step": state.get("step")},
    )


def _load_exported(folder: Path, device) -> LoadedWeights:
    try:
        config = json.loads((folder / EXPORT_CONFIG).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{folder / EXPORT_CONFIG} is not readable JSON: {e}") from e
    name = config.get("architecture")
    if not name:
        raise WeightsError(f"{folder / EXPORT_CONFIG} names no 'architecture'; it is not a timm/rotnet export")
    tensors, meta = load_safetensors(folder / EXPORT_WEIGHTS)
    pcfg = config.get("pretrained_cfg", {})
    # timm records the build size of fixed-size models (ViTs) in model_args, as [H, W];
    # the size the weights were trained at is pretrained_cfg's input_size (C, H, W).
    build_size = (config.get("model_args") or {}).get("img_size")
    img_size = (pcfg.get("input_size") or [None])[-1]
    rotations, head_state = None, None
    if (folder / EXPORT_HEAD).is_file():
        head_tensors, head_meta = load_safetensors(folder / EXPORT_HEAD)
        rotations = tuple(_meta_json(head_meta, "rotations", [])) or None
        head_state = {k[len("head."):] if k.startswith("head.") else k: v for k, v in head_tensors.items()}
    backbone, head = _build(name, build_size, rotations, tensors, head_state, str(folder))
    return _finish(
        backbone, head, device, model_name=name, rotations=rotations, img_size=img_size,
        mean=pcfg.get("mean"), std=pcfg.get("std"), source=str(folder), kind="exported", info=meta,
    )


def load_weights(spec: str, device: torch.device | str = "cpu", seed: int = 0, img_size: int | None = None) -> LoadedWeights:
    """Resolve any weights spec rotnet accepts to a ready (eval-mode) backbone and head.

    Specs: a run directory, its checkpoint.pt or model.safetensors, an exported folder,
    ``timm:NAME`` (timm's pretrained weights; needs the hub) or ``random:NAME``.
    ``img_size`` builds ``timm:``/``random:`` models that need a fixed input size (ViTs) for
    that size, e.g. the size of the run they are compared with; saved weights know theirs.
    """
    text = str(spec)
    if text.startswith("random:") or text.startswith("timm:"):
        kind, name = text.split(":", 1)
        name = canonical_model_name(name)
        with torch.random.fork_rng(devices=[]):  # the same "random" baseline every time; the caller's RNG is untouched
            torch.manual_seed(seed)
            backbone = create_backbone(name, img_size=img_size, pretrained=(kind == "timm"))
        return _finish(backbone, None, device, model_name=name, rotations=None, source=text, kind=kind, img_size=img_size)

    path = Path(text).expanduser()
    if not path.exists():
        raise WeightsError(
            f"{path} does not exist; give a run directory, checkpoint.pt, .safetensors, an exported folder, "
            "timm:NAME or random:NAME"
        )
    if path.is_dir():
        if (path / EXPORT_CONFIG).is_file() and (path / EXPORT_WEIGHTS).is_file() and not (path / RUN_CHECKPOINT).exists():
            try:
                is_export = "architecture" in json.loads((path / EXPORT_CONFIG).read_text())
            except (OSError, json.JSONDecodeError):
                is_export = False
            if is_export:
                return _load_exported(path, device)
        if (path / RUN_WEIGHTS).is_file():
            return _load_rotnet_safetensors(path / RUN_WEIGHTS, device, kind="run", run_dir=path)
        if (path / RUN_CHECKPOINT).is_file():  # training stopped before the final weights
            loaded = _load_checkpoint_file(path / RUN_CHECKPOINT, device, run_dir=path)
            loaded.kind = "run"
            return loaded
        raise WeightsError(
            f"{path} is not a rotnet run directory or exported model (no model.safetensors, checkpoint.pt or config.json)"
        )
    if path.suffix == ".safetensors":
        run_dir = path.parent if (path.parent / RUN_CONFIG).is_file() and path.name == RUN_WEIGHTS else None
        return _load_rotnet_safetensors(path, device, kind="safetensors", run_dir=run_dir)
    run_dir = path.parent if (path.parent / RUN_CONFIG).is_file() and path.name == RUN_CHECKPOINT else None
    return _load_checkpoint_file(path, device, run_dir=run_dir)
