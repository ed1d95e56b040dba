"""Keras's training conveniences, mapped: each mapping tested against Keras 3 itself.

* ``ReduceLROnPlateau``, ``EarlyStopping(restore_best_weights=True)`` and
  ``ModelCheckpoint(save_best_only=True)``: the pure functions of imgcls_jax.train.callbacks take
  the real callbacks' decisions on random sequences of monitored values (hypothesis), and
  ``fit`` (schedule ``plateau``, ``early_stopping_patience``, the ``best/`` checkpoint) takes them
  on a prescribed sequence, resumed or not.
* ``ImageDataGenerator``: ``from_image_data_generator`` converts its arguments;
  for the same explicit transform the tf.data warp gives its pixels, and the sampled parameters
  have its distributions.
* ``image_dataset_from_directory``: the same classes, labels and files as ``scan_folder`` on a
  real folder; its ``validation_split`` is a plain seeded cut where ``split_records`` stratifies.
"""

import logging
import math
import os
import tempfile
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls_jax.config import AugmentConfig, PhaseConfig, TrainConfig
from imgcls_jax.train import callbacks as cb
from tests import helpers

keras = pytest.importorskip("keras")
tf = pytest.importorskip("tensorflow")
from keras.src.legacy.preprocessing.image import ImageDataGenerator  # noqa: E402

from imgcls_jax.data import augment as aug  # noqa: E402  (its helpers take explicit parameters)
from imgcls_jax.data import from_image_data_generator  # noqa: E402

# ------------------------------------------------------------------ the callbacks, driven by Keras
#: Steps of a random walk of monitored values: ties, changes about Keras's default min_delta
#: (1e-4, where float32 rounding decides), and ordinary moves.
STEPS = st.one_of(
    st.sampled_from([0.0, 0.0, 1e-9, -1e-9, 1e-4, -1e-4, 1.00001e-4, -1.00001e-4, 5e-5, -5e-5, 0.01, -0.01]),
    st.floats(-0.2, 0.2, allow_nan=False),
)


@st.composite
def score_sequences(draw, missing: bool = True):
    """1-20 monitored values; some may be NaN, and None (the epoch has no such value)."""
    values = list(np.cumsum([draw(st.floats(0, 2)), *draw(st.lists(STEPS, max_size=19))]))
    for _ in range(draw(st.integers(0, 2))):
        values[draw(st.integers(0, len(values) - 1))] = draw(
            st.sampled_from([math.nan, None] if missing else [math.nan])
        )
    return [None if v is None else float(v) for v in values]


