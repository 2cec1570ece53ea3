"""Start-up cost of the CLI: `rotnet --help` time divided by `python -c "import timm"` time.

The CLI imports torch and timm only inside commands, so --help should cost a small
fraction of importing timm (goal: at most 0.1). Medians of several cold subprocess runs.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import emit, machine


def median_seconds(cmd: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=7)
    args = p.parse_args()
    rotnet = [sys.executable, "-m", "rotnet_cli"]
    script = Path(sys.executable).parent / "rotnet"
    if script.exists():
        rotnet = [str(script)]
    help_s = median_seconds(rotnet + ["--help"], args.runs)
    pretrain_help_s = median_seconds(rotnet + ["pretrain", "--help"], args.runs)
    timm_s = median_seconds([sys.executable, "-c", "import timm"], args.runs)
    emit(
        {
            "benchmark": "startup",
            **machine(),
            "runs": args.runs,
            "rotnet_help_s": round(help_s, 4),
            "rotnet_pretrain_help_s": round(pretrain_help_s, 4),
            "import_timm_s": round(timm_s, 4),
            "help_vs_import_timm": round(help_s / timm_s, 3),
            "pretrain_help_vs_import_timm": round(pretrain_help_s / timm_s, 3),
        }
    )


if __name__ == "__main__":
    main()
