"""oneDNN's 2-D convolutions as a differentiable, jittable JAX op on the CPU (:func:`conv`).

The kernels are ``onednn_conv.cc`` (forward, input gradient, weight gradient), built once by
:mod:`imgcls_jax.native.build`, loaded with ``ctypes`` and registered as XLA FFI targets; they
are called with ``jax.ffi.ffi_call`` and differentiated by ``jax.custom_vjp`` (the gradients are
the other two kernels). Under ``jit`` with a batch sharded over several devices (a ``Mesh``),
``custom_partitioning`` runs each kernel on the local batch: forward and input gradient need no
communication, the weight gradient is summed over the batch's mesh axes (``psum``). Under
``vmap`` (``custom_vmap``) a mapped activation with an unmapped kernel is folded into the batch
(one call); anything else runs once per mapped element.

Nothing is built or loaded until :func:`status` (or :func:`conv`) is first called, never on
import. If the library cannot be had (no compiler, oneDNN not installed, ``IMGCLS_JAX_ONEDNN=0``)
:func:`status` says why; :func:`imgcls_jax.models.conv.choose_impl` then keeps XLA's convolution.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import threading
from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding, PartitionSpec

from imgcls_jax.native.build import NativeUnavailable, library_path

log = logging.getLogger(__name__)

TARGETS = {
    "fwd": "imgcls_onednn_conv_fwd",
    "bwd_data": "imgcls_onednn_conv_bwd_data",
    "bwd_weights": "imgcls_onednn_conv_bwd_weights",
}
_DTYPE_CODES = {jnp.dtype(jnp.float32): 0, jnp.dtype(jnp.bfloat16): 1}


@dataclass(frozen=True)
class Status:
    """Whether the oneDNN kernels can run here: ``reason`` says why not (``None`` when they can);
    ``dtypes``: the compute dtypes this CPU runs (float32; bfloat16 where the CPU has it)."""

    reason: str | None
    version: str | None = None
    path: str | None = None
    dtypes: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.reason is None


_lock = threading.Lock()
_status: Status | None = None
_lib: ctypes.CDLL | None = None


def status() -> Status:
    """Build (once per machine) and load (once per process) the kernels; never raises."""
    global _status
    with _lock:
        if _status is None:
            _status = _load()
            if not _status.available:
                log.debug("oneDNN convolutions unavailable, XLA's are used: %s", _status.reason)
        return _status


def _load() -> Status:
    global _lib
    if os.environ.get("IMGCLS_JAX_ONEDNN", "1").lower() in ("0", "false", "no", "off"):
        return Status("turned off by IMGCLS_JAX_ONEDNN=0")
    try:
        path = library_path()
        lib = ctypes.CDLL(str(path))
    except NativeUnavailable as error:
        return Status(str(error))
    except OSError as error:
        return Status(f"cannot load the oneDNN library: {error}")
    lib.imgcls_onednn_version.restype = ctypes.c_char_p
    lib.imgcls_onednn_impl.restype = ctypes.c_char_p
    lib.imgcls_onednn_impl.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 14
    for target in TARGETS.values():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
    _lib = lib
    dtypes = tuple(str(d) for d, code in _DTYPE_CODES.items() if lib.imgcls_onednn_supports(code))
    return Status(None, lib.imgcls_onednn_version().decode(), str(path), dtypes)


def supports(dtype) -> bool:
    """Whether :func:`conv` runs ``dtype`` here (loads the kernels if needed)."""
    s = status()
    return s.available and str(jnp.dtype(dtype)) in s.dtypes


# ------------------------------------------------------------------------------ the JAX op
Pads = tuple[tuple[int, int], tuple[int, int]]


@dataclass(frozen=True)
class Geometry:
    """The static part of one convolution: ``strides (sh, sw)``, ``pads ((top, bottom), (left,
    right))``, ``groups``, and the input's spatial size ``in_hw`` (for the input gradient)."""

    strides: tuple[int, int]
    pads: Pads
    groups: int
    in_hw: tuple[int, int]

    def attrs(self) -> dict:
        (pt, pb), (pl, pr) = self.pads
        values = dict(stride_h=self.strides[0], stride_w=self.strides[1], pad_top=pt, pad_bottom=pb,
                      pad_left=pl, pad_right=pr, groups=self.groups)  # fmt: skip
        return {k: np.int64(v) for k, v in values.items()}

    def out_hw(self, kernel_hw: tuple[int, int]) -> tuple[int, int]:
        sizes = zip(self.in_hw, self.pads, kernel_hw, self.strides)
        return tuple((n + lo + hi - k) // s + 1 for n, (lo, hi), k, s in sizes)  # type: ignore[return-value]


def _ffi(kind: str, shape, dtype, a, b, geometry: Geometry):
    call = jax.ffi.ffi_call(TARGETS[kind], jax.ShapeDtypeStruct(shape, dtype), vmap_method="sequential")
    return call(a, b, **geometry.attrs())


def _fwd_local(x, w, geometry: Geometry):
    return _ffi("fwd", (x.shape[0], *geometry.out_hw(w.shape[:2]), w.shape[3]), x.dtype, x, w, geometry)


def _bwd_data_local(dy, w, geometry: Geometry):
    c = w.shape[2] * geometry.groups
    return _ffi("bwd_data", (dy.shape[0], *geometry.in_hw, c), dy.dtype, dy, w, geometry)


def _bwd_weights_local(x, dy, geometry: Geometry, w_shape):
    return _ffi("bwd_weights", w_shape, x.dtype, x, dy, geometry)


def _batch_spec(mesh, arg_shape):
    """The mesh axes the batch (first) dimension of ``arg_shape`` is split over, or ``None``."""
    sharding = arg_shape.sharding
    if not isinstance(sharding, NamedSharding) or not sharding.spec:
        return None
    return sharding.spec[0]


def _axes(spec) -> tuple[str, ...]:
    if spec is None:
        return ()
    return tuple(spec) if isinstance(spec, tuple) else (spec,)


def _batched(mesh, spec, ndim=4):
    return NamedSharding(mesh, PartitionSpec(spec, *([None] * (ndim - 1))))


@partial(custom_partitioning, static_argnums=(2,))
def _fwd(x, w, geometry):
    return _fwd_local(x, w, geometry)


@partial(custom_partitioning, static_argnums=(2,))
def _bwd_data(dy, w, geometry):
    return _bwd_data_local(dy, w, geometry)


@partial(custom_partitioning, static_argnums=(2, 3))
def _bwd_weights(x, dy, geometry, w_shape):
    return _bwd_weights_local(x, dy, geometry, w_shape)


def _split_infer(geometry, mesh, arg_shapes, result_shape):
    return _batched(mesh, _batch_spec(mesh, arg_shapes[0]))


def _split_partition(local, geometry, mesh, arg_shapes, result_shape):
    """Batch-split ops (forward, input gradient): the activation keeps its batch split, the
    kernel is whole on every device, the result is split as the activation."""
    spec = _batch_spec(mesh, arg_shapes[0])
    shardings = (_batched(mesh, spec), NamedSharding(mesh, PartitionSpec()))
    return mesh, partial(local, geometry=geometry), _batched(mesh, spec), shardings


def _weights_infer(geometry, w_shape, mesh, arg_shapes, result_shape):
    return NamedSharding(mesh, PartitionSpec())


def _weights_partition(geometry, w_shape, mesh, arg_shapes, result_shape):
    """The weight gradient: both operands split on the batch alike, each device's partial sum
    added over the batch's mesh axes; the result is whole on every device."""
    spec = _batch_spec(mesh, arg_shapes[0])
    axes = _axes(spec)

    def lower(x, dy):
        dw = _bwd_weights_local(x, dy, geometry, w_shape)
        return jax.lax.psum(dw, axes) if axes else dw

    shardings = (_batched(mesh, spec), _batched(mesh, spec))
    return mesh, lower, NamedSharding(mesh, PartitionSpec()), shardings


_fwd.def_partition(
    infer_sharding_from_operands=_split_infer,
    partition=partial(_split_partition, _fwd_local),
    sharding_rule="n h w c, kh kw ci o -> n oh ow o",
)
_bwd_data.def_partition(
    infer_sharding_from_operands=_split_infer,
    partition=partial(_split_partition, _bwd_data_local),
    sharding_rule="n oh ow o, kh kw ci o -> n h w c",
)
_bwd_weights.def_partition(
    infer_sharding_from_operands=_weights_infer,
    partition=_weights_partition,
    sharding_rule="n h w c, n oh ow o -> kh kw ci o",
    reduction_factors=("n",),
)


def _vmap_rule(fn, foldable: bool):
    """A ``custom_vmap`` rule for ``fn(a, b)``: when only ``a`` (an activation) is mapped and
    ``foldable``, one call on the mapped axis folded into the batch; otherwise one call per
    mapped element (``lax.map``; unmapped operands broadcast)."""

    def rule(axis_size, in_batched, a, b):
        a_mapped, b_mapped = in_batched
        if foldable and a_mapped and not b_mapped:
            out = fn(a.reshape(-1, *a.shape[2:]), b)
            return out.reshape(axis_size, -1, *out.shape[1:]), True
        a = a if a_mapped else jnp.broadcast_to(a, (axis_size, *a.shape))
        b = b if b_mapped else jnp.broadcast_to(b, (axis_size, *b.shape))
        return jax.lax.map(lambda ab: fn(*ab), (a, b)), True

    return rule


@functools.cache
def _ops(geometry: Geometry, w_shape: tuple[int, ...]):
    """``(forward, input gradient, weight gradient)`` of one convolution, each batchable by
    ``vmap`` (:func:`_vmap_rule`; ``custom_partitioning`` has no batching rule of its own)."""
    ops = []
    for fn, foldable in (
        (lambda x, w: _fwd(x, w, geometry), True),
        (lambda dy, w: _bwd_data(dy, w, geometry), True),
        (lambda x, dy: _bwd_weights(x, dy, geometry, w_shape), False),  # sums over the batch
    ):
        op = jax.custom_batching.custom_vmap(fn)
        op.def_vmap(_vmap_rule(fn, foldable))
        ops.append(op)
    return tuple(ops)


@partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, w, geometry: Geometry):
    return _ops(geometry, w.shape)[0](x, w)


