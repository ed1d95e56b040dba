"""User errors read as errors, not crashes (issue #19, item 5).

Each command is called as a new user would get it wrong (a missing or wrong folder, a folder
that is not a run, an edited run, an unknown or invalid config value, an unreadable image, a bad
flag): ``imgcls-jax`` must print one line ``imgcls-jax: error: ...`` naming the problem and exit
with status 2, with no traceback unless ``--verbose``. A failure inside a run (a bug, a NaN
loss) must keep its traceback: the same exception types raised there are not swallowed.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls_jax import cli
from imgcls_jax.config import PhaseConfig, TrainConfig
from imgcls_jax.models.registry import model_info
from tests.keras_references import registry_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every path the mistakes below name: a tiny image folder, a run folder and copies of it
    edited by hand, bad config and tune files, a text file named .jpg."""
    tmp = tmp_path_factory.mktemp("user_errors")
    data = tmp / "dätä 数据"  # a unicode path with a space, through every command
    rng = np.random.default_rng(0)
    for name, color in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
        (data / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(rng.normal(color, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.png")
    (tmp / "one_class" / "cat").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp / "one_class" / "cat" / "0.png")
    run = _run_folder(data, tmp / "run")
    paths = {"tmp": tmp, "data": data, "run": run, "missing": tmp / "missing", "one_class": tmp / "one_class"}
    (tmp / "file.txt").write_text("a file, not a folder\n")
    (tmp / "fake.jpg").write_text("hello: a text file named .jpg\n")
    (tmp / "empty").mkdir()
    paths.update(file=tmp / "file.txt", fake_jpg=tmp / "fake.jpg", empty_dir=tmp / "empty")
    paths.update(_configs(tmp, data))
    paths.update(_edited_runs(tmp, run))
    return paths


def _run_folder(data: Path, run_dir: Path) -> Path:
    """A run folder as ``fit`` writes it (config, manifest, epoch 0 in ``checkpoints/`` and
    ``best/`` through the trainer's own ``Checkpoints``), its parameters zeros: no mistake here
    needs trained weights, and building VGG16's random init costs tens of seconds."""
    from flax import nnx

    from imgcls_jax.data import scan_folder, split_records, write_manifest
    from imgcls_jax.models.registry import model_from_config
    from imgcls_jax.train.checkpoints import Checkpoints
    from imgcls_jax.train.rundir import RunDir

    config = TrainConfig(
        data=str(data), run_dir=str(run_dir), splits={"train": 0.5, "val": 0.25, "test": 0.25},
        weights="random", image_size=32, batch_size=2, head_units=(4,), augment={}, cache=None,
        phases=[PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2)],
    )  # fmt: skip
    run_dir.mkdir()
    config.to_json(run_dir / "config.json")
    found = scan_folder(data)
    records = split_records(found.records, config.splits, config.seed)
    write_manifest(run_dir / "manifest.csv", records, found.class_names, root=found.root)
    abstract = nnx.eval_shape(lambda: model_from_config(config, len(found.class_names), weights=None))
    params = nnx.to_pure_dict(nnx.state(abstract, nnx.Param))
    zeros = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), params)
    with Checkpoints(RunDir(run_dir), keep=1, monitor="val_accuracy", mode_max=True) as saver:
        saver.save(0, {"params": zeros}, {"val_accuracy": 0.5, "val_loss": 0.7})
    row = {"epoch": 0, "phase": 0, "step": 2, "train_loss": 0.7, "train_accuracy": 0.5, "val_loss": 0.7,
           "val_accuracy": 0.5, "learning_rate": 0.01, "images_per_s": 1.0}  # fmt: skip
    RunDir(run_dir).write_history([row])
    return run_dir


