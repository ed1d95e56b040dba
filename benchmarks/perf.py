"""Benchmark accounting: XLA's FLOP count of a compiled step, the device's peak rate, and MFU.

:func:`compiled_flops` reads the FLOPs XLA itself counts for a jitted function at given arguments
(elementwise work included), the figure the benchmark suite divides by time. It compiles the
function a second time and some backends (GPU plugins) count nothing or raise, so the prepared
accelerator run uses :func:`analytic_flops` instead: the model family's own count
(:mod:`imgcls_jax.models.flops`), which needs no compiler and cannot fail on a device.

The peak must be a peak, or MFU is not a fraction: :func:`measure_peak` times matmuls of several
shapes, in the step's dtype and float32 (on CPUs a bfloat16 step may run at float32's rate), with
JAX and with every other matmul at hand on the device (PyTorch where installed, NumPy's BLAS on
CPU), and keeps the best rate. On the 2-core CPU a 2048-square XLA matmul alone measured 0.10
TFLOP/s while convolutions reached more, so steps reported MFUs of 108-155%: a rate measured on one
shape of one library is a floor, not the chip's limit. Beside it, :func:`datasheet_peak` gives the
vendor's dense figure where the device is known (``None`` on CPUs).
"""

from __future__ import annotations

import importlib
import importlib.util
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np

#: Matmul shapes ``(m, k, n)`` timed for the peak, by platform.
CPU_SHAPES = ((1024, 1024, 1024), (2048, 2048, 2048), (1024, 4096, 1024), (3072, 3072, 3072))
ACCEL_SHAPES = ((4096, 4096, 4096), (8192, 8192, 8192), (16384, 8192, 8192), (8192, 16384, 4096))
FRAMEWORKS = ("jax", "torch", "numpy")

#: Vendors' dense (no sparsity) peak FLOP/s by ``device_kind`` substring (first match wins) and
#: dtype. float32 is the TF32 tensor-core figure on NVIDIA GPUs (JAX's default matmul precision).
DATASHEET = (
    ("H200", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("H100 PCIe", {"bfloat16": 756e12, "float16": 756e12, "float32": 378e12}),
    ("H100", {"bfloat16": 989e12, "float16": 989e12, "float32": 494e12}),
    ("A100", {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12}),
    ("TPU v6", {"bfloat16": 918e12}),
    ("TPU v5p", {"bfloat16": 459e12}),
    ("TPU v5 lite", {"bfloat16": 197e12}),
    ("TPU v4", {"bfloat16": 275e12}),
)


def compiled_flops(fn: Callable, *args, **kwargs) -> float:
    """FLOPs XLA's cost analysis counts for one call of jitted ``fn`` at these arguments.

    ``fn`` must have ``.lower`` (a ``jax.jit`` result). Raises ``RuntimeError`` if the backend
    gives no FLOP count (some plugins do not implement cost analysis).
    """
    analysis = fn.lower(*args, **kwargs).compile().cost_analysis()
    if isinstance(analysis, list | tuple):  # older jax: one dict per computation
        analysis = analysis[0] if analysis else None
    if not analysis or "flops" not in analysis:
        raise RuntimeError(f"no FLOP count from XLA's cost analysis on {jax.default_backend()!r}")
    return float(analysis["flops"])


def analytic_flops(model, image_size: int | tuple[int, int], mode: str, *, padding: str = "valid") -> float:
    """FLOPs of one image through ``model`` in ``mode`` (``"forward"``, ``"train"``, ``"frozen"``)
    by its family's analytic count (multiply-add = 2; convolutions and dense layers): ``vgg_flops``
    for a VGG, else the ``flops(model, image_size, mode, padding=)`` function of the module that
    defines the model's class. ``padding="valid"`` leaves out the taps on zero padding, as XLA's
    cost analysis does (see :mod:`imgcls_jax.models.flops`).

    Raises ``NotImplementedError`` for a family whose module has no ``flops`` function."""
    from imgcls_jax.models import VGG
    from imgcls_jax.models.flops import vgg_flops

    if isinstance(model, VGG):
        return vgg_flops(model, image_size, mode, padding=padding)
    family = importlib.import_module(type(model).__module__)
    count = getattr(family, "flops", None)
    if count is None:
        raise NotImplementedError(
            f"{type(model).__name__}: {family.__name__} has no analytic FLOP count; add "
            "flops(model, image_size, mode, padding=) there (see imgcls_jax.models.flops)"
        )
    return float(count(model, image_size, mode, padding=padding))


def datasheet_peak(device_kind: str, dtype: str) -> float | None:
    """The vendor's dense peak FLOP/s of ``device_kind`` in ``dtype``; ``None`` where not known."""
    for key, rates in DATASHEET:
        if key.lower() in device_kind.lower():
            return rates.get(dtype)
    return None


def _best_seconds(run: Callable[[], object], repeats: int) -> float:
    run()  # compile / warm up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def matmul_rate(
    shape: tuple[int, int, int], dtype: str, framework: str = "jax", *, repeats: int = 5, device=None
) -> float | None:
    """FLOP/s of the best of ``repeats`` timed ``[m, k] @ [k, n]`` products (``2 m k n`` FLOPs) on
    ``device`` (default: JAX's first device); ``None`` where ``framework`` cannot run there."""
    m, k, n = shape
    device = jax.devices()[0] if device is None else device
    if framework == "jax":
        keys = jax.random.split(jax.random.key(0))
        a = jax.device_put(jax.random.normal(keys[0], (m, k), jnp.dtype(dtype)), device)
        b = jax.device_put(jax.random.normal(keys[1], (k, n), jnp.dtype(dtype)), device)
        matmul = jax.jit(jnp.matmul)
        seconds = _best_seconds(lambda: matmul(a, b).block_until_ready(), repeats)
    elif framework == "numpy":
        if device.platform != "cpu" or dtype not in ("float32", "float64"):
            return None
        rng = np.random.default_rng(0)
        a, b = rng.standard_normal((m, k), dtype), rng.standard_normal((k, n), dtype)
        seconds = _best_seconds(lambda: a @ b, repeats)
    elif framework == "torch":
        seconds = _torch_seconds(shape, dtype, device.platform, repeats)
        if seconds is None:
            return None
    else:
        raise ValueError(f"framework must be one of {FRAMEWORKS}, got {framework!r}")
    return 2.0 * m * k * n / seconds