def _conv_fwd(x, w, geometry):
    return _conv(x, w, geometry), (x, w)


def _conv_bwd(geometry, residuals, dy):
    x, w = residuals
    _, bwd_data, bwd_weights = _ops(geometry, w.shape)
    return bwd_data(dy, w), bwd_weights(x, dy)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x: jax.Array, kernel: jax.Array, strides=(1, 1), pads: Pads = ((0, 0), (0, 0)), groups: int = 1):
    """oneDNN's convolution of NHWC ``x`` ``[N, H, W, C]`` with the HWIO ``kernel``
    ``[KH, KW, C / groups, O]`` (output channels group-major, as ``lax.conv_general_dilated``'s
    ``feature_group_count``), explicit zero padding ``pads`` ``((top, bottom), (left, right))``
    (non-negative), ``strides`` ``(sh, sw)``. Returns ``[N, OH, OW, O]`` in ``x``'s dtype
    (float32, or bfloat16 where :func:`supports` says so; both operands alike), ``OH = (H + top +
    bottom - KH) // sh + 1``. Differentiable in ``x`` and ``kernel``; same results as
    ``lax.conv_general_dilated`` to float rounding.

    Raises ``ValueError`` for shapes or dtypes it does not take, and ``RuntimeError`` (with the
    reason) where the kernels are unavailable.
    """
    backend = jax.default_backend()
    if backend != "cpu":
        raise ValueError(
            f"conv_impl='onednn' runs on the CPU only; the default backend here is {backend!r}: use "
            "conv_impl='auto' (XLA's convolutions off CPU) or 'xla'"
        )
    s = status()
    if not s.available:
        raise RuntimeError(f"conv_impl='onednn' is unavailable here: {s.reason}")
    if x.ndim != 4 or kernel.ndim != 4:
        raise ValueError(f"expected NHWC x and HWIO kernel, got shapes {x.shape} and {kernel.shape}")
    if x.dtype != kernel.dtype or str(jnp.dtype(x.dtype)) not in s.dtypes:
        raise ValueError(
            f"conv_impl='onednn' computes in {' or '.join(s.dtypes)} with both operands alike on this CPU; "
            f"got x {x.dtype} and kernel {kernel.dtype}: use conv_impl='auto' or 'xla'"
        )
    if groups < 1 or x.shape[3] != kernel.shape[2] * groups or kernel.shape[3] % groups:
        raise ValueError(f"kernel {kernel.shape} does not fit input {x.shape} with {groups} groups")
    geometry = Geometry(tuple(int(v) for v in strides), tuple((int(a), int(b)) for a, b in pads), int(groups),
                        (int(x.shape[1]), int(x.shape[2])))  # fmt: skip
    if min(geometry.strides) < 1 or min(v for p in geometry.pads for v in p) < 0:
        raise ValueError(f"conv_impl='onednn' needs strides >= 1 and padding >= 0, got {strides}, {pads}")
    if min(geometry.out_hw(kernel.shape[:2])) < 1:
        raise ValueError(f"kernel {kernel.shape[:2]} does not fit the padded input {x.shape} at {strides}")
    return _conv(x, kernel, geometry)


def impl_name(kind: str, x_shape, kernel_shape, strides=(1, 1), pads: Pads = ((0, 0), (0, 0)), groups=1,
              dtype=jnp.float32) -> str:  # fmt: skip
    """The oneDNN implementation (e.g. ``"brgconv:avx512_core"``) one convolution's ``kind``
    (``"fwd"``, ``"bwd_data"``, ``"bwd_weights"``) uses here; for profiles and RESULTS.md."""
    if _lib is None and not status().available:
        return ""
    n, h, w, c = x_shape
    kh, kw, _, o = kernel_shape
    (pt, pb), (pl, pr) = pads
    kind_code = list(TARGETS).index(kind)
    args = (n, h, w, c, kh, kw, o, strides[0], strides[1], pt, pb, pl, pr, groups)
    return _lib.imgcls_onednn_impl(kind_code, _DTYPE_CODES[jnp.dtype(dtype)], *args).decode()
