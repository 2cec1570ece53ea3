"""The one weight loader: every weights spec a command accepts, to a ready backbone (and head).

Specs: a run directory, its checkpoint.pt or model.safetensors, a kept checkpoint of a run
(``RUN:best``, ``RUN:epoch-12``, or the path ``RUN/checkpoints/epoch-12[.safetensors]``), an
exported folder (or its model.safetensors), ``timm:NAME`` (timm's pretrained weights: the hub,
or its local cache when the hub is out of reach) and ``random:NAME`` (the baseline). A safetensors file says what it is through the format marker
in its metadata (see rundir/metadata.py); a folder is what its model.safetensors says it is, or a
run that stopped before its final weights when it holds only checkpoint.pt.
"""

from __future__ import annotations

import socket
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import rundir
from .checkpoint import load_safetensors
from .errors import ModelError, WeightsError
from .models import RotNet, canonical_model_name, create_backbone, data_config, rotation_head


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
    info: dict[str, Any] = field(default_factory=dict)  # the file's metadata (decoded), or the checkpoint's position

    def rotnet(self) -> RotNet:
        """Backbone and head as one module (needs a head)."""
        if self.head is None or self.rotations is None:
            raise WeightsError(
                f"{self.source} has no rotation head; use a run directory, its model.safetensors, "
                "or an export made with --with-head"
            )
        return RotNet(self.backbone, self.head)


def load_weights(
    spec: str, device: torch.device | str = "cpu", seed: int = 0, img_size: int | None = None
) -> LoadedWeights:
    """Resolve any weights spec rotnet accepts to a ready (eval-mode) backbone and head.

    ``img_size`` builds ``timm:``/``random:`` models that need a fixed input size (ViTs) for
    that size, e.g. the size of the run they are compared with; saved weights know theirs.
    """
    text = str(spec)
    if text.startswith("random:") or text.startswith("timm:"):
        kind, name = text.split(":", 1)
        name = canonical_model_name(name)
        with torch.random.fork_rng(devices=[]):  # the same "random" baseline every time; the caller's RNG is untouched
            torch.manual_seed(seed)
            backbone = (
                _pretrained_backbone(name, img_size) if kind == "timm" else create_backbone(name, img_size=img_size)
            )
        return _finish(
            backbone, None, device, model_name=name, rotations=None, source=text, kind=kind, img_size=img_size
        )

    path = kept_checkpoint_path(text) or Path(text).expanduser()
    if not path.exists():
        raise WeightsError(
            f"{path} does not exist; give a run directory, checkpoint.pt, .safetensors, an exported folder, "
            "timm:NAME or random:NAME"
        )
    if path.is_dir():
        weights = path / rundir.WEIGHTS
        if weights.is_file():
            if rundir.weights_format(weights) == rundir.EXPORT_FORMAT:
                return _load_exported(path, device)
            return _load_safetensors(weights, device, kind="run")
        if (path / rundir.CHECKPOINT).is_file():  # training stopped before the final weights
            loaded = _load_checkpoint(path / rundir.CHECKPOINT, device)
            loaded.kind = "run"
            return loaded
        if (path / rundir.REPLACED).is_dir():
            raise WeightsError(
                f"{path}: the run that --overwrite started there has no checkpoint yet (it is starting, or it was "
                f"stopped); the run it replaces is kept in {path / rundir.REPLACED}, and if the new run was stopped, the "
                f"next rotnet pretrain on this folder puts it back (e.g. rotnet pretrain --resume {path})"
            )
        raise WeightsError(
            f"{path} is not a rotnet run directory or exported model (no model.safetensors, checkpoint.pt or config.json)"
        )
    if path.suffix == ".safetensors":
        return _load_safetensors(path, device, kind="safetensors")
    return _load_checkpoint(path, device)


def kept_checkpoint_path(spec: str) -> Path | None:
    """The file of a kept checkpoint spec (RUN:best, RUN:epoch-12, RUN/checkpoints/epoch-12), None for other specs.

    A path that exists as written is always itself (a folder may have ':' in its name); ``RUN:NAME`` needs
    RUN to be a run directory, and a NAME it does not keep is a WeightsError listing the kept ones.
    """
    path = Path(spec).expanduser()
    if path.exists():
        return None
    if path.parent.name == rundir.CHECKPOINTS and path.with_name(path.name + ".safetensors").is_file():
        return path.with_name(path.name + ".safetensors")
    run, sep, name = spec.rpartition(":")
    run_path = Path(run).expanduser()
    if not sep or not name or not (run_path / rundir.CONFIG).is_file():
        return None
    kept = rundir.kept_checkpoint(run_path, name)
    if not kept.is_file() and rundir.folder_kind(run_path) == "export":
        raise WeightsError(  # an export holds one set of weights: kept checkpoints stay in the run it came from
            f"{run} is an export, which keeps no checkpoints; give the export itself ({run}), or the run it came "
            f"from as RUN:{name}"
        )
    if not kept.is_file():
        names = rundir.kept_checkpoint_names(run_path)
        have = f"it keeps {', '.join(f'{run}:{n}' for n in names)}" if names else "it keeps none"
        raise WeightsError(
            f"{run} has no kept checkpoint {name!r} ({have}); rotnet pretrain --keep-checkpoints N keeps the last N "
            "epochs, and the best one by --best-metric"
        )
    return kept


