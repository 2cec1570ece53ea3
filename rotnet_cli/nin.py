"""Network-In-Network (NIN) backbones for RotNet, registered as timm models.

The architecture is the CIFAR-10 NIN used in

    Spyros Gidaris, Praveer Singh, Nikos Komodakis.
    "Unsupervised Representation Learning by Predicting Image Rotations". ICLR 2018.
    https://arxiv.org/abs/1803.07728

following the authors' official implementation (``architectures/NetworkInNetwork.py`` in
github.com/gidariss/FeatureLearningRotNet). Three variants are registered, named by their number of
blocks (each block = three conv-BN-ReLU layers): ``rotnet_nin3``, ``rotnet_nin4``, ``rotnet_nin5``.

Importing this module registers them, after which the usual timm API applies::

    import rotnet_cli.nin  # noqa: F401  (registers the models)
    model = timm.create_model('rotnet_nin4', num_classes=0)
    feats = model.forward_intermediates(x, intermediates_only=True)  # one NCHW map per block

Feature shapes on a 32x32 input: block 1 -> 96x16x16, blocks 2+ -> 192x8x8.
"""

import math
from typing import Any

import torch
from timm.layers import SelectAdaptivePool2d
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint_seq
from torch import nn

__all__ = ["NetworkInNetwork"]  # register_model appends the model entrypoint names

# CIFAR-10 per-channel statistics: the paper trains and evaluates the NIN on CIFAR-10.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


class ConvBnAct(nn.Module):
    """Conv2d (no bias) -> BatchNorm2d -> ReLU with "same" padding, the NIN's only layer type.

    The conv has no bias because the BatchNorm right after it has its own shift (as in the official code).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, padding=(kernel_size - 1) // 2, bias=False, **dd)
        self.bn = nn.BatchNorm2d(out_chs, **dd)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class NinHead(nn.Module):
    """Global pool -> dropout -> Linear, or Identity in place of the Linear when ``num_classes == 0``.

    A small local head rather than ``timm.layers.ClassifierHead``, whose constructor and ``reset`` arguments
    changed across the timm 1.0.x releases this package supports.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool_type: str = "avg",
        drop_rate: float = 0.0,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.drop = nn.Dropout(drop_rate)
        self.reset(num_classes, pool_type, device=device, dtype=dtype)

    def reset(
        self,
        num_classes: int,
        pool_type: str | None = None,
        in_features: int | None = None,
        device=None,
        dtype=None,
    ) -> None:
        """Rebuild pooling (kept if ``pool_type`` is None) and classifier; '' pool_type = no pooling."""
        if in_features is not None:
            self.in_features = in_features
        if pool_type is None:
            pool_type = self.global_pool.pool_type
        # (B, C, H, W) -> (B, C * feat_mult); without pooling the map is passed through unflattened
        self.global_pool = SelectAdaptivePool2d(pool_type=pool_type, flatten=bool(pool_type))
        self.num_features = self.in_features * self.global_pool.feat_mult()
        if num_classes > 0:
            self.fc = nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)
        else:
            self.fc = nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.drop(self.global_pool(x))
        return x if pre_logits else self.fc(x)


def _block_layout(num_blocks: int) -> list[tuple[tuple[tuple[int, int], ...], str | None]]:
    """Per block: ((kernel_size, out_chs) for its three convs, pooling after the convs or None).

    Straight from the official NetworkInNetwork.py; the final width (192) is the model's num_features.
    """
    layout = [
        (((5, 192), (1, 160), (1, 96)), "max"),
        (((5, 192), (1, 192), (1, 192)), "avg"),
    ]
    layout += [(((3, 192), (1, 192), (1, 192)), None)] * (num_blocks - 2)
    return layout


