"""rotnet: RotNet self-supervised learning (Gidaris et al., ICLR 2018) for any timm backbone.

The Python API mirrors the CLI: build a config, call the function, read the result.

    from rotnet_cli import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(model="resnet18", data="digits", epochs=5, out="runs/demo"))

Importing the package is cheap: torch and timm load on first use of a function, so the
CLI's --help stays fast. The paper's NIN models (``rotnet_nin3/4/5``) are timm models that
every rotnet function can build; to build them with timm directly, ``import rotnet_cli.nin``
first (it registers them with timm).
"""

from __future__ import annotations

from importlib import import_module

from ._version import __version__

# public name -> module that defines it (imported on first access: importing the package, as the
# `rotnet` command does first, runs almost nothing, so a Ctrl-C then lands where the CLI handles it)
_LAZY = {
    "PretrainConfig": "config",
    "RotnetError": "errors",
    "pretrain": "pretraining",
    "PretrainResult": "pretraining",
    "load_weights": "weights",
    "LoadedWeights": "weights",
    "create_backbone": "models",
    "export": "exporting",
    "ExportResult": "exporting",
    "ExportConfig": "config",
    "probe": "probing",
    "ProbeResult": "probing",
    "ProbeConfig": "config",
    "draw_filters": "viz",
    "draw_attention": "viz",
    "draw_curves": "viz",
    "FiltersConfig": "config",
    "AttentionConfig": "config",
    "CurvesConfig": "config",
    "embed": "embedding",
    "EmbedResult": "embedding",
    "EmbedConfig": "config",
    "read_embeddings": "embedding",
    "EmbeddingTable": "embedding",
    "neighbours": "similarity",
    "NeighboursResult": "similarity",
    "NeighboursConfig": "config",
    "draw_embedding_map": "embedding_map",
    "EmbeddingMapResult": "embedding_map",
    "EmbeddingMapConfig": "config",
    "predict": "prediction",
    "PredictResult": "prediction",
    "PredictConfig": "config",
    "score": "scoring",
    "ScoreResult": "scoring",
    "ScoreConfig": "config",
    "read_scores": "scoring",
    "draw_outliers": "outlier_sheet",
    "OutliersSheetConfig": "config",
    "reproduce": "reproduction",
    "ReproduceConfig": "config",
    "train_supervised": "supervised",
    "SupervisedResult": "supervised",
    "SupervisedConfig": "config",
}


def __getattr__(name: str):  # -> the public object (no typing import: this runs before the CLI's Ctrl-C guard)
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rotnet_cli' has no attribute {name!r}")


__all__ = ["__version__", *_LAZY]