# ----------------------------------------------------------------------------- timm's pretrained weights


def _pretrained_backbone(name: str, img_size: int | None) -> nn.Module:
    """timm's pretrained weights for ``name``: through the Hugging Face hub, or from its local
    cache alone when the hub is out of reach (one quick line rather than a minute of retries)."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        arch = timm.models.split_model_name_tag(name)[0]
        tags = timm.list_pretrained(f"{arch}.*")
        hint = f"; timm has these: {', '.join(tags[:5])}" if tags else ""
        raise WeightsError(f"timm has no pretrained weights for {name}; compare with random:{arch}{hint}")
    if _hub_reachable():
        return create_backbone(name, img_size=img_size, pretrained=True)
    from huggingface_hub import constants

    offline, constants.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE, True  # what HF_HUB_OFFLINE=1 does, for this load only
    why = "HF_HUB_OFFLINE is set" if offline else "the Hugging Face hub is out of reach"
    try:
        return create_backbone(name, img_size=img_size, pretrained=True)
    except WeightsError as e:
        raise WeightsError(
            f"{why} and the local cache ({constants.HF_HUB_CACHE}) holds no timm weights for {name}; "
            f"connect to the internet, point HF_HOME at a cache that holds them, or compare with random:{name}"
        ) from e
    finally:
        constants.HF_HUB_OFFLINE = offline


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (offline mode: no)."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return False
    if urllib.request.getproxies().get("https"):
        return True  # only the proxy knows: let the hub client try
    endpoint = urllib.parse.urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((endpoint.hostname, endpoint.port or 443), timeout=timeout).close()
    except OSError:  # no route, no DNS, refused or timed out
        return False
    return True


# ----------------------------------------------------------------------------- one loader per form


def _load_safetensors(path: Path, device, kind: str) -> LoadedWeights:
    """A run's model.safetensors (backbone.* and head.*) or an export's (the backbone's own keys)."""
    tensors, raw = load_safetensors(path)
    meta = rundir.read_weights_metadata(path, raw)
    marker = meta[rundir.FORMAT_KEY]
    if marker == rundir.HEAD_FORMAT:
        raise WeightsError(f"{path} holds only a rotation head; give the exported folder it belongs to")
    rotations = meta.get("rotations")
    if marker == rundir.RUN_FORMAT:
        backbone_state, head_state = _split_prefixed(tensors)
    else:
        backbone_state, head_state = tensors, {}
    img_size = meta.get("img_size")
    backbone, head = _build(meta["model"], img_size, rotations, backbone_state, head_state, str(path))
    run_dir = rundir.run_dir_of(path) if marker == rundir.RUN_FORMAT else None
    return _finish(
        backbone,
        head,
        device,
        model_name=meta["model"],
        rotations=rotations,
        img_size=img_size,
        mean=meta.get("mean"),
        std=meta.get("std"),
        source=str(path),
        kind=kind,
        run_dir=run_dir,
        info=meta,
    )


def _load_checkpoint(path: Path, device) -> LoadedWeights:
    try:
        state = rundir.read_checkpoint(path)  # every field checked
    except WeightsError:
        raise
    except Exception as e:  # torch's unpickler trips over foreign bytes in its own ways (KeyError, struct.error, ...)
        raise WeightsError(
            f"{path} is not a checkpoint (torch.load failed: {type(e).__name__}); give a run directory, "
            "checkpoint.pt, .safetensors file or an exported folder"
        ) from e
    config = state["run_config"]
    rotations = config.rotations
    backbone_state, head_state = _split_prefixed(state["model"])
    img_size = state.get("img_size")
    backbone, head = _build(config.model, img_size, rotations, backbone_state, head_state, str(path))
    return _finish(
        backbone,
        head,
        device,
        model_name=config.model,
        rotations=rotations,
        img_size=img_size,
        mean=state.get("mean"),
        std=state.get("std"),
        source=str(path),
        kind="checkpoint",
        run_dir=rundir.run_dir_of(path),
        info={"epoch": state.get("epoch"), "step": state.get("step")},
    )


def _load_exported(folder: Path, device) -> LoadedWeights:
    """An exported folder, read as timm reads it (config.json), plus the optional rotation head."""
    config = rundir.read_export_config(folder)  # every field checked; a missing file is named as such
    name = config["architecture"]
    tensors, raw = load_safetensors(folder / rundir.EXPORT_WEIGHTS)
    meta = rundir.read_weights_metadata(folder / rundir.EXPORT_WEIGHTS, raw)
    # timm records the build size of fixed-size models (ViTs) in model_args, as [H, W];
    # the size the weights were trained at is pretrained_cfg's input_size (C, H, W).
    rotations, head_state = None, None
    if (folder / rundir.EXPORT_HEAD).is_file():
        head_tensors, head_raw = load_safetensors(folder / rundir.EXPORT_HEAD)
        rotations = rundir.read_weights_metadata(folder / rundir.EXPORT_HEAD, head_raw)["rotations"]
        head_state = head_tensors
    backbone, head = _build(name, config["build_size"], rotations, tensors, head_state, str(folder))
    return _finish(
        backbone,
        head,
        device,
        model_name=name,
        rotations=rotations,
        img_size=config["img_size"],
        mean=config["mean"],
        std=config["std"],
        source=str(folder),
        kind="exported",
        info=meta,
    )


# ----------------------------------------------------------------------------- shared steps


def _split_prefixed(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A RotNet state dict -> (backbone's, head's), each with its own keys."""
    backbone = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    head = {k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")}
    return backbone, head


def _build(
    model_name: str,
    img_size: int | list[int] | None,
    rotations: tuple[float, ...] | None,
    backbone_state: dict[str, torch.Tensor],
    head_state: dict[str, torch.Tensor] | None,
    source: str,
) -> tuple[nn.Module, nn.Linear | None]:
    check_finite_weights({**backbone_state, **(head_state or {})}, source)
    try:
        backbone = create_backbone(model_name, img_size=img_size)
    except ModelError as e:  # the name came from the file: say so
        raise WeightsError(f"{source} names the model {model_name!r}, which cannot be built here ({e})") from None
    load_state_dict_strict(backbone, backbone_state, source, model_name)
    head = None
    if head_state and rotations:
        head = rotation_head(backbone, len(rotations))
        load_state_dict_strict(head, head_state, source, f"the rotation head ({len(rotations)} rotations)")
    return backbone, head


def nonfinite_tensors(state: dict[str, torch.Tensor]) -> list[str]:
    """The names of the floating-point tensors of ``state`` that hold NaN or infinity (none: one host read)."""
    tensors = {k: v for k, v in state.items() if v.is_floating_point()}
    if not tensors or bool(torch.stack([torch.isfinite(v).all() for v in tensors.values()]).all()):
        return []
    return [k for k, v in tensors.items() if not bool(torch.isfinite(v).all())]


def check_finite_weights(state: dict[str, torch.Tensor], source: str) -> None:
    """Weights with NaN or infinity come from a diverged run: nothing computed from them means anything."""
    bad = nonfinite_tensors(state)
    if bad:
        raise WeightsError(
            f"{source} holds NaN or infinite weights ({len(bad)} tensor(s), e.g. {bad[0]}): it comes from a diverged "
            "run; use an earlier checkpoint, or train again with a lower --lr"
        )


def load_state_dict_strict(module: nn.Module, state: dict[str, torch.Tensor], source: str, model_name: str) -> None:
    """A strict load whose failure is one line naming up to five missing/unexpected/reshaped keys.

    torch reports missing and unexpected keys (as the module itself counts them); tensors of
    another shape are taken out first, because torch raises on them before it reports anything.
    """
    own = module.state_dict()
    wrong_shape = [k for k, v in state.items() if k in own and v.shape != own[k].shape]
    report = module.load_state_dict({k: v for k, v in state.items() if k not in wrong_shape}, strict=False)
    if report.missing_keys or report.unexpected_keys or wrong_shape:
        parts = []
        if report.missing_keys:
            parts.append(f"{len(report.missing_keys)} missing ({', '.join(report.missing_keys[:5])})")
        if report.unexpected_keys:
            parts.append(f"{len(report.unexpected_keys)} unexpected ({', '.join(report.unexpected_keys[:5])})")
        if wrong_shape:
            shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong_shape[:5]]
            parts.append(f"{len(wrong_shape)} with other shapes ({', '.join(shapes)})")
        raise WeightsError(f"weights in {source} do not fit {model_name}: " + "; ".join(parts))


def _finish(backbone: nn.Module, head: nn.Linear | None, device: torch.device | str, **fields_: Any) -> LoadedWeights:
    """Move to ``device``, eval mode, and fill in what the file did not say from timm's data config."""
    backbone.to(device).eval()
    if head is not None:
        head.to(device).eval()
    cfg = data_config(backbone)
    img_size = fields_.pop("img_size", None) or int(cfg["input_size"][-1])
    mean = tuple(fields_.pop("mean", None) or cfg["mean"])
    std = tuple(fields_.pop("std", None) or cfg["std"])
    return LoadedWeights(backbone=backbone, head=head, img_size=int(img_size), mean=mean, std=std, **fields_)


__all__ = ["load_weights", "LoadedWeights", "load_state_dict_strict", "kept_checkpoint_path"]
