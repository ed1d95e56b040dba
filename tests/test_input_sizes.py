"""Input sizes: the sizes Keras rejects are rejected for Keras's reason; any size it accepts goes
through the data pipeline, the train step, evaluation and prediction (values against Keras are in
tests/test_parity_keras.py::test_any_size_keras_accepts)."""

import os
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import numpy as np
import pytest

import imgcls_jax
from imgcls_jax.data import from_arrays, make_pipeline
from imgcls_jax.models.vgg import check_input_shape
from imgcls_jax.train import init_state, make_optimizer, make_train_step, split_model, trainable_layers


def keras_reason(**kwargs) -> str:
    """Keras's ValueError for ``keras.applications.VGG16(**kwargs)``, up to its "Received"."""
    keras = pytest.importorskip("keras")
    kwargs.setdefault("weights", None)
    with pytest.raises(ValueError) as info, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        keras.applications.VGG16(**kwargs)
    return str(info.value).split("Received")[0].rstrip(" .;")


@pytest.mark.parametrize(
    "keras_kwargs, ours",
    [
        (dict(include_top=False, input_shape=(31, 48, 3)), dict(include_top=False, input_shape=(31, 48, 3))),
        (dict(include_top=False, input_shape=(64, 16, 3)), dict(num_classes=4, input_shape=(64, 16, 3))),
        (dict(include_top=False, input_shape=(48, 48)), dict(include_top=False, input_shape=(48, 48))),
        # Keras rejects other channel counts with ImageNet weights (it only warns without them); the
        # model preprocesses RGB, so it rejects them always, for the same reason
        (
            dict(include_top=False, input_shape=(48, 48, 1), weights="imagenet"),
            dict(include_top=False, input_shape=(48, 48, 1)),
        ),
        # the check comes before any file is looked for (none exists offline)
        (
            dict(include_top=True, input_shape=(64, 64, 3), weights="imagenet"),
            dict(include_top=True, input_shape=(64, 64, 3), weights="imagenet"),
        ),
    ],
)
def test_sizes_keras_rejects_fail_for_keras_reason(keras_kwargs, ours):
    reason = keras_reason(**keras_kwargs)
    with pytest.raises(ValueError) as info:
        imgcls_jax.create_model("vgg16", **ours)
    message = str(info.value)
    assert message.startswith(reason), f"{message!r} does not give Keras's reason {reason!r}"
    assert "input_shape=" in message  # names the offending value


def test_sizes_keras_accepts_are_accepted():
    """Keras builds every side >= 32 (and a top at any size without ImageNet weights)."""
    keras = pytest.importorskip("keras")
    for shape in ((32, 32, 3), (33, 100, 3), (299, 41, 3)):
        keras.applications.VGG16(weights=None, include_top=False, input_shape=shape)
        assert check_input_shape(shape) == shape
        assert check_input_shape(list(np.asarray(shape))) == shape  # numpy ints become ints
    top = imgcls_jax.create_model("vgg16", include_top=True, input_shape=(100, 60, 3))
    assert top.fc1.kernel.shape == (3 * 1 * 512, 4096)


@pytest.mark.parametrize("backend", ["tf", "numpy"])
def test_pipeline_train_evaluate_at_48x40(backend):
    """Images of other sizes, resized to 48x40 by either pipeline, train (flatten head: 1x1x512
    features) and evaluate; the evaluation's loss equals the cross-entropy of the model's own
    logits on the pipeline's batches (float32, 1e-5 relative)."""
    from imgcls_jax.evaluate.runs import evaluate_model

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (6, 50, 70, 3), dtype=np.uint8)
    labels = np.arange(6) % 3
    source = from_arrays(images, labels, ["a", "b", "c"])
    model = imgcls_jax.create_model("vgg16", num_classes=3, pooling=None, input_shape=(48, 40, 3))
    assert model.head_logits.kernel.shape == (512, 3)

    train = make_pipeline(
        source, backend=backend, image_size=(48, 40), batch_size=4, training=True, cache=None
    )
    split = split_model(model, trainable_layers(model, "top:1"))
    optimizer = make_optimizer("sgd", 1e-3, momentum=0.9)
    state = init_state(split, optimizer)
    step = make_train_step(split, optimizer)
    for batch in train.epoch(0):
        assert batch["image"].shape == (4, 48, 40, 3)
        state, metrics = step(state, split.frozen, batch)
        assert np.isfinite(float(metrics["loss"]))
    nnx_model = split.merge(state.params)

    evaluation = make_pipeline(
        source, backend=backend, image_size=(48, 40), batch_size=4, training=False, cache=None
    )
    result = evaluate_model(nnx_model, evaluation, source.class_names)
    assert result.count == 6
    logits, seen = [], []
    for batch in evaluation.epoch(0):
        logits.append(np.asarray(nnx_model(batch["image"]))[batch["mask"]])
        seen.append(batch["label"][batch["mask"]])
    logits, seen = np.concatenate(logits).astype(np.float64), np.concatenate(seen)
    log_probs = logits - logits.max(1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(1, keepdims=True))
    np.testing.assert_allclose(result.loss, -log_probs[np.arange(6), seen].mean(), rtol=1e-5)


def test_predict_at_odd_size():
    """``predict`` on a run at an odd square size (45: maps 45, 22, 11, 5, 2, 1): the arrays are
    resized to it and the probabilities are the model's softmax (1e-6)."""
    from imgcls_jax.config import TrainConfig
    from imgcls_jax.evaluate.prediction import predict
    from imgcls_jax.evaluate.runs import LoadedRun

    model = imgcls_jax.create_model("vgg16", num_classes=3, pooling="avg", input_shape=(45, 45, 3))
    config = TrainConfig(image_size=45, weights="random")
    loaded = LoadedRun(None, config, model, ["a", "b", "c"], 0, "latest")
    images = np.random.default_rng(1).integers(0, 256, (3, 45, 45, 3), dtype=np.uint8)
    got = predict(loaded, images, top_k=3)
    want = np.asarray(jax.nn.softmax(model(images), -1))
    for i, prediction in enumerate(got):
        probs = dict(prediction.top_k)
        np.testing.assert_allclose([probs[c] for c in "abc"], want[i], rtol=1e-6, atol=1e-7)
    assert len(predict(loaded, np.zeros((2, 60, 37, 3), np.uint8))) == 2  # resized to 45x45
