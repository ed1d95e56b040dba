"""CLI help is the behaviour (issue #23, item 6): every default a flag's help names is the value
the parsed command uses; flags either apply with ``--config`` or are refused in one line."""

import argparse
import json
import re
from pathlib import Path

import pytest

from imgcls_jax import TrainConfig, cli
from imgcls_jax.cli.commands import CONFIG_OVERRIDES, TRAIN_DEFAULTS
from tests.helpers import load_example

DOCUMENTED = re.compile(r"\(default:? ([^;)]+?)(?:;|\))")


def subcommands(parser=None) -> dict[str, argparse.ArgumentParser]:
    parser = parser or cli.build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def documented_defaults(parser=None):
    """``[(command, dest, documented text, argparse default)]`` of every optional flag whose help
    names a default."""
    found = []
    for name, command in subcommands(parser).items():
        for action in command._actions:
            if not action.option_strings or action.help in (None, argparse.SUPPRESS):
                continue
            match = DOCUMENTED.search(action.help % {"default": action.default})
            if match:
                found.append((name, action.dest, match.group(1).strip(), action.default))
    return found


#: Defaults argparse leaves unset (None) that the command resolves itself, by (command, flag):
#: each is checked by a test below against what the command uses.
RESOLVED = {
    ("train", "data"), ("train", "run_dir"), ("train", "model"), ("train", "weights"), ("train", "epochs"),
    ("train", "lr"), ("train", "image_size"), ("train", "batch_size"), ("train", "dtype"), ("train", "seed"),
    ("train", "steps_per_execution"),
    ("evaluate", "split"), ("evaluate", "checkpoint"), ("predict", "checkpoint"),
    # the Keras commands' (tests/test_keras_cli.py checks what they use)
    ("import-keras", "preprocessing"), ("import-keras", "class_names"),
    ("export-keras", "input_preprocessing"), ("export-keras", "checkpoint"),
}  # fmt: skip


@pytest.mark.parametrize("parser", ["imgcls-jax", "examples/train.py"])
def test_every_documented_default_is_the_parsed_one_or_resolved_by_the_command(parser):
    parser = example_parser() if parser == "examples/train.py" else None
    found = documented_defaults(parser)
    assert len(found) >= 12  # the walk finds the flags (a change in help wording would not hide them)
    for command, dest, text, default in found:
        if default is None:
            assert (command, dest) in RESOLVED, f"{command} --{dest}: documents {text!r}; nothing checks it"
        elif isinstance(default, bool):
            assert text == str(default) or text.lower().startswith(("no ", "off")) != default, (command, dest)
        else:
            assert text == str(default), f"{command} --{dest}: help says {text!r}, parses {default!r}"


def test_every_flag_is_explained_and_names_every_model():
    from imgcls_jax.models import list_models

    for name, command in subcommands().items():
        for action in command._actions:
            assert action.help, f"{name} {action.option_strings or action.dest}: no help"
            if action.dest == "model":
                assert all(m in action.help for m in list_models()), f"{name} --model"
    port = subcommands()["port-weights"]
    assert "VGG" not in port.description + (port.format_help())


def example_parser():
    return cli.build_parser(load_example().DEFAULTS)


def _used(parser, argv, monkeypatch) -> TrainConfig:
    """The config ``train`` builds for ``argv`` (ImageNet weights unavailable, as offline)."""
    from imgcls_jax.weights import WeightsUnavailableError

    def offline(model, include_top):
        raise WeightsUnavailableError("offline (test)")

    monkeypatch.setattr("imgcls_jax.weights.store.resolve_imagenet", offline)
    config, _ = cli.train_config(parser.parse_args(["train", *argv]))
    return config


