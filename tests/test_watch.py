"""Watching and steering a long run (issue 16): loggers, feature quality during pretraining,
kept checkpoints, config files, and extending a run with --resume --epochs N (issue 19, item 12).

Every logger is read back with its own tool: TensorBoard's EventAccumulator, MLflow's client,
W&B's offline files (record by record, as W&B's LevelDB-style log stores them), csv with csv.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from rotnet_cli import rundir
from rotnet_cli.cli import app
from rotnet_cli.config import PretrainConfig
from rotnet_cli.errors import ConfigError, Interrupted, RotnetError, WeightsError
from rotnet_cli.pretraining import lr_factor, pretrain, resume_config
from rotnet_cli.weights import load_weights

TIMING = ("images_per_s", "seconds", "data_wait", "eval_seconds")
# 2 epochs of 4 steps, a log every 2 steps: the steps logged are 2, 4, 6, 8
RUN = dict(model="test_resnet", epochs=2, max_steps_per_epoch=4, batch_size=16, device="cpu", workers=0, log_every=2)


@pytest.fixture(autouse=True)
def one_thread():
    """Same thread count as every other run in the suite, so runs compare bitwise."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B without the network or a login: offline mode, its files and settings under tmp_path."""
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
        "WANDB_DISABLE_GIT": "true",
        "WANDB_API_KEY": "",
    }.items():
        monkeypatch.setenv(key, value)
    (tmp_path / "wandb-dir").mkdir()


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rundir.read_metrics(run)]


def stop_in_epoch_2(after_steps: int = 5):
    """should_stop that asks to stop after the given number of polls (a poll per step but an epoch's last)."""
    calls = {"n": 0}

    def should_stop() -> bool:
        calls["n"] += 1
        return calls["n"] == after_steps

    return should_stop


def stopped_and_resumed(run: Path, **options) -> None:
    with pytest.raises(Interrupted):
        pretrain(PretrainConfig(**{**RUN, **options}, out=str(run)), should_stop=stop_in_epoch_2())
    assert rundir.read_checkpoint(run / "checkpoint.pt")["step"] == 1  # stopped in epoch 2, after step 1 of 4
    pretrain(resume_config(run, {}))


def csv_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(run / "logs" / "scalars.csv", newline="") as f:
        for row in csv.DictReader(f):
            series.setdefault(row["name"], []).append((int(row["step"]), float(row["value"])))
    return series


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """RUN with the csv logger and kNN on digits, never interrupted."""
    out = tmp_path_factory.mktemp("reference") / "run"
    torch.set_num_threads(1)
    pretrain(PretrainConfig(**RUN, eval_data="digits", eval_layers="1,-1", out=str(out)))
    return out


# ----------------------------------------------------------------------------- loggers


