"""rotnet predict's inference on onnxruntime against PyTorch, side by side in one run. Prints ONE JSON line:

  python benchmarks/onnx_predict.py                                  # resnet18 at 224 px, batch 16, CPU
  python benchmarks/onnx_predict.py --model mobilenetv3_small_100 --img-size 224 --batch-size 32

The model is what predict runs (backbone + rotation head, random weights: speed does not depend on
them), exported the way ``rotnet export --format onnx --with-head`` exports it. Both backends get the
same normalised batches; they take turns batch by batch, so a machine shared with other work slows
both alike. Figures: images/s of each (the best of --repeats passes of --batches batches) and their
ratio; PyTorch runs in eval mode under no_grad on --threads threads, onnxruntime on as many.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine

from rotnet_cli import __version__
from rotnet_cli.models import RotNet, create_backbone, rotation_head
from rotnet_cli.onnx import OPSET, export_onnx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    torch.manual_seed(0)
    backbone = create_backbone(args.model, img_size=args.img_size)
    model = RotNet(backbone, rotation_head(backbone, 4)).eval()
    batches = [torch.randn(args.batch_size, 3, args.img_size, args.img_size) for _ in range(args.batches)]
    with tempfile.TemporaryDirectory(prefix="rotnet-onnx-bench-") as tmp:
        path = Path(tmp) / "model.onnx"
        meta = {"rotnet_format": "onnx", "output": "logits", "model": args.model, "opset": OPSET}
        export_onnx(model, path, args.img_size, meta)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def pytorch(x):
            with torch.no_grad():
                return model(x)

        def onnxruntime(x):
            return session.run(None, {"images": x.numpy()})[0]

        backends = {"pytorch": pytorch, "onnxruntime": onnxruntime}
        for run in backends.values():  # warm-up: first-call allocations and graph set-up
            run(batches[0])
        seconds = {name: [0.0] * args.repeats for name in backends}
        for repeat in range(args.repeats):
            for x in batches:
                for name, run in backends.items():  # turn by turn: both see the same load
                    start = time.perf_counter()
                    run(x)
                    seconds[name][repeat] += time.perf_counter() - start
    images = args.batch_size * args.batches
    speed = {name: images / min(times) for name, times in seconds.items()}
    emit(
        {
            "benchmark": "onnx_predict",
            "rotnet": __version__,
            "onnxruntime": ort.__version__,
            "model": args.model,
            "img_size": args.img_size,
            "batch_size": args.batch_size,
            "images_per_pass": images,
            "repeats": args.repeats,
            "pytorch_images_per_s": round(speed["pytorch"], 1),
            "onnxruntime_images_per_s": round(speed["onnxruntime"], 1),
            "onnxruntime_over_pytorch": round(speed["onnxruntime"] / speed["pytorch"], 2),
            **machine(),
        }
    )


if __name__ == "__main__":
    main()
