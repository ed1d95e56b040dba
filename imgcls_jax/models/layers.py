"""Keras layers the BatchNorm families (EfficientNet, ResNet50, MobileNetV2) share beyond VGG's:
``BatchNormalization`` (:class:`BatchNorm`), ``Conv2D`` (:func:`conv2d`), ``Normalization``,
``DepthwiseConv2D``, ``imagenet_utils.correct_pad``, swish, and Keras's kernel initializers
drawn in one program.

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
    ``center`` / ``scale``: Keras's options (no beta / no gamma when False).
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


def conv2d(cin: int, cout: int, kernel: int, *, strides: int = 1, padding="VALID", use_bias: bool,
           dtype, conv_general_dilated=None, rngs: nnx.Rngs) -> nnx.Conv:  # fmt: skip
    """Keras's ``Conv2D`` (HWIO kernel ``[k, k, cin, cout]``, optional bias) computing in ``dtype``
    with float32 parameters. Kernel and bias start at zero: the family draws its kernels with
    :func:`init_conv_kernels` or :func:`init_glorot_kernels` (Keras's biases start at zero).
    ``conv_general_dilated``: e.g. VGG's :class:`~imgcls_jax.models.conv.ConvGeneralDilated`."""
    extra = {} if conv_general_dilated is None else {"conv_general_dilated": conv_general_dilated}
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=strides, padding=padding, use_bias=use_bias, dtype=dtype,
        param_dtype=jnp.float32, kernel_init=_zeros, bias_init=_zeros, rngs=rngs, **extra,
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


DEPTHWISE_IMPLS = ("auto", "xla", "shift")


def choose_depthwise_impl(impl: str = "auto", backend: str | None = None) -> str:
    """``"xla"`` or ``"shift"`` for ``impl``; ``"auto"``: ``"shift"`` on CPU, ``"xla"`` elsewhere.

    XLA:CPU runs depthwise convolutions (``feature_group_count = C``) as slow loops, and their
    kernel gradient as a dense convolution (C times the work: XLA's cost analysis counts it so).
    As k x k shifted multiply-adds the same layer is elementwise work XLA fuses: measured on a
    2-core CPU at EfficientNetB0's shapes (batch 32), forward 7-100x and forward + gradients
    8-40x faster, equal to float32 rounding."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    if impl == "auto":
        backend = jax.default_backend() if backend is None else backend
        return "shift" if backend == "cpu" else "xla"
    return impl


class DepthwiseConv2D(nnx.Module):
    """Keras's ``DepthwiseConv2D`` (depth multiplier 1, no bias) as a VALID convolution of an
    already padded input; the kernel keeps Keras's shape ``[k, k, C, 1]`` so weight files copy
    as they are. ``impl``: see :func:`choose_depthwise_impl` (decided at trace time)."""

    def __init__(self, channels: int, kernel: int, *, dtype, impl: str = "auto"):
        self.kernel = nnx.Param(_zeros(None, (kernel, kernel, channels, 1)))  # see init_conv_kernels
        self.dtype = dtype
        self.impl = impl

    def __call__(self, x: jax.Array, strides: int) -> jax.Array:
        """``x`` ``[N, H, W, C]`` (padded) -> ``[N, (H - k) // s + 1, (W - k) // s + 1, C]``."""
        k, _, c, _ = self.kernel.shape
        x, kernel = x.astype(self.dtype), self.kernel[...].astype(self.dtype)
        if choose_depthwise_impl(self.impl) == "xla":
            return lax.conv_general_dilated(
                x, kernel.reshape(k, k, 1, c), (strides, strides), "VALID",
                dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c,
            )  # fmt: skip
        h, w = (x.shape[1] - k) // strides + 1, (x.shape[2] - k) // strides + 1
        out = jnp.zeros((x.shape[0], h, w, c), jnp.float32)
        for i in range(k):
            for j in range(k):
                window = x[
                    :, i : i + (h - 1) * strides + 1 : strides, j : j + (w - 1) * strides + 1 : strides
                ]
                out = out + (window * kernel[i, j, :, 0]).astype(jnp.float32)
        return out.astype(self.dtype)


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)