@pytest.fixture(scope="module")
def keras_model():
    """A compiled one-unit model: the callbacks read and set its optimizer's learning rate."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.01), loss="mse")
    return model


def _logs(value) -> dict:
    return {} if value is None else {"val_loss": value}


def _drive(callback, model, scores, after_epoch=lambda epoch: None) -> None:
    """Keras's epoch-end calls for ``scores``, as ``fit`` makes them; stops when the model is told
    to stop (``after_epoch`` sees each epoch)."""
    callback.set_model(model)
    callback.on_train_begin()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "monitored metric not available" for the None epochs
        for epoch, value in enumerate(scores):
            model.stop_training = False
            callback.on_epoch_begin(epoch)
            callback.on_epoch_end(epoch, _logs(value))
            after_epoch(epoch)
            if model.stop_training:
                return


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scores=score_sequences(),
    mode_max=st.booleans(),
    factor=st.sampled_from([0.1, 0.5, 0.2]),
    patience=st.integers(1, 4),
    min_delta=st.sampled_from([0.0, 1e-4, 0.05]),
    cooldown=st.integers(0, 2),
    min_lr=st.sampled_from([0.0, 1e-3]),
    lr=st.sampled_from([0.01, 3e-4, 0.1]),
)
def test_plateau_learning_rates_are_reduce_lr_on_plateau(
    keras_model, scores, mode_max, factor, patience, min_delta, cooldown, min_lr, lr
):
    keras_model.optimizer.learning_rate = lr
    callback = keras.callbacks.ReduceLROnPlateau(
        monitor="val_loss", mode="max" if mode_max else "min", factor=factor, patience=patience,
        min_delta=min_delta, cooldown=cooldown, min_lr=min_lr,
    )  # fmt: skip
    expected = []
    _drive(
        callback, keras_model, scores, lambda _: expected.append(float(keras_model.optimizer.learning_rate))
    )
    ours = cb.plateau_learning_rates(
        scores, lr, mode_max=mode_max, factor=factor, patience=patience, min_delta=min_delta,
        cooldown=cooldown, min_lr=min_lr,
    )  # fmt: skip
    assert ours == expected  # the same float32 values, epoch by epoch


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    scores=score_sequences(),
    mode_max=st.booleans(),
    patience=st.integers(1, 5),
    min_delta=st.sampled_from([0.0, 1e-4, 0.05]),
    baseline=st.sampled_from([None, 0.5, 1.0]),
    start_from_epoch=st.integers(0, 3),
)
@example(  # a subnormal score: TensorFlow's CPU comparison flushes it to zero (found in CI)
    scores=[0.0, 0.0, 0.0, 1.401298464324817e-45],
    mode_max=True,
    patience=1,
    min_delta=0.0,
    baseline=None,
    start_from_epoch=2,
)
def test_early_stopping_epoch_and_best_epoch_are_early_stopping(
    keras_model, scores, mode_max, patience, min_delta, baseline, start_from_epoch
):
    callback = keras.callbacks.EarlyStopping(
        monitor="val_loss", mode="max" if mode_max else "min", patience=patience, min_delta=min_delta,
        baseline=baseline, start_from_epoch=start_from_epoch, restore_best_weights=True,
    )  # fmt: skip
    stopped = []
    _drive(callback, keras_model, scores, lambda e: stopped.append(e) if keras_model.stop_training else None)
    ours = cb.early_stopping_epoch(
        scores, mode_max=mode_max, patience=patience, min_delta=min_delta, baseline=baseline,
        start_from_epoch=start_from_epoch,
    )  # fmt: skip
    assert ours == (stopped[0] if stopped else None)
    if callback.best_weights is not None:  # the epoch restore_best_weights restores
        seen = scores[: len(scores) if ours is None else ours + 1]
        seen = [None if i < start_from_epoch else v for i, v in enumerate(seen)]
        assert cb.best_epoch(seen, mode_max=mode_max, min_delta=min_delta) == callback.best_epoch


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scores=score_sequences(missing=False), mode_max=st.booleans())
def test_improvements_are_the_epochs_model_checkpoint_saves(keras_model, scores, mode_max):
    with tempfile.TemporaryDirectory() as folder:
        callback = keras.callbacks.ModelCheckpoint(
            os.path.join(folder, "e{epoch:03d}.weights.h5"), monitor="val_loss",
            mode="max" if mode_max else "min", save_best_only=True, save_weights_only=True,
        )  # fmt: skip
        _drive(callback, keras_model, scores)
        saved = sorted(int(name[1:4]) - 1 for name in os.listdir(folder))  # Keras names epoch + 1
    marks = cb.improvements(scores, mode_max=mode_max)
    assert [i for i, better in enumerate(marks) if better] == saved
    assert cb.best_epoch(scores, mode_max=mode_max) == saved[-1]


def test_is_improvement_compares_in_float32_as_keras():
    # 0.8 + 1e-9 and 0.8 are one float32: not an improvement for Keras, nor here.
    assert not cb.is_improvement(0.8 + 1e-9, 0.8, mode_max=True)
    assert cb.is_improvement(0.8 + 1e-6, 0.8, mode_max=True)
    assert not cb.is_improvement(0.7, 0.7, mode_max=False)  # a tie is not an improvement
    assert not cb.is_improvement(0.79995, 0.8, mode_max=False, min_delta=1e-4)
    assert cb.is_improvement(math.nan, None, mode_max=True) and not cb.is_improvement(
        0.9, math.nan, mode_max=True
    )


# -------------------------------------------------------------------- the same decisions in fit
#: val_loss by epoch: at epoch 2 an improvement smaller than the plateau's min_delta (1e-4: the
#: rate is halved, yet it is the best checkpoint so far), later a stall that early stopping
#: (patience 2) ends after epoch 6.
VAL_LOSS = [1.0, 0.8, 0.79995, 0.81, 0.7, 0.75, 0.76, 0.6, 0.5]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for name, colour in (("blue", (30, 30, 200)), ("red", (200, 30, 30))):
        (root / name).mkdir()
        for i in range(8):
            pixels = np.clip(rng.normal(colour, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def _plateau_config(data, run_dir, epochs: int, patience: int) -> TrainConfig:
    """Head-only, no augmentation (so the base's outputs are computed once), val_loss monitored."""
    return TrainConfig(
        data=str(data), run_dir=str(run_dir), image_size=32, batch_size=4, head_units=(8,), seed=0,
        weights="random", augment=AugmentConfig(), monitor="val_loss", early_stopping_patience=patience,
        keep_checkpoints=1,
        phases=[PhaseConfig(epochs=epochs, trainable="head", learning_rate=0.01, schedule="plateau",
                            plateau_factor=0.5, plateau_patience=1)],
    )  # fmt: skip


@pytest.fixture
def prescribed_validation(monkeypatch):
    """``fit``'s validation replaced by the scores given (the rest of the run is real)."""
    from imgcls_jax.train.loop import Trainer

    def use(scores):
        def validate(self, phase, row):
            row["val_loss"], row["val_accuracy"] = scores[row["epoch"]], 0.5

        monkeypatch.setattr(Trainer, "validate", validate)

    return use


def _keras_run(scores, lr, *, plateau_patience, factor, patience):
    """Keras's fit with ReduceLROnPlateau, EarlyStopping and ModelCheckpoint(save_best_only) on
    ``scores``: (the learning rate of each epoch run, the best checkpoint's epoch)."""
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)])
    model.compile(optimizer=keras.optimizers.Adam(learning_rate=lr), loss="mse")
    plateau = keras.callbacks.ReduceLROnPlateau("val_loss", factor=factor, patience=plateau_patience)
    stopping = keras.callbacks.EarlyStopping("val_loss", patience=patience, restore_best_weights=True)
    lrs = []
    with tempfile.TemporaryDirectory() as folder:
        best = keras.callbacks.ModelCheckpoint(
            os.path.join(folder, "e{epoch:03d}.weights.h5"), "val_loss", save_best_only=True,
            save_weights_only=True,
        )  # fmt: skip
        callbacks = keras.callbacks.CallbackList([plateau, stopping, best], model=model)
        callbacks.on_train_begin()
        for epoch, value in enumerate(scores):
            lrs.append(float(model.optimizer.learning_rate))
            callbacks.on_epoch_begin(epoch)
            callbacks.on_epoch_end(epoch, {"val_loss": value})
            if model.stop_training:
                break
        saved = max(int(name[1:4]) - 1 for name in os.listdir(folder))
    assert saved == stopping.best_epoch
    return lrs, saved


