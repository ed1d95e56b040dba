"""Hyperparameter search: space checks, a real pruned search, faults, SIGKILL resume, two workers.

Trials train the head of a random-weight VGG16 on 32x32 copies of real flower photos (made in
tmp_path from ../shared/data/flowers5): a few seconds each on 2 CPU cores.
"""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from imgcls_jax.config import AugmentConfig, ConfigError, PhaseConfig, TrainConfig
from imgcls_jax.hpo import (
    apply_params,
    is_trial_fault,
    load_tune_config,
    parse_space,
    search,
)
from tests import helpers  # noqa: E402

optuna = pytest.importorskip("optuna")
ROOT = Path(__file__).resolve().parents[1]
FLOWERS = helpers.flowers()  # the shared flowers5, else the embedded sample of it
PNG = b"\x89PNG\r\n\x1a\n"
SPACE = {
    "phases.0.learning_rate": {"type": "float", "low": 1e-5, "high": 0.3, "log": True},
    "dropout": {"type": "float", "low": 0.0, "high": 0.5},
    "phases.*.weight_decay": {"type": "float", "low": 1e-6, "high": 1e-2, "log": True},
    "label_smoothing": {"type": "float", "low": 0.0, "high": 0.2},
}


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    """3 classes x 16 real photos, downscaled to 32x32 PNGs in a temporary folder."""
    root = tmp_path_factory.mktemp("flowers_tiny")
    for name in sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())[:3]:
        (root / name).mkdir()
        for f in sorted((FLOWERS / name).iterdir())[:16]:
            Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR).save(root / name / f"{f.stem}.png")
    return root


def base_config(data, run_dir, epochs=3, **kw):
    fields = dict(
        data=str(data), run_dir=str(run_dir), weights="random", image_size=32, batch_size=8, head_units=(16,),
        augment={},
        monitor="val_loss", seed=0, keep_checkpoints=1,
        phases=[PhaseConfig(epochs=epochs, trainable="head", learning_rate=1e-3, schedule="constant")],
    )  # fmt: skip
    fields.update(kw)
    return TrainConfig(**fields)


# -- the search space -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "space, message",
    [
        (
            {"learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2}},
            "unknown parameter 'learning_rate'",
        ),
        ({"phases.3.learning_rate": {"type": "float", "low": 0.1, "high": 1}}, "phases has 2 entries"),
        ({"phases.0.lr": {"type": "float", "low": 0.1, "high": 1}}, "'lr' is not a key of phases.0"),
        ({"augment.spin": {"type": "float", "low": 0, "high": 1}}, "'spin' is not a key of augment"),
        ({"dropout": {"type": "float", "low": 0.5, "high": 0.5}}, "'dropout': empty range"),
        ({"dropout": {"type": "float", "low": 0.6, "high": 0.2}}, "'dropout': empty range"),
        (
            {"batch_size": {"type": "categorical", "choices": []}},
            "'batch_size': 'choices' must be a non-empty",
        ),
        ({"phases.0.learning_rate": {"type": "float", "low": 0, "high": 1, "log": True}}, "log range"),
        ({"dropout": {"type": "uniform", "low": 0, "high": 1}}, "expected {'type'"),
        ({"dropout": {"type": "float", "low": 0, "high": 0.5, "choices": [1]}}, "unknown key"),
        ({"batch_size": {"type": "float", "low": 4, "high": 16}}, "integer field"),
        (
            {"phases.1.trainable": {"type": "categorical", "choices": ["top:2", "top:9"]}},
            "'top:9' is invalid",
        ),
        ({"dropout": {"type": "float", "low": 0.0, "high": 1.5}}, "value 1.5 is invalid"),
        (
            {"kernel_init": {"type": "categorical", "choices": ["he_normal", "kaiming"]}},
            "'kaiming' is invalid",
        ),
        ({}, "non-empty mapping"),
    ],
)
def test_invalid_space_is_an_error_before_any_trial(tmp_path, space, message):
    base = base_config(tmp_path / "none", tmp_path / "study")
    base = replace(base, phases=[*base.phases, PhaseConfig(trainable="top:1")])
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("{", r"\{")):
        search(base, space, 3)
    assert not (tmp_path / "study").exists()  # nothing ran, nothing was written


