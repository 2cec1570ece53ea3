"""timm backbone + rotation head, and stage features.

The backbone is ``timm.create_model(name, num_classes=0)`` and the rotation head a
separate ``Linear(num_features, R)``, so the backbone's state dict has exactly timm's keys
and exports load into timm strictly. Only timm's uniform API is used; nothing here
branches on an architecture name. Loading saved weights is weights.py's work.
"""

from __future__ import annotations

import difflib
from importlib import import_module
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, ModelError, WeightsError


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


def rotation_head(backbone: nn.Module, num_rotations: int) -> nn.Linear:
    """The rotation classifier on the backbone's pooled features: (N, width) -> (N, R)."""
    return nn.Linear(backbone.num_features, num_rotations)


class RotNet(nn.Module):
    """Backbone + rotation head. ``forward``: (N, 3, H, W) -> rotation logits (N, R)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def normalises_over_batch(model: nn.Module) -> bool:
    """Whether training mode normalises over the batch (any BatchNorm; timm's BatchNormAct2d is one too)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


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
