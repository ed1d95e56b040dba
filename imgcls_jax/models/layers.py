"""Keras layers the convolutional families share beyond VGG's: ``Normalization``,
``DepthwiseConv2D``, ``imagenet_utils.correct_pad``, swish, and Keras's convolution kernel
initializer drawn in one program.

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


def init_conv_kernels(kernels: Sequence[nnx.Param], key: jax.Array) -> None:
    """Keras's ``CONV_KERNEL_INITIALIZER`` for every kernel (HWIO or depthwise ``[k, k, C, 1]``):
    ``VarianceScaling(2.0, "fan_out", "truncated_normal")``, i.e. a normal truncated at two
    standard deviations, std ``sqrt(2 / fan_out) / 0.8796`` with ``fan_out = k * k * shape[-1]``.

    All kernels come from one draw (one compiled program instead of one per kernel shape, which
    cost tens of seconds on a 2-core CPU), split in order; the result depends only on ``key``.
    """
    sizes = [int(np.prod(k.shape)) for k in kernels]
    draw = jax.random.truncated_normal(key, -2.0, 2.0, (sum(sizes),), jnp.float32)
    if not isinstance(draw, jax.core.Tracer):  # under nnx.eval_shape it stays abstract
        draw = np.asarray(draw)
    start = 0
    for kernel, size in zip(kernels, sizes):
        k0, k1, _, cout = kernel.shape
        std = math.sqrt(2.0 / (k0 * k1 * cout)) / 0.87962566103423978
        kernel.set_value(jnp.asarray(draw[start : start + size].reshape(kernel.shape) * np.float32(std)))
        start += size


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