def test_apply_params_sets_paths_lists_wildcards_and_augment_strength(tmp_path):
    base = base_config(
        tmp_path, tmp_path / "run", augment={"flip": "horizontal", "rotation": 0.4, "hue": 0.3}
    )
    base = replace(base, phases=[*base.phases, PhaseConfig(trainable="top:1", weight_decay=0.5)])
    cfg = apply_params(
        base,
        {"phases.*.weight_decay": 1e-4, "head_units": [64, 32], "phases.1.trainable": "top:2",
         "augment_strength": 2.0, "augment.zoom": 0.2},
    )  # fmt: skip
    assert [p.weight_decay for p in cfg.phases] == [1e-4, 1e-4]
    assert cfg.head_units == (64, 32) and cfg.phases[1].trainable == "top:2"
    assert cfg.augment == AugmentConfig(flip="horizontal", rotation=0.8, hue=0.5, zoom=0.2)  # hue clipped
    assert apply_params(base, {"head_units.0": 48}).head_units == (48,)
    assert base.phases[1].weight_decay == 0.5 and base.head_units == (16,)  # the base is not modified
    space = {
        "head_units": {"type": "categorical", "choices": [[16], [32, 16]]},
        "batch_size": {"type": "int", "low": 4, "high": 8},
    }
    params = parse_space(space, base)
    assert [p.encoded for p in params] == [True, False]


# -- a real search ----------------------------------------------------------------------------


def test_search_prunes_and_exports_a_best_config_that_trains(flowers, tmp_path):
    from imgcls_jax.train.loop import fit

    base = base_config(flowers, tmp_path / "study")
    result = search(
        base, SPACE, 6, pruner="median", pruner_options={"n_startup_trials": 2, "n_warmup_steps": 0}
    )
    trials = result.study.get_trials()
    assert len(trials) == 6 and result.states.get("PRUNED", 0) >= 1 and result.states.get("COMPLETE", 0) >= 2
    for t in trials:
        run = Path(t.user_attrs["run_dir"])
        assert run.parent == tmp_path / "study" / "trials"
        assert (
            TrainConfig.from_json(run / "config.json").phases[0].learning_rate
            == t.params["phases.0.learning_rate"]
        )
        epochs = len((run / "metrics.csv").read_text().splitlines()) - 1
        # every epoch reported; a completed trial ran all 3, a pruned one stopped before the end
        assert epochs == len(t.intermediate_values) and sorted(t.intermediate_values) == list(range(epochs))
        assert epochs == 3 if t.state.name == "COMPLETE" else 1 <= epochs < 3
        assert (run / "best").is_dir()  # checkpoint of the trial's best epoch
    rows = (tmp_path / "study" / "trials.csv").read_text().splitlines()
    assert len(rows) == 7 and rows[0].startswith("number,state,value")
    assert sorted(p.name for p in result.plots) == [
        "intermediate_values.png", "optimization_history.png", "param_importances.png",
    ]  # fmt: skip
    assert all(p.read_bytes()[:8] == PNG and p.stat().st_size > 5000 for p in result.plots)
    # The exported file is a plain TrainConfig that retrains the best trial exactly.
    best = TrainConfig.from_json(result.best_config_path)
    assert best.run_dir == str(tmp_path / "study" / "best_run")
    assert best.phases[0].learning_rate == result.study.best_params["phases.0.learning_rate"]
    retrained = fit(best)
    assert min(h["val_loss"] for h in retrained.history) == pytest.approx(result.best_value, rel=1e-6)


def test_nan_trial_is_recorded_failed_with_its_reason_and_the_study_goes_on(flowers, tmp_path):
    base = base_config(flowers, tmp_path / "study", epochs=1)
    base = replace(base, phases=[replace(base.phases[0], optimizer="sgd")])
    space = {"phases.0.learning_rate": {"type": "categorical", "choices": [1e-3, 1e30]}}
    result = search(base, space, 4, sampler="random", seed=1, pruner="none", plots=False)
    states = {t.number: (t.state.name, t.params["phases.0.learning_rate"]) for t in result.study.get_trials()}
    assert {s for s, lr in states.values() if lr == 1e30} == {"FAIL"}, states
    assert {s for s, lr in states.values() if lr == 1e-3} == {"COMPLETE"}, states
    failed = [t for t in result.study.get_trials() if t.state.name == "FAIL"]
    assert all("NonFiniteLossError: loss is" in t.user_attrs["fail_reason"] for t in failed)
    assert "NonFiniteLossError" in (tmp_path / "study" / "trials.csv").read_text()
    assert result.best_config is not None and result.best_config.phases[0].learning_rate == 1e-3


