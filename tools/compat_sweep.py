"""The compatibility sweep: one model of every timm family through every rotnet command.

    python tools/compat_sweep.py                     # every family; continues a stopped sweep
    python tools/compat_sweep.py --only vgg,levit --redo
    python tools/compat_sweep.py --list              # the chosen models, nothing run

A family is a timm model module (``timm.list_modules()``); its representative is its
smallest model by parameter count (timm's tiny ``test_*`` models aside), counted once per
timm version on the meta device, where nothing is allocated. Each family runs in its own
process, under a timeout, through the commands as a user types them:

    pretrain       1 epoch of 2 steps on a small folder of images (4 images x 4 rotations a step)
    probe          every stage, linear head
    export         --with-head, then a strict ``timm.create_model("local-dir:...")`` whose
                   features must equal those of the run's backbone
    viz filters, viz attention, predict

at a small input size: the first of 64, 112, 128, 224 px that rotnet accepts for the model,
else the model's own size. Each family's result is appended to WORK/results.jsonl as soon as
it finishes and docs/compatibility.md is rewritten from all results, so a stopped sweep
continues where it stopped (``--redo`` runs the chosen families again).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("pretrain", "probe", "export", "viz filters", "viz attention", "predict")
SIZES = (64, 112, 128, 224)  # small first; 112 and 224 also divide by the patch sizes 14 and 16 and by 7-token windows
IMAGES_PER_CLASS = 8
IMAGE_PIXELS = 48
BUG_MARK = "unexpected: a bug in rotnet"  # what the CLI's error boundary says of an exception it did not expect


# ----------------------------------------------------------------------------- choosing the models


def choose_models(work: Path) -> dict[str, dict]:
    """family -> {"model", "params"}: the smallest model of every timm module, cached per timm version."""
    import timm

    cache = work / "models.json"
    if cache.is_file():
        saved = json.loads(cache.read_text())
        if saved.get("timm") == timm.__version__:
            return saved["families"]
    families = {}
    with _no_weight_init():
        for family in timm.list_modules():
            counts = {
                name: _count_params(name) for name in timm.list_models(module=family) if not name.startswith("test_")
            }
            counts = {name: n for name, n in counts.items() if n is not None}
            if counts:
                name = min(counts, key=lambda n: (counts[n], n))
                families[family] = {"model": name, "params": counts[name]}
    _write_json(cache, {"timm": timm.__version__, "families": families})
    return families


def _count_params(name: str) -> int | None:
    import timm
    import torch

    try:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=0)
    except Exception:  # a model that cannot be built on the meta device is not a candidate
        return None
    return sum(p.numel() for p in model.parameters())


@contextlib.contextmanager
def _no_weight_init():
    """Weight initialisation is a no-op on meta tensors but costs most of a meta build (torch runs
    its Python reference kernels for every init op); skip it while counting parameters (4x faster)."""
    import torch

    patched = []

    def skip_on_meta(owner, attr: str) -> None:
        original = getattr(owner, attr)

        def maybe(tensor, *args, **kwargs):
            return tensor if getattr(tensor, "is_meta", False) else original(tensor, *args, **kwargs)

        patched.append((owner, attr, original))
        setattr(owner, attr, maybe)

    for attr in ("uniform_", "normal_", "erfinv_", "clamp_", "mul_", "add_", "fill_", "zero_", "copy_", "div_", "sub_"):
        skip_on_meta(torch.Tensor, attr)
    for attr in (
        "trunc_normal_",
        "normal_",
        "uniform_",
        "kaiming_normal_",
        "kaiming_uniform_",
        "xavier_uniform_",
        "xavier_normal_",
        "constant_",
        "zeros_",
        "ones_",
        "orthogonal_",
    ):
        skip_on_meta(torch.nn.init, attr)
    try:
        yield
    finally:
        for owner, attr, original in reversed(patched):
            setattr(owner, attr, original)


# ----------------------------------------------------------------------------- one family (child process)


def make_images(folder: Path) -> Path:
    """Two classes of small PNGs with some structure (a bar and a blob), made once."""
    import numpy as np
    from PIL import Image

    if folder.is_dir() and len(list(folder.rglob("*.png"))) == 2 * IMAGES_PER_CLASS:
        return folder
    rng = np.random.default_rng(0)
    for c, label in enumerate(("bars", "blobs")):
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(IMAGES_PER_CLASS):
            pixels = rng.integers(0, 80, (IMAGE_PIXELS, IMAGE_PIXELS, 3)).astype(np.uint8)
            top = rng.integers(4, IMAGE_PIXELS // 2)
            if c == 0:
                pixels[top : top + 8, 4:-4] = rng.integers(150, 256, 3)
            else:
                yy, xx = np.mgrid[:IMAGE_PIXELS, :IMAGE_PIXELS]
                pixels[(yy - top - 8) ** 2 + (xx - IMAGE_PIXELS // 3) ** 2 < 60] = rng.integers(150, 256, 3)
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


def input_size(model: str) -> tuple[int, str | None]:
    """The first of SIZES (up to the model's own) that rotnet builds and runs the model at, else
    the model's own size; with rotnet's refusal of the smallest size, if it refused it."""
    from rotnet_cli.errors import InputSizeError
    from rotnet_cli.models import create_backbone, model_default_size

    own = model_default_size(model)
    refusal = None
    for size in [s for s in SIZES if s < own] + [own]:
        try:
            create_backbone(model, img_size=size)
            return size, refusal
        except InputSizeError as e:
            refusal = refusal or str(e)
    return own, refusal


def run_family(family: str, model: str, work: Path, images: Path, size: int | None = None) -> dict:
    """Every command on ``model``; the record grows in WORK/families/FAMILY.json after each one."""
    from typer.testing import CliRunner  # Click's in-process runner: each command's exit code and stderr

    from rotnet_cli.cli import app

    folder = work / "families" / family
    folder.mkdir(parents=True, exist_ok=True)
    record_file = work / "families" / f"{family}.json"
    record: dict = {"family": family, "model": model, "results": {}}
    runner = CliRunner()
    started = time.perf_counter()

    def save() -> None:
        record["seconds"] = round(time.perf_counter() - started, 1)
        _write_json(record_file, record)

    save()
    if size is None:
        size, refusal = input_size(model)
        if refusal:
            record["refused"] = refusal
    record["img_size"] = size
    save()
    run, export = folder / "run", folder / "export"
    image = next(iter(sorted(images.rglob("*.png"))))
    argv = {
        "pretrain": [
            "pretrain",
            "--model",
            model,
            "--data",
            images,
            "--img-size",
            size,
            "--epochs",
            "1",
            "-b",
            "4",
            "--max-steps-per-epoch",
            "2",
            "--val-split",
            "0.25",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--out",
            run,
            "--overwrite",
        ],
        "probe": [
            "probe",
            run,
            "--data",
            images,
            "--head",
            "linear",
            "--epochs",
            "3",
            "-b",
            "8",
            "--device",
            "cpu",
            "--workers",
            "0",
        ],
        "export": ["export", run, "--out", export, "--with-head", "--overwrite"],
        "viz filters": ["viz", "filters", run, "--out", folder / "filters.png"],
        "viz attention": ["viz", "attention", run, image, "--out", folder / "attention", "--device", "cpu"],
        "predict": ["predict", run, images, "--device", "cpu", "--workers", "0", "--json"],
    }
    for command in COMMANDS:
        result = runner.invoke(app, [str(a) for a in argv[command]])
        if result.exit_code == 0:
            outcome = "ok"
            if command == "export":
                outcome = _timm_loads_export(export, run, size)
        else:
            outcome = _one_line(result)
        record["results"][command] = outcome
        save()
        if command == "pretrain" and outcome != "ok":
            break  # every other command reads the run
    return record


def _one_line(result) -> str:
    """The error line a user sees (without its 'error:' prefix), or what went wrong instead."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        return f"traceback: {type(result.exception).__name__}: {result.exception}"  # the error boundary was bypassed
    lines = [line.strip() for line in (result.stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if len(errors) == 1 and lines[-1] == errors[0]:
        return errors[0][len("error:") :].strip()
    return f"exit {result.exit_code} without one error line: {' / '.join(lines[-3:])[:300]}"


def _timm_loads_export(export: Path, run: Path, size: int) -> str:
    """timm alone loads the export strictly, and its features equal those of the run's backbone."""
    import timm
    import torch

    from rotnet_cli.weights import load_weights

    try:
        model = timm.create_model(f"local-dir:{export}", pretrained=True).eval()
        reference = load_weights(str(run)).backbone.eval()
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)
    except Exception as e:
        first = (str(e).strip().splitlines() or [""])[0][:200]
        return f"timm local-dir load: {type(e).__name__}: {first}"
    return "ok"


# ----------------------------------------------------------------------------- the sweep (parent process)


def sweep(args: argparse.Namespace) -> None:
    work = Path(args.work)
    families = choose_models(work)
    if args.list:
        for family, chosen in sorted(families.items()):
            print(f"{family:28s} {chosen['model']:45s} {chosen['params'] / 1e6:8.2f}M")
        return
    if args.report:
        write_markdown(read_results(work), families, Path(args.out))
        return
    chosen_families = sorted(families) if not args.only else [f.strip() for f in args.only.split(",") if f.strip()]
    unknown = [f for f in chosen_families if f not in families]
    if unknown:
        sys.exit(f"not timm families: {', '.join(unknown)} (see --list)")
    make_images(work / "images")
    results = read_results(work)
    todo = [f for f in chosen_families if args.redo or f not in results or results[f]["model"] != families[f]["model"]]
    print(f"{len(todo)} of {len(chosen_families)} families to run; results in {work / 'results.jsonl'}", flush=True)
    started = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:  # threads only wait: each family is a process of its own
        running = [
            pool.submit(run_child, family, families[family]["model"], work, args.timeout, args.threads)
            for family in todo
        ]
        for i, future in enumerate(as_completed(running), 1):
            record = future.result()
            family = record["family"]
            record["params"] = families[family]["params"]
            with open(work / "results.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            results[family] = record
            write_markdown(results, families, Path(args.out))
            failed = {c: r for c, r in record["results"].items() if r != "ok"}
            print(
                f"[{i}/{len(todo)}] {family} ({record['model']}, {record.get('img_size')} px, {record['seconds']:.0f} s): "
                + ("ok" if not failed and len(record["results"]) == len(COMMANDS) else json.dumps(failed)),
                flush=True,
            )
    write_markdown(results, families, Path(args.out))
    print(
        f"swept {len(todo)} families in {(time.perf_counter() - started) / 60:.1f} minutes; wrote {args.out}",
        flush=True,
    )


def run_child(family: str, model: str, work: Path, timeout: float, threads: int) -> dict:
    """One family in its own process (a crash or a hang costs only that family)."""
    record_file = work / "families" / f"{family}.json"
    record_file.unlink(missing_ok=True)
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    started = time.perf_counter()
    command = [sys.executable, __file__, "--work", str(work), "--family", family, "--model", model]
    try:
        done = subprocess.run(command, env=env, timeout=timeout, capture_output=True, text=True)
        ended = (
            None
            if done.returncode == 0
            else f"the process ended with exit code {done.returncode}: "
            + ((done.stderr.strip().splitlines() or [""])[-1][:200])
        )
    except subprocess.TimeoutExpired:
        ended = f"timed out after {timeout:.0f} s"
    record = (
        json.loads(record_file.read_text())
        if record_file.is_file()
        else {"family": family, "model": model, "results": {}}
    )
    record["seconds"] = round(time.perf_counter() - started, 1)
    if ended:
        pending = [c for c in COMMANDS if c not in record["results"]]
        if pending:
            record["results"][pending[0]] = f"not finished: {ended}"
    return record


def read_results(work: Path) -> dict[str, dict]:
    """The latest record of every family swept so far."""
    results = {}
    path = work / "results.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                results[record["family"]] = record
    return results


# ----------------------------------------------------------------------------- docs/compatibility.md


def onnx_results() -> dict[str, str]:
    """family -> the onnx column's cell, from tools/onnx_families.jsonl (written by tools/onnx_families.py)."""
    path = Path(__file__).with_name("onnx_families.jsonl")
    cells: dict[str, str] = {}
    for line in path.read_text().splitlines() if path.is_file() else []:
        with contextlib.suppress(ValueError, KeyError):
            row = json.loads(line)
            cells[row["family"]] = (
                f"ok (`{row['model']}`, max diff {row['max_abs_diff']:.1g})"
                if row["ok"]
                else f"`{row['model']}`: {row['error']}".replace("|", "\\|")
            )
    return cells


def write_markdown(results: dict[str, dict], families: dict[str, dict], out: Path) -> None:
    import timm
    import torch

    from rotnet_cli import __version__

    swept = [f for f in sorted(families) if f in results]
    passing = [f for f in swept if _passes(results[f])]
    bugs = [f for f in swept if any(is_bug(r) for r in results[f]["results"].values())]
    refused = [f for f in swept if results[f].get("refused")]
    lines = [
        "# Compatibility: every timm family through every rotnet command",
        "",
        "Generated by `python tools/compat_sweep.py` (do not edit by hand). One model of every timm model "
        "module (a *family*), the smallest by parameter count, runs through `rotnet pretrain` (1 epoch of 2 "
        "steps on 16 small images), `rotnet probe` (every stage, linear head), `rotnet export --with-head` "
        'followed by a strict `timm.create_model("local-dir:...")` whose features must equal the run\'s, '
        "`rotnet viz filters`, `rotnet viz attention` and `rotnet predict`, with random initial weights at a "
        "small input size: the first of 64, 112, 128, 224 px that rotnet accepts for the model, else its own.",
        "",
        f"rotnet {__version__}, timm {timm.__version__}, torch {torch.__version__.split('+')[0]}, Python "
        f"{platform.python_version()}, CPU; {datetime.now(timezone.utc).strftime('%Y-%m-%d')}. "
        f"{len(swept)} of {len(families)} families swept, in {sum(results[f]['seconds'] for f in swept) / 60:.0f} "
        "minutes of family processes"
        + (" (`python tools/compat_sweep.py` continues the sweep)." if len(swept) < len(families) else "."),
        "",
        f"**{len(passing)} of {len(swept)} families pass every command.** "
        + (
            "The others stop with the one-line error rotnet gives, shown in their row."
            if len(passing) < len(swept)
            else ""
        )
        + (f" Unexpected errors (bugs): {', '.join(bugs)}." if bugs else ""),
        "",
        "The onnx column is `rotnet export --format onnx` (onnxruntime against PyTorch on random and real "
        "images) for the families `python tools/onnx_families.py` checked, with the model it checked at its "
        "own input size and random weights; its results are kept in tools/onnx_families.jsonl.",
        "",
        "| family | model | params | px | " + " | ".join(COMMANDS) + " | onnx |",
        "|---|---|---:|---:|" + "---|" * (len(COMMANDS) + 1),
    ]
    onnx = onnx_results()
    for family in sorted(families):
        if family not in results:  # a sweep still to be continued
            lines.append(
                f"| {family} | `{families[family]['model']}` | {families[family]['params'] / 1e6:.1f}M | | "
                + " | ".join(["not swept yet"] * len(COMMANDS))
                + f" | {onnx.get(family, 'not checked')} |"
            )
            continue
        record = results[family]
        cells = [_cell(record["results"].get(c)) for c in COMMANDS]
        lines.append(
            f"| {family} | `{record['model']}` | {record.get('params', 0) / 1e6:.1f}M | {record.get('img_size', '')} | "
            + " | ".join(cells)
            + f" | {onnx.get(family, 'not checked')} |"
        )
    if refused:
        lines += [
            "",
            "## Input sizes",
            "",
            "Models that rotnet refused at 64 px, with the line it gives (a run that does not choose "
            "`--img-size` gets a size the model takes):",
            "",
        ]
        lines += [
            f"- {family} (`{results[family]['model']}`): {_text(results[family]['refused'])}" for family in refused
        ]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


def _passes(record: dict) -> bool:
    return all(record["results"].get(c) == "ok" for c in COMMANDS)


def is_bug(outcome: str) -> bool:
    return BUG_MARK in outcome or outcome.startswith(
        ("traceback:", "exit ", "timm local-dir load:", "not finished: the process")
    )


def _cell(outcome: str | None) -> str:
    if outcome is None:
        return "-"  # not run: pretraining failed before it
    return "ok" if outcome == "ok" else f"no: {_text(outcome)}"


def _text(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--work",
        default=str(ROOT / "runs" / "compat-sweep"),
        help="Working folder: model choice, images, runs, results.jsonl.",
    )
    parser.add_argument("--out", default=str(ROOT / "docs" / "compatibility.md"), help="The table to write.")
    parser.add_argument("--only", help="Comma list of families (default: all).")
    parser.add_argument("--redo", action="store_true", help="Run families that have a result again.")
    parser.add_argument("--timeout", type=float, default=900, help="Seconds per family.")
    parser.add_argument("--jobs", type=int, default=2, help="Families run at once, each in its own process.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per family process.")
    parser.add_argument("--list", action="store_true", help="Print the chosen model of every family and stop.")
    parser.add_argument("--report", action="store_true", help="Write the table from the results so far and stop.")
    parser.add_argument("--family", help=argparse.SUPPRESS)  # the child process: one family
    parser.add_argument("--model", help=argparse.SUPPRESS)
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.family:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        work = Path(args.work)
        run_family(args.family, args.model, work, make_images(work / "images"))
        return
    sweep(args)


if __name__ == "__main__":
    main()
