"""Keras references for the BatchNorm families (ResNet50, MobileNetV2): Keras builds each model
with random weights *and random moving statistics*, and writes them in both layouts with its
own writers (the legacy HDF5 layout of Keras's published files, and Keras 3 ``.weights.h5``).

Moving statistics drawn independently of the activations make a deep network's output nearly
independent of its input (measured on MobileNetV2 at 32 px: outputs of four random images
within 3.5e-4 of each other, relative to their size), so a port with a wrong early layer could
still match. :func:`randomize` therefore calibrates them: each BatchNorm's moving statistics are
the statistics of a random batch at that layer, then perturbed (mean +- 0.2 std, variance x
0.5-2): random, positive, and the output depends on the input (see test_outputs_depend_on_input
in tests/test_parity_bn.py)."""

from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")
from keras.applications import imagenet_utils  # noqa: E402

#: registry name -> (Keras application, its preprocess_input mode)
KERAS_APPS = {
    "resnet50": (keras.applications.ResNet50, "caffe"),
    "mobilenetv2": (keras.applications.MobileNetV2, "tf"),
}
BN_MODELS = sorted(KERAS_APPS)
#: Perturbation of the calibrated moving statistics: mean + MEAN_SHIFT * std * N(0, 1), variance
#: times U(VAR_SCALE).
MEAN_SHIFT = 0.2
VAR_SCALE = (0.5, 2.0)


def keras_model(arch, include_top, size, pooling=None, classes=1000):
    """``keras.applications.<arch>(weights=None)`` at ``size`` x ``size``, logits at the top."""
    app, _ = KERAS_APPS[arch]
    if include_top:
        return app(
            weights=None, include_top=True, input_shape=(size, size, 3), classes=classes,
            classifier_activation=None,
        )  # fmt: skip
    return app(weights=None, include_top=False, input_shape=(size, size, 3), pooling=pooling)


def random_value(name: str, shape, rng) -> np.ndarray:
    """A random value for the Keras weight ``name`` (the last part of its path): positive moving
    variances, gammas around 1, kernels of std ``1 / sqrt(fan_in)`` (activations neither vanish
    nor saturate MobileNetV2's ReLU6 through the depth), non-zero biases."""
    if name == "gamma":
        value = rng.uniform(0.5, 1.5, shape)
    elif name == "beta":
        value = rng.normal(0.0, 0.2, shape)
    elif name == "moving_mean":
        value = rng.normal(0.0, 0.5, shape)
    elif name == "moving_variance":
        value = rng.uniform(0.5, 2.0, shape)
    elif name == "bias":
        value = rng.normal(0.0, 0.1, shape)
    else:  # a kernel: HWIO, depthwise [k, k, C, 1], or dense [in, out]
        fan_in = int(np.prod(shape[:2])) if len(shape) == 4 and shape[-1] == 1 else int(np.prod(shape[:-1]))
        value = rng.normal(0.0, np.sqrt(1.0 / fan_in), shape)
    return value.astype(np.float32)


def randomize(model, seed: int, arch: str | None = None) -> None:
    """Fill every weight of a Keras model at random, BatchNorm moving statistics calibrated on a
    random batch (see the module docstring; ``arch``: the registry name, for the preprocessing
    of that batch, else taken from the model's name)."""
    rng = np.random.default_rng(seed)
    model.set_weights([random_value(w.path.rsplit("/", 1)[-1], tuple(w.shape), rng) for w in model.weights])
    arch = arch or ("resnet50" if model.name.startswith("resnet50") else "mobilenetv2")
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0  # a training-mode pass sets the moving statistics to the batch's
    batch = images(8, model.input_shape[1], seed=seed)
    model(imagenet_utils.preprocess_input(batch.astype(np.float32), mode=KERAS_APPS[arch][1]), training=True)
    for bn, m in zip(bns, momentum, strict=True):
        bn.momentum = m
        gamma, beta, mean, var = bn.get_weights()
        mean = mean + MEAN_SHIFT * np.sqrt(var) * rng.normal(size=mean.shape)
        var = var * rng.uniform(*VAR_SCALE, var.shape)
        bn.set_weights([gamma, beta, mean.astype(np.float32), var.astype(np.float32)])


def save_legacy(model, path: Path) -> Path:
    """The legacy HDF5 layout, written by Keras's own writer (``layer_names``, per-layer
    ``weight_names``), as ``keras.Model.load_weights`` reads it."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)
    return path


def save_both(model, folder: Path, stem: str) -> dict:
    """``{"legacy": path, "keras3": path}`` of ``model``'s weights in ``folder``."""
    keras3 = folder / f"{stem}.weights.h5"
    model.save_weights(keras3)
    return {"legacy": save_legacy(model, folder / f"{stem}.h5"), "keras3": keras3}


def keras_out(model, arch, images: np.ndarray) -> np.ndarray:
    """The Keras model's output on raw uint8 ``images``, preprocessed as its weights expect."""
    _, mode = KERAS_APPS[arch]
    return np.asarray(model(imagenet_utils.preprocess_input(images.astype(np.float32), mode=mode)))


def images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def max_rel_err(ours, theirs) -> float:
    """``max |ours - theirs| / max |theirs|``."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    scale = np.abs(theirs).max()
    assert scale > 0
    return float(np.abs(ours - theirs).max() / scale)