def test_out_of_memory_is_a_trial_fault_but_a_bug_stops_the_study(tmp_path, monkeypatch):
    import imgcls_jax.train.loop as loop

    XlaRuntimeError = type("XlaRuntimeError", (RuntimeError,), {})
    oom = XlaRuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 123 bytes")
    assert is_trial_fault(oom) and is_trial_fault(MemoryError()) and not is_trial_fault(KeyError("x"))
    (tmp_path / "data").mkdir()
    base = base_config(tmp_path / "data", tmp_path / "study")

    def raise_(exc):
        def fake_fit(config, **kw):
            raise exc

        return fake_fit

    monkeypatch.setattr(loop, "fit", raise_(oom))
    result = search(base, SPACE, 3, plots=False)
    assert result.states == {"FAIL": 3} and result.best_config is None
    assert all("RESOURCE_EXHAUSTED" in t.user_attrs["fail_reason"] for t in result.study.get_trials())
    monkeypatch.setattr(loop, "fit", raise_(KeyError("a bug")))
    storage = f"sqlite:///{tmp_path / 'bug.db'}"
    with pytest.raises(KeyError, match="a bug"):
        search(base, SPACE, 3, storage=storage, study_dir=tmp_path / "bug", plots=False)
    (trial,) = optuna.load_study(study_name="imgcls", storage=storage).get_trials()
    assert trial.state.name == "FAIL" and "KeyError" in trial.user_attrs["fail_reason"]


def test_search_needs_a_validation_split(tmp_path):
    base = base_config(tmp_path, tmp_path / "study", splits={"train": 1.0})
    with pytest.raises(ValueError, match="needs a validation split"):
        search(base, SPACE, 2)


# -- processes: SIGKILL and resume, two workers -------------------------------------------------

WORKER = """
import sys, logging
from imgcls_jax.config import TrainConfig
from imgcls_jax.hpo import search
cfg, storage, worker, n, space = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
import json
search(TrainConfig.from_json(cfg), json.loads(space), n, storage=storage, worker=worker, pruner="none",
       heartbeat_s=1, grace_s=3, plots=False)
"""


def start_worker(cfg_path, storage, worker, n_trials, space=SPACE):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [
        sys.executable,
        "-c",
        WORKER,
        str(cfg_path),
        storage,
        str(worker),
        str(n_trials),
        json.dumps(space),
    ]
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(proc, timeout=400):
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"worker timed out:\n{err.decode()[-3000:]}")
    assert proc.returncode == 0, err.decode()[-3000:]


@pytest.mark.slow  # worker processes (~30 s); tests/test_hpo_postgres.py runs in the quick tier
def test_sigkilled_study_resumes_from_sqlite_without_losing_a_completed_trial(flowers, tmp_path):
    base = base_config(flowers, tmp_path / "study", epochs=2)
    base.to_json(tmp_path / "base.json")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    proc = start_worker(tmp_path / "base.json", storage, 0, 4)
    deadline = time.time() + 400
    try:
        while time.time() < deadline and proc.poll() is None:
            time.sleep(0.3)
            try:
                trials = optuna.load_study(study_name="imgcls", storage=storage).get_trials()
            except KeyError:  # the study is not created yet
                continue
            states = [t.state.name for t in trials]
            if states.count("COMPLETE") >= 2 and "RUNNING" in states:
                break
        assert proc.poll() is None, "the search ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        proc.kill()
    before = {t.number: t for t in optuna.load_study(study_name="imgcls", storage=storage).get_trials()}
    done_before = {n: t.value for n, t in before.items() if t.state.name == "COMPLETE"}
    killed = [n for n, t in before.items() if t.state.name == "RUNNING"]
    assert len(done_before) >= 2 and len(killed) == 1
    time.sleep(3.5)  # past the grace period: the dead worker's trial is stale
    result = search(base, SPACE, 4, storage=storage, pruner="none", heartbeat_s=1, grace_s=3, plots=False)
    after = {t.number: t for t in result.study.get_trials()}
    assert {n: after[n].value for n in done_before} == done_before  # no completed trial lost or redone
    assert after[killed[0]].state.name == "FAIL"  # failed as stale, not counted, run again
    assert sum(t.state.name == "COMPLETE" for t in after.values()) == 4
    assert result.best_config_path.is_file()