def test_fit_reduces_stops_and_keeps_the_best_as_keras_and_resumed(
    tiny_folder, tmp_path, prescribed_validation
):
    """One run, stopped after epoch 3 and resumed: the epochs before use the decisions taken
    as it goes, those after the ones recomputed from metrics.csv."""
    from imgcls_jax import load_run
    from imgcls_jax.train.loop import fit

    prescribed_validation(VAL_LOSS)
    lrs, best = _keras_run(VAL_LOSS, 0.01, plateau_patience=1, factor=0.5, patience=2)
    assert len(lrs) == 7 and best == 4 and lrs[3] == lrs[2] / 2  # stops early, halves at epoch 2

    class Stop(Exception):
        pass

    def stop_after_3(epoch, row):
        if epoch == 3:
            raise Stop

    config = _plateau_config(tiny_folder, tmp_path / "run", epochs=len(VAL_LOSS), patience=2)
    with pytest.raises(Stop):
        fit(config, callbacks=[stop_after_3])
    result = fit(config)
    assert result.stopped_early and [row["epoch"] for row in result.history] == list(range(len(lrs)))
    np.testing.assert_allclose([row["learning_rate"] for row in result.history], lrs, rtol=1e-6)
    assert load_run(result.run_dir, "best").epoch == best


def test_fit_keeps_the_first_of_equal_best_scores_as_keras(tiny_folder, tmp_path, prescribed_validation):
    from imgcls_jax import load_run
    from imgcls_jax.train.loop import fit

    scores = [1.0, 0.7, 0.7]
    prescribed_validation(scores)
    _, best = _keras_run(scores, 0.01, plateau_patience=5, factor=0.5, patience=5)
    result = fit(_plateau_config(tiny_folder, tmp_path / "run", epochs=len(scores), patience=5))
    assert best == 1 and load_run(result.run_dir, "best").epoch == best


