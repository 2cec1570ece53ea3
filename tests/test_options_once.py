"""Every option is declared once: a command's defaults are its config class's defaults.

A user who runs a command with no options gets what the config (and a --config file, a resumed
run, a Python caller) calls the default. A default written into a command's signature by hand
would drift from the config's; these tests fail when it does, and when a command grows an option
that no config field holds (other than the few below, which only say how to run or show).
"""

import dataclasses

import pytest
import typer

from rotnet_cli import config as C
from rotnet_cli.cli import app
from rotnet_cli.config import NONE_ON_THE_COMMAND_LINE, option_default, parse_layers, parse_power

# Every command of the app and the config it builds (a new command adds its row).
COMMAND_CONFIGS = {
    "pretrain": C.PretrainConfig,
    "probe": C.ProbeConfig,
    "export": C.ExportConfig,
    "predict": C.PredictConfig,
    "embed": C.EmbedConfig,
    "neighbours": C.NeighboursConfig,
    "neighbors": C.NeighboursConfig,  # the US spelling, hidden
    "score": C.ScoreConfig,
    "reproduce": C.ReproduceConfig,
    "viz filters": C.FiltersConfig,
    "viz attention": C.AttentionConfig,
    "viz curves": C.CurvesConfig,
    "viz embeddings": C.EmbeddingMapConfig,
    "viz outliers": C.OutliersSheetConfig,
}

# Options with no config field: they say how to run or how to show a result, not what is computed.
WITHOUT_A_FIELD = {
    "debug",  # rotnet --debug: tracebacks
    "version",  # rotnet --version
    "json_out",  # --json: the result as JSON instead of tables
    "config_file",  # pretrain --config: where the options are read from
    "resume_dir",  # pretrain --resume DIR: the saved config of DIR, and config.resume
    "no_augment",  # pretrain --no-augment: the hidden flag of earlier versions, --augment none
    "top",  # score --top: rows of the table shown
    "bottom",  # score --bottom: rows of the table shown
}

# A value for each required argument, so that a config can be built from the defaults alone.
REQUIRED = {
    "weights": "runs/demo",
    "images": ("photo.png",),
    "inputs": ("photo.png",),
    "data": "digits",
    "out": "out.npz",
    "run": "runs/demo",
    "embeddings": "embeddings.npz",
    "scores": "scores.csv",
}
# Commands that need one of a few optional arguments given (score: DATA, or --inliers and --outliers).
NEEDS_ONE = {"score": {"data": ("photos",)}}


def commands(command=None, path=()):
    """(name, click command) for every command of the app, through its groups; groups too."""
    command = command or typer.main.get_command(app)
    yield " ".join(path), command
    for name, sub in getattr(command, "commands", {}).items():
        yield from commands(sub, (*path, name))


LEAVES = [(name, command) for name, command in commands() if not hasattr(command, "commands")]


def test_every_command_has_its_config():
    assert sorted(name for name, _ in LEAVES) == sorted(COMMAND_CONFIGS)


@pytest.mark.parametrize("name, command", LEAVES, ids=[name for name, _ in LEAVES])
def test_every_option_default_is_its_config_default(name, command):
    config = COMMAND_CONFIGS[name]
    fields = {f.name for f in dataclasses.fields(config)}
    for param in command.params:
        if param.name in WITHOUT_A_FIELD:
            continue
        assert param.name in fields, f"rotnet {name}: option {param.opts[0]} has no field in {config.__name__}"
        if param.required:
            continue
        expected = option_default(config, param.name)
        assert (param.default, type(param.default)) == (expected, type(expected)), (
            f"rotnet {name} {param.opts[0]}: the command's default {param.default!r} is not "
            f"{config.__name__}.{param.name}'s ({expected!r}); take it from option_default"
        )


@pytest.mark.parametrize("name, command", LEAVES, ids=[name for name, _ in LEAVES])
def test_no_options_builds_the_config_defaults(name, command):
    """The command line's spelling of each default (a comma list, 'all') means the config's own."""
    config = COMMAND_CONFIGS[name]
    required = {
        f.name: REQUIRED[f.name]
        for f in dataclasses.fields(config)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    } | NEEDS_ONE.get(name, {})
    cli_defaults = {p.name: p.default for p in command.params if not p.required}
    assert config.from_dict({**cli_defaults, **required}) == config.from_dict(required)


def test_group_options_need_no_field():
    for name, command in commands():
        if hasattr(command, "commands"):
            assert {p.name for p in command.params} <= WITHOUT_A_FIELD, f"rotnet {name}"


def test_the_words_for_none_parse_back_to_none():
    assert NONE_ON_THE_COMMAND_LINE == {"layers": "all", "eval_layers": "all", "power": "auto"}
    assert parse_layers(NONE_ON_THE_COMMAND_LINE["layers"]) is None
    assert parse_power(NONE_ON_THE_COMMAND_LINE["power"]) is None


def test_option_default_reads_factories_and_refuses_unknown_names():
    assert option_default(C.ProbeConfig, "workers") == C.default_workers()  # a default_factory field
    assert option_default(C.PretrainConfig, "rotations") == "0,90,180,270"
    with pytest.raises(AttributeError):
        option_default(C.ProbeConfig, "no_such_option")