@pytest.mark.parametrize("which", ["imgcls-jax", "examples/train.py"])
def test_train_uses_the_defaults_its_help_names(which, tmp_path, monkeypatch):
    from imgcls_jax.config import SCRATCH_LR, TRANSFER_LR

    parser = example_parser() if which == "examples/train.py" else cli.build_parser()
    defaults = {**TRAIN_DEFAULTS, **(load_example().DEFAULTS if which == "examples/train.py" else {})}
    data = tmp_path / "photos"
    data.mkdir()
    given = [] if defaults["data"] else ["--data", str(data)]
    config = _used(parser, given, monkeypatch)  # weights auto -> unavailable -> from scratch
    documented = {dest: text for command, dest, text, _ in documented_defaults(parser) if command == "train"}
    assert config.model == documented["model"] == defaults["model"]
    assert sum(p.epochs for p in config.phases) == int(documented["epochs"]) == defaults["epochs"]
    assert config.batch_size == int(documented["batch_size"]) == defaults["batch_size"]
    assert str(config.image_size) == documented["image_size"] == str(defaults["image_size"])
    assert config.dtype == documented["dtype"] and config.seed == int(documented["seed"])
    per_execution = config.steps_per_execution
    assert per_execution == int(documented["steps_per_execution"]) == defaults["steps_per_execution"]
    assert config.weights is None and documented["weights"] == "auto"  # auto: unavailable -> scratch
    assert config.phases[0].learning_rate == SCRATCH_LR and f"{SCRATCH_LR:g} from scratch" in documented["lr"]
    if defaults["run_dir"]:
        assert config.run_dir == documented["run_dir"] == defaults["run_dir"]
        assert config.data == documented["data"] == defaults["data"]
    else:
        assert (
            config.run_dir == str(Path("runs") / "photos")
            and "runs/<data folder name>" in documented["run_dir"]
        )
        assert config.data == str(data)
    weights = tmp_path / "w.h5"
    transfer = _used(parser, [*given, "--weights", str(weights)], monkeypatch)
    assert (
        transfer.phases[0].learning_rate == TRANSFER_LR
        and f"{TRANSFER_LR:g} with weights" in documented["lr"]
    )


def test_with_config_every_flag_overrides_or_is_refused_in_one_line(tmp_path, capsys, monkeypatch):
    data = tmp_path / "photos"
    data.mkdir()
    file = tmp_path / "c.json"
    TrainConfig(data="elsewhere", weights="random").to_json(file)
    values = {
        "data": str(data), "run_dir": str(tmp_path / "r"), "model": "vgg19", "image_size": "48",
        "batch_size": "4", "dtype": "bfloat16", "seed": "5", "init_from": "runs/other",
        "steps_per_execution": "3",
    }  # fmt: skip
    assert set(values) | {"weights"} == set(CONFIG_OVERRIDES)
    argv = ["--config", str(file)] + [x for k, v in values.items() for x in ("--" + k.replace("_", "-"), v)]
    config = _used(cli.build_parser(), argv, monkeypatch)
    for key, text in values.items():
        assert str(getattr(config, key)) == text, key
    assert config.weights is None  # the whole model of --init-from replaces the file's base
    config = _used(cli.build_parser(), ["--config", str(file), "--weights", "w.h5"], monkeypatch)
    assert config.weights == "w.h5"
    written = json.loads(config.to_json())  # what the run's config.json will record
    assert written["weights"] == "w.h5" and written["data"] == "elsewhere"
    for refused, message in (
        (["--epochs", "3"], "--epochs and --lr shape the recipe's phases"),
        (["--lr", "0.1"], "--epochs and --lr shape the recipe's phases"),
        (["--weights", "none", "--init-from", "x.keras"], "set weights"),
    ):
        assert cli.main(["train", "--config", str(file), *refused]) == 2
        err = capsys.readouterr().err
        assert err.startswith("imgcls-jax: error: ") and message in err and err.count("\n") == 1
    assert cli.main(["train", "--data", str(data), "--weights", "none", "--init-from", "x.keras"]) == 2
    assert "not both" in capsys.readouterr().err


def test_the_example_help_shows_its_own_defaults(capsys):
    module = load_example()
    with pytest.raises(SystemExit):
        module.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "usage: python examples/train.py" in text
    for dest in ("image_size", "batch_size", "epochs", "run_dir"):
        assert f"default {module.DEFAULTS[dest]}" in text, dest
    assert "(default 224" not in text and "default 32)" not in text  # not imgcls-jax train's