# ----------------------------------------------------------------- schedule and loss of compile()
@pytest.mark.parametrize("total, warmup", [(120, 20), (87 * 12, 174), (50, 0)])
def test_cosine_with_warmup_is_keras_cosine_decay(total, warmup):
    """``PhaseConfig(schedule="cosine", warmup_epochs=)``'s rate at every step is
    ``CosineDecay(0.0, decay_steps=total - warmup, warmup_target=lr, warmup_steps=warmup)``'s."""
    from imgcls_jax.train.optim import make_schedule

    ours = make_schedule("cosine", 2e-4, total, warmup_steps=warmup)
    theirs = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else 2e-4, decay_steps=total - warmup, alpha=0.0,
        warmup_target=2e-4 if warmup else None, warmup_steps=warmup,
    )  # fmt: skip
    steps = np.arange(total + 1)
    got = np.array([float(ours(int(t))) for t in steps])
    want = np.array([float(theirs(int(t))) for t in steps])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-11)


def test_label_smoothing_is_keras_categorical_crossentropy():
    from imgcls_jax.train.steps import cross_entropy

    rng = np.random.default_rng(0)
    logits, labels = rng.normal(0, 3, (64, 5)).astype(np.float32), rng.integers(0, 5, 64)
    onehot = np.eye(5, dtype=np.float32)[labels]
    for smoothing in (0.0, 0.1, 0.3):
        ours = float(np.mean(cross_entropy(logits, labels, label_smoothing=smoothing)))
        for from_logits, outputs in ((True, logits), (False, keras.ops.softmax(logits))):
            loss = keras.losses.CategoricalCrossentropy(from_logits=from_logits, label_smoothing=smoothing)
            np.testing.assert_allclose(ours, float(loss(onehot, outputs)), rtol=1e-5)


# ------------------------------------------------------------------------- ImageDataGenerator
def test_image_data_generator_arguments_convert_exactly(caplog):
    kwargs = dict(
        rotation_range=20, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.1,
        horizontal_flip=True, fill_mode="nearest",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, "imgcls_jax.config"):
        config = from_image_data_generator(**kwargs)
    assert config == AugmentConfig(
        flip="horizontal", rotation=20 / 360, zoom=0.1, translation=0.1, fill_mode="nearest"
    )
    assert "x and y zoom independently" in caplog.text
    assert from_image_data_generator() == AugmentConfig(fill_mode="nearest")  # IDG's default
    both = from_image_data_generator(
        horizontal_flip=True, vertical_flip=True, zoom_range=[0.8, 1.2], fill_mode="constant", cval=128
    )
    assert (both.flip, both.zoom, both.fill_mode, both.fill_value) == (
        "horizontal_and_vertical",
        0.2,
        "constant",
        128,
    )


@pytest.mark.parametrize(
    "kwargs, named",
    [
        ({"shear_range": 10}, "shear_range"),
        ({"channel_shift_range": 20.0}, "channel_shift_range"),
        ({"brightness_range": (0.8, 1.2)}, "brightness_range"),
        ({"width_shift_range": 0.1, "height_shift_range": 0.2}, "width_shift_range=0.1 != height"),
        ({"width_shift_range": 0.1}, "height_shift_range=0.0"),
        ({"width_shift_range": 5, "height_shift_range": 5}, "width_shift_range=5"),
        ({"width_shift_range": [-2, 2], "height_shift_range": [-2, 2]}, "width_shift_range=[-2, 2]"),
        ({"zoom_range": [0.9, 1.2]}, "zoom_range=[0.9, 1.2]"),
        ({"rescale": 1 / 255}, "TrainConfig.preprocessing"),
        ({"preprocessing_function": lambda x: x}, "preprocessing_function"),
        ({"validation_split": 0.2}, "TrainConfig.splits"),
        ({"featurewise_center": True}, "featurewise_center"),
        ({"zca_whitening": True}, "zca_whitening"),
        ({"interpolation_order": 0}, "interpolation_order"),
        ({"rotation_range": 400}, "rotation_range"),
        ({"data_format": "channels_first"}, "data_format"),
        ({"shearrange": 1}, "unknown ImageDataGenerator argument(s) ['shearrange']"),
    ],
)
def test_image_data_generator_arguments_without_equivalent_are_errors(kwargs, named):
    with pytest.raises(ValueError) as error:
        from_image_data_generator(**kwargs)
    assert named in str(error.value)


def test_image_data_generator_wrap_is_warned_about(caplog):
    with caplog.at_level(logging.WARNING, "imgcls_jax.config"):
        assert from_image_data_generator(fill_mode="wrap").fill_mode == "wrap"
    assert "n - 1 pixels" in caplog.text