def _configs(tmp: Path, data: Path) -> dict:
    base = {
        "data": str(data),
        "run_dir": str(tmp / "tuned"),
        "image_size": 32,
        "batch_size": 2,
        "weights": "random",
    }
    texts = {
        "not_json": "{'data': 'single quotes are not JSON'}",
        "typo": json.dumps({**base, "learning_rat": 0.01}),
        "negative": json.dumps({**base, "batch_size": -4}),
        "good": json.dumps(base),
        "tune_bad_space": json.dumps(
            {
                "base": base,
                "space": {"dropout": {"type": "float", "low": 1, "high": 0}},
                "study": {"n_trials": 1},
            }
        ),
        "tune_no_trials": json.dumps(
            {"base": base, "space": {"dropout": {"type": "float", "low": 0, "high": 0.5}}}
        ),
        "tune_ok": json.dumps(
            {
                "base": base,
                "space": {"dropout": {"type": "float", "low": 0, "high": 0.5}},
                "study": {"n_trials": 1},
            }
        ),
        "tune_no_val": json.dumps(
            {
                "base": {**base, "splits": {"train": 1.0}},
                "space": {"dropout": {"type": "float", "low": 0, "high": 0.5}},
                "study": {"n_trials": 1},
            }
        ),  # fmt: skip
    }
    out = {}
    for name, text in texts.items():
        out[name] = tmp / f"{name}.json"
        out[name].write_text(text)
    return out


def _edited_runs(tmp: Path, run: Path) -> dict:
    """Copies of ``run`` (checkpoints linked, not copied) with one file edited by hand."""

    def copy(name: str, edit, checkpoints=("checkpoints", "best")) -> Path:
        out = tmp / name
        out.mkdir()
        for item in ("config.json", "manifest.csv", "metrics.csv"):
            (out / item).write_text((run / item).read_text())
        for item in checkpoints:
            (out / item).symlink_to(run / item)
        edit(out / "manifest.csv")
        return out

    def lines(path: Path) -> list[str]:
        return path.read_text().splitlines()

    def bad_label(path):
        rows = lines(path)
        rows[2] = rows[2].replace(",0,", ",x,").replace(",1,", ",x,")
        path.write_text("\n".join(rows) + "\n")

    def missing_image(path):
        rows = lines(path)
        index = next(i for i, r in enumerate(rows) if r.endswith(",test"))
        rows[index] = "gone/" + rows[index]
        path.write_text("\n".join(rows) + "\n")

    return {
        "bad_label_run": copy("bad_label_run", bad_label),
        "extra_class_run": copy("extra_class_run", lambda p: p.write_text(p.read_text() + ",2,purple,\n")),
        "missing_image_run": copy("missing_image_run", missing_image),
        "no_best_run": copy("no_best_run", lambda p: None, checkpoints=("checkpoints",)),
    }


