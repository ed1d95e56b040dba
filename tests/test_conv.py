"""im2col convolution and the fast max-pool gradient equal XLA's, alone and inside VGG16.

Tolerances: float32 results agree with ``lax.conv_general_dilated`` to 1e-5 of the largest
reference value (the two differ only in summation order over 9*Cin terms); bfloat16 results
(8-bit mantissa) are compared with a float32 reference to 2e-2 of its largest value, the
tolerance XLA's own bfloat16 convolution also meets.
"""

import re
from functools import partial

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from imgcls_jax.models import conv
from imgcls_jax.models.conv import ConvGeneralDilated, choose_impl, conv3x3, max_pool_2x2
from imgcls_jax.models.vgg import VGG

F32_TOL = 1e-5
BF16_TOL = 2e-2


def close(actual, desired, tol):
    actual, desired = np.asarray(actual, np.float32), np.asarray(desired, np.float32)
    assert actual.shape == desired.shape
    scale = max(float(np.abs(desired).max()), 1e-30)
    err = float(np.abs(actual - desired).max()) / scale
    assert err <= tol, f"max error {err:.2e} of the largest value exceeds {tol:.0e}"


@partial(jax.jit, static_argnums=0)
def conv_and_grads(impl, x, k, g):
    """The conv and its gradients w.r.t. input and kernel for the cotangent ``g``."""
    y, vjp = jax.vjp(lambda x, k: conv3x3(x, k, impl), x, k)
    return (y, *vjp(g))


def random_case(seed, n, h, w, cin, cout, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(n, h, w, cin)), dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, cin, cout)), dtype)
    g = jnp.asarray(rng.normal(size=(n, h, w, cout)), dtype)
    return x, k, g