def _photo(size: int = 64) -> np.ndarray:
    """A real photo (the embedded sample), float32[size, size, 3] in [0, 255]."""
    path = sorted((helpers.SAMPLE / "daisy").glob("*.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB").resize((size, size)), np.float32)


def _ours(image: np.ndarray, theta: float, tx: float, ty: float, zoom: float, fill_mode: str, cval=0.0):
    """Our warp for ImageDataGenerator's explicit ``theta`` (degrees), ``tx``, ``ty`` (pixels)
    and ``zx = zy = zoom``. Measured conventions: IDG's ``tx`` moves the image left (the column
    read is ``col + tx``: it is sampled as the *height* shift), ``ty`` moves it up, its shift is
    in input pixels before the zoom; the angle has the same sign as ours."""
    params = {"angle": math.radians(theta), "zoom": zoom, "shift": [-ty / zoom, -tx / zoom]}
    params = {k: tf.constant(v, tf.float32) for k, v in params.items()}
    config = AugmentConfig(rotation=0.1, fill_mode=fill_mode, fill_value=cval)
    return aug._apply_params(tf.constant(image), params, config).numpy()


def _source_coordinates(n: int, theta, tx, ty, zoom) -> tuple[np.ndarray, np.ndarray]:
    """Where IDG reads each output pixel of an n x n image (float64 rows, columns)."""
    rows, cols = np.mgrid[0:n, 0:n].astype(np.float64)
    c, a = (n - 1) / 2, math.radians(theta)
    x, y = zoom * (cols - c) + tx, zoom * (rows - c) + ty
    return c + math.sin(a) * x + math.cos(a) * y, c + math.cos(a) * x - math.sin(a) * y


TRANSFORMS = [(20, 0, 0, 1), (0, 6.5, 0, 1), (0, 0, -6.5, 1), (0, 0, 0, 0.9), (0, 0, 0, 1.15),
              (-17, 3.3, -4.1, 1.08), (33, -5, 2.5, 0.87)]  # fmt: skip


@pytest.mark.parametrize("fill_mode", ["nearest", "reflect"])
@pytest.mark.parametrize("theta, tx, ty, zoom", TRANSFORMS)
def test_warp_gives_image_data_generator_pixels(fill_mode, theta, tx, ty, zoom):
    image = _photo()
    ref = ImageDataGenerator(fill_mode=fill_mode).apply_transform(
        image, {"theta": theta, "tx": tx, "ty": ty, "zx": zoom, "zy": zoom}
    )
    np.testing.assert_allclose(_ours(image, theta, tx, ty, zoom, fill_mode), ref, atol=0.01)


@pytest.mark.parametrize("fill_mode", ["constant", "wrap"])
@pytest.mark.parametrize("theta, tx, ty, zoom", TRANSFORMS)
def test_constant_and_wrap_differ_only_outside_the_image(fill_mode, theta, tx, ty, zoom):
    """Where IDG reads inside the image the pixels agree; ``constant`` also agrees one pixel or
    more outside it (both give cval), ``wrap`` does not (periods n - 1 and n)."""
    image, n = _photo(), 64
    ref = ImageDataGenerator(fill_mode=fill_mode, cval=77.0).apply_transform(
        image, {"theta": theta, "tx": tx, "ty": ty, "zx": zoom, "zy": zoom}
    )
    ours = _ours(image, theta, tx, ty, zoom, fill_mode, cval=77.0)
    r, c = _source_coordinates(n, theta, tx, ty, zoom)
    inside = (r >= 0) & (r <= n - 1) & (c >= 0) & (c <= n - 1)
    np.testing.assert_allclose(ours[inside], ref[inside], atol=0.01)
    if fill_mode == "constant":
        far = (r < -1) | (r > n) | (c < -1) | (c > n)
        np.testing.assert_allclose(ours[far], 77.0)
        np.testing.assert_allclose(ref[far], 77.0)


def test_image_data_generator_quirks_as_documented():
    """What ``from_image_data_generator`` warns about: IDG's height shift moves images sideways,
    and on a non-square image it rotates about a transposed centre."""
    image = np.zeros((9, 13, 1), np.float32)
    image[2, 3] = 1
    idg = ImageDataGenerator(fill_mode="constant")

    def bright(params):
        return np.unravel_index(np.argmax(idg.apply_transform(image, params)), image.shape)[:2]

    assert bright({"tx": 2}) == (2, 1)  # tx (drawn from height_shift_range * height) moves columns
    assert bright({"ty": 2}) == (0, 3)
    # A quarter turn about the true centre (4, 6) puts (2, 3) at (7, 4); IDG turns about (6, 4).
    assert bright({"theta": 90}) == (7, 0)


