import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

import imgcls_jax
from imgcls_jax.models import preprocess_input


def images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_import_and_model_do_not_import_tensorflow():
    code = (
        "import sys, numpy as np, imgcls_jax\n"
        "assert 'tensorflow' not in sys.modules, 'after import'\n"
        "m = imgcls_jax.create_model('vgg16', num_classes=3, input_shape=(32, 32, 3))\n"
        "m(np.zeros((1, 32, 32, 3), np.uint8)).block_until_ready()\n"
        "assert 'tensorflow' not in sys.modules, 'after building a model'\n"
        "assert 'keras' not in sys.modules\n"
        "import imgcls_jax.data\n"
        "from imgcls_jax.data import Pipeline, scan_folder, AugmentConfig, prefetch_to_device, audit\n"
        "assert 'tensorflow' not in sys.modules, 'after importing the data layer'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_registry():
    names = imgcls_jax.list_models()
    assert {"vgg16", "vgg19", "efficientnetb0", "resnet50", "mobilenetv2"} <= set(names)
    assert names == sorted(names)
    with pytest.raises(ValueError, match="unknown model 'vgg11'"):
        imgcls_jax.create_model("vgg11")
    with pytest.raises(ValueError, match="already registered"):
        imgcls_jax.register_model("vgg16")(lambda **kw: None)


@pytest.mark.parametrize("arch, n_conv, last", [("vgg16", 13, "block5_conv3"), ("vgg19", 16, "block5_conv4")])
def test_keras_layer_names(arch, n_conv, last):
    model = imgcls_jax.create_model(arch, include_top=False, input_shape=(32, 32, 3))
    names = model.base_layers
    assert len(names) == n_conv and names[0] == "block1_conv1" and names[-1] == last
    assert all(hasattr(model, n) for n in names)


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(include_top=False), (2, 2, 2, 512)),
        (dict(include_top=False, pooling="avg"), (2, 512)),
        (dict(include_top=False, pooling="max"), (2, 512)),
        (dict(num_classes=7), (2, 7)),  # transfer head, flatten
        (dict(num_classes=7, pooling="avg", head_units=(16, 8), dropout=0.5), (2, 7)),
    ],
)
def test_output_shapes(kwargs, shape):
    model = imgcls_jax.create_model("vgg16", input_shape=(64, 64, 3), **kwargs)
    out = model(images(size=64))
    assert out.shape == shape and out.dtype == jnp.float32


def test_pooling_semantics():
    model = imgcls_jax.create_model("vgg16", include_top=False, input_shape=(64, 64, 3))
    fmap = model(images(size=64))
    for pooling, reduce in (("avg", jnp.mean), ("max", jnp.max)):
        model.pooling = pooling
        np.testing.assert_allclose(model(images(size=64)), reduce(fmap, axis=(1, 2)), rtol=1e-5, atol=1e-5)


def test_default_include_top():
    top = imgcls_jax.create_model("vgg16")
    assert top.include_top and top.num_classes == 1000 and top.fc1.kernel.shape == (25088, 4096)
    head = imgcls_jax.create_model(
        "vgg16", num_classes=18, head_units=(32,), dropout=0.5, input_shape=(32, 32, 3)
    )
    assert not head.include_top and head.head_layers == ("head_fc1", "head_logits")
    assert head.head_logits.kernel.shape == (32, 18)


def test_bfloat16_compute_keeps_float32_params():
    model = imgcls_jax.create_model(
        "vgg16", num_classes=4, pooling="avg", dtype="bfloat16", input_shape=(32, 32, 3)
    )
    assert model.block1_conv1.kernel.dtype == jnp.float32
    assert model.head_logits.kernel.dtype == jnp.float32
    features = model.features(images())
    assert features.dtype == jnp.bfloat16
    assert model(images()).dtype == jnp.float32


def test_dropout_only_in_train_mode():
    model = imgcls_jax.create_model(
        "vgg16", num_classes=4, pooling="avg", head_units=(64,), dropout=0.5, input_shape=(32, 32, 3)
    )
    x = images()
    np.testing.assert_array_equal(model(x), model(x))  # inference mode after construction
    model.train()
    assert not np.allclose(model(x), model(x))
    model.eval()
    np.testing.assert_array_equal(model(x), model(x))


def test_seeded_init_is_reproducible():
    a = imgcls_jax.create_model("vgg16", num_classes=3, input_shape=(32, 32, 3), seed=3)
    b = imgcls_jax.create_model("vgg16", num_classes=3, input_shape=(32, 32, 3), seed=3)
    c = imgcls_jax.create_model("vgg16", num_classes=3, input_shape=(32, 32, 3), seed=4)
    np.testing.assert_array_equal(a(images()), b(images()))
    assert not np.allclose(a.block1_conv1.kernel[...], c.block1_conv1.kernel[...])