#: (argv, what the one line must say), per command: the mistakes a new user makes.
MISTAKES = {
    "train": [
        (["train"], "no data: pass --data DIR"),
        (["train", "--data", "{missing}"], "no such folder"),
        (["train", "--data", "{file}"], "no such folder"),
        (["train", "--config", "{missing}"], "no such config file"),
        (["train", "--config", "{not_json}"], "not valid JSON"),
        (["train", "--config", "{typo}"], "'learning_rate' is a field of 'phases'"),
        (["train", "--config", "{negative}"], "TrainConfig.batch_size must be an integer >= 1"),
        (["train", "--config", "{good}", "--epochs", "3"], "--epochs and --lr shape the recipe's phases"),
        (
            ["train", "--data", "{data}", "--epochs", "0"],
            "argument --epochs: must be an integer >= 1, got '0'",
        ),
        (["train", "--data", "{data}", "--batch-size", "many"], "argument --batch-size: must be an integer"),
        (["train", "--data", "{data}", "--weights", "none", "--lr", "nan"], "learning_rate must be a number"),
        (
            ["train", "--data", "{data}", "--weights", "none", "--image-size", "48x31"],
            "vgg16 takes images of at least 32x32",
        ),
        (["train", "--data", "{data}", "--image-size", "48x"], "argument --image-size: must be a size"),
        (["train", "--data", "{data}", "--weights", "{missing}"], "no such file or folder"),
        (["train", "--data", "{data}", "--weights", "{fake_jpg}"], "fake.jpg: not an HDF5 file"),
        (["train", "--data", "{data}", "--weights", "none", "--run-dir", "{file}/run"], "run dir"),
        (["train", "--data", "{data}", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    ],
    "evaluate": [
        (["evaluate", "{missing}"], "no such folder (a run folder written by 'imgcls-jax train')"),
        (["evaluate", "{data}"], "not a run folder written by 'imgcls-jax train' (no config.json"),
        (["evaluate", "{run}", "--split", "nope"], "--split nope: "),
        (["evaluate", "{run}", "--checkpoint", "first"], "argument --checkpoint: invalid choice"),
        (["evaluate", "{bad_label_run}"], "manifest.csv, line 3: label 'x' is not an integer"),
        (
            ["evaluate", "{extra_class_run}"],
            "does not fit the model that config.json and manifest.csv (3 classes)",
        ),
        (["evaluate", "{missing_image_run}"], "1 listed image(s) not found: line"),
        (["evaluate", "{no_best_run}", "--checkpoint", "best"], "no finished best checkpoint"),
    ],
    "predict": [
        (["predict", "{run}", "{missing}"], "missing: no such file or folder"),
        (["predict", "{run}", "{fake_jpg}"], "1 of 1 input file(s) cannot be decoded: "),
        (["predict", "{run}", "{data}", "{fake_jpg}"], "1 of 9 input file(s) cannot be decoded: "),
        (["predict", "{run}", "{empty_dir}"], "no image files"),
        (["predict", "{run}", "{fake_jpg}", "--top-k", "0"], "argument --top-k: must be an integer >= 1"),
        (["predict", "{data}", "{fake_jpg}"], "not a run folder"),
        (["predict", "{no_best_run}", "{fake_jpg}", "--checkpoint", "best"], "use --checkpoint latest"),
        (["predict", "{run}"], "the following arguments are required: inputs"),
    ],
    "audit": [
        (["audit", "{missing}"], "no such folder"),
        (["audit", "{one_class}"], "found only one class"),
        (["audit", "{data}", "--tiny", "-1"], "argument --tiny: must be an integer >= 1"),
        (
            ["audit", "{data}", "--mask-threshold", "nan"],
            "argument --mask-threshold: must be a number in (0, 1]",
        ),
        (["audit", "{data}", "--json", "{file}/a.json"], "--json folder"),
    ],
    "port-weights": [
        (["port-weights", "{missing}", "{tmp}/ported"], "no such weight file"),
        (["port-weights", "{fake_jpg}", "{tmp}/ported"], "fake.jpg: not an HDF5 file (30 bytes)"),
        (["port-weights", "{fake_jpg}", "{data}"], "exists and is not empty"),
        (["port-weights", "{fake_jpg}", "{tmp}/ported", "--model", "vgg11"], "invalid choice: 'vgg11'"),
    ],
    "import-keras": [
        (["import-keras", "{missing}", "{tmp}/imported"], "no such file"),
        (["import-keras", "{fake_jpg}", "{tmp}/imported"], "fake.jpg"),
        (["import-keras", "{fake_jpg}", "{data}"], "exists and is not empty"),
        (["import-keras", "{fake_jpg}", "{tmp}/imported", "--data", "{missing}"], "--data"),
        (["import-keras", "{fake_jpg}", "{tmp}/i", "--preprocessing", "bgr"], "invalid choice: 'bgr'"),
    ],
    "export-keras": [
        (["export-keras", "{data}", "{tmp}/out.keras"], "not a run folder"),
        (["export-keras", "{run}", "{tmp}/out.txt"], "must end in .keras"),
        (["export-keras", "{no_best_run}", "{tmp}/out.keras"], "no best checkpoint"),
        (["export-keras", "{run}"], "the following arguments are required: out_file"),
    ],
    "tune": [
        (["tune", "--config", "{missing}"], "no such tune file"),
        (["tune", "--config", "{not_json}"], "not valid JSON"),
        (["tune", "--config", "{typo}"], "needs keys 'base' and 'space'"),
        (["tune", "--config", "{tune_bad_space}"], "search space 'dropout': empty range"),
        (["tune", "--config", "{tune_no_trials}"], "give study.n_trials in the file or --n-trials"),
        (["tune", "--config", "{tune_ok}", "--n-trials", "0"], "study option 'n_trials' must be in [1, "),
        (["tune", "--config", "{tune_ok}", "--data", "{missing}"], "no such folder"),
        (["tune", "--config", "{tune_no_val}"], "a search needs a validation split"),
        (["tune"], "the following arguments are required: --config"),
    ],
    "(none)": [
        ([], "the following arguments are required: COMMAND"),
        (["fly"], "argument COMMAND: invalid choice: 'fly'"),
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
    ],
}
CASES = [(command, argv, expected) for command, cases in MISTAKES.items() for argv, expected in cases]


def _argv(argv: list[str], files: dict) -> list[str]:
    return [arg.format(**{k: str(v) for k, v in files.items()}) for arg in argv]


@pytest.mark.parametrize(("command", "argv", "expected"), CASES, ids=[" ".join(c[1]) or "-" for c in CASES])
def test_a_mistake_is_one_line_and_exit_status_2(files, capsys, command, argv, expected):
    status = cli.main(_argv(argv, files))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2, err
    assert len(lines) == 1 and lines[0].startswith("imgcls-jax: error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err


def test_every_command_is_tried():
    parser = cli.build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    assert commands <= set(MISTAKES), f"no mistakes tried for {commands - set(MISTAKES)}"


def test_verbose_shows_the_traceback_then_the_one_line(files, capsys):
    for argv in (["-v", "evaluate", str(files["data"])], ["evaluate", str(files["data"]), "--verbose"]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback (most recent call last)" in err and "NotARunError" in err
        assert err.strip().splitlines()[-1].startswith("imgcls-jax: error: ")


def test_user_error_classes_all_exist():
    classes = cli.user_error_classes(load=True)
    assert len(classes) == len(cli.USER_ERRORS) + 1  # and UsageError
    assert all(issubclass(c, Exception) for c in classes)
    assert not cli.is_user_error(ValueError("a ValueError on its own is not one")) and not cli.is_user_error(
        KeyError("x")
    )


def _boom(exc: BaseException):
    def raise_it(*args, **kwargs):
        raise exc

    return raise_it


def test_failures_inside_a_run_keep_their_traceback(files, monkeypatch, capsys):
    """The exception types that are mistakes while reading input (ValueError, OSError) are
    failures when raised once a run has started: not caught, so Python prints the traceback."""
    from imgcls_jax.train.loop import NonFiniteLossError

    data, run, out = str(files["data"]), str(files["run"]), str(files["tmp"] / "bug_run")
    train = ["train", "--data", data, "--weights", "none", "--image-size", "32", "--run-dir", out]
    for exc in (
        ValueError("a bug deep inside fit"),
        NonFiniteLossError("loss is nan at step 3"),
        MemoryError(),
    ):
        monkeypatch.setattr("imgcls_jax.train.fit", _boom(exc))
        with pytest.raises(type(exc)):
            cli.main(train)
    monkeypatch.setattr(
        "imgcls_jax.evaluate.evaluate_run", _boom(FileNotFoundError("a bug: a file we wrote"))
    )
    with pytest.raises(FileNotFoundError, match="a bug"):
        cli.main(["evaluate", run])
    monkeypatch.setattr("imgcls_jax.evaluate.load_run", _boom(ValueError("a bug in load_run")))
    with pytest.raises(ValueError, match="a bug in load_run"):
        cli.main(["predict", run, str(files["data"] / "red" / "0.png")])
    search_module = importlib.import_module("imgcls_jax.hpo.trials")  # the module of imgcls_jax.hpo.search
    monkeypatch.setattr(search_module, "search", _boom(ValueError("a bug in the study")))
    with pytest.raises(ValueError, match="a bug in the study"):
        cli.main(["tune", "--config", str(files["tune_ok"])])
    assert "imgcls-jax: error" not in capsys.readouterr().err


def test_the_real_command_exits_2_with_one_line_on_stderr(tmp_path):
    """``python -m imgcls_jax.cli`` in a fresh process: the exit status and the whole of stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "imgcls_jax.cli", "train", "--data", str(tmp_path / "nonexistent")],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [
        f"imgcls-jax: error: --data {tmp_path / 'nonexistent'}: no such folder (the image folder to train on)"
    ], done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


class _Reached(Exception):
    """Raised where a command would start its work: every check of its input passed."""


def _stop_at_the_work(monkeypatch) -> None:
    """Replace the work of every command (training, evaluating, loading a model, auditing,
    building a model, searching) by raising :class:`_Reached`."""
    search_module = importlib.import_module("imgcls_jax.hpo.trials")
    targets = [("imgcls_jax.train", "fit"), ("imgcls_jax.evaluate", "evaluate_run"),
               ("imgcls_jax.evaluate", "load_run"), ("imgcls_jax.data", "audit"),
               ("imgcls_jax.models", "create_model")]  # fmt: skip
    for module, name in targets:
        monkeypatch.setattr(importlib.import_module(module), name, _boom(_Reached(f"{module}.{name}")))
    monkeypatch.setattr(search_module, "search", _boom(_Reached("search")))


VALUES = st.one_of(
    st.sampled_from(["0", "-1", "1", "2", "32", "33", "1e400", "nan", "-inf", "2147483648", "x", "", " ",
                     "none", "auto", "imagenet", "best", "latest", "test", "val", "ünï cødé", "\udcff",
                     "--data"]),
    st.text(max_size=8).filter(lambda t: "\x00" not in t),
)  # fmt: skip
PATH_KEYS = ["data", "run", "missing", "file", "fake_jpg", "empty_dir", "one_class", "good", "typo",
             "tune_ok", "tune_no_val", "bad_label_run", "extra_class_run", "no_best_run"]  # fmt: skip


@st.composite
def command_lines(draw, files):
    """An argv for one command, built from the parser's own options: each option given or not,
    its value a path of ``files``, a choice, or hostile text; positionals likewise."""
    commands = cli.build_parser()._subparsers._group_actions[0].choices
    name = draw(st.sampled_from(sorted(commands)))
    argv = [name]
    value = st.one_of(st.sampled_from(PATH_KEYS).map(lambda k: str(files[k])), VALUES)
    for action in commands[name]._actions:
        if "-h" in action.option_strings or "-v" in action.option_strings:
            continue
        if not action.option_strings:  # a positional: mostly one of the paths
            paths = st.sampled_from(PATH_KEYS).map(lambda k: str(files[k]))
            argv += draw(st.lists(st.one_of(paths, paths, paths, VALUES), min_size=1, max_size=2))
        elif draw(st.booleans()):
            argv.append(draw(st.sampled_from(action.option_strings)))
            if action.nargs != 0:
                argv.append(
                    draw(st.one_of(st.sampled_from(action.choices), value) if action.choices else value)
                )
    return argv


#: Command lines tried (IMGCLS_HOSTILE_EXAMPLES=3000 for a deeper search by hand: a third of it).
LINES = int(os.environ.get("IMGCLS_HOSTILE_EXAMPLES", "300")) // 3


@settings(max_examples=LINES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_command_line_is_accepted_or_one_line_with_status_2(files, monkeypatch, capsys, tmp_path, data):
    """Arguments generated from the parser (hypothesis): the command reaches its work (all its
    checks passed) or prints one ``imgcls-jax: error:`` line with exit status 2; never anything
    else. The work itself is replaced, so nothing trains."""
    monkeypatch.chdir(tmp_path)  # relative paths made up here land in the test's folder
    _stop_at_the_work(monkeypatch)
    argv = data.draw(command_lines(files))
    try:
        status = cli.main(argv)
    except _Reached:
        event(f"{argv[0]}: reached its work")
        return
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    event(f"{argv[0]}: status {status}")
    assert status == 2 and len(lines) == 1 and lines[0].startswith("imgcls-jax: error: "), (argv, status, err)


@pytest.mark.parametrize("name", registry_params())  # the large variants: slow
def test_the_train_command_checks_every_family(name):
    """``imgcls-jax train`` builds each phase's model abstractly (``nnx.eval_shape``) before
    training: every family's constructor must trace (EfficientNet's kernel initializer did not)."""
    from imgcls_jax.cli.commands import check_train_model

    size = model_info(name).min_size
    config = TrainConfig(model=name, data="x", image_size=max(size, 32), weights="random")
    check_train_model(config)