def test_sampled_parameters_have_image_data_generator_distributions():
    """Each parameter's distribution, IDG's draws against ours (two-sample Kolmogorov-Smirnov;
    2,000 draws each, so a distance above 0.062 would reject equality at the 0.1% level)."""
    from scipy.stats import ks_2samp

    kwargs = dict(rotation_range=20, width_shift_range=0.1, height_shift_range=0.1, zoom_range=0.15,
                  horizontal_flip=True)  # fmt: skip
    idg, config, n, size = (
        ImageDataGenerator(**kwargs),
        from_image_data_generator(**kwargs),
        2000,
        64,
    )
    drawn = [idg.get_random_transform((size, size, 3), seed=i) for i in range(n)]
    sample = tf.function(lambda s: aug._sample_params(tf.constant([size, size, 3]), s, config))
    ours = [{k: v.numpy() for k, v in sample(tf.constant([7, i], tf.int64)).items()} for i in range(n)]
    pairs = {
        "angle (degrees)": ([d["theta"] for d in drawn], [math.degrees(o["angle"]) for o in ours]),
        "sideways shift / size": ([d["tx"] / size for d in drawn], [-o["shift"][1] / size for o in ours]),
        "vertical shift / size": ([d["ty"] / size for d in drawn], [-o["shift"][0] / size for o in ours]),
        "zoom x": ([d["zx"] for d in drawn], [o["zoom"] for o in ours]),
        "zoom y": ([d["zy"] for d in drawn], [o["zoom"] for o in ours]),
        "flip": ([float(d["flip_horizontal"]) for d in drawn], [float(o["flip_h"]) for o in ours]),
    }
    for name, (theirs, mine) in pairs.items():
        assert ks_2samp(theirs, mine).statistic < 0.062, name
        assert np.isclose(min(theirs), min(mine), atol=0.02 * np.ptp(theirs)), name
        assert np.isclose(max(theirs), max(mine), atol=0.02 * np.ptp(theirs)), name
    assert not any(d["zx"] == d["zy"] for d in drawn)  # the documented difference: IDG's axes differ


# ----------------------------------------------------------------- image_dataset_from_directory
def test_classes_labels_and_files_are_image_dataset_from_directory_s():
    from keras.src.utils.dataset_utils import index_directory
    from keras.src.utils.image_dataset_utils import ALLOWLIST_FORMATS

    from imgcls_jax.data import scan_folder

    root = helpers.flowers()
    paths, labels, class_names = index_directory(
        str(root), "inferred", formats=ALLOWLIST_FORMATS, shuffle=False
    )
    found = scan_folder(root, verify=False)
    assert found.class_names == class_names == sorted(p.name for p in root.iterdir() if p.is_dir())
    theirs = sorted((os.path.realpath(p), int(label)) for p, label in zip(paths, labels))
    assert sorted((os.path.realpath(r.path), r.label) for r in found.records) == theirs


def test_validation_split_is_a_seeded_cut_where_ours_is_stratified():
    """Keras: one seeded shuffle of all files, the last ``int(split * N)`` are validation, so
    class shares drift; ``split_records``: each class split by largest remainder."""
    from collections import Counter

    from imgcls_jax.data import scan_folder, split_records

    root = helpers.flowers()
    subsets = {}
    for subset in ("training", "validation"):
        ds = keras.utils.image_dataset_from_directory(
            root, validation_split=0.2, subset=subset, seed=1337, image_size=(8, 8), batch_size=None
        )
        subsets[subset] = {os.path.realpath(p) for p in ds.file_paths}
    found = scan_folder(root, verify=False)
    n = len(found.records)
    assert not subsets["training"] & subsets["validation"] and len(subsets["validation"]) == int(0.2 * n)
    per_class = Counter(found.class_names[r.label] for r in found.records)
    records = split_records(found.records, {"train": 0.8, "val": 0.2})
    ours = Counter(found.class_names[r.label] for r in records if r.split == "val")
    keras_val = Counter(Path(p).parent.name for p in subsets["validation"])
    assert all(abs(ours[c] - 0.2 * per_class[c]) < 1 for c in per_class)  # stratified
    assert any(abs(keras_val[c] - 0.2 * per_class[c]) >= 1 for c in per_class)  # Keras's drift
