"""rotnet: RotNet self-supervised learning (Gidaris et al., ICLR 2018) for any timm backbone.

The Python API mirrors the CLI: build a config, call the function, read the result.

    from rotnet_cli import PretrainConfig, pretrain
    result = pretrain(PretrainConfig(model="resnet18", data="digits", epochs=5, out="runs/demo"))

Importing the package is cheap: torch and timm load on first use of a function, so the
CLI's --help stays fast.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from importlib import import_module
from typing import Any

from ._version import __version__
from .config import PretrainConfig
from .errors import RotnetError

# public name -> module that defines it (imported on first access)
_LAZY = {
    "pretrain": "pretraining",
    "PretrainResult": "pretraining",
    "load_weights": "models",
    "LoadedWeights": "models",
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
    "predict": "prediction",
    "PredictResult": "prediction",
    "PredictConfig": "config",
    "reproduce": "reproduction",
    "ReproduceConfig": "config",
}


class _RegisterModelsAfterTimm(importlib.abc.MetaPathFinder):
    """Registers rotnet's timm models (the paper's NIN) as soon as timm is imported.

    ``import rotnet_cli`` must stay cheap (the CLI's --help never loads torch), yet
    ``timm.create_model("rotnet_nin4")`` should work after it. So the registration waits
    for timm's own import and runs right after it.
    """

    def find_spec(self, name, path, target=None):
        if name != "timm":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec("timm")
        if spec is None or spec.loader is None:
            return spec
        exec_timm = spec.loader.exec_module

        def exec_module(module):
            exec_timm(module)
            import_module(".nin", __name__)

        spec.loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


if "timm" in sys.modules:
    import_module(".nin", __name__)
elif not any(isinstance(f, _RegisterModelsAfterTimm) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterModelsAfterTimm())


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'rotnet_cli' has no attribute {name!r}")


__all__ = ["__version__", "PretrainConfig", "RotnetError", *_LAZY]
