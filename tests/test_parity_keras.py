"""The port is proven against Keras itself, on random weights (ImageNet files are not
obtainable offline): Keras builds VGG16/VGG19, its weights are written in the legacy layout
(keras-applications dataset names, read back by Keras's own ``load_weights``) and in the
Keras 3 ``.weights.h5`` layout, both are ported, and outputs are compared on the same images.

Tolerances: float32, max |flax - keras| <= 1e-4 * max |keras|. bfloat16 against Keras's own
mixed precision, the transfer head and a fine-tuning step: tests/test_applications.py (every
registered model); here VGG's own cases: the applications' Keras-1 file names, Keras's sizes that
are not multiples of 32, flatten heads.
"""

import numpy as np
import pytest

import imgcls_jax
from imgcls_jax.weights import write_legacy_h5

keras = pytest.importorskip("keras")
from keras.applications import imagenet_utils  # noqa: E402

F32_TOL = 1e-4
KERAS_APPS = {"vgg16": keras.applications.VGG16, "vgg19": keras.applications.VGG19}


def randomize(keras_model, seed):
    rng = np.random.default_rng(seed)
    weights = []
    for w in keras_model.get_weights():
        fan_in = int(np.prod(w.shape[:-1])) if w.ndim > 1 else 0
        std = np.sqrt(2.0 / fan_in) if fan_in else 0.1
        weights.append(rng.normal(0, std, w.shape).astype(np.float32))
    keras_model.set_weights(weights)


def keras_vgg(arch, include_top, size, pooling=None):
    return KERAS_APPS[arch](
        weights=None,
        include_top=include_top,
        pooling=pooling,
        input_shape=(size, size, 3),
        classifier_activation=None,
    )


def keras_out(keras_model, x):
    return np.asarray(keras_model(imagenet_utils.preprocess_input(x.astype(np.float32), mode="caffe")))


def assert_close(ours, theirs, tol):
    ours = np.asarray(ours)
    assert ours.shape == theirs.shape
    scale = np.abs(theirs).max()
    assert scale > 0
    err = np.abs(ours - theirs).max()
    print(f"max abs diff / max |keras| = {err / scale:.2e} (tolerance {tol})")
    assert err <= tol * scale, f"max abs diff {err:.3g} > {tol} * {scale:.3g}"


def _id(param):
    return f"{param[0]}-{'top' if param[1] else 'notop'}"


#: VGG19's cases are slow: the same code as VGG16's with four more layers, and its 224 px top
#: (143 M parameters, in both frameworks) set the quick tier's memory peak (tests/test_memory.py)
_SLOW = [pytest.mark.slow]


@pytest.fixture(
    scope="module",
    params=[("vgg16", True), ("vgg16", False), pytest.param(("vgg19", True), marks=_SLOW),
            pytest.param(("vgg19", False), marks=_SLOW)],
    ids=_id,
)  # fmt: skip
def keras_files(request, tmp_path_factory):
    """A random-weight Keras model and its weights in both layouts."""
    arch, include_top = request.param
    size = 224 if include_top else 64
    model = keras_vgg(arch, include_top, size)
    randomize(model, seed=sum(map(ord, arch)) + include_top)
    tmp = tmp_path_factory.mktemp(f"{arch}{include_top}")
    legacy = tmp / f"{arch}_weights_tf_dim_ordering_tf_kernels{'' if include_top else '_notop'}.h5"
    write_legacy_h5(
        legacy,
        {layer.name: layer.get_weights() for layer in model.layers if layer.weights},
        layer_names=[layer.name for layer in model.layers],
        weight_names="applications",
    )
    keras3 = tmp / f"{arch}.weights.h5"
    model.save_weights(keras3)
    x = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.uint8)
    return dict(arch=arch, include_top=include_top, size=size, model=model, legacy=legacy, keras3=keras3, x=x)


def test_keras_reads_our_legacy_file_identically(keras_files):
    import h5py

    with h5py.File(keras_files["legacy"]) as f:  # the applications' Keras-1 dataset names
        assert list(f["block1_conv1"].attrs["weight_names"]) == [b"block1_conv1_W_1:0", b"block1_conv1_b_1:0"]
    fresh = keras_vgg(keras_files["arch"], keras_files["include_top"], keras_files["size"])
    fresh.load_weights(keras_files["legacy"])
    for mine, theirs in zip(fresh.layers, keras_files["model"].layers, strict=True):  # a layer at a
        for a, b in zip(mine.get_weights(), theirs.get_weights(), strict=True):  # time: VGG16's top
            np.testing.assert_array_equal(a, b)  # is 553 MB a copy


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_outputs_equal_keras(keras_files, layout):
    arch, include_top, size, x = (keras_files[k] for k in ("arch", "include_top", "size", "x"))
    if include_top:
        ours = imgcls_jax.create_model(arch, weights=keras_files[layout])
        assert ours.include_top
        assert_close(ours(x), keras_out(keras_files["model"], x), F32_TOL)
        return
    for pooling in (None, "avg", "max"):
        theirs = keras_vgg(arch, False, size, pooling=pooling)
        theirs.set_weights(keras_files["model"].get_weights())
        ours = imgcls_jax.create_model(
            arch, include_top=False, pooling=pooling, input_shape=(size, size, 3), weights=keras_files[layout]
        )
        assert_close(ours(x), keras_out(theirs, x), F32_TOL)


