"""VGG's layers in forms XLA:CPU runs fast: 3x3 convolutions and 2x2 max pooling.

3x3 SAME stride-1 convolutions run as XLA's convolution or as im2col + one matmul, chosen per
backend and shape; :func:`max_pool_2x2` is max pooling with a cheaper gradient. Both take any
map size (odd ones included).

XLA:CPU compiles some convolution shapes into very slow loops (a 3x3 conv on a 2x2 map with 512
channels at batch 32: ~270 ms, vs ~2.5 ms as a matmul), and its weight-gradient convolutions are
several times slower than its forward ones. Rewritten as im2col (the nine shifted windows of the
zero-padded input concatenated on channels, ``[N, H, W, 9*Cin]``, times the kernel reshaped to
``[9*Cin, Cout]``), forward and both gradients become plain matmuls, which XLA:CPU runs near peak.
The price is memory: the im2col buffer is 9x the layer's input, and a train step keeps it for the
weight gradient.

Implementations (``conv_impl`` of :class:`imgcls_jax.models.VGG`):

* ``"xla"``: ``lax.conv_general_dilated``, whatever the backend.
* ``"im2col"``: the matmul form, whatever the backend and shape.
* ``"auto"`` (default): :func:`choose_impl`, decided at trace time from ``jax.default_backend()``
  and the static input shape. GPU/TPU always get ``"xla"``. On CPU, ``"im2col"`` when the map has at
  most :data:`CPU_IM2COL_MAX_PIXELS` pixels (``H * W``), else ``"xla"``; the threshold comes from
  per-layer timings of VGG16's shapes at 32/64/128/224 px (``benchmarks/RESULTS.md``).

Both forms compute in the dtype of their inputs (the caller casts, as ``nnx.Conv`` does); the
im2col matmul accumulates in float32 for low-precision inputs and rounds once at the end.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col")

#: On CPU, "auto" uses im2col for maps of at most this many pixels (H * W), XLA's conv above.
CPU_IM2COL_MAX_PIXELS = 4 * 4

_NHWC = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str) -> str:
    """Return ``impl`` if it is one of :data:`CONV_IMPLS`, else raise ``ValueError`` naming it."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