def _torch_seconds(shape, dtype: str, platform: str, repeats: int) -> float | None:
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if platform not in ("cpu", "gpu") or (platform == "gpu" and not torch.cuda.is_available()):
        return None
    where = "cuda" if platform == "gpu" else "cpu"
    m, k, n = shape
    a = torch.randn(m, k, device=where, dtype=getattr(torch, dtype))
    b = torch.randn(k, n, device=where, dtype=getattr(torch, dtype))

    def run():
        out = a @ b
        if where == "cuda":
            torch.cuda.synchronize()
        return out

    return _best_seconds(run, repeats)


@dataclass
class Peak:
    """The best matmul rate measured on one device, and what it was measured on."""

    flops: float  #: FLOP/s, the best of :attr:`rates`
    best: str  #: the entry of :attr:`rates` that gave it
    rates: dict[str, float] = field(default_factory=dict)  #: "framework dtype MxKxN" -> FLOP/s
    device: str = ""  #: ``device_kind``
    datasheet: float | None = None  #: vendor's figure for the step's dtype, where known

    def describe(self) -> str:
        sheet = (
            f"; datasheet {self.datasheet / 1e12:.0f} TFLOP/s" if self.datasheet else "; datasheet unknown"
        )
        return f"peak {self.flops / 1e12:.3f} TFLOP/s measured ({self.best}, {self.device}){sheet}"


def measure_peak(
    dtypes: Sequence[str] = ("float32",),
    shapes: Sequence[tuple[int, int, int]] | None = None,
    *,
    frameworks: Sequence[str] = FRAMEWORKS,
    repeats: int = 5,
    device=None,
    rate: Callable[..., float | None] = matmul_rate,
) -> Peak:
    """The best matmul rate over ``shapes`` x ``dtypes`` x ``frameworks`` (those that run here).

    Args:
      dtypes: matmul dtypes, e.g. the step's compute dtype and float32 (the first is the one
        whose datasheet figure is reported).
      shapes: ``(m, k, n)`` products; default :data:`CPU_SHAPES` or :data:`ACCEL_SHAPES`.
      frameworks: which libraries time the product (``"torch"`` where installed, ``"numpy"`` on CPU).
      repeats: timed runs per entry (after one warm-up); the fastest counts.
      device: a JAX device (default: the first).
      rate: ``(shape, dtype, framework, repeats=, device=) -> FLOP/s or None`` (tests pass a fake).
    """
    device = jax.devices()[0] if device is None else device
    shapes = shapes or (CPU_SHAPES if device.platform == "cpu" else ACCEL_SHAPES)
    rates = {}
    for dtype in dtypes:
        for framework in frameworks:
            for shape in shapes:
                value = rate(shape, dtype, framework, repeats=repeats, device=device)
                if value is not None:
                    rates[f"{framework} {dtype} {'x'.join(map(str, shape))}"] = value
    if not rates:
        raise RuntimeError(f"no matmul could be timed on {device} for {list(dtypes)} with {list(frameworks)}")
    best = max(rates, key=rates.get)
    kind = str(device.device_kind)
    return Peak(rates[best], best, rates, kind, datasheet_peak(kind, dtypes[0]))


def peak_flops(dtype: str = "bfloat16", shapes=None, repeats: int = 5, device=None) -> float:
    """:func:`measure_peak`'s FLOP/s for steps computing in ``dtype`` (float32 is timed too)."""
    dtypes = (dtype,) if dtype == "float32" else (dtype, "float32")
    return measure_peak(dtypes, shapes, repeats=repeats, device=device).flops


def mfu(flops_per_step: float, seconds_per_step: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s (``flops_per_step / seconds_per_step``) over
    ``peak`` FLOP/s, a fraction (0.5 = 50%). A value above 1 means ``peak`` is not a peak."""
    if seconds_per_step <= 0 or peak <= 0:
        raise ValueError(f"need positive time and peak, got {seconds_per_step} s and {peak} FLOP/s")
    return flops_per_step / seconds_per_step / peak
