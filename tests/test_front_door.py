"""The front door (issue #23): one way to build a run (``TrainConfig.recipe``), a frozen config
validated once, the run folder as the truth on resume, one set of evaluation defaults, one
``predict`` for a model or a run, and a fit that fails this test when learning breaks."""

import dataclasses
import logging
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import ConfigError, PhaseConfig, RunMismatchError, TrainConfig, create_model, predict
from imgcls_jax.data import DatasetError

COLORS = {"blue": (30, 30, 200), "green": (30, 190, 30), "red": (200, 30, 30), "yellow": (210, 200, 30)}


def make_images(root, per_class=12, start=0, size=(36, 40), seed=0):
    rng = np.random.default_rng(seed + start)
    for name, color in COLORS.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(start, start + per_class):
            pixels = np.clip(rng.normal(color, 35, (*size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def colors(tmp_path_factory):
    return make_images(tmp_path_factory.mktemp("colors"))


def small(data, run_dir, **kw):
    """A quick run on a random frozen base (on purpose): a linear head learns the colours. (A
    random VGG16's pooled features are small, ~0.07 +- 0.014 at 32 px with Keras's initializer:
    a hidden Dense + ReLU head needs hundreds of steps on them, a linear one a dozen.)"""
    base = dict(
        data=str(data), run_dir=str(run_dir), weights="random", image_size=32, batch_size=8, head_units=(),
        dropout=0.0, splits={"train": 0.5, "val": 0.25, "test": 0.25}, augment={}, seed=1, keep_checkpoints=1,
        phases=[PhaseConfig(epochs=6, trainable="head", learning_rate=3e-2, schedule="constant")],
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


# --------------------------------------------------------------------------------- the recipe
def test_the_recipe_is_a_public_constructor(tmp_path):
    scratch = TrainConfig.recipe(tmp_path / "photos", weights=None, epochs=7, image_size=64)
    assert [(p.trainable, p.epochs, p.learning_rate) for p in scratch.phases] == [("all", 7, 1e-4)]
    assert scratch.run_dir.endswith("runs/photos") and scratch.head_units == (256,) and scratch.dropout == 0.5
    transfer = TrainConfig.recipe(tmp_path, weights="some.h5", epochs=5, learning_rate=3e-3, model="resnet50")
    assert [(p.trainable, p.epochs, p.optimizer) for p in transfer.phases] == [
        ("head", 2, "adam"), ("top:2", 3, "sgd"),
    ]  # fmt: skip
    assert transfer.weights == "some.h5" and transfer.phases[1].base_lr_multiplier == 0.1
    assert transfer.phases[0].learning_rate == 3e-3
    whole = TrainConfig.recipe(tmp_path, init_from="runs/imported")
    assert whole.weights is None and whole.phases[0].trainable == "head"  # the model brings its base
    with pytest.raises(ConfigError, match="not both"):
        TrainConfig.recipe(tmp_path, weights="imagenet", init_from="runs/imported")


def test_a_random_base_kept_frozen_is_a_config_error_that_says_what_to_do():
    with pytest.raises(ConfigError) as info:
        TrainConfig(data="photos")  # the defaults: no weights, a head-only phase
    message = str(info.value)
    assert "phases[0].trainable='head'" in message and "would stay random" in message
    assert all(hint in message for hint in ("weights='imagenet'", "init_from", "'all'", "TrainConfig.recipe"))
    with pytest.raises(ConfigError, match="phases\\[0\\].trainable='top:2'"):
        TrainConfig(data="photos", phases=[PhaseConfig(trainable="top:2")])
    # trained first, frozen later; a base from a file or a whole model; or random on purpose: fine
    TrainConfig(data="photos", phases=[PhaseConfig(trainable="all"), PhaseConfig(trainable="head")])
    TrainConfig(data="photos", phases=[PhaseConfig(trainable="top:5")])  # vgg16's five stages: all
    TrainConfig(data="photos", weights="imagenet")
    TrainConfig(data="photos", init_from="runs/imported")
    TrainConfig(data="photos", weights="random")


def test_a_config_is_frozen_and_replace_validates_again():
    config = TrainConfig(data="photos", weights="random")
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.batch_size = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.phases[0].learning_rate = -1.0
    with pytest.raises(TypeError, match="dataclasses.replace"):
        config.splits["test"] = 0.5
    with pytest.raises(AttributeError):
        config.phases.append(PhaseConfig())
    with pytest.raises(ConfigError, match="TrainConfig.batch_size must be an integer >= 1"):
        replace(config, batch_size=0)
    changed = replace(config, batch_size=4, splits={"train": 0.5, "test": 0.5})
    assert (changed.batch_size, dict(changed.splits), config.batch_size) == (
        4,
        {"train": 0.5, "test": 0.5},
        32,
    )
    assert TrainConfig.from_json(changed.to_json()) == changed


def test_every_config_mistake_is_one_config_error_type(tmp_path):
    """The API, the search space and the command line raise the same ConfigError."""
    from imgcls_jax import cli
    from imgcls_jax.hpo import parse_space

    base = TrainConfig(data=str(tmp_path), weights="random")
    with pytest.raises(ConfigError):
        TrainConfig(data="x", weights="random", data_backend="numpy", augment_on="host")
    with pytest.raises(ConfigError):
        TrainConfig(data="x", weights="imagenet", init_from="runs/imported")
    with pytest.raises(ConfigError):
        parse_space({"dropout": {"type": "float", "low": 0.5, "high": 0.1}}, base)
    with pytest.raises(ConfigError, match="not both"):
        cli.train_config(cli.build_parser().parse_args(
            ["train", "--data", str(tmp_path), "--weights", "none", "--init-from", "x.keras"]
        ))  # fmt: skip


# ------------------------------------------------------------------------ the run folder is the truth
class _Stop(Exception):
    pass


def _stop_after(epoch):
    def callback(e, row):
        if e == epoch:
            raise _Stop

    return callback


def _files(folder):
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def test_resume_reads_the_run_folder_and_refuses_a_changed_config(tmp_path):
    from imgcls_jax import fit

    data = make_images(tmp_path / "data", per_class=8)
    config = small(data, tmp_path / "run")
    with pytest.raises(_Stop):
        fit(config, callbacks=[_stop_after(0)])  # interrupted after its first checkpoint
    run = tmp_path / "run"
    manifest = (run / "manifest.csv").read_bytes()
    make_images(data, per_class=4, start=100)  # new photos arrive in every class folder
    changes = (
        dict(seed=2), dict(model="vgg19"), dict(splits={"train": 0.75, "val": 0.25}),
        dict(augment={"flip": "horizontal"}), dict(phases=[PhaseConfig(epochs=3, trainable="head")]),
    )  # fmt: skip
    for change in changes:
        before = _files(run)
        with pytest.raises(RunMismatchError) as info:
            fit(replace(config, **change))
        field = next(iter(change))
        assert f"{field}" in str(info.value) and "--restart" in str(info.value)
        assert _files(run) == before, f"{field}: the refused resume wrote into the run folder"
    result = fit(replace(config, eval_batch_size=3))  # a field that cannot change results may differ
    assert [h["epoch"] for h in result.history] == list(range(6))
    assert (run / "manifest.csv").read_bytes() == manifest  # not rescanned: the new photos stay out
    assert "/100.png" not in manifest.decode() and "\\100.png" not in manifest.decode()
    (data / "red" / "0.png").unlink()
    with pytest.raises(DatasetError, match="0.png"):
        fit(config)  # a photo of the run is gone: named, before anything runs


def test_a_changed_config_without_a_checkpoint_starts_afresh(tmp_path, caplog):
    from imgcls_jax import fit
    from imgcls_jax.train import RunDir

    data = make_images(tmp_path / "data", per_class=6)
    run = RunDir(tmp_path / "run")
    run.root.mkdir()
    small(data, run.root, seed=7).to_json(run.config)  # an earlier start that trained nothing
    run.manifest.write_text("path,label,class_name,split\n")
    with caplog.at_level(logging.WARNING, logger="imgcls_jax.train"):
        fit(small(data, run.root, phases=[PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2)]))
    assert "nothing was trained yet: starting afresh" in caplog.text and "seed" in caplog.text
    assert TrainConfig.from_json(run.config).seed == 1 and run.manifest.read_text().count("\n") > 20


def test_phases_appended_to_a_finished_run_end_as_the_longer_config_from_the_start(tmp_path, caplog):
    import jax
    from flax import nnx

    from imgcls_jax import fit

    data = make_images(tmp_path / "data", per_class=6)
    head = PhaseConfig(epochs=2, trainable="head", learning_rate=3e-2)
    first = small(data, tmp_path / "run", phases=[head])
    more = PhaseConfig(epochs=2, trainable="top:1", optimizer="sgd", learning_rate=1e-3, image_size=40)
    longer = replace(first, phases=[*first.phases, more])
    fit(first)
    with caplog.at_level(logging.INFO, logger="imgcls_jax.train"):
        extended = fit(longer)
    assert "1 phase(s) appended" in caplog.text and "resuming" in caplog.text
    assert TrainConfig.from_json(tmp_path / "run" / "config.json") == longer
    straight = fit(replace(longer, run_dir=str(tmp_path / "straight")))

    def rows(history):
        return [{k: v for k, v in h.items() if k != "images_per_s"} for h in history]

    assert [h["phase"] for h in extended.history] == [0, 0, 1, 1]
    assert rows(extended.history) == rows(straight.history)
    for a, b in zip(*(jax.tree.leaves(nnx.state(r.model, nnx.Param)) for r in (extended, straight))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    changed_first = replace(longer, phases=[replace(first.phases[0], learning_rate=1e-2), more, more])
    for refused in (first, changed_first):  # a phase dropped, or a stored phase changed
        before = _files(tmp_path / "run")
        with pytest.raises(RunMismatchError, match="phases"):
            fit(refused)
        assert _files(tmp_path / "run") == before


def test_the_readme_progressive_config_appends_to_the_48_epoch_run():
    from pathlib import Path

    from imgcls_jax.config import appended_phases, resume_differences

    configs = Path(__file__).resolve().parents[1] / "examples" / "configs"
    run48 = TrainConfig.from_json(configs / "flowers5_scratch_cpu64_48ep.json")
    prog = TrainConfig.from_json(configs / "flowers5_scratch_prog64_96.json")
    assert resume_differences(run48, prog) == [] and appended_phases(run48, prog) == 1
    assert prog.phases[1].image_size == 96 and appended_phases(prog, run48) == 0


# --------------------------------------------------------------------- evaluation, prediction
@pytest.fixture(scope="module")
def trained(colors, tmp_path_factory):
    from imgcls_jax import fit

    return fit(small(colors, tmp_path_factory.mktemp("trained") / "run"))


def test_evaluation_defaults_are_best_and_test_else_val(trained, colors, tmp_path, caplog):
    from imgcls_jax import evaluate_run, fit, load_run

    report = evaluate_run(trained.run_dir)
    assert report.split == "test" and report.count == 12
    metrics = (report.out_dir / "metrics.json").read_text()
    assert '"checkpoint": "best"' in metrics and load_run(trained.run_dir).which == "best"
    assert evaluate_run(trained.run_dir, split="val", which="latest").split == "val"
    no_val = fit(small(colors, tmp_path / "noval", splits={"train": 0.75, "test": 0.25},
                       phases=[PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2)]))  # fmt: skip
    with caplog.at_level(logging.INFO, logger="imgcls_jax.evaluate"):
        report = evaluate_run(no_val.run_dir)
    assert report.split == "test" and "no best checkpoint" in caplog.text
    assert '"checkpoint": "latest"' in (report.out_dir / "metrics.json").read_text()
    with pytest.raises(DatasetError, match="no 'val' split"):
        evaluate_run(no_val.run_dir, split="val")


def test_predict_takes_a_model_a_run_or_its_folder_and_compiles_once(trained, colors, caplog):
    import jax

    from imgcls_jax import load_run

    loaded = load_run(trained.run_dir)
    files = sorted(str(p) for p in (colors / "red").iterdir())[:3]
    by_folder = predict(trained.run_dir, files, top_k=2)
    by_loaded = predict(loaded, files, top_k=2)
    by_model = predict(loaded.model, files, top_k=2, class_names=loaded.class_names)
    assert by_folder == by_loaded == by_model and len(by_folder) == 3
    bare = create_model("vgg16", num_classes=3, head_units=(4,), pooling="avg", input_shape=(32, 32, 3))
    images = np.zeros((2, 32, 32, 3), np.uint8)
    assert [p.source for p in predict(bare, images)] == ["array[0]", "array[1]"]
    assert {name for name, _ in predict(bare, images)[0].top_k} == {"0", "1", "2"}
    with pytest.raises(ValueError, match="has no classifier"):
        predict(create_model("vgg16", input_shape=(32, 32, 3), include_top=False), images)
    jax.config.update("jax_log_compiles", True)
    try:
        with caplog.at_level(logging.WARNING, logger="jax"):
            for _ in range(3):
                predict(loaded, files, top_k=1)
            predict(loaded.model, images[:1], class_names=loaded.class_names)  # a new batch shape
    finally:
        jax.config.update("jax_log_compiles", False)
    compiled = [r.getMessage() for r in caplog.records if "Compiling jit(probabilities)" in r.getMessage()]
    assert len(compiled) == 1, compiled  # the first shape was compiled by the calls above


# ----------------------------------------------------------------------- learning must show
def _learned(config) -> float:
    """The validation accuracy of ``config``'s last epoch."""
    from imgcls_jax import fit

    return fit(config).history[-1]["val_accuracy"]


@pytest.fixture
def fresh_steps():
    """Compiled steps built under a patch must not outlive it (nor be reused by it)."""
    from imgcls_jax.train import steps

    steps._JIT_CACHE.clear()
    yield
    steps._JIT_CACHE.clear()


def test_fit_learns_separable_colours_and_this_test_fails_when_learning_breaks(
    trained, colors, tmp_path, monkeypatch, fresh_steps
):
    """Four colours, a linear head on a random frozen base: >= 95% of the held-out images right
    after six epochs (18 steps). The same run with the gradient's sign flipped, or a learning
    rate of zero (each by a temporary patch here), stays below it: the threshold is what tells
    learning from not."""
    import jax

    from imgcls_jax.train.optim import OptimizerSpec

    assert trained.history[-1]["val_accuracy"] >= 0.95, trained.history
    value_and_grad = jax.value_and_grad

    def ascending(fun, **kw):
        def run(*args):
            value, grads = value_and_grad(fun, **kw)(*args)
            return value, jax.tree.map(lambda g: -g, grads)

        return run

    with monkeypatch.context() as patch:
        patch.setattr(jax, "value_and_grad", ascending)
        flipped = _learned(small(colors, tmp_path / "flipped"))
    for_phase = OptimizerSpec.for_phase.__func__

    def zero_rate(cls, *args, **kw):
        spec, hyper = for_phase(cls, *args, **kw)
        return spec, {**hyper, "learning_rate": 0.0}

    from imgcls_jax.train import steps

    steps._JIT_CACHE.clear()
    with monkeypatch.context() as patch:
        patch.setattr(OptimizerSpec, "for_phase", classmethod(zero_rate))
        frozen = _learned(small(colors, tmp_path / "zero_lr"))
    assert flipped < 0.95 and frozen < 0.95, (flipped, frozen)
