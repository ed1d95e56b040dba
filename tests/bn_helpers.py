"""Helpers for the Keras-application tests: Keras models with random weights and random
(calibrated) BatchNorm statistics saved in both Keras layouts, and jitted forward passes (the
Keras applications by registry name: tests/keras_references.py, re-exported here).

Random weights alone are not enough for a test that can fail: with BatchNorm moving statistics
drawn independently of the activations, a deep random network's output stops depending on its
input after a few blocks (measured: relative change 1e-7 between two random images for
EfficientNet, 3.5e-4 for MobileNetV2 at 32 px), so a port that computed the early layers wrongly
would still "match". :func:`randomize_keras` therefore sets each BatchNorm's moving statistics to
the batch statistics of a random batch, then perturbs them (mean +- 0.2 std, variance x 0.5-2):
every layer stays input-dependent and the statistics are random and positive.
"""

from functools import cache

import h5py
import jax
import numpy as np
from flax import nnx

from tests.keras_references import keras_app, keras_out, keras_preprocess  # noqa: F401

#: The families tests/test_bn_models.py and test_bn_weights.py take (EfficientNet has its own
#: test files). Parity with Keras for every registered model: tests/test_applications.py.
BN_MODELS = ["mobilenetv2", "resnet50"]


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """``n`` random uint8 RGB images ``size`` x ``size``."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def randomize_keras(model, seed: int, calibrate: bool = True, preprocess=None) -> None:
    """Random weights for every layer of the Keras ``model`` (He-scaled kernels, gamma in
    [0.5, 1.5], beta and biases ~N(0, 0.1-0.2), Normalization mean in [0.3, 0.6] and variance in
    [0.03, 0.1], ConvNeXt's layer scale in [0.2, 1]); BatchNorm statistics calibrated as the
    module docstring says, on random images passed through ``preprocess`` (what the model expects
    of raw pixels; default: as they are)."""
    rng = np.random.default_rng(seed)
    draw = {
        "bias": lambda s: rng.normal(0, 0.1, s),
        "gamma": lambda s: rng.uniform(0.5, 1.5, s),
        "beta": lambda s: rng.normal(0, 0.2, s),
        "moving_mean": lambda s: rng.normal(0, 0.2, s),
        "moving_variance": lambda s: rng.uniform(0.5, 2.0, s),
        "mean": lambda s: rng.uniform(0.3, 0.6, s),
        "variance": lambda s: rng.uniform(0.03, 0.1, s),
        "count": lambda s: np.full(s, 1234),
        "layer_scale": lambda s: rng.uniform(0.2, 1.0, s),
    }
    for layer in model.layers:
        values = []
        for w in layer.weights:
            kind, shape = w.path.split("/")[-1], tuple(w.shape)
            if type(layer).__name__ == "LayerScale":  # ConvNeXt's (an unnamed weight: "variable")
                kind = "layer_scale"
            if kind in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                fan_in = int(np.prod(shape[:-1] if kind == "kernel" else shape[:2]))
                values.append(rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(w.dtype))
            else:
                values.append(np.asarray(draw[kind](shape)).astype(w.dtype))
        if values:
            layer.set_weights(values)
    for layer in model.layers:
        if hasattr(layer, "finalize_state"):  # Normalization reads its variables only then
            layer.finalize_state()
    if calibrate:
        _calibrate_batchnorm(model, rng, preprocess or (lambda x: x))


def _calibrate_batchnorm(model, rng, preprocess) -> None:
    bns = [layer for layer in model.layers if type(layer).__name__ == "BatchNormalization"]
    batch = preprocess(rng.integers(0, 256, (8, *model.input_shape[1:3], 3)).astype(np.float32))
    momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    model(batch, training=True)  # moving statistics := this batch's statistics
    for bn, m in zip(bns, momentum, strict=True):
        bn.momentum = m
        *affine, mean, var = bn.get_weights()  # gamma (unless scale=False), beta
        mean = mean + rng.normal(0, 0.2, mean.shape) * np.sqrt(var)
        var = var * rng.uniform(0.5, 2.0, var.shape)
        bn.set_weights([*affine, mean.astype(np.float32), var.astype(np.float32)])


def save_both_layouts(model, folder, stem: str) -> dict:
    """``model``'s weights as Keras 3 ``<stem>.weights.h5`` and, through Keras's own legacy
    writer, ``<stem>.h5`` (the layout of the published files). Returns ``{layout: path}``."""
    from keras.src.legacy.saving import legacy_h5_format

    keras3, legacy = folder / f"{stem}.weights.h5", folder / f"{stem}.h5"
    model.save_weights(keras3)
    with h5py.File(legacy, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return {"keras3": keras3, "legacy": legacy}


@cache
def _jitted(graph, method: str):
    return jax.jit(lambda state, x: getattr(nnx.merge(graph, state), method)(x))


def forward(model, images, method: str = "__call__") -> np.ndarray:
    """``model(images)`` (or another method) jitted, one compile per model graph and shape."""
    graph, state = nnx.split(model)
    return np.asarray(_jitted(graph, method)(state, images))


def rel_err(ours, theirs) -> float:
    """``max |ours - theirs| / max |theirs|`` (same shapes, ``theirs`` not all zero)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = np.abs(theirs).max()
    assert scale > 0
    return float(np.abs(ours - theirs).max() / scale)


def assert_close(ours, theirs, tol: float) -> float:
    """max |ours - theirs| <= tol * max |theirs|; returns the ratio (printed for the record)."""
    err = rel_err(ours, theirs)
    print(f"max abs diff / max |keras| = {err:.2e} (tolerance {tol})")
    assert err <= tol, f"relative error {err:.3g} > {tol}"
    return err