@settings(max_examples=15, deadline=None)
@given(
    n=st.integers(1, 3),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    cin=st.integers(1, 9),
    cout=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_im2col_equals_xla_float32(n, h, w, cin, cout, seed):
    x, k, g = random_case(seed, n, h, w, cin, cout)
    for ours, ref in zip(conv_and_grads("im2col", x, k, g), conv_and_grads("xla", x, k, g)):
        assert ours.dtype == jnp.float32
        close(ours, ref, F32_TOL)


@pytest.mark.parametrize("shape", [(2, 1, 1, 16, 8), (2, 2, 2, 64, 32), (1, 4, 3, 5, 7), (3, 8, 8, 24, 16)])
def test_im2col_equals_xla_bfloat16(shape):
    x, k, g = random_case(1, *shape, dtype=jnp.bfloat16)
    up = [a.astype(jnp.float32) for a in (x, k, g)]
    ref = conv_and_grads("xla", *up)
    for impl in ("im2col", "xla"):
        for ours, want in zip(conv_and_grads(impl, x, k, g), ref):
            assert ours.dtype == jnp.bfloat16
            close(ours, want, BF16_TOL)


def test_bad_shapes_and_names_are_errors():
    x = jnp.zeros((1, 4, 4, 3))
    with pytest.raises(ValueError, match=r"kernel \[3, 3, 3, Cout\].*\(5, 5, 3, 8\)"):
        conv3x3(x, jnp.zeros((5, 5, 3, 8)), "im2col")
    with pytest.raises(ValueError, match=r"NHWC.*\(4, 4, 3\)"):
        conv3x3(x[0], jnp.zeros((3, 3, 3, 8)), "xla")
    with pytest.raises(ValueError, match="conv_impl must be one of .*'fast'"):
        conv3x3(x, jnp.zeros((3, 3, 3, 8)), "fast")
    with pytest.raises(ValueError, match="conv_impl must be one of"):
        VGG("vgg16", include_top=False, input_shape=(32, 32, 3), conv_impl="cudnn", rngs=nnx.Rngs(0))


def test_nnx_conv_hook_handles_other_convs_by_impl():
    """Strided convs go to lax under xla, and run as auto chooses under im2col (which only has
    the 3x3 SAME stride-1 form): the same numbers as a plain ``nnx.Conv`` to float rounding."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 3)), jnp.float32)
    layers = {
        impl: nnx.Conv(
            3, 4, (3, 3), strides=2, conv_general_dilated=ConvGeneralDilated(impl), rngs=nnx.Rngs(0)
        )
        for impl in ("auto", "xla", "im2col")
    }
    plain = nnx.Conv(3, 4, (3, 3), strides=2, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(layers["xla"](x), plain(x))
    close(layers["auto"](x), plain(x), F32_TOL)
    close(layers["im2col"](x), plain(x), F32_TOL)
    assert ConvGeneralDilated("auto") == ConvGeneralDilated("auto")  # one graphdef per impl
    with pytest.raises(ValueError, match="'none'"):
        ConvGeneralDilated("none")


@pytest.fixture
def without_onednn(monkeypatch):
    """``"auto"`` as on a machine without the oneDNN kernels (tests/test_onednn.py has them)."""
    monkeypatch.setattr(conv, "_onednn_usable", lambda dtype: False)


def test_auto_rule(without_onednn):
    """The documented rule without oneDNN: XLA off CPU; on CPU im2col for maps of <= 16 pixels."""
    assert conv.CPU_IM2COL_MAX_PIXELS == 16
    for backend in ("gpu", "tpu"):
        assert choose_impl((32, 2, 2, 512), backend) == "xla"
    assert choose_impl((32, 1, 1, 512), "cpu") == "im2col"
    assert choose_impl((32, 2, 2, 512), "cpu") == "im2col"
    assert choose_impl((32, 4, 4, 512), "cpu") == "im2col"
    assert choose_impl((32, 2, 8, 512), "cpu") == "im2col"
    assert choose_impl((32, 8, 8, 512), "cpu") == "xla"
    assert choose_impl((1, 224, 224, 3), "cpu") == "xla"


def count_ops(model, images):
    graph, state = nnx.split(model)
    text = str(jax.make_jaxpr(lambda s, x: nnx.merge(graph, s)(x))(state, images))
    return text.count("conv_general_dilated["), text.count("dot_general[")


def vgg(impl, dtype=jnp.float32, size=(32, 32)):
    return VGG(
        "vgg16",
        include_top=False,
        pooling="avg",
        num_classes=3,
        input_shape=(*size, 3),
        dtype=dtype,
        conv_impl=impl,
        rngs=nnx.Rngs(params=0, dropout=1),
    )


def test_vgg_auto_uses_im2col_only_for_small_maps_on_cpu(without_onednn):
    if jax.default_backend() != "cpu":
        pytest.skip(f"the CPU rule; this backend is {jax.default_backend()}")
    images = jnp.zeros((2, 32, 32, 3), jnp.uint8)
    # 13 convs + the head's dense layer; at 32 px blocks 4-5 (4x4 and 2x2 maps) are im2col
    assert count_ops(vgg("xla"), images) == (13, 1)
    assert count_ops(vgg("im2col"), images) == (0, 14)
    assert count_ops(vgg("auto"), images) == (7, 7)


def test_vgg_impls_have_identical_parameters():
    shapes = {
        impl: jax.tree.map(lambda a: (a.shape, a.dtype), nnx.state(vgg(impl))) for impl in ("xla", "im2col")
    }
    assert shapes["xla"] == shapes["im2col"]
    a, b = nnx.state(vgg("xla"), nnx.Param), nnx.state(vgg("im2col"), nnx.Param)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert vgg("im2col").block1_conv1.kernel.shape == (3, 3, 3, 64)


def loss_and_grads(model, images, labels):
    graph, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
        logits = nnx.merge(graph, params, rest)(images)
        return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1)), logits

    (value, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, logits, grads


@pytest.fixture(scope="module")
def xla_reference():
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    labels = jnp.asarray([0, 1, 2, 0])
    return images, labels, loss_and_grads(vgg("xla"), images, labels)


@pytest.mark.parametrize("impl", ["im2col", "auto"])
def test_vgg16_logits_and_gradient_equal_xla(impl, xla_reference):
    images, labels, (loss_x, logits_x, grads_x) = xla_reference
    loss_i, logits_i, grads_i = loss_and_grads(vgg(impl), images, labels)
    close(logits_i, logits_x, F32_TOL)
    close(loss_i, loss_x, F32_TOL)
    flat_x = dict(nnx.to_flat_state(grads_x))
    flat_i = dict(nnx.to_flat_state(grads_i))
    assert flat_x.keys() == flat_i.keys() and len(flat_x) == 28
    for path in flat_x:
        close(flat_i[path].get_value(), flat_x[path].get_value(), 1e-4)


def test_vgg16_bfloat16_im2col_close_to_xla():
    images = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8))
    ref = vgg("xla")(images)
    out = vgg("im2col", jnp.bfloat16)(images)
    assert out.dtype == jnp.float32
    close(out, ref, 0.1)  # 13 bfloat16 layers deep: about 2^-8 per layer, compounded


@pytest.mark.parametrize(
    "shape",
    [(2, 4, 6, 3), (1, 2, 2, 5), (3, 8, 4, 2), (2, 5, 7, 3), (1, 3, 2, 4), (2, 45, 22, 2), (1, 2, 3, 1)],
)
def test_max_pool_equals_nnx_max_pool_with_ties(shape):
    """Values and gradient equal ``nnx.max_pool`` (VALID, 2x2/2) exactly, odd sizes included:
    the odd last row/column is dropped and gets a zero gradient, as XLA's select-and-scatter."""
    rng = np.random.default_rng(0)
    n, h, w, c = shape
    for x in (rng.integers(0, 3, shape), rng.normal(size=shape)):  # small ints: many ties
        x = jnp.asarray(x, jnp.float32)
        g = jnp.asarray(rng.normal(size=(n, h // 2, w // 2, c)), jnp.float32)
        y_ref, vjp_ref = jax.vjp(lambda x: nnx.max_pool(x, (2, 2), strides=(2, 2), padding="VALID"), x)
        y, vjp = jax.vjp(max_pool_2x2, x)
        assert y.shape == (n, h // 2, w // 2, c)
        np.testing.assert_array_equal(y, y_ref)
        np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
        np.testing.assert_array_equal(jax.jit(jax.vjp(max_pool_2x2, x)[1])(g)[0], vjp_ref(g)[0])
    for bad in ((1, 1, 4, 2), (3, 4, 2)):
        with pytest.raises(ValueError, match=rf"H, W >= 2.*{re.escape(str(bad))}"):
            max_pool_2x2(jnp.zeros(bad))


@pytest.fixture(scope="module")
def odd_case():
    """VGG16 at 45x38 (maps 45x38, 22x19, 11x9, 5x4, 2x2: odd sides drop a row/column at every
    pooling but the last), logits and gradients by XLA's convolution."""
    rng = np.random.default_rng(2)
    images = jnp.asarray(rng.integers(0, 256, (2, 45, 38, 3), dtype=np.uint8))
    labels = jnp.asarray([0, 2])
    return images, labels, loss_and_grads(vgg("xla", size=(45, 38)), images, labels)


@pytest.mark.parametrize("impl", ["im2col", "auto"])
def test_vgg16_at_odd_size_equals_xla(impl, odd_case, monkeypatch):
    """im2col/auto against XLA at an odd, non-square size: logits to 1e-5, gradients to 1e-4 of
    the largest value (as at 32 px above)."""
    images, labels, (loss_x, logits_x, grads_x) = odd_case
    model = vgg(impl, size=(45, 38))
    assert model.pool(model.features(images)).shape == (2, 512)
    loss_i, logits_i, grads_i = loss_and_grads(model, images, labels)
    close(logits_i, logits_x, F32_TOL)
    close(loss_i, loss_x, F32_TOL)
    flat_x, flat_i = dict(nnx.to_flat_state(grads_x)), dict(nnx.to_flat_state(grads_i))
    assert flat_x.keys() == flat_i.keys()
    for path in flat_x:
        close(flat_i[path].get_value(), flat_x[path].get_value(), 1e-4)
    if impl == "auto" and jax.default_backend() == "cpu":
        monkeypatch.setattr(conv, "_onednn_usable", lambda dtype: False)
        assert count_ops(model, images) == (10, 4)  # block5 (2x2) + head as matmuls; block4 (5x4) by XLA