class NetworkInNetwork(nn.Module):
    """Gidaris et al.'s CIFAR NIN with timm's classification-model API.

    ``blocks[i]`` is an ``nn.Sequential`` of three ``ConvBnAct`` followed, for blocks 0 and 1, by a
    3x3 stride-2 pooling (max, then average), as in the official code (NetworkInNetwork.py l. 49 and 55:
    each pool ends its block), so the per-block features are the official ``conv1`` ... ``conv4``
    (96x16x16, then 192x8x8 on 32x32 input). The 4- and 5-block models have no pool after block 3, as the
    official RotNet configs (``use_avg_on_conv3: False``, config/CIFAR10_RotNet_NIN4blocks.py l. 28).

    ``weight_init``: 'official' (default) is what the official code runs, 'he' what its unused
    ``weight_initialization`` would do; see ``_init_official`` and ``_init_he``.
    """

    def __init__(
        self,
        num_blocks: int = 4,
        num_classes: int = 10,
        in_chans: int = 3,
        global_pool: str = "avg",
        drop_rate: float = 0.0,
        weight_init: str = "official",
        device=None,
        dtype=None,
    ):
        """
        Args:
            num_blocks: Number of conv blocks (the paper evaluates 3, 4 and 5); at least 2, the two pooling blocks.
            num_classes: Classifier outputs; 0 replaces the classifier with nn.Identity.
            in_chans: Input image channels.
            global_pool: Global pooling type of the head (timm's names; 'avg' in the paper).
            drop_rate: Dropout before the classifier.
            weight_init: 'official' (PyTorch 0.2's defaults, what the official code trains from) or 'he'.
        """
        super().__init__()
        if num_blocks < 2:
            raise ValueError(f"NetworkInNetwork needs at least 2 blocks, got num_blocks={num_blocks}")
        if weight_init not in _INITS:
            raise ValueError(f"weight_init must be one of {', '.join(_INITS)}, got {weight_init!r}")
        self.weight_init = weight_init
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.drop_rate = drop_rate
        self.grad_checkpointing = False

        blocks = []
        self.feature_info = []
        prev_chs = in_chans
        reduction = 1
        for block_idx, (convs, pool) in enumerate(_block_layout(num_blocks)):
            layers: list[nn.Module] = []
            for kernel_size, out_chs in convs:
                layers.append(ConvBnAct(prev_chs, out_chs, kernel_size, **dd))
                prev_chs = out_chs
            if pool == "max":
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2, padding=1))  # H -> H/2
                reduction *= 2
            elif pool == "avg":
                layers.append(nn.AvgPool2d(kernel_size=3, stride=2, padding=1))  # H -> H/2
                reduction *= 2
            blocks.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=prev_chs, reduction=reduction, module=f"blocks.{block_idx}"))
        self.blocks = nn.Sequential(*blocks)
        self.num_features = self.head_hidden_size = prev_chs  # 192

        # (B, 192, H/4, W/4) -> global pool (B, 192) -> dropout -> fc (B, num_classes)
        self.head = NinHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate, **dd)

        self.apply(_INITS[weight_init])

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups for layer-wise LR decay: block 0 is the stem, then one group per later block
        (per conv when not coarse); the head lands in the last group."""
        return dict(
            stem=r"^blocks\.0\.",
            blocks=r"^blocks\.(\d+)" if coarse else r"^blocks\.(\d+)\.(\d+)",
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in backward instead of storing them."""
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the classifier with a freshly initialised one with ``num_classes`` outputs (0 = Identity)."""
        first_param = next(self.parameters())
        self.num_classes = num_classes
        self.head.reset(
            num_classes,
            global_pool,
            in_features=self.num_features,
            device=first_param.device,
            dtype=first_param.dtype,
        )
        self.head_hidden_size = self.head.num_features
        self.head.apply(_INITS[self.weight_init])  # the same init as at construction

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward features and return the output of selected blocks.

        Args:
            x: Input images (B, C, H, W).
            indices: Take the last n blocks if int, all if None, the given (possibly negative) block indices
                if a sequence.
            norm: Accepted for API parity; the NIN has no final norm layer, so it changes nothing.
            stop_early: Stop running blocks after the last requested one.
            output_fmt: Only 'NCHW' is supported.
            intermediates_only: Return only the list of intermediate features.

        Returns:
            The list of block outputs (block 0: (B, 96, H/2, W/2), later: (B, 192, H/4, W/4)), or
            (final features, that list).
        """
        assert output_fmt in ("NCHW",), "Output shape must be NCHW."
        intermediates = []
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)

        if torch.jit.is_scripting() or not stop_early:  # can't slice blocks in torchscript
            blocks = self.blocks
        else:
            blocks = self.blocks[: max_index + 1]
        for feat_idx, block in enumerate(blocks):
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint_seq(block, x)  # per block, as forward_features
            else:
                x = block(x)
            if feat_idx in take_indices:
                intermediates.append(x)

        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self,
        indices: int | list[int] = 1,
        prune_norm: bool = False,
        prune_head: bool = True,
    ) -> list[int]:
        """Drop the blocks after the last one needed for ``indices`` (and the classifier if asked).

        Returns:
            The absolute indices of the kept intermediates.
        """
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        prune_end = max_index < len(self.blocks) - 1
        self.blocks = self.blocks[: max_index + 1]
        if prune_end:
            # features now end at the last kept block; the head was sized for the old final features
            self.num_features = self.head_hidden_size = self.feature_info[max_index]["num_chs"]
        if prune_head or prune_end:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_chans, H, W) -> (B, 192, H/4, W/4)."""
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return checkpoint_seq(self.blocks, x)
        return self.blocks(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, 192, h, w) -> pooled (B, 192) if ``pre_logits`` else logits (B, num_classes)."""
        return self.head(x, pre_logits=True) if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def _init_official(module: nn.Module) -> None:
    """What the official code trains from. Its ``weight_initialization`` (NetworkInNetwork.py l. 125-138) is
    defined but never called, so every layer keeps the default of the PyTorch it was tested with (0.2.0,
    its README l. 30): conv and linear weights U(-1/sqrt(fan_in), 1/sqrt(fan_in)) and linear biases alike,
    which are today's defaults too, and BatchNorm weights U(0, 1), bias 0: PyTorch's default until 1.0
    (pytorch/pytorch#12259), set here by hand because today's default is 1."""
    if isinstance(module, nn.BatchNorm2d):
        nn.init.uniform_(module.weight, 0.0, 1.0)
        nn.init.zeros_(module.bias)


