"""One fine-tuning step of EfficientNetB0 against Keras's ``train_on_batch`` on the same model and
batch: ``trainable="top:3"`` (blocks 6 and 7, the top convolution and ``predictions``: BatchNorm
in training mode in residual, squeeze-excite blocks), SGD, no dropout or drop connect. In Keras
the frozen layers have ``layer.trainable = False``, which also runs their BatchNorm in inference
mode (Keras since TF 2.0), as ``split_model`` does.

Compared: every trained weight after the step, relative to the size of its update, and every
BatchNorm moving statistic of the trained layers relative to its change (momentum 0.99: the
statistics move by 1% of batch - moving). Tolerance 1e-3 of the update (measured: weights
2.0e-4, moving statistics 2.2e-5; both frameworks in float32). Frozen layers: untouched on both
sides, exactly.
"""

import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.train import init_state, make_optimizer, make_train_step, split_model
from tests.bn_helpers import randomize_keras

keras = pytest.importorskip("keras")
from keras.src.applications.efficientnet import EfficientNet as KerasEfficientNet  # noqa: E402

SIZE, BATCH, CLASSES, LR = 64, 4, 5, 0.5
UPDATE_TOL = 1e-3


def keras_b0_without_dropout():
    """EfficientNetB0 as Keras builds it, with dropout_rate=0 and drop_connect_rate=0 (so one
    step is deterministic; the Dropout layers are then left out)."""
    return KerasEfficientNet(
        1.0, 1.0, 224, dropout_rate=0.0, drop_connect_rate=0.0, name="efficientnetb0", weights=None,
        include_top=True, input_shape=(SIZE, SIZE, 3), classes=CLASSES, classifier_activation=None,
    )  # fmt: skip


@pytest.fixture(scope="module")
def one_step(tmp_path_factory):
    path = tmp_path_factory.mktemp("b0train") / "b0.weights.h5"
    source = keras_b0_without_dropout()
    randomize_keras(source, seed=11)
    source.save_weights(path)
    ours = imgcls_jax.create_model(
        "efficientnetb0", include_top=True, num_classes=CLASSES, input_shape=(SIZE, SIZE, 3), weights=path,
        drop_connect_rate=0.0, top_dropout=0.0,
    )  # fmt: skip
    trained = ours.trainable_layers("top:3")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (BATCH, SIZE, SIZE, 3)).astype(np.uint8)
    y = rng.integers(0, CLASSES, (BATCH,)).astype(np.int32)

    theirs = keras_b0_without_dropout()
    theirs.load_weights(path)
    weighted = [layer for layer in theirs.layers if layer.weights]
    names = [spec.name for spec in ours.layer_specs()]  # Keras's order; theirs may be numbered
    assert len(weighted) == len(names)
    for layer, name in zip(weighted, names):
        layer.trainable = name in trained
    theirs.compile(
        optimizer=keras.optimizers.SGD(learning_rate=LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    before = {n: [np.asarray(w) for w in layer.get_weights()] for n, layer in zip(names, weighted)}
    keras_loss = float(theirs.train_on_batch(x.astype(np.float32), y))
    after = {n: [np.asarray(w) for w in layer.get_weights()] for n, layer in zip(names, weighted)}

    split = split_model(ours, trained)
    optimizer = make_optimizer("sgd", LR, momentum=0.0)
    step = make_train_step(split, optimizer)
    state, metrics = step(init_state(split, optimizer), split.frozen, {"image": x, "label": y})
    stepped = split.merge(state.params, stats=state.stats)
    ours_after = {n: [np.asarray(v[...]) for v in stepped.keras_variables(n)] for n in names}
    return dict(
        trained=trained, before=before, after=after, ours=ours_after, keras_loss=keras_loss,
        loss=float(metrics["loss"]), split=split, state=state,
    )  # fmt: skip


def test_trained_layers_are_blocks_6_7_top_and_predictions(one_step):
    stages = {name[:6] if name.startswith("block") else name for name in one_step["trained"]}
    assert stages == {"block6", "block7", "top_conv", "top_bn", "predictions"}


def test_loss_equals_keras(one_step):
    assert one_step["loss"] == pytest.approx(one_step["keras_loss"], rel=1e-5)


def test_trained_weights_and_statistics_equal_keras(one_step):
    before, after, ours = one_step["before"], one_step["after"], one_step["ours"]
    largest = max(np.abs(a - b).max() for n in one_step["trained"] for a, b in zip(after[n], before[n]))
    worst = {}
    for name in one_step["trained"]:
        for i, (b, a, o) in enumerate(zip(before[name], after[name], ours[name], strict=True)):
            update = np.abs(a - b).max()
            # an update below 1e-4 of the largest is rounding noise (e.g. a BatchNorm beta whose
            # every path ends in a BatchNorm in training mode has zero gradient): vs the largest
            worst[(name, i)] = np.abs(o - a).max() / max(update, 1e-4 * largest)
    statistics = {k: v for k, v in worst.items() if "_bn" in k[0] and k[1] >= 2}
    print(f"largest update {largest:.3g}; error / update: weights {max(worst.values()):.2e}, "
          f"moving statistics {max(statistics.values()):.2e}")  # fmt: skip
    assert len(statistics) == 2 * sum("_bn" in n for n in one_step["trained"])
    bad = {k: float(v) for k, v in worst.items() if v > UPDATE_TOL}
    assert not bad, bad
    moved = [np.abs(after[n][i] - before[n][i]).max() for n, i in statistics]
    assert min(moved) > 0  # Keras did update every trained BatchNorm's statistics


def test_frozen_layers_untouched(one_step):
    before, after, ours = one_step["before"], one_step["after"], one_step["ours"]
    frozen = [n for n in before if n not in one_step["trained"]]
    assert "block5c_project_bn" in frozen and "stem_bn" in frozen
    for name in frozen:
        for b, a, o in zip(before[name], after[name], ours[name], strict=True):
            np.testing.assert_array_equal(a, b)  # Keras: trainable=False, inference-mode BatchNorm
            np.testing.assert_array_equal(o, b)


def test_split_keeps_trained_statistics_in_the_state(one_step):
    """The state carries the trained BatchNorm layers' statistics (and only theirs); the frozen
    ones stay in ``split.frozen``."""
    stats_layers = {path[0] for path, _ in nnx.to_flat_state(one_step["state"].stats)}
    assert stats_layers == {n for n in one_step["trained"] if n.endswith("_bn")}
    frozen_layers = {path[0] for path, _ in nnx.to_flat_state(one_step["split"].frozen)}
    assert "block5c_project_bn" in frozen_layers and "block6a_bn" not in frozen_layers
