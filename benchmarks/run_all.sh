#!/usr/bin/env bash
# Every figure of the README's Performance table, one JSON line each, on this machine.
#
#   bash benchmarks/run_all.sh [RESULTS.jsonl]      (default: benchmarks/results-HOST-DATE.jsonl)
#
# On a machine with CUDA it adds the GPU lines (bf16 + channels_last: resnet18 at 32 px and
# resnet50 at 224 px) and the GPU test set (pytest -m gpu). Each line names its device,
# library versions and thread count; the results file collects them.
set -euo pipefail
cd "$(dirname "$0")/.."
results=${1:-benchmarks/results-$(hostname)-$(date +%Y%m%d-%H%M).jsonl}
python=${PYTHON:-python}

bench() { "$python" "$@" | tee -a "$results"; }

has_cuda=$("$python" -c "import torch; print(int(torch.cuda.is_available()))")

bench benchmarks/startup.py
bench benchmarks/memory.py
if [ "$has_cuda" = 1 ]; then
    bench benchmarks/probe.py --device cuda
    bench benchmarks/pipeline.py --precision bf16 --channels-last
    bench benchmarks/pipeline.py --model resnet50 --img-size 224 --batch-size 64 --precision bf16 --channels-last
    bench benchmarks/pipeline.py --precision fp32   # the same loop without the GPU fast paths
    # the official-style loader with the official code's own worker count (--num_workers 4)
    bench benchmarks/pipeline.py --precision bf16 --channels-last --official-workers 4 --skip digits,jpeg
    bench benchmarks/embed.py --device cuda --precision bf16
    bench benchmarks/online_eval.py --device cuda
    bench benchmarks/onnx_predict.py   # onnxruntime's CPU provider against PyTorch on the CPU
    "$python" -m pytest -m gpu -q
else
    bench benchmarks/probe.py --device cpu
    bench benchmarks/pipeline.py
    bench benchmarks/embed.py --device cpu
    bench benchmarks/online_eval.py --device cpu
    bench benchmarks/onnx_predict.py
fi
echo "figures in $results" >&2