# Sizes Keras builds that are not multiples of 32 (non-square, odd at the input or at an inner
# pooling: 180 -> 90 -> 45 -> 22 -> 11 -> 5), and the smallest, 32; a few per architecture.
ANY_SIZES = [("vgg16", (48, 48)), ("vgg16", (100, 60)), ("vgg16", (180, 180)), ("vgg19", (32, 32))]
ANY_SIZES += [("vgg19", (224, 160)), ("vgg19", (299, 299))]


@pytest.fixture(scope="module")
def notop_file(request, tmp_path_factory):
    """A random-weight top-less Keras model of ``request.param`` (the arch) and its Keras 3 weight
    file (conv weights fit every input size)."""
    arch = request.param
    model = keras_vgg(arch, False, 32)
    randomize(model, seed=7 + len(arch))
    path = tmp_path_factory.mktemp(f"{arch}any") / f"{arch}.weights.h5"
    model.save_weights(path)
    return model.get_weights(), path


def keras_any(arch, size, **kw):
    return KERAS_APPS[arch](weights=None, input_shape=(*size, 3), classifier_activation=None, **kw)


def _size_id(v):
    return v if isinstance(v, str) else "x".join(map(str, v))


@pytest.mark.parametrize("notop_file, size", ANY_SIZES, indirect=["notop_file"], ids=_size_id)
def test_any_size_keras_accepts(notop_file, size, request):
    """Top-less VGG at sizes that are not multiples of 32: shapes equal Keras's for pooling
    None/avg/max, values within 1e-4 of max |keras| (measured <= 4.2e-6)."""
    arch = request.node.callspec.params["notop_file"]
    weights, path = notop_file
    x = np.random.default_rng(sum(size)).integers(0, 256, (2, *size, 3)).astype(np.uint8)
    for pooling in (None, "avg", "max"):
        theirs = keras_any(arch, size, include_top=False, pooling=pooling)
        theirs.set_weights(weights)
        ours = imgcls_jax.create_model(
            arch, include_top=False, pooling=pooling, input_shape=(*size, 3), weights=str(path)
        )
        want = keras_out(theirs, x)
        assert tuple(theirs.output_shape[1:]) == want.shape[1:]
        if pooling is None:
            assert want.shape == (2, size[0] // 32, size[1] // 32, 512)
        assert_close(ours(x), want, F32_TOL)


@pytest.mark.parametrize("notop_file", ["vgg16"], indirect=True)
def test_flatten_heads_at_odd_size_equal_keras(notop_file, tmp_path):
    """At 100x60 (block5_pool 3x1): Keras's top built there (weights=None: Keras builds fc1 over
    3*1*512 = 1536 features) and a pooling=None transfer head (Keras: Flatten + Dense) equal
    Keras's logits within 1e-4 of max |keras| (measured <= 2e-6): same flat size, same order."""
    size, k = (100, 60), 5
    weights, path = notop_file
    x = np.random.default_rng(1).integers(0, 256, (2, *size, 3)).astype(np.uint8)
    top = keras_any("vgg16", size, include_top=True)
    randomize(top, seed=3)
    top.save_weights(tmp_path / "top.weights.h5")
    ours = imgcls_jax.create_model("vgg16", input_shape=(*size, 3), weights=str(tmp_path / "top.weights.h5"))
    assert ours.include_top and ours.fc1.kernel.shape == (1536, 4096)
    assert_close(ours(x), keras_out(top, x), F32_TOL)

    base = keras_any("vgg16", size, include_top=False)
    base.set_weights(weights)
    dense = keras.layers.Dense(k)
    head = keras.Sequential([base, keras.layers.Flatten(), dense])
    head.build((None, *size, 3))
    rng = np.random.default_rng(4)
    kernel, bias = rng.normal(0, 0.05, (1536, k)).astype(np.float32), rng.normal(0, 0.1, k).astype(np.float32)
    dense.set_weights([kernel, bias])
    ours = imgcls_jax.create_model(
        "vgg16", num_classes=k, pooling=None, input_shape=(*size, 3), weights=str(path)
    )
    assert ours.head_logits.kernel.shape == (1536, k)
    ours.head_logits.kernel.set_value(kernel)
    ours.head_logits.bias.set_value(bias)
    assert_close(ours(x), keras_out(head, x), F32_TOL)
