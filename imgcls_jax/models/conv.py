"""How 2-D convolutions compute, for every family: XLA's convolution, im2col + one matmul, shifted
multiply-adds (depthwise) or oneDNN's kernels, chosen per backend and shape in one place
(:func:`conv_nhwc`, :func:`choose_impl`); and :func:`max_pool_2x2`, max pooling with a cheaper
gradient.

XLA:CPU compiles some convolution shapes into very slow loops (a 3x3 conv on a 2x2 map with 512
channels at batch 32: ~270 ms, vs ~2.5 ms as a matmul), and its weight-gradient convolutions are
several times slower than its forward ones. Rewritten as im2col (the nine shifted windows of the
zero-padded input concatenated on channels, ``[N, H, W, 9*Cin]``, times the kernel reshaped to
``[9*Cin, Cout]``), forward and both gradients become plain matmuls, which XLA:CPU runs near peak.
The price is memory: the im2col buffer is 9x the layer's input, and a train step keeps it for the
weight gradient. oneDNN's convolutions (:mod:`imgcls_jax.native.onednn`, called through XLA's FFI)
run forward and both gradients at several times XLA:CPU's speed where the kernels are available.

Implementations (``conv_impl`` of every family; :data:`CONV_IMPLS`):

* ``"xla"``: ``lax.conv_general_dilated``, whatever the backend (depthwise ones too).
* ``"im2col"``: 3x3 SAME stride-1 convolutions as im2col + matmul, whatever the backend; every
  other convolution as ``"auto"`` chooses.
* ``"onednn"``: oneDNN's kernels for every NHWC 2-D convolution (grouped and depthwise included,
  no dilation), float32 (bfloat16 where the CPU has it); CPU only. An error where unavailable,
  naming why.
* ``"auto"`` (default): :func:`choose_impl`, decided at trace time from ``jax.default_backend()``,
  the static shapes and dtype. GPU/TPU always get ``"xla"`` (nothing native is built or loaded).
  On CPU, ``"onednn"`` where the kernels are available (:func:`imgcls_jax.native.onednn.status`)
  and the measured rule :func:`onednn_wins` says so; else depthwise convolutions run as
  ``"shift"`` and 3x3 SAME stride-1 ones on maps of at most :data:`CPU_IM2COL_MAX_PIXELS` pixels
  as ``"im2col"``, the rest as ``"xla"``. The rule's timings: ``benchmarks/RESULTS.md``.

Every form computes in the dtype of its inputs (the caller casts, as ``nnx.Conv`` does); the
im2col matmul accumulates in float32 for low-precision inputs and rounds once at the end, and so
do oneDNN's kernels and the shifted multiply-adds.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax

log = logging.getLogger(__name__)

CONV_IMPLS = ("auto", "xla", "im2col", "onednn")
#: What a depthwise convolution may be told (``depthwise_impl``): "shift" is the shifted
#: multiply-add form (:func:`depthwise_shift`); "auto" follows the model's ``conv_impl``.
DEPTHWISE_IMPLS = ("auto", "xla", "shift", "onednn")

#: On CPU, "auto" uses im2col for maps of at most this many pixels (H * W), XLA's conv above.
CPU_IM2COL_MAX_PIXELS = 4 * 4

_NHWC = ("NHWC", "HWIO", "NHWC")


def check_impl(impl: str) -> str:
    """Return ``impl`` if it is one of :data:`CONV_IMPLS`, else raise ``ValueError`` naming it."""
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl must be one of {CONV_IMPLS}, got {impl!r}")
    return impl


def check_depthwise_impl(impl: str) -> str:
    """Return ``impl`` if it is one of :data:`DEPTHWISE_IMPLS`, else raise ``ValueError``."""
    if impl not in DEPTHWISE_IMPLS:
        raise ValueError(f"depthwise_impl must be one of {DEPTHWISE_IMPLS}, got {impl!r}")
    return impl


def depthwise_impl_for(conv_impl: str, depthwise_impl: str = "auto") -> str:
    """The implementation a family's depthwise convolutions get: ``depthwise_impl`` unless it is
    ``"auto"``, then the model's ``conv_impl`` (``"im2col"``, which has no depthwise form, and
    ``"auto"`` give ``"auto"``)."""
    check_impl(conv_impl)
    if check_depthwise_impl(depthwise_impl) != "auto":
        return depthwise_impl
    return conv_impl if conv_impl in ("xla", "onednn") else "auto"


def _is_3x3_same_s1(kernel_shape, strides, pads, groups) -> bool:
    return (
        tuple(kernel_shape[:2]) == (3, 3)
        and tuple(strides) == (1, 1)
        and groups == 1
        and (tuple(map(tuple, pads)) == ((1, 1), (1, 1)))
    )


def _is_depthwise(x_shape, kernel_shape, groups) -> bool:
    return groups > 1 and groups == x_shape[3] and kernel_shape[2] == 1 and kernel_shape[3] == groups


def onednn_wins(x_shape, kernel_shape, strides, groups: int, dtype, pads=None) -> bool:
    """Whether ``"auto"`` runs this convolution with oneDNN on CPU (when the kernels are there):
    every convolution but two kinds, from the per-layer timings of ``benchmarks/conv_layers.py``
    (``benchmarks/RESULTS.md``):

    * on a 1x1 map (squeeze-excitation's convolutions): a matmul XLA fuses with its neighbours;
    * 3x3 SAME stride-1 ones on maps of at most :data:`CPU_IM2COL_MAX_PIXELS` pixels: im2col's
      matmuls, which need no kernel reorder (oneDNN reorders the whole kernel into its blocked
      layout for the forward pass and the input gradient, and the weight gradient back, which
      costs more than the convolution itself on a 2x2 or 4x4 map with 256-512 channels).
    """
    _, height, width, _ = x_shape
    if height * width == 1:
        return False
    pads = tuple(((k - 1) // 2, k // 2) for k in kernel_shape[:2]) if pads is None else pads
    return not (
        _is_3x3_same_s1(kernel_shape, strides, pads, groups) and height * width <= CPU_IM2COL_MAX_PIXELS
    )


def _onednn_usable(dtype) -> bool:
    from imgcls_jax.native import onednn

    return onednn.supports(dtype)


def choose_impl(
    x_shape: tuple[int, ...],
    backend: str | None = None,
    *,
    kernel_shape: tuple[int, ...] | None = None,
    strides=(1, 1),
    pads=((1, 1), (1, 1)),
    groups: int = 1,
    dtype=jnp.float32,
) -> str:
    """The implementation ``"auto"`` uses for a convolution of an NHWC input of ``x_shape`` (by
    default a 3x3 SAME stride-1 one, ``kernel_shape`` HWIO): ``"xla"``, ``"im2col"``, ``"shift"``
    (depthwise) or ``"onednn"``; see the module docstring.

    ``backend``: ``"cpu"``, ``"gpu"``, ``"tpu"``...; default ``jax.default_backend()``. Off CPU
    this is always ``"xla"`` and loads nothing. ``dtype``: the compute dtype of both operands;
    ``None`` when they differ or a wider result is asked for (then only "xla" or "im2col").
    """
    backend = jax.default_backend() if backend is None else backend
    if backend != "cpu":
        return "xla"
    kernel_shape = (3, 3, x_shape[3], x_shape[3]) if kernel_shape is None else tuple(kernel_shape)
    if dtype is not None and _onednn_usable(dtype):
        if onednn_wins(x_shape, kernel_shape, strides, groups, dtype, pads):
            return "onednn"
    unpadded = not any(v for p in pads for v in p)
    if dtype is not None and _is_depthwise(x_shape, kernel_shape, groups) and unpadded:
        return "shift"
    _, height, width, _ = x_shape
    plain = _is_3x3_same_s1(kernel_shape, strides, pads, groups)
    return "im2col" if plain and height * width <= CPU_IM2COL_MAX_PIXELS else "xla"


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
    check_impl(impl)
    _check_shapes(x, kernel)
    return conv_nhwc(x, kernel, (1, 1), ((1, 1), (1, 1)), impl=impl, **kwargs)


def depthwise_shift(x: jax.Array, kernel: jax.Array, strides: tuple[int, int]) -> jax.Array:
    """A depthwise VALID convolution as ``k x k`` shifted multiply-adds, accumulated in float32.

    XLA:CPU runs depthwise convolutions (``feature_group_count = C``) as slow loops, and their
    kernel gradient as a dense convolution (C times the work); as shifted multiply-adds the layer
    is elementwise work XLA fuses (measured at EfficientNetB0's shapes, batch 32: forward 7-100x,
    forward + gradients 8-40x faster than XLA's, equal to float32 rounding). ``x``:
    ``[N, H, W, C]`` (already padded); ``kernel``: HWIO ``[k, k, 1, C * m]`` (``m``: Keras's
    ``depth_multiplier``; output channel ``c * m + j`` is input channel ``c`` times kernel
    ``[..., c * m + j]``); returns ``[N, (H - k) // sh + 1, (W - k) // sw + 1, C * m]`` in ``x``'s
    dtype.
    """
    k, kw, _, c = kernel.shape
    m = c // x.shape[3]
    if m > 1:
        x = jnp.repeat(x, m, axis=-1)  # channel c * m + j reads input channel c
    sh, sw = strides
    h, w = (x.shape[1] - k) // sh + 1, (x.shape[2] - kw) // sw + 1
    out = jnp.zeros((x.shape[0], h, w, c), jnp.float32)
    for i in range(k):
        for j in range(kw):
            window = x[:, i : i + (h - 1) * sh + 1 : sh, j : j + (w - 1) * sw + 1 : sw]
            out = out + (window * kernel[i, j, 0, :]).astype(jnp.float32)
    return out.astype(x.dtype)


def conv_nhwc(
    x: jax.Array,
    kernel: jax.Array,
    strides=(1, 1),
    padding="VALID",
    *,
    groups: int = 1,
    impl: str = "auto",
    precision=None,
    preferred_element_type=None,
) -> jax.Array:
    """The one entry of every family's 2-D convolution: NHWC ``x`` ``[N, H, W, C]``, HWIO
    ``kernel`` ``[KH, KW, C / groups, O]``, ``strides`` ``(sh, sw)``, ``padding`` ``"SAME"``,
    ``"VALID"`` or ``((top, bottom), (left, right))``, ``groups`` (``C`` for a depthwise
    convolution) -> ``[N, OH, OW, O]``, by ``impl`` (:data:`CONV_IMPLS`, or ``"shift"`` for a
    depthwise one). ``precision`` and ``preferred_element_type`` as ``lax.conv_general_dilated``
    (oneDNN and shift compute in the inputs' dtype: a ``preferred_element_type`` other than it
    sends ``"auto"`` to XLA)."""
    strides = tuple(int(s) for s in strides)
    pads = padding
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(x.shape[1:3], kernel.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if impl == "auto":
        same_type = preferred_element_type in (None, x.dtype) and x.dtype == kernel.dtype
        impl = "xla"
        if min(v for p in pads for v in p) >= 0:
            impl = choose_impl(x.shape, kernel_shape=kernel.shape, strides=strides, pads=pads, groups=groups,
                               dtype=x.dtype if same_type else None)  # fmt: skip
    elif impl == "im2col" and not _is_3x3_same_s1(kernel.shape, strides, pads, groups):
        return conv_nhwc(x, kernel, strides, pads, groups=groups, impl="auto", precision=precision,
                         preferred_element_type=preferred_element_type)  # fmt: skip
    if _recorders:
        _record(x, kernel, strides, pads, groups, impl)
    if impl == "onednn":
        from imgcls_jax.native import onednn

        return onednn.conv(x, kernel, strides, pads, groups)
    if impl == "shift":
        multiplier_ok = kernel.shape[2] == 1 and kernel.shape[3] % max(groups, 1) == 0
        if groups != x.shape[3] or groups < 2 or not multiplier_ok or any(v for p in pads for v in p):
            raise ValueError(f"depthwise_impl='shift' takes VALID depthwise convolutions only; got kernel "
                             f"{kernel.shape} on {x.shape}, {groups} groups, padding {pads}")  # fmt: skip
        return depthwise_shift(x, kernel, strides)
    if impl == "im2col":
        return conv3x3_im2col(x, kernel, precision=precision, preferred_element_type=preferred_element_type)
    return lax.conv_general_dilated(
        x, kernel, strides, pads, dimension_numbers=_NHWC, feature_group_count=groups, precision=precision,
        preferred_element_type=preferred_element_type,
    )  # fmt: skip


@dataclass(frozen=True)
class ConvCall:
    """One convolution as :func:`conv_nhwc` saw it: NHWC input and HWIO kernel shapes, strides,
    explicit padding ``((top, bottom), (left, right))``, groups, the inputs' dtype and the
    implementation it ran by."""

    x_shape: tuple[int, ...]
    kernel_shape: tuple[int, ...]
    strides: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]
    groups: int
    dtype: str
    impl: str

    def key(self) -> tuple:
        """What identifies the computation (all but ``impl``)."""
        return (self.x_shape, self.kernel_shape, self.strides, self.pads, self.groups, self.dtype)


_recorders: list[list[ConvCall]] = []


@contextlib.contextmanager
def record_convs() -> Iterator[list[ConvCall]]:
    """Within the block, every convolution traced through :func:`conv_nhwc` (so every family's)
    is appended to the yielded list as a :class:`ConvCall`, e.g. around ``jax.eval_shape`` of a
    model's forward pass to list its convolutions."""
    calls: list[ConvCall] = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _record(x, kernel, strides, pads, groups, impl) -> None:
    call = ConvCall(tuple(x.shape), tuple(kernel.shape), strides, pads, groups, str(jnp.dtype(x.dtype)), impl)
    for calls in _recorders:
        calls.append(call)


@dataclass(frozen=True)
class ConvGeneralDilated:
    """A ``conv_general_dilated`` for ``nnx.Conv(conv_general_dilated=...)`` that runs NHWC/HWIO
    2-D convolutions without dilation through :func:`conv_nhwc` by ``impl``.

    Any other convolution (other layouts, dilation, sharding arguments) goes to
    ``lax.conv_general_dilated`` under ``"auto"``, ``"xla"`` and ``"im2col"``, and is a
    ``ValueError`` under ``"onednn"``. Frozen and compared by value, so models built with the same
    ``impl`` share one graph definition.
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
            and (lhs_dilation if lhs_dilation is None else tuple(lhs_dilation)) in ones
            and (rhs_dilation if rhs_dilation is None else tuple(rhs_dilation)) in ones
            and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
            == lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
            and kwargs.get("out_sharding") is None
        )
        if plain:
            return conv_nhwc(
                lhs, rhs, window_strides, padding, groups=feature_group_count, impl=self.impl,
                precision=precision, preferred_element_type=preferred_element_type,
            )  # fmt: skip
        if self.impl == "onednn":
            raise ValueError(
                f"conv_impl='onednn' handles NHWC/HWIO 2-D convolutions without dilation; got kernel "
                f"{rhs.shape}, lhs_dilation {lhs_dilation}, rhs_dilation {rhs_dilation}, dimension_numbers "
                f"{dimension_numbers}: use conv_impl='auto' or 'xla'"
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
