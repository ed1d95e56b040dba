"""ResNet50 and MobileNetV2 against Keras itself (ImageNet files are not obtainable offline):
Keras builds each model with random weights and random, calibrated BatchNorm moving statistics
(tests/bn_helpers.py), writes them in the legacy HDF5 layout and as Keras 3 ``.weights.h5`` (its
own writers), both are ported, and outputs are compared on the same images, in inference mode.
EfficientNet's counterpart is tests/test_efficientnet_parity.py, VGG's tests/test_parity_keras.py.

Sizes: 32 (Keras's minimum, even maps) and 57 (odd maps: MobileNetV2's ``correct_pad`` pads
(1, 1) there and (0, 1) on even maps; ResNet50's stride-2 1x1 convolutions drop no pixel).

Tolerances: float32, max |ours - keras| <= 1e-4 * max |keras| (measured: see F32_TOL).
bfloat16 compute (parameters and BatchNorm float32) against Keras float32: see BF16_TOL.
"""

import numpy as np
import pytest

import imgcls_jax
from tests.bn_helpers import (
    BN_MODELS,
    forward,
    images,
    keras_app,
    keras_out,
    keras_preprocess,
    randomize_keras,
    rel_err,
    save_both_layouts,
)

pytest.importorskip("keras")

#: measured 1.0e-6 to 5.9e-6 (mobilenetv2) and 4.5e-6 to 2.6e-5 (resnet50) over both layouts,
#: sizes, top / no top / avg / max
F32_TOL = 1e-4
#: bfloat16 compute against Keras float32, at 32x32 with the top: at most BF16_TOL and at most
#: BF16_VS_KERAS times the error of Keras's own ``mixed_bfloat16`` model (measured: ours 6.3e-2,
#: Keras's 7.4e-2 (resnet50); ours 1.3e-2, Keras's 1.9e-2 (mobilenetv2)). bfloat16 keeps 8
#: significant bits through 53 (resnet50) or 52 (mobilenetv2) convolutions; EfficientNet's is
#: 0.1 too (tests/test_efficientnet_parity.py).
BF16_TOL = 0.1
BF16_VS_KERAS = 1.5
SIZES = (32, 57)


def test_every_registered_family_is_compared_with_keras():
    """A family is registered only with a Keras reference: VGG's and EfficientNet's files (see the
    module docstring), the others parametrize these tests through tests/bn_helpers.py."""
    others = {"vgg16", "vgg19", *(f"efficientnetb{i}" for i in range(8))}
    assert set(imgcls_jax.list_models()) - others == set(BN_MODELS)


@pytest.fixture(scope="module", params=BN_MODELS)
def files(request, tmp_path_factory):
    """Keras models of one family at both sizes sharing random weights, and its top and no-top
    weight files in both layouts. The moving statistics are calibrated at the larger size: the
    statistics of a 32-px input's last 1x1 maps (8 values a channel) under-estimate the variances
    at 57 px, and the excess compounds through the depth (measured: Keras's own float32 output
    1.3e-4 (mobilenetv2) and 1e-5 (resnet50) off its float64 one at 57 px calibrated at 32,
    5e-6 and 8e-7 calibrated at 57)."""
    arch = request.param
    top = keras_app(arch, True, SIZES[1])
    randomize_keras(top, seed=sum(map(ord, arch)), preprocess=keras_preprocess(arch))
    notop = keras_app(arch, False, SIZES[0])
    base_weights = top.get_weights()[: len(notop.get_weights())]
    notop.set_weights(base_weights)
    tmp = tmp_path_factory.mktemp(arch)
    return dict(
        arch=arch,
        top=top,
        notop=notop,
        base_weights=base_weights,
        top_files=save_both_layouts(top, tmp, f"{arch}_top"),
        notop_files=save_both_layouts(notop, tmp, f"{arch}_notop"),
        variants={(True, SIZES[1], None): top, (False, SIZES[0], None): notop},
    )


def keras_variant(files, include_top, size, pooling=None):
    """The Keras model of ``files`` with the top or not, at ``size``, with its weights."""
    key = (include_top, size, pooling)
    if key not in files["variants"]:
        model = keras_app(files["arch"], include_top, size, pooling=pooling)
        model.set_weights(files["top"].get_weights() if include_top else files["base_weights"])
        files["variants"][key] = model
    return files["variants"][key]


