"""The ONNX column of docs/compatibility.md: rotnet export --format onnx for a handful of timm families.

Each model with random weights (random:NAME) at its own input size goes through the export, which
checks onnxruntime against PyTorch on random and real images; one JSON line per model:
{"family", "model", "ok", "max_abs_diff" or "error", "seconds"}. Run:

    python tools/onnx_families.py > tools/onnx_families.jsonl    # then tools/compat_sweep.py puts it in its onnx column
    python tools/onnx_families.py MODEL ...
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import timm

from rotnet_cli.config import ExportConfig
from rotnet_cli.errors import RotnetError
from rotnet_cli.exporting import export

MODELS = [
    "resnet18",
    "convnext_atto",
    "efficientnet_b0",
    "mobilenetv3_small_050",
    "vit_tiny_patch16_224",
    "deit_tiny_patch16_224",
    "regnetx_002",
    "densenet121",
    "efficientvit_b0",
    "fastvit_t8",
]


def check(model: str) -> dict:
    family = timm.models.model_entrypoint(model).__module__.rsplit(".", 1)[-1]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rotnet-onnx-families-") as tmp:
        try:
            result = export(ExportConfig(weights=f"random:{model}", out=str(Path(tmp) / "out"), format="onnx"))
            row = {"ok": True, "max_abs_diff": max(result.onnx["max_abs_diff"].values())}
        except RotnetError as e:
            row = {"ok": False, "error": str(e)}
    return {"family": family, "model": model, **row, "seconds": round(time.perf_counter() - start, 1)}


if __name__ == "__main__":
    for name in sys.argv[1:] or MODELS:
        print(json.dumps(check(name)), flush=True)