@pytest.mark.parametrize(
    "init, std_times_sqrt_fan_in",
    # glorot_uniform: variance 2 / (fan_in + fan_out) = 1 / fan_in when fan_in == fan_out;
    # he_*: 2 / fan_in (Keras's he_normal is a normal truncated at 2 std, rescaled to that variance)
    [("glorot_uniform", 1.0), ("he_normal", 2**0.5), ("he_uniform", 2**0.5)],
)
def test_kernel_init_scale(init, std_times_sqrt_fan_in):
    model = imgcls_jax.create_model("vgg16", num_classes=3, input_shape=(32, 32, 3), kernel_init=init)
    kernel = np.asarray(model.block4_conv2.kernel[...])  # 3x3x512x512: fan_in == fan_out
    fan_in = np.prod(kernel.shape[:-1])
    np.testing.assert_allclose(kernel.std() * fan_in**0.5, std_times_sqrt_fan_in, rtol=0.01)
    assert np.all(np.asarray(model.block4_conv2.bias[...]) == 0)
    assert model.kernel_init == init


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(31, 64, 3)), r"at least 32x32; received input_shape=\(31, 64, 3\)"),
        (dict(input_shape=(32, 32, 1)), "must have 3 channels"),
        (dict(input_shape=(32, 32)), "tuple of three integers"),
        (dict(weights="imagenet", input_shape=(64, 64, 3)), r"`input_shape` should be \(224, 224, 3\)"),
        (dict(pooling="mean"), "pooling must be"),
        (dict(include_top=True, head_units=(8,)), "include_top=False"),
        (dict(num_classes=0), "num_classes must be >= 1"),
        (dict(dropout=1.0), "dropout"),
        (dict(dtype="int8"), "dtype"),
        (dict(preprocessing="imagenet"), "unknown preprocessing mode"),
        (dict(weights="imagenet", include_top=True, num_classes=18), "1000 classes"),
        (dict(weights="/nonexistent/vgg.h5"), "no such file"),
        (dict(kernel_init="kaiming"), "unknown kernel_init"),
    ],
)
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        imgcls_jax.create_model("vgg16", **kwargs)


def test_bad_inputs_at_call():
    model = imgcls_jax.create_model("vgg16", num_classes=3, input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="built for input_shape"):
        model(images(size=64))
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        model(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="built for input_shape"):
        model(np.zeros((1, 40, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"at least 32x32; received images of shape \(1, 31, 40, 3\)"):
        model(np.zeros((1, 31, 40, 3), np.uint8))


@pytest.mark.parametrize("mode", ["caffe", "torch", "tf"])
def test_preprocess_input_equals_keras(mode):
    from keras.applications import imagenet_utils

    x = np.random.default_rng(1).uniform(0, 255, (3, 8, 8, 3)).astype(np.float32)
    expected = imagenet_utils.preprocess_input(x.copy(), mode=mode)
    np.testing.assert_allclose(np.asarray(preprocess_input(x, mode)), expected, rtol=1e-6, atol=1e-5)
    # uint8 input is cast first, as Keras does
    x8 = x.astype(np.uint8)
    expected8 = imagenet_utils.preprocess_input(x8.astype(np.float32), mode=mode)
    np.testing.assert_allclose(np.asarray(preprocess_input(x8, mode)), expected8, rtol=1e-6, atol=1e-5)


def test_preprocess_caffe_by_hand():
    x = np.zeros((1, 1, 1, 3), np.float32)
    x[..., 0] = 10.0  # R
    out = np.asarray(preprocess_input(x, "caffe"))[0, 0, 0]
    np.testing.assert_allclose(out, [-103.939, -116.779, 10.0 - 123.68], rtol=1e-6)


def test_preprocess_rejects_bad_input():
    with pytest.raises(ValueError, match="unknown preprocessing mode"):
        preprocess_input(np.zeros((1, 2, 2, 3)), "bgr")
    with pytest.raises(ValueError, match="3 channels"):
        preprocess_input(np.zeros((1, 2, 2, 4)), "caffe")


@pytest.mark.parametrize("arch", ["vgg16", pytest.param("vgg19", marks=pytest.mark.slow)])  # 143 M params x 2
def test_parameter_count_equals_keras(arch):
    """Counted on the model built abstractly (``nnx.eval_shape``: shapes, no arrays; the real
    VGG16 with its top added 1.75 GB to this test's process, the quick tier's largest jump in
    2026-12-07's memory log); the summary of an abstract model is a real one's (checked at 32 px)."""
    from flax import nnx

    keras = pytest.importorskip("keras")
    theirs = getattr(keras.applications, arch.upper())(weights=None).count_params()
    text = imgcls_jax.summary(nnx.eval_shape(lambda: imgcls_jax.create_model(arch)))
    small = lambda: imgcls_jax.create_model(arch, include_top=False, input_shape=(32, 32, 3), num_classes=3)  # noqa: E731
    assert imgcls_jax.summary(nnx.eval_shape(small)) == imgcls_jax.summary(small())
    assert text.splitlines()[-1].split()[-1] == f"{theirs:,}"