def test_layer_specs_are_keras_layers(files):
    """Every weighted Keras layer, with its weights' names and shapes in Keras's order (the
    layers' order differs: Keras sorts a graph's layers by depth, ``stages`` keep forward order).
    A depthwise kernel is ``depthwise_kernel`` in the published (Keras 2) files, ``kernel`` in
    Keras 3."""
    for include_top in (True, False):
        keras = files["top" if include_top else "notop"]
        ours = imgcls_jax.create_model(
            files["arch"], include_top=include_top, input_shape=(SIZES[0], SIZES[0], 3)
        )
        expected = {
            layer.name: (tuple(w.name for w in layer.weights), tuple(tuple(w.shape) for w in layer.weights))
            for layer in keras.layers
            if layer.weights
        }
        specs = ours.layer_specs()
        assert len(specs) == len(expected)
        keras3_names = {"depthwise_kernel": "kernel"}
        found = {s.name: (tuple(keras3_names.get(w, w) for w in s.weight_names), s.shapes) for s in specs}
        assert found == expected


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_outputs_equal_keras(files, layout):
    arch = files["arch"]
    errors = {}
    for size in SIZES:
        x = images(2, size, seed=size)
        ours = imgcls_jax.create_model(
            arch, include_top=True, input_shape=(size, size, 3), weights=files["top_files"][layout]
        )
        theirs = keras_out(keras_variant(files, True, size), arch, x)
        errors[("top", size)] = rel_err(forward(ours, x), theirs)
        ours = imgcls_jax.create_model(
            arch, include_top=False, input_shape=(size, size, 3), weights=files["notop_files"][layout]
        )
        fmap = forward(ours, x, "features")
        errors[(None, size)] = rel_err(fmap, keras_out(keras_variant(files, False, size), arch, x))
        pooling = "avg" if size == SIZES[0] else "max"  # one of each per size keeps Keras builds few
        ours.pooling = pooling  # the same weights, pooled
        theirs = keras_out(keras_variant(files, False, size, pooling), arch, x)
        errors[(pooling, size)] = rel_err(ours.head(ours.pool(fmap)), theirs)
    print(arch, layout, {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) <= F32_TOL, errors


def test_outputs_depend_on_input(files):
    """The comparison can fail: with calibrated moving statistics (tests/bn_helpers.py) the
    outputs of different images differ by far more than the tolerance (uncalibrated random
    statistics left MobileNetV2's within 3.5e-4 of each other)."""
    out = keras_out(keras_variant(files, True, SIZES[0]), files["arch"], images(4, SIZES[0], seed=9))
    spread = np.abs(out - out.mean(axis=0)).max() / np.abs(out).max()
    print(f"{files['arch']}: outputs of 4 images differ by {spread:.2f} of their size")
    assert spread > 1e3 * F32_TOL


def test_bfloat16_close_to_keras(files):
    import keras

    arch, size = files["arch"], SIZES[0]
    x = images(2, size, seed=3)
    ours = imgcls_jax.create_model(
        arch, input_shape=(size, size, 3), dtype="bfloat16", weights=files["top_files"]["legacy"]
    )
    assert ours.predictions.kernel.dtype == np.float32
    assert ours.conv_kernels()[0].dtype == np.float32
    assert forward(ours, x, "features").dtype == np.dtype("bfloat16")
    theirs = keras_out(keras_variant(files, True, size), arch, x)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = keras_app(arch, True, size)
    finally:
        keras.config.set_dtype_policy("float32")
    mixed.set_weights(files["top"].get_weights())
    keras_err = rel_err(keras_out(mixed, arch, x).astype(np.float32), theirs)
    err = rel_err(forward(ours, x), theirs)
    print(f"{arch} bfloat16: max abs diff / max |keras| = {err:.2e}, Keras's mixed_bfloat16 {keras_err:.2e}")
    assert err <= min(BF16_TOL, BF16_VS_KERAS * keras_err)


def test_transfer_head_on_ported_base(files):
    """The usual transfer setup: Keras base weights + a fresh head for other classes."""
    arch, size = files["arch"], SIZES[0]
    x = images(2, size, seed=5)
    ours = imgcls_jax.create_model(
        arch, num_classes=7, head_units=(16,), dropout=0.5, pooling="avg", input_shape=(size, size, 3),
        weights=files["notop_files"]["keras3"],
    )  # fmt: skip
    assert ours.head_layers == ("head_fc1", "head_logits")
    fmap = keras_out(files["notop"], arch, x)
    assert rel_err(ours.pool(forward(ours, x, "features")), fmap.mean(axis=(1, 2))) <= F32_TOL
    assert forward(ours, x).shape == (2, 7)
