"""Keras layers the BatchNorm families (EfficientNet, ResNet50, MobileNetV2) share beyond VGG's:
``BatchNormalization`` (:class:`BatchNorm`), ``Conv2D`` (:func:`conv2d`), ``Normalization``,
``DepthwiseConv2D``, ``imagenet_utils.correct_pad``, swish, and Keras's kernel initializers
drawn in one program; and those ConvNeXt, EfficientNetV2 and MobileNetV3 add (at the end):
``LayerNormalization`` (:class:`LayerNorm`), ConvNeXt's ``LayerScale``, stochastic depth,
squeeze-and-excitation, GELU, hard sigmoid and hard swish.

Layers keep Keras's weight shapes, so weight files copy as they are. Layout NHWC.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax import lax

from imgcls_jax.models.conv import ConvGeneralDilated, check_depthwise_impl, conv_nhwc
from imgcls_jax.models.flops import same_pads


def correct_pad(size: tuple[int, int], kernel: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras's ``imagenet_utils.correct_pad`` for a map of ``size`` (H, W): the zero padding
    ``((top, bottom), (left, right))`` before a stride-2 VALID convolution of ``kernel``."""
    c = kernel // 2
    return tuple((c - (1 - n % 2), c) for n in size)  # type: ignore[return-value]


def _host_constant(value: float):
    """An initializer of ``value`` everywhere, made on the host (no per-shape XLA compile)."""

    def init(key, shape, dtype=jnp.float32):
        return jnp.asarray(np.full(shape, value, np.dtype(dtype)))

    return init


_zeros, _ones = _host_constant(0.0), _host_constant(1.0)


def _fill_kernels(kernels: Sequence[nnx.Param], draw: jax.Array, scale) -> None:
    """Set each kernel to its slice of ``draw`` (a flat float32 array, consumed in order) times
    ``scale(shape)``."""
    if not isinstance(draw, jax.core.Tracer):  # under nnx.eval_shape it stays abstract
        draw = np.asarray(draw)
    start = 0
    for kernel in kernels:
        size = int(np.prod(kernel.shape))
        value = draw[start : start + size].reshape(kernel.shape) * np.float32(scale(kernel.shape))
        kernel.set_value(jnp.asarray(value))
        start += size


def init_conv_kernels(kernels: Sequence[nnx.Param], key: jax.Array) -> None:
    """EfficientNet's ``CONV_KERNEL_INITIALIZER`` for every kernel (HWIO or depthwise
    ``[k, k, C, 1]``): ``VarianceScaling(2.0, "fan_out", "truncated_normal")``, i.e. a normal
    truncated at two standard deviations, std ``sqrt(2 / fan_out) / 0.8796`` with
    ``fan_out = k * k * shape[-1]``.

    All kernels come from one draw (one compiled program instead of one per kernel shape, which
    cost tens of seconds on a 2-core CPU), split in order; the result depends only on ``key``.
    """
    total = sum(int(np.prod(k.shape)) for k in kernels)
    draw = jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32)
    _fill_kernels(kernels, draw, lambda s: math.sqrt(2.0 / (s[0] * s[1] * s[-1])) / 0.87962566103423978)


def init_glorot_kernels(kernels: Sequence[nnx.Param], key: jax.Array) -> None:
    """Keras's default ``glorot_uniform`` for every kernel (HWIO ``Conv2D``, depthwise
    ``[k, k, C, 1]``, dense ``[in, out]``): uniform in ``+-sqrt(6 / (fan_in + fan_out))`` with
    Keras's fans (``fan_in = prod(shape[:-1])``, ``fan_out = prod(shape[:-2]) * shape[-1]``).
    One draw for all, as :func:`init_conv_kernels`."""
    total = sum(int(np.prod(k.shape)) for k in kernels)
    draw = jax.random.uniform(key, (total,), jnp.float32, -1.0, 1.0)

    def limit(shape):
        fan_in, fan_out = np.prod(shape[:-1]), np.prod(shape[:-2]) * shape[-1]
        return math.sqrt(6.0 / (fan_in + fan_out))

    _fill_kernels(kernels, draw, limit)