def choose_impl(x_shape: tuple[int, ...], backend: str | None = None) -> str:
    """The implementation ``"auto"`` uses for a 3x3 SAME conv on an NHWC input of ``x_shape``.

    ``backend``: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default ``jax.default_backend()``.
    Returns ``"im2col"`` on CPU for maps of at most :data:`CPU_IM2COL_MAX_PIXELS` pixels, else ``"xla"``.
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    _, height, width, _ = x_shape
    return "im2col" if height * width <= CPU_IM2COL_MAX_PIXELS else "xla"


def _check_shapes(x: jax.Array, kernel: jax.Array) -> None:
    if x.ndim != 4:
        raise ValueError(f"expected an NHWC input [N, H, W, C], got shape {x.shape}")
    if kernel.shape[:2] != (3, 3) or kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(
            f"expected an HWIO kernel [3, 3, {x.shape[3]}, Cout] for input {x.shape}, got {kernel.shape}"
        )


def conv3x3_xla(x: jax.Array, kernel: jax.Array, *, precision=None, preferred_element_type=None) -> jax.Array:
    """XLA's 3x3 SAME stride-1 convolution. ``x``: ``[N, H, W, Cin]``, ``kernel``: HWIO
    ``[3, 3, Cin, Cout]``, same dtype; returns ``[N, H, W, Cout]`` in that dtype (or
    ``preferred_element_type``)."""
    _check_shapes(x, kernel)
    return lax.conv_general_dilated(
        x,
        kernel,
        (1, 1),
        "SAME",
        dimension_numbers=_NHWC,
        precision=precision,
        preferred_element_type=preferred_element_type,
    )


def conv3x3_im2col(
    x: jax.Array, kernel: jax.Array, *, precision=None, preferred_element_type=None
) -> jax.Array:
    """The same convolution as :func:`conv3x3_xla`, as im2col + one matmul (see the module doc).

    ``x``: ``[N, H, W, Cin]``; ``kernel``: HWIO ``[3, 3, Cin, Cout]``. Returns ``[N, H, W, Cout]``
    in ``preferred_element_type`` if given, else in ``x``'s dtype (accumulated in float32 when
    that is a 16-bit float). Temporary memory: ``N*H*W*9*Cin`` elements.
    """
    _check_shapes(x, kernel)
    n, h, w, cin = x.shape
    cout = kernel.shape[3]
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    # channel order (kh, kw, cin) matches the row-major reshape of the HWIO kernel
    cols = jnp.concatenate([padded[:, i : i + h, j : j + w, :] for i in range(3) for j in range(3)], axis=-1)
    out_dtype = preferred_element_type or x.dtype
    acc = jnp.float32 if jnp.dtype(x.dtype).itemsize < 4 else preferred_element_type
    y = jnp.dot(
        cols.reshape(n * h * w, 9 * cin),
        kernel.reshape(9 * cin, cout),
        precision=precision,
        preferred_element_type=acc,
    )
    return y.astype(out_dtype).reshape(n, h, w, cout)


def conv3x3(x: jax.Array, kernel: jax.Array, impl: str = "auto", **kwargs) -> jax.Array:
    """3x3 SAME stride-1 conv of NHWC ``x`` with HWIO ``kernel`` by ``impl`` (see :data:`CONV_IMPLS`);
    ``kwargs``: ``precision``, ``preferred_element_type``."""
    impl = check_impl(impl)
    if impl == "auto":
        impl = choose_impl(x.shape)
    fn = conv3x3_im2col if impl == "im2col" else conv3x3_xla
    return fn(x, kernel, **kwargs)


@dataclass(frozen=True)
class ConvGeneralDilated:
    """A ``conv_general_dilated`` for ``nnx.Conv(conv_general_dilated=...)`` that runs 3x3 SAME
    stride-1 NHWC convolutions by ``impl``.

    Any other convolution goes to ``lax.conv_general_dilated`` under ``"auto"`` and ``"xla"``,
    and is a ``ValueError`` under ``"im2col"`` (which only exists for that case). Frozen and
    compared by value, so models built with the same ``impl`` share one graph definition.
    """

    impl: str = "auto"

    def __post_init__(self):
        check_impl(self.impl)

    def __call__(
        self,
        lhs,
        rhs,
        window_strides,
        padding,
        lhs_dilation=None,
        rhs_dilation=None,
        dimension_numbers=None,
        feature_group_count=1,
        precision=None,
        preferred_element_type=None,
        **kwargs,
    ):
        ones = (None, (1, 1))
        plain = (
            lhs.ndim == 4
            and rhs.shape[:2] == (3, 3)
            and tuple(window_strides) == (1, 1)
            and (padding == "SAME" or tuple(map(tuple, padding)) == ((1, 1), (1, 1)))
            and (lhs_dilation if lhs_dilation is None else tuple(lhs_dilation)) in ones
            and (rhs_dilation if rhs_dilation is None else tuple(rhs_dilation)) in ones
            and feature_group_count == 1
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            and kwargs.get("out_sharding") is None
        )
        if plain:
            return conv3x3(
                lhs, rhs, self.impl, precision=precision, preferred_element_type=preferred_element_type
            )
        if self.impl == "im2col":
            raise ValueError(
                f"conv_impl='im2col' handles only 3x3 SAME stride-1 NHWC convolutions without "
                f"dilation or groups; got kernel {rhs.shape}, strides {window_strides}, padding "
                f"{padding!r}, dimension_numbers {dimension_numbers}"
            )
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            preferred_element_type=preferred_element_type,
            **kwargs,
        )


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 VALID max pooling of NHWC ``x`` ``[N, H, W, C]`` -> ``[N, H // 2, W // 2, C]``.

    An odd last row or column is dropped, as VALID pooling does (Keras's ``MaxPooling2D`` and
    ``nnx.max_pool(x, (2, 2), strides=(2, 2))``: a 45x45 map pools to 22x22); its gradient is zero.
    Same values and gradient as ``nnx.max_pool``, whose gradient (XLA's select-and-scatter) goes to
    the first maximum of each window in row-major order; here that gradient is a mask of
    elementwise ops on a reshaped view, which XLA:CPU runs 3-25x faster than its
    select-and-scatter at VGG's shapes (``benchmarks/RESULTS.md``). H and W must be at least 2.
    """
    if x.ndim != 4 or x.shape[1] < 2 or x.shape[2] < 2:
        raise ValueError(f"max_pool_2x2 needs an NHWC input [N, H, W, C] with H, W >= 2, got shape {x.shape}")
    h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
    if (h, w) != x.shape[1:3]:
        x = x[:, :h, :w, :]  # VALID: the odd row/column is outside every window
    return _max_pool_even(x)


@jax.custom_vjp
def _max_pool_even(x: jax.Array) -> jax.Array:
    """:func:`max_pool_2x2` of ``x`` with even H and W, with the fast gradient."""
    return _windows(x).max(axis=(2, 4))


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x.reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x):
    y = _max_pool_even(x)
    return y, (x, y)


def _max_pool_bwd(res, g):
    x, y = res
    win = _windows(x)
    hit = win == y[:, :, None, :, None, :]
    # keep only the first maximum of each window, in the order (0, 0), (0, 1), (1, 0), (1, 1)
    h00, h01, h10, h11 = hit[:, :, 0, :, 0], hit[:, :, 0, :, 1], hit[:, :, 1, :, 0], hit[:, :, 1, :, 1]
    h01 = h01 & ~h00
    h10 = h10 & ~(h00 | h01)
    h11 = h11 & ~(h00 | h01 | h10)
    zero = jnp.zeros((), g.dtype)
    top = jnp.stack([jnp.where(h00, g, zero), jnp.where(h01, g, zero)], axis=3)
    bottom = jnp.stack([jnp.where(h10, g, zero), jnp.where(h11, g, zero)], axis=3)
    return (jnp.stack([top, bottom], axis=2).reshape(x.shape),)


_max_pool_even.defvjp(_max_pool_fwd, _max_pool_bwd)