@pytest.mark.slow  # worker processes (~30 s); tests/test_hpo_postgres.py runs in the quick tier
def test_two_workers_share_one_study_and_complete_n_trials_without_duplicates(flowers, tmp_path):
    base = base_config(flowers, tmp_path / "study", epochs=1)
    base.to_json(tmp_path / "base.json")
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    workers = [start_worker(tmp_path / "base.json", storage, w, 5) for w in (0, 1)]
    try:
        for proc in workers:
            finish(proc)
    finally:
        for proc in workers:
            proc.kill()
    trials = optuna.load_study(study_name="imgcls", storage=storage).get_trials()
    finished = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(finished) == 5, [(t.number, t.state.name, t.user_attrs) for t in trials]
    assert all(t.user_attrs.get("surplus") for t in trials if t.state.name != "COMPLETE")
    assert len({t.user_attrs["run_dir"] for t in finished}) == 5  # each trial ran once, in its own dir
    assert len({json.dumps(t.params, sort_keys=True) for t in finished}) == 5  # no repeated sample
    for t in finished:
        metrics = Path(t.user_attrs["run_dir"]) / "metrics.csv"
        assert len(metrics.read_text().splitlines()) == 2  # one epoch, trained exactly once


# -- the tune command -------------------------------------------------------------------------


def test_tune_command_runs_a_tune_file_and_the_example_file_is_valid(flowers, tmp_path):
    import argparse

    from imgcls_jax.hpo import add_tune_parser, load_tune_config

    example = load_tune_config(ROOT / "examples" / "configs" / "tune_flowers.json")
    parse_space(example.space, example.base)
    tune = {
        "base": json.loads(base_config(flowers, tmp_path / "study", epochs=1).to_json()),
        "space": {"phases.0.learning_rate": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}},
        "study": {"n_trials": 5, "pruner": "none"},
    }
    (tmp_path / "tune.json").write_text(json.dumps(tune))
    parser = argparse.ArgumentParser()
    add_tune_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["tune", "--config", str(tmp_path / "tune.json"), "--n-trials", "2", "--no-plots"]
    )
    assert args.func(args) == 0
    best = TrainConfig.from_json(tmp_path / "study" / "best_config.json")
    assert len((tmp_path / "study" / "trials.csv").read_text().splitlines()) == 3  # --n-trials won
    assert best.image_size == 32 and not (tmp_path / "study" / "plots").exists()
    with pytest.raises(ConfigError, match=r"unknown 'study' option 'trials'; known: \[.*'n_trials'"):
        load_tune_config(json.dumps({**tune, "study": {"trials": 3}}))
    with pytest.raises(FileNotFoundError, match="no such tune file"):
        load_tune_config(tmp_path / "missing.json")


def test_import_needs_neither_tensorflow_nor_optuna():
    code = "import sys, imgcls_jax.hpo; print('tensorflow' in sys.modules, 'optuna' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_the_quick_example_tune_file_is_valid():
    quick = load_tune_config(ROOT / "examples" / "configs" / "tune_flowers_quick.json")
    parse_space(quick.space, quick.base)
    assert quick.base.weights == "random"  # runs without network: a seeded random base


def test_the_search_space_can_choose_the_model(flowers, tmp_path):
    """``"model"`` as a categorical: each trial builds and trains the family it drew (a BatchNorm
    family included, its statistics checkpointed); an unknown family fails before any trial."""
    from imgcls_jax.hpo.space import parse_space

    space = {"model": {"type": "categorical", "choices": ["vgg16", "efficientnetb0"]}}
    with pytest.raises(ConfigError, match="model"):
        parse_space(
            {"model": {"type": "categorical", "choices": ["vgg16", "resnet9000"]}},
            base_config(flowers, tmp_path),
        )
    result = search(
        base_config(flowers, tmp_path / "study", epochs=1), space, 3, sampler="random", seed=1, plots=False
    )
    drawn = []
    for t in result.study.get_trials():
        assert t.state.name == "COMPLETE"
        run = Path(t.user_attrs["run_dir"])
        assert TrainConfig.from_json(run / "config.json").model == t.params["model"]
        has_stats = (run / "checkpoints" / "0" / "batch_stats").is_dir()
        assert has_stats == (t.params["model"] == "efficientnetb0")
        drawn.append(t.params["model"])
    assert set(drawn) == {"vgg16", "efficientnetb0"}, drawn


def test_the_study_options_checked_are_those_search_takes():
    """``config.STUDY_OPTIONS`` (what a tune file's ``study`` is checked against) names each
    keyword option of :func:`imgcls_jax.hpo.search` with its type, and ``n_trials``."""
    import inspect
    import typing

    from imgcls_jax.config import STUDY_OPTIONS

    hints = typing.get_type_hints(search)
    options = {n for n, p in inspect.signature(search).parameters.items() if p.kind is p.KEYWORD_ONLY}
    assert set(STUDY_OPTIONS) == options | {"n_trials"}
    path_like = {str | Path | None}
    for name in options:
        want = str | None if hints[name] in path_like else hints[name]
        assert STUDY_OPTIONS[name] == want, name
