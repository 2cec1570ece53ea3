"""timm backbone + rotation head, and stage features.

The backbone is ``timm.create_model(name, num_classes=0)`` and the rotation head a
separate ``Linear(feature_width, R)`` (timm's ``head_hidden_size``), so the backbone's state dict has exactly timm's keys
and exports load into timm strictly. Only timm's uniform API is used; nothing here
branches on an architecture name. Loading saved weights is weights.py's work.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from importlib import import_module
from typing import Any

import torch
from torch import nn

from .errors import ConfigError, InputSizeError, ModelError, WeightsError


def canonical_model_name(name: str) -> str:
    """'timm/resnet18.a1_in1k' -> 'resnet18.a1_in1k'; unknown names fail with suggestions."""
    import timm

    _register_builtin_models()
    text = name.strip()
    if text.startswith("timm/"):
        text = text[len("timm/") :]
    arch = timm.models.split_model_name_tag(text)[0]
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.6)
        hint = (
            f"; did you mean {', '.join(close)}?"
            if close
            else "; list models with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
        )
        raise ModelError(f"unknown timm model {name!r}{hint}")
    return text


def _register_builtin_models() -> None:
    """rotnet's own timm models (the paper's NIN) register on import."""
    import_module(".nin", __package__)


def create_backbone(
    name: str, img_size: int | list[int] | None = None, pretrained: bool = False, **kwargs: Any
) -> nn.Module:
    """A headless timm model (``num_classes=0``), checked to run on ``img_size`` images:
    ``model(x)`` gives pooled (N, feature_width(model)) features.

    A model whose constructor takes ``img_size`` (ViT, Swin, ... : timm sizes their position
    embeddings and windows from it) is built for the run's size; any other model is built as
    timm defines it and must run on that size as it is. A size the model cannot take is an
    InputSizeError naming the size timm defines it for; nothing here branches on names.
    """
    import timm

    name = canonical_model_name(name)
    if isinstance(img_size, (list, tuple)):  # timm records the build size of an export as [H, W]
        img_size = int(img_size[-1])
    default_size = model_default_size(name)
    size_args = {}
    if img_size is not None and img_size != default_size:
        if takes_img_size(name):
            size_args = {"img_size": img_size}
        elif _fixed_input_size(name):
            raise InputSizeError(
                f"{name} takes only {default_size} px input (timm builds it for that size alone); use --img-size {default_size}",
                size=default_size,
            )
    try:
        backbone = timm.create_model(name, num_classes=0, pretrained=pretrained, **size_args, **kwargs)
    except (RuntimeError, ValueError, OSError, AssertionError) as e:
        if pretrained:
            raise WeightsError(
                f"could not get timm's pretrained weights for {name} from the Hugging Face hub ({type(e).__name__}); "
                f"connect to the internet, point HF_HOME at a cache that holds them, or compare with random:{name}"
            ) from e
        if size_args:  # the constructor refused the size (a patch or window size that does not divide it...)
            raise InputSizeError(_size_message(name, img_size, default_size, e), size=default_size) from e
        raise ModelError(f"timm could not build {name!r}: {_first_line(e)}") from e
    check_input_size(backbone, name, img_size or default_size, default_size)
    return backbone


def feature_width(backbone: nn.Module) -> int:
    """The width of what the headless model returns, the rotation head's input.

    timm calls it ``head_hidden_size``: wider than ``num_features`` when a conv head or a
    pre-logits MLP follows the pooling (MobileNetV3, GhostNet, VGG, EfficientViT...).
    """
    return int(getattr(backbone, "head_hidden_size", None) or backbone.num_features)


@torch.no_grad()
def check_input_size(backbone: nn.Module, name: str, img_size: int, default_size: int) -> None:
    """One forward pass of a blank image: the model runs on ``img_size`` and returns
    (1, feature_width) pooled features, or this says which size it needs."""
    was_training = backbone.training
    backbone.eval()  # no batch statistics from a single blank image, no dropout
    try:
        out = backbone(torch.zeros(1, 3, img_size, img_size))
    except (RuntimeError, ValueError, AssertionError, IndexError) as e:  # timm asserts sizes; convs and reshapes raise
        raise InputSizeError(_size_message(name, img_size, default_size, e), size=default_size) from e
    finally:
        backbone.train(was_training)
    if tuple(out.shape) != (1, feature_width(backbone)):
        raise ModelError(
            f"{name} without its classifier returns {tuple(out.shape)} per image, not pooled features of "
            f"{feature_width(backbone)} (its head_hidden_size); rotnet needs timm's pooled output"
        )


def _size_message(name: str, img_size: int, default_size: int, error: BaseException) -> str:
    if img_size == default_size:
        return f"timm's {name} does not run on its own input size {default_size} px: {_first_line(error)}"
    return (
        f"{name} cannot run on {img_size} px images ({_first_line(error)}); "
        f"use --img-size {default_size}, the size timm defines it for"
    )


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:160]}" if lines else type(error).__name__


def model_default_size(name: str) -> int:
    """The input size timm defines the model (and its pretrained tag) for: pretrained_cfg's input_size."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name) or timm.models.get_pretrained_cfg(
        timm.models.split_model_name_tag(name)[0]
    )
    return int(cfg.input_size[-1]) if cfg is not None else 224


def takes_only_default_size(name: str) -> bool:
    """Whether the model runs on timm's input size for it alone (no img_size argument, a fixed size)."""
    name = canonical_model_name(name)
    return not takes_img_size(name) and _fixed_input_size(name)


def _fixed_input_size(name: str) -> bool:
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return bool(cfg is not None and cfg.fixed_input_size)


@functools.cache
def takes_img_size(name: str) -> bool:
    """Whether the model's class takes an ``img_size`` argument (its own or a parent's, through **kwargs).

    The class is known only once built; building on the meta device allocates nothing.
    """
    import timm

    try:
        with torch.device("meta"):
            cls = type(timm.create_model(name, num_classes=0))
    except Exception:  # a model that insists on real tensors while it is built
        cls = type(timm.create_model(name, num_classes=0))
    for klass in cls.__mro__:
        if klass is nn.Module:
            break
        params = inspect.signature(klass.__init__).parameters
        if "img_size" in params:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            break  # no **kwargs: nothing reaches a parent's arguments
    return False


def rotation_head(backbone: nn.Module, num_rotations: int) -> nn.Linear:
    """The rotation classifier on the backbone's pooled features: (N, feature_width) -> (N, R)."""
    return nn.Linear(feature_width(backbone), num_rotations)


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