def _init_he(module: nn.Module) -> None:
    """The official file's unused ``weight_initialization``: He-normal convs (fan_out = k*k*out_channels),
    BN as identity, zero Linear bias (the Linear weight keeps PyTorch's default)."""
    if isinstance(module, nn.Conv2d):
        fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
        nn.init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


_INITS = {"official": _init_official, "he": _init_he}


def _create_nin(variant: str, num_blocks: int, pretrained: bool = False, **kwargs) -> NetworkInNetwork:
    return build_model_with_cfg(
        NetworkInNetwork,
        variant,
        pretrained,
        # features_only: blocks.N are the feature taps, so FeatureListNet must look one Sequential deep,
        # and by default it returns every block (timm's default 0..4 would not exist for nin3).
        feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(num_blocks))),
        num_blocks=num_blocks,
        **kwargs,
    )


def _cfg(**kwargs) -> dict[str, Any]:
    # No url / hf_hub_id: no pretrained weights are published in timm format, so pretrained=True errors out.
    return {
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (8, 8),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "first_conv": "blocks.0.0.conv",
        "classifier": "head.fc",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "rotnet_nin3": _cfg(),
        "rotnet_nin4": _cfg(),
        "rotnet_nin5": _cfg(),
    }
)


@register_model
def rotnet_nin3(pretrained: bool = False, **kwargs) -> NetworkInNetwork:
    """NIN with 3 blocks (Gidaris et al., 2018)."""
    return _create_nin("rotnet_nin3", num_blocks=3, pretrained=pretrained, **kwargs)


@register_model
def rotnet_nin4(pretrained: bool = False, **kwargs) -> NetworkInNetwork:
    """NIN with 4 blocks (Gidaris et al., 2018), the paper's main CIFAR-10 RotNet model."""
    return _create_nin("rotnet_nin4", num_blocks=4, pretrained=pretrained, **kwargs)


@register_model
def rotnet_nin5(pretrained: bool = False, **kwargs) -> NetworkInNetwork:
    """NIN with 5 blocks (Gidaris et al., 2018)."""
    return _create_nin("rotnet_nin5", num_blocks=5, pretrained=pretrained, **kwargs)
