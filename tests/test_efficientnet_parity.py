"""EfficientNet's ImageNet weights as Keras builds its ImageNet model (the extra rescaling Keras
adds only when it loads its published file). Parity with Keras on random weights and
statistics, both layouts, two sizes, bfloat16 and a fine-tuning step, for every variant:
tests/test_applications.py.
"""

import dataclasses

import numpy as np
import pytest

import imgcls_jax
from imgcls_jax.weights import store
from tests.bn_helpers import assert_close, forward, randomize_keras, save_both_layouts

keras = pytest.importorskip("keras")
from keras.src.applications import efficientnet as keras_efficientnet  # noqa: E402

F32_TOL = 1e-4
SIZE = (49, 57)  # odd and non-square: correct_pad differs from SAME


def keras_app(arch, size, include_top, pooling=None, weights=None):
    return getattr(keras.applications, f"EfficientNetB{arch[-1]}")(
        weights=weights, include_top=include_top, pooling=pooling, input_shape=(*size, 3),
        classifier_activation=None,
    )  # fmt: skip


def keras_b0(size, include_top, pooling=None, weights=None):
    return keras_app("efficientnetb0", size, include_top, pooling, weights)


def images(size, n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3)).astype(np.uint8)


def test_imagenet_weights_as_keras_builds_them(tmp_path, monkeypatch):
    """``weights="imagenet"`` reproduces Keras's ImageNet model, whose extra
    ``Rescaling(1/sqrt(stddev))`` layer exists only when Keras loads its published file: Keras
    builds that model around a random file standing in for ``efficientnetb0_notop.h5`` (its
    download replaced by the file), and we load the same file as the published one."""
    size = SIZE
    placeholder = save_both_layouts(keras_b0(size, False), tmp_path, "placeholder")["legacy"]
    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *a, **k: str(placeholder))
    theirs = keras_b0(size, False, weights="imagenet")
    assert [type(layer).__name__ for layer in theirs.layers[1:4]] == [
        "Rescaling",
        "Normalization",
        "Rescaling",
    ]
    randomize_keras(theirs, seed=7)  # calibrated with the extra rescaling in place
    path = save_both_layouts(theirs, tmp_path, "efficientnetb0_notop")["legacy"]
    key = ("efficientnetb0", False)
    published = store.IMAGENET[key]
    monkeypatch.setitem(store.IMAGENET, key, dataclasses.replace(published, file_hash=store.md5sum(path)))
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(tmp_path))
    ours = imgcls_jax.create_model(
        "efficientnetb0", include_top=False, input_shape=(*size, 3), weights="imagenet"
    )
    x = images(size, seed=3)
    assert_close(forward(ours, x), np.asarray(theirs(x.astype(np.float32))), F32_TOL)
    # the same file by path is what Keras's weights=path gives: no extra rescaling
    by_path = imgcls_jax.create_model(
        "efficientnetb0", include_top=False, input_shape=(*size, 3), weights=path
    )
    plain = keras_b0(size, False, weights=str(path))
    assert_close(forward(by_path, x), np.asarray(plain(x.astype(np.float32))), F32_TOL)