def test_csv_and_tensorboard_continue_a_resumed_run_without_repeating_a_step(tmp_path, reference):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    stopped_and_resumed(run, eval_data="digits", eval_layers="1,-1", logger="csv,tensorboard")
    # the evaluation and the loggers change nothing the run computes: bitwise the reference
    saved, expected = load_file(run / "model.safetensors"), load_file(reference / "model.safetensors")
    assert all(torch.equal(saved[k], expected[k]) for k in expected)
    assert rows(run) == rows(reference)

    reference_csv, resumed_csv = csv_scalars(reference), csv_scalars(run)
    assert [step for step, _ in resumed_csv["train/loss"]] == [2, 4, 6, 8]  # no step twice, none missing
    for name in ("train/loss", "train/rot_acc", "epoch/loss", "val/rot_acc", "knn/stage1", "knn/stage5"):
        assert resumed_csv[name] == reference_csv[name], name

    events = EventAccumulator(str(run / "logs" / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    for name in ("train/loss", "epoch/rot_acc", "knn/stage5"):
        assert [(e.step, pytest.approx(e.value)) for e in events.Scalars(name)] == reference_csv[name]
    assert [e.step for e in events.Images("filters")] == [4, 8]  # the stem filters after each epoch
    assert "config" in str(events.Tags()["tensors"])  # the config, as text


def test_mlflow_store_reads_back_and_a_resumed_run_is_the_same_mlflow_run(tmp_path, reference, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    stopped_and_resumed(run, eval_data="digits", eval_layers="1,-1", logger="mlflow")
    client = MlflowClient(tracking_uri=f"sqlite:///{run / 'logs' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("rotnet")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # the resumed process continued the same run
    assert runs[0].info.run_id == rundir.read_checkpoint(run / "checkpoint.pt")["loggers"]["mlflow"]["id"]
    reference_csv = csv_scalars(reference)
    for name in ("train/loss", "epoch/loss", "knn/stage5"):
        history = client.get_metric_history(runs[0].info.run_id, name)
        assert [(m.step, pytest.approx(m.value)) for m in history] == reference_csv[name], name
    assert runs[0].data.params["model"] == "test_resnet" and runs[0].data.params["eval_data"] == "digits"


def wandb_records(path: Path) -> list:
    """The protobuf records of a W&B offline file: a 7-byte header, then LevelDB-log blocks of 32 KiB
    whose records have a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # too little room for a header: the block's tail is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(path: Path) -> list[dict]:
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
        for record in wandb_records(path)
        if record.WhichOneof("record_type") == "history"
    ]


def test_wandb_offline_files_hold_the_scalars_and_a_resume_keeps_the_run_id_without_repeating_steps(
    tmp_path, reference, wandb_offline
):
    run = tmp_path / "run"
    stopped_and_resumed(run, eval_data="digits", eval_layers="1,-1", logger="wandb")
    run_id = rundir.read_checkpoint(run / "checkpoint.pt")["loggers"]["wandb"]["id"]
    files = sorted((run / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one W&B run, two sessions
    steps = [[row["_step"] for row in wandb_history(f) if "train/loss" in row] for f in files]
    assert steps[0] + steps[1] == [2, 4, 6, 8]  # what the first session logged is not logged again
    merged: dict[int, dict] = {}
    for row in (row for f in files for row in wandb_history(f)):
        merged.setdefault(row["_step"], {}).update(row)
    reference_csv = csv_scalars(reference)
    for name in ("train/loss", "epoch/loss", "knn/stage5"):
        assert [
            (step, pytest.approx(row[name])) for step, row in sorted(merged.items()) if name in row
        ] == reference_csv[name]
    assert merged[8]["filters/_type"] == "image-file"  # the stem filters, as an image


@pytest.mark.parametrize(
    "left_by_the_kill, kept",
    [
        ("", []),  # killed before anything reached the disk
        ("step,name,value\n2,train/loss,1.5\n4,train/loss,1.25\n6,train/lo", ["2,train/loss,1.5", "4,train/loss,1.25"]),
        ("step,name,value\n2,train/loss,1.5\n4,train/loss,1.2", ["2,train/loss,1.5"]),  # a number cut short
    ],
)
def test_csv_after_a_kill_keeps_the_whole_rows_up_to_the_checkpoint(tmp_path, left_by_the_kill, kept):
    from rotnet_cli.loggers import CsvLogger

    (tmp_path / "scalars.csv").write_text(left_by_the_kill)
    logger = CsvLogger(tmp_path, "run", {}, resume_step=4, saved={})
    logger.log_scalars(6, {"train/loss": 1.0})
    logger.close(finished=True)
    assert (tmp_path / "scalars.csv").read_text().splitlines() == ["step,name,value", *kept, "6,train/loss,1.0"]


def test_a_missing_logger_package_is_one_line_naming_the_extra_and_nothing_is_written(tmp_path, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    result = CliRunner().invoke(
        app,
        [
            "pretrain",
            "--model",
            "test_resnet",
            "--logger",
            "csv,wandb",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 1
    assert result.stderr.strip() == "error: --logger wandb needs the wandb package: pip install 'rotnet-cli[wandb]'"
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- feature quality


def test_the_features_are_evaluated_every_n_epochs_and_after_the_last():
    from rotnet_cli.evaluation import should_evaluate

    every_2 = SimpleNamespace(every=2)  # a FeatureEval's interval; the epochs are 0-based
    assert [epoch + 1 for epoch in range(5) if should_evaluate(every_2, epoch, 5)] == [2, 4, 5]
    assert not any(should_evaluate(None, epoch, 5) for epoch in range(5))  # no --eval-data (or not rank 0)


@pytest.mark.slow  # 5 epochs with 3 evaluations (~25 s); the fast sibling above, and `reference` and `kept_run` evaluate
def test_knn_accuracy_appears_at_the_asked_epochs_and_rises_on_digits(tmp_path):
    from rotnet_cli.evaluation import evaluate_features, set_up_eval
    from rotnet_cli.pretraining import build_model

    config = PretrainConfig(
        **{**RUN, "epochs": 5, "max_steps_per_epoch": 8, "batch_size": 32},
        eval_data="digits",
        eval_every=2,
        eval_heads="knn,linear",
        out=str(tmp_path / "run"),
    )
    result = pretrain(config)
    evaluated = [row["epoch"] for row in rundir.read_metrics(tmp_path / "run") if "eval" in row]
    assert evaluated == [2, 4, 5]  # every second epoch, and the last
    last = result.history[-1]["eval"]
    assert set(last) == {"knn", "linear"} and set(last["knn"]) == {"1", "2", "3", "4", "5"}  # every stage by default
    assert all(0.5 < acc <= 1 for head in last.values() for acc in head.values())
    # the same evaluation of the network before training (the run's initial weights)
    model, img_size, mean, std = build_model(config, init=True)
    before = evaluate_features(
        set_up_eval(config, model, img_size, 1, lambda event: None),
        model,
        "test_resnet",
        img_size,
        mean,
        std,
        torch.device("cpu"),
        "fp32",
    )
    average = lambda per_stage: sum(per_stage.values()) / len(per_stage)  # noqa: E731
    assert average(last["knn"]) > average(before["knn"]) + 0.02


def test_eval_options_are_checked_before_the_run_starts(tmp_path):
    with pytest.raises(ConfigError, match="--best-metric knn needs --eval-data"):
        PretrainConfig(best_metric="knn")
    with pytest.raises(ConfigError, match="--eval-layers"):
        pretrain(PretrainConfig(**RUN, eval_data="digits", eval_layers="9", out=str(tmp_path / "run")))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- kept checkpoints


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("kept") / "run"
    torch.set_num_threads(1)
    pretrain(
        PretrainConfig(
            **{**RUN, "epochs": 3},
            keep_checkpoints=2,
            eval_data="digits",
            eval_layers="-1",
            eval_every=1,
            logger="none",
            out=str(out),
        )
    )
    return out


def test_kept_checkpoints_are_the_last_epochs_and_best_is_the_best_epoch(kept_run):
    assert rundir.kept_checkpoint_names(kept_run) == ["best", "epoch-2", "epoch-3"]
    history = rundir.read_metrics(kept_run)
    knn = [row["eval"]["knn"]["5"] for row in history]
    best = load_weights(f"{kept_run}:best")
    assert best.info["epoch"] == 1 + knn.index(max(knn)) and best.info["best_metric"] == "knn"
    assert best.info["best_value"] == pytest.approx(max(knn))
    final = load_file(kept_run / "model.safetensors")
    last = load_file(kept_run / "checkpoints" / "epoch-3.safetensors")
    assert all(torch.equal(final[k], last[k]) for k in final)  # the last epoch's weights are the run's


@pytest.mark.parametrize(
    "spec", ["{run}:best", "{run}:epoch-2", "{run}/checkpoints/epoch-3", "{run}/checkpoints/epoch-3.safetensors"]
)
def test_every_kept_checkpoint_spec_loads(kept_run, spec):
    loaded = load_weights(spec.format(run=kept_run))
    assert loaded.model_name == "test_resnet" and loaded.head is not None and loaded.img_size == 32


def test_a_checkpoint_that_is_not_kept_names_the_kept_ones(kept_run):
    with pytest.raises(
        WeightsError, match=r"no kept checkpoint 'epoch-1' \(it keeps .*:best, .*:epoch-2, .*:epoch-3\)"
    ):
        load_weights(f"{kept_run}:epoch-1")


def test_every_command_accepts_kept_checkpoints(kept_run, tmp_path):
    image = tmp_path / "digit.png"
    from PIL import Image

    Image.new("RGB", (32, 32), "white").save(image)
    best, epoch_2 = f"{kept_run}:best", f"{kept_run}:epoch-2"
    commands = [
        ["probe", best, "--head", "knn", "--layers", "-1", "--device", "cpu", "--workers", "0", "--json"],
        ["export", epoch_2, "--out", str(tmp_path / "export")],
        ["viz", "filters", best, epoch_2, "--out", str(tmp_path / "filters.png")],
        ["predict", best, str(image), "--device", "cpu", "--workers", "0"],
        [
            "pretrain",
            "--init",
            best,
            "--model",
            "test_resnet",
            "--epochs",
            "1",
            "--max-steps-per-epoch",
            "1",
            "-b",
            "16",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--logger",
            "none",
            "--out",
            str(tmp_path / "from-best"),
        ],
    ]
    for args in commands:
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, (args[0], result.output)


# ----------------------------------------------------------------------------- --resume --epochs N


def test_resume_with_more_epochs_extends_a_finished_run_as_if_planned_that_long(tmp_path):
    """A step schedule keeps its milestones: extending 2 epochs to 3 is bitwise a 3-epoch run."""
    step = dict(RUN, schedule="step", milestones="1", logger="none")
    pretrain(PretrainConfig(**{**step, "epochs": 3}, out=str(tmp_path / "planned")))
    pretrain(PretrainConfig(**step, out=str(tmp_path / "run")))
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(tmp_path / "run"), "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert "extending the run from 2 to 3 epochs" in result.stderr and "keeps its milestones" in result.stderr
    assert rows(tmp_path / "run") == rows(tmp_path / "planned")
    record = rundir.read_config(tmp_path / "run")
    assert record["config"]["epochs"] == 3 and record["extended"][0]["from_epochs"] == 2
    # the next plain --resume knows the new length: nothing left to train
    again = CliRunner().invoke(app, ["pretrain", "--resume", str(tmp_path / "run")])
    assert again.exit_code == 0 and "nothing to train" in again.stderr


def test_a_cosine_schedule_is_replanned_over_the_new_total_from_the_resume_step(tmp_path):
    run = tmp_path / "run"
    pretrain(PretrainConfig(**RUN, logger="none", out=str(run)))
    extended = pretrain(resume_config(run, {"epochs": 4}))
    steps = RUN["max_steps_per_epoch"]
    cfg = PretrainConfig(**{**RUN, "epochs": 4})
    # the lr of an epoch's row is that of its last step, on the plan of 4 epochs
    assert extended.history[2]["lr"] == pytest.approx(0.1 * lr_factor(3 * steps - 1, cfg, steps))
    assert extended.history[3]["lr"] == pytest.approx(0.1 * lr_factor(4 * steps - 1, cfg, steps))


def test_resume_cannot_shorten_a_run(tmp_path):
    run = tmp_path / "run"
    pretrain(PretrainConfig(**RUN, logger="none", out=str(run)))
    result = CliRunner().invoke(app, ["pretrain", "--resume", str(run), "--epochs", "1"])
    assert result.exit_code == 1 and "can be extended" in result.stderr and "not shortened" in result.stderr


# ----------------------------------------------------------------------------- --config


@pytest.fixture
def captured(monkeypatch) -> list:
    """The PretrainConfig the CLI builds, without training: pretrain is replaced by a recorder."""
    import rotnet_cli.pretraining as pretraining

    configs = []

    def record(config, **kwargs):
        configs.append(config)
        raise RotnetError("captured")

    monkeypatch.setattr(pretraining, "pretrain", record)
    return configs


def config_of(captured: list, args: list[str]) -> PretrainConfig:
    result = CliRunner().invoke(app, ["pretrain", *args])
    assert result.exit_code == 1 and "captured" in result.stderr, result.output
    return captured.pop()


@pytest.mark.parametrize("fmt", ["yaml", "json"])
@pytest.mark.parametrize(
    "option, in_file, on_command_line, from_file, from_both",
    [
        ("channels_last", True, ["--no-channels-last"], True, False),  # a bool flag
        ("compile", False, ["--compile"], False, True),
        ("rotations", [0, 90, 180], ["--rotations", "0,180"], (0.0, 90.0, 180.0), (0.0, 180.0)),  # a list
        ("milestones", [2, 3], ["--milestones", "1"], (2, 3), (1,)),
        ("lr", 0.05, ["--lr", "0.2"], 0.05, 0.2),  # an optional number
        ("img_size", 16, ["--img-size", "24"], 16, 24),
        ("warmup_epochs", 0.5, ["--warmup-epochs", "1"], 0.5, 1.0),  # a float
        ("epochs", 7, ["--epochs", "9"], 7, 9),  # an int
        ("data", "photos/train", ["--data", "other/dir"], "photos/train", "other/dir"),  # a path
        ("init", "runs/a:best", ["--init", "runs/b"], "runs/a:best", "runs/b"),
        ("logger", ["tensorboard", "csv"], ["--logger", "none"], ("tensorboard", "csv"), ()),  # a list of names
        ("augment", "crop", ["--augment", "none"], "crop", "none"),  # a choice
    ],
)
def test_config_file_sets_every_kind_of_option_and_the_command_line_wins(
    tmp_path, captured, fmt, option, in_file, on_command_line, from_file, from_both
):
    base = {"schedule": "step", "milestones": [2, 3], "epochs": 5} if option == "milestones" else {}
    values = {**base, option: in_file}
    path = tmp_path / f"options.{fmt}"
    if fmt == "yaml":
        import yaml

        path.write_text(yaml.safe_dump(values))
    else:
        path.write_text(json.dumps(values))
    assert getattr(config_of(captured, ["--config", str(path)]), option) == from_file
    assert getattr(config_of(captured, ["--config", str(path), *on_command_line]), option) == from_both


def test_a_runs_own_config_json_repeats_it_with_one_change_and_a_new_folder(tmp_path, captured, tiny_run):
    repeated = config_of(captured, ["--config", str(tiny_run / "config.json"), "--seed", "1"])
    saved = PretrainConfig.from_dict(rundir.read_config(tiny_run)["config"])
    assert repeated.seed == 1 and repeated.rotations == (0.0, 180.0) == saved.rotations
    assert {k: v for k, v in repeated.to_dict().items() if k not in ("seed", "out")} == {
        k: v for k, v in saved.to_dict().items() if k not in ("seed", "out")
    }
    assert repeated.out is None  # where the old run went is not taken: it would be refused, or overwritten


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 3\n", "'epoch' is not an option of this command (did you mean epochs?)"),
        ("epochs: ten\n", "epochs: Invalid value for '--epochs'"),
        ("- epochs\n", "must hold a mapping of option names to values"),
        ("epochs: [3\n", "is not valid YAML"),
        (b"\xff\xfeepochs: 3\n", "is not UTF-8 text"),  # a binary file or another encoding: no traceback
    ],
)
def test_a_bad_config_file_is_a_usage_error_naming_the_file_and_nothing_runs(tmp_path, captured, text, message):
    path = tmp_path / "options.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    result = CliRunner().invoke(app, ["pretrain", "--config", str(path), "--out", str(tmp_path / "run")])

    def unboxed(text: str) -> str:  # Typer's usage box wraps long lines inside its borders, anywhere
        return "".join(text.replace("│", " ").split())

    assert result.exit_code == 2
    assert unboxed(message) in unboxed(result.stderr) and unboxed(str(path)) in unboxed(result.stderr), result.stderr
    assert not captured and not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- viz curves


def test_viz_curves_draws_the_knn_curve_too(reference, tmp_path):
    pytest.importorskip("matplotlib")
    result = CliRunner().invoke(app, ["viz", "curves", str(reference), "--out", str(tmp_path / "curves.png"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["panels"] == ["loss", "rotation accuracy", "knn accuracy"]


def test_eval_every_auto_keeps_evaluations_near_3_percent_of_the_training_compute():
    from rotnet_cli.evaluation import AUTO_EVAL_SHARE, auto_eval_every

    # digits (1,797 images) after an epoch of 11 steps x 128 images x 4 rotations: every 4th epoch
    every = auto_eval_every(1797, 11 * 128 * 4)
    assert every == 4 and 1797 / (every * 3 * 11 * 128 * 4) <= AUTO_EVAL_SHARE < 1797 / ((every - 1) * 3 * 11 * 128 * 4)
    assert auto_eval_every(1797, 10**9) == 1  # a large pretraining set: every epoch
    assert PretrainConfig(eval_every="AUTO").eval_every == "auto" and PretrainConfig(eval_every="3").eval_every == 3
    with pytest.raises(ConfigError, match="--eval-every is a number of epochs or auto"):
        PretrainConfig(eval_every="often")