class BatchNorm(nnx.BatchNorm):
    """Keras's ``BatchNormalization`` over the channels, as Keras computes it under mixed
    precision: in float32 whatever the input dtype (parameters and moving statistics float32),
    the output cast back to the input's dtype. ``scale``/``bias``/``mean``/``var`` are Keras's
    gamma/beta/moving_mean/moving_variance (the last two ``nnx.BatchStat``). Built in inference
    mode; in training mode (``.train()``) the batch statistics (biased variance, computed as
    ``mean((x - mean)^2)``) normalise and ``moving <- momentum * moving + (1 - momentum) * batch``.
    ``center`` / ``scale``: Keras's options (no beta / no gamma when False; ``bias`` / ``scale`` is
    then None; the Inception families build ``scale=False``).
    """

    def __init__(self, channels: int, *, epsilon: float, momentum: float, rngs: nnx.Rngs, center: bool = True,
                 scale: bool = True):  # fmt: skip
        super().__init__(
            channels, epsilon=epsilon, momentum=momentum, use_running_average=True, use_fast_variance=False,
            dtype=jnp.float32, param_dtype=jnp.float32, scale_init=_ones, bias_init=_zeros, use_bias=center,
            use_scale=scale, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        """``x`` ``[N, H, W, C]`` (any float dtype) -> normalised, same shape and dtype."""
        return super().__call__(x, **kwargs).astype(x.dtype)


def conv2d(cin: int, cout: int, kernel: int | tuple[int, int], *, strides: int = 1, padding="VALID",
           use_bias: bool, dtype, conv_impl: str = "auto", conv_general_dilated=None, groups: int = 1,
           rngs: nnx.Rngs) -> nnx.Conv:  # fmt: skip
    """Keras's ``Conv2D`` (HWIO kernel ``[kh, kw, cin / groups, cout]``; ``kernel`` an int for square
    ones, ``(kh, kw)`` for others such as Inception's 1x7; optional bias) computing in ``dtype``
    with float32 parameters, run by ``conv_impl`` (:mod:`imgcls_jax.models.conv`; or by an
    explicit ``conv_general_dilated``). Kernel and bias start at zero: the family draws its kernels
    with :func:`init_conv_kernels` or :func:`init_glorot_kernels` (Keras's biases start at zero).
    ``groups``: Keras's ``groups`` (``groups = cin = cout``: ConvNeXt's depthwise convolution,
    kernel ``[k, k, 1, C]`` as Keras stores it)."""
    kernel = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
    return nnx.Conv(
        cin, cout, kernel, strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
        param_dtype=jnp.float32, kernel_init=_zeros, bias_init=_zeros, feature_group_count=groups,
        rngs=rngs, conv_general_dilated=conv_general_dilated or ConvGeneralDilated(conv_impl),
    )  # fmt: skip


class Normalization(nnx.Module):
    """Keras's ``Normalization`` over channels: ``(x - mean) / max(sqrt(variance), 1e-7)``.

    ``mean``, ``variance`` ``float32[C]`` and Keras's bookkeeping ``count`` (a scalar, unused)
    are ``nnx.BatchStat`` (statistics, not trained); before loading they are 0, 1 and 0.
    """

    def __init__(self, channels: int = 3):
        self.mean = nnx.BatchStat(jnp.zeros((channels,), jnp.float32))
        self.variance = nnx.BatchStat(jnp.ones((channels,), jnp.float32))
        self.count = nnx.BatchStat(jnp.zeros((), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        return (x - self.mean[...]) / jnp.maximum(jnp.sqrt(self.variance[...]), 1e-7)


def choose_depthwise_impl(impl: str = "auto", backend: str | None = None) -> str:
    """Checks ``impl`` (:data:`~imgcls_jax.models.conv.DEPTHWISE_IMPLS`) and returns it; what
    ``"auto"`` becomes is decided per shape at trace time by
    :func:`~imgcls_jax.models.conv.choose_impl` (``"onednn"`` or ``"shift"`` on CPU, ``"xla"``
    elsewhere). ``backend`` is unused (kept for callers)."""
    return check_depthwise_impl(impl)


class DepthwiseConv2D(nnx.Module):
    """Keras's ``DepthwiseConv2D`` (no bias) as a VALID convolution of an already padded input;
    the kernel keeps Keras's shape ``[k, k, C, depth_multiplier]`` so weight files copy as they
    are; output channel ``c * depth_multiplier + m`` is input channel ``c`` times kernel ``[..., c,
    m]`` (TensorFlow's order). ``impl``: :data:`~imgcls_jax.models.conv.DEPTHWISE_IMPLS` (the
    family passes :func:`~imgcls_jax.models.conv.depthwise_impl_for` of its options); it runs
    through :func:`~imgcls_jax.models.conv.conv_nhwc` with ``groups = C``."""

    def __init__(self, channels: int, kernel: int, *, dtype, impl: str = "auto", depth_multiplier: int = 1):
        self.kernel = nnx.Param(_zeros(None, (kernel, kernel, channels, depth_multiplier)))  # see init_*
        self.dtype = dtype
        self.impl = check_depthwise_impl(impl)

    def __call__(self, x: jax.Array, strides: int) -> jax.Array:
        """``x`` ``[N, H, W, C]`` (padded) -> ``[N, (H - k) // s + 1, (W - k) // s + 1, C * m]``."""
        k, _, c, m = self.kernel.shape
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        return conv_nhwc(
            x, kernel.reshape(k, k, 1, c * m), (strides, strides), "VALID", groups=c, impl=self.impl
        )


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


# ------------------------------------------------------------ ConvNeXt, EfficientNetV2, MobileNetV3
class LayerNorm(nnx.LayerNorm):
    """Keras's ``LayerNormalization`` over the channels (the last axis), as Keras computes it
    under mixed precision: in float32 whatever the input dtype, the output cast back to the
    input's dtype. ``scale``/``bias`` are Keras's gamma/beta (float32, 1 and 0 to start).
    ``epsilon``: Keras's default is 1e-3; ConvNeXt's layers take 1e-6."""

    def __init__(self, channels: int, *, epsilon: float, rngs: nnx.Rngs):
        super().__init__(
            channels, epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, use_fast_variance=False,
            scale_init=_ones, bias_init=_zeros, rngs=rngs,
        )  # fmt: skip

    def __call__(self, x: jax.Array, **kwargs) -> jax.Array:
        """``x`` ``[..., C]`` (any float dtype) -> normalised over C, same shape and dtype."""
        return super().__call__(x.astype(jnp.float32), **kwargs).astype(x.dtype)


class LayerScale(nnx.Module):
    """ConvNeXt's ``LayerScale``: ``x * gamma`` per channel, ``gamma`` ``float32[C]`` starting at
    ``init_value`` (Keras's weight has no name: ``variable`` in a Keras 3 file).

    ``deterministic``: the layer's mode, set by ``.train()`` / ``.eval()`` as on dropout (True:
    inference mode). It has no effect on the product; its block's stochastic depth follows it, so
    a frozen block (run in inference mode) drops nothing."""

    def __init__(self, channels: int, init_value: float):
        self.gamma = nnx.Param(_host_constant(init_value)(None, (channels,)))
        self.deterministic = True

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


def stochastic_depth(rate: float) -> nnx.Dropout:
    """Per-example dropout of a residual branch: Keras's ``Dropout(rate, noise_shape=(None, 1,
    1, 1))`` (EfficientNet's "drop connect") and ConvNeXt's ``StochasticDepth(rate)``, which are
    the same: keep an example's branch with probability ``1 - rate``, scaled by ``1 / (1 -
    rate)``. Built inactive (``deterministic=True``); the family calls it with
    ``deterministic=False`` while the block is trained."""
    return nnx.Dropout(rate, broadcast_dims=(1, 2, 3), deterministic=True)


def gelu(x: jax.Array) -> jax.Array:
    """Keras's ``"gelu"`` activation: the exact one, ``x * Phi(x)`` (erf; not the tanh form)."""
    return jax.nn.gelu(x, approximate=False)


def hard_sigmoid(x: jax.Array) -> jax.Array:
    """MobileNetV3's ``hard_sigmoid``: ``ReLU6(x + 3) * (1 / 6)``."""
    return jax.nn.relu6(x + 3.0) * (1.0 / 6.0)


def hard_swish(x: jax.Array) -> jax.Array:
    """Keras's ``"hard_swish"`` (``hard_silu``) activation: ``x * ReLU6(x + 3) / 6``."""
    return x * (jax.nn.relu6(x + 3.0) / 6.0)


def squeeze_excite(x: jax.Array, reduce: nnx.Module, expand: nnx.Module, activation, gate) -> jax.Array:
    """Squeeze-and-excitation as Keras's applications build it: the map ``x`` ``[N, H, W, C]``
    averaged over H and W (in float32, then ``x``'s dtype), the 1x1 convolution ``reduce``,
    ``activation``, the 1x1 convolution ``expand`` (back to C), ``gate`` (sigmoid, or MobileNetV3's
    :func:`hard_sigmoid`), times ``x``."""
    s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(x.dtype)
    return x * gate(expand(activation(reduce(s))))


# ---------------------------------------------------------------------------------------------
# The layers of the second group of Keras families (ResNet V2, DenseNet, Xception, Inception V3,
# Inception-ResNet V2, MobileNet, NASNet): separable convolutions, pooling with Keras's "same" and
# "valid" padding, and Keras's paddings as explicit pads.


def init_he_normal_kernels(kernels: Sequence[nnx.Param], key: jax.Array) -> None:
    """Keras's ``he_normal`` for every kernel: ``VarianceScaling(2.0, "fan_in",
    "truncated_normal")``, a normal truncated at two standard deviations, std ``sqrt(2 / fan_in) /
    0.8796`` with ``fan_in = prod(shape[:-1])``. One draw for all, as :func:`init_conv_kernels`."""
    total = sum(int(np.prod(k.shape)) for k in kernels)
    draw = jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32)
    _fill_kernels(kernels, draw, lambda s: math.sqrt(2.0 / np.prod(s[:-1])) / 0.87962566103423978)


def keras_pads(
    size: Sequence[int], kernel: int | tuple[int, int], strides: int, padding: str
) -> tuple[tuple[int, int], tuple[int, int]]:
    """The zero padding ``((top, bottom), (left, right))`` Keras's ``padding`` (``"valid"`` or
    ``"same"``: TensorFlow's rule, the odd pixel after) adds around a map of ``size`` (H, W) for a
    window of ``kernel`` at ``strides``."""
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding != "same":
        raise ValueError(f"padding must be 'valid' or 'same', got {padding!r}")
    return (same_pads(size[0], kh, strides), same_pads(size[1], kw, strides))


def pad2d(x: jax.Array, pads: tuple[tuple[int, int], tuple[int, int]]) -> jax.Array:
    """Keras's ``ZeroPadding2D(pads)`` of an NHWC map."""
    return jnp.pad(x, ((0, 0), *pads, (0, 0))) if any(p for pair in pads for p in pair) else x


def max_pool2d(x: jax.Array, k: int, strides: int, padding: str = "valid") -> jax.Array:
    """Keras's ``MaxPooling2D(k, strides, padding)`` of an NHWC map: ``"same"`` pads with -inf (a
    window's maximum is of the map's own pixels); ``"valid"`` drops what no window covers."""
    pads = keras_pads(x.shape[1:3], k, strides, padding)
    return lax.reduce_window(  # a Python scalar init: JAX's differentiable max pooling
        x, -jnp.inf, lax.max, (1, k, k, 1), (1, strides, strides, 1), ((0, 0), *pads, (0, 0))
    )


def avg_pool2d(x: jax.Array, k: int, strides: int, padding: str = "valid") -> jax.Array:
    """Keras's ``AveragePooling2D(k, strides, padding)`` of an NHWC map: the mean of each window's
    pixels; with ``"same"`` the pixels of the padding are not counted (TensorFlow's and Keras's
    rule: a corner of a 3x3 window averages 4 pixels). Sums in float32, returns ``x``'s dtype."""
    pads = keras_pads(x.shape[1:3], k, strides, padding)
    window, step = (1, k, k, 1), (1, strides, strides, 1)
    total = lax.reduce_window(x.astype(jnp.float32), 0.0, lax.add, window, step, ((0, 0), *pads, (0, 0)))
    rows, cols = (
        _window_counts(n, o, k, strides, p[0]) for n, o, p in zip(x.shape[1:3], total.shape[1:3], pads)
    )
    counts = np.outer(rows, cols).astype(np.float32)[None, :, :, None]  # real pixels per window
    return (total / counts).astype(x.dtype)


def _window_counts(size: int, out: int, k: int, strides: int, before: int) -> np.ndarray:
    """How many of a window's ``k`` positions fall inside ``[0, size)``, for each of ``out``
    windows along one axis (starting at ``o * strides - before``)."""
    start = np.arange(out) * strides - before
    return np.minimum(start + k, size) - np.maximum(start, 0)


class SeparableConv2D(nnx.Module):
    """Keras's ``SeparableConv2D`` without bias: a depthwise ``k x k`` convolution
    (:class:`DepthwiseConv2D`, kernel ``depthwise_kernel [k, k, cin, 1]``) then a pointwise 1x1
    convolution (:func:`conv2d`, kernel ``pointwise_kernel [1, 1, cin, cout]``), Keras's weights
    in Keras's order. The input is padded by the caller (:func:`keras_pads` for ``"same"``,
    ``correct_pad`` for NASNet's stride-2 ones)."""

    def __init__(self, cin: int, cout: int, kernel: int, *, dtype, impl: str = "auto", rngs: nnx.Rngs):
        self.depthwise = DepthwiseConv2D(cin, kernel, dtype=dtype, impl=impl)
        self.pointwise = conv2d(cin, cout, 1, use_bias=False, dtype=dtype, rngs=rngs)

    @property
    def kernels(self) -> tuple[nnx.Param, nnx.Param]:
        """``(depthwise_kernel, pointwise_kernel)``: Keras's weights, in its order."""
        return self.depthwise.kernel, self.pointwise.kernel

    def __call__(self, x: jax.Array, strides: int = 1, padding: str = "same") -> jax.Array:
        """``x`` ``[N, H, W, cin]`` -> ``[N, h, w, cout]``; ``padding``: ``"same"`` or ``"valid"``
        (Keras's meanings; ``"valid"`` for an input the caller padded)."""
        k = self.depthwise.kernel.shape[0]
        x = pad2d(x, keras_pads(x.shape[1:3], k, strides, padding))
        return self.pointwise(self.depthwise(x, strides))
