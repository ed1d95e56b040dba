"""Deprecated: this module's contents moved, and it goes away in the next release.

* ``vgg_flops`` (the analytic FLOP count) -> :mod:`imgcls_jax.models.flops`;
* ``compiled_flops``, ``peak_flops``, ``mfu`` (benchmark accounting) -> ``benchmarks/perf.py`` in
  the source tree (``from benchmarks.perf import ...`` from the repository root); it is not part of
  the installed package.
"""

from __future__ import annotations

import warnings

from imgcls_jax.models.flops import FLOP_MODES as MODES
from imgcls_jax.models.flops import vgg_flops

warnings.warn(
    "imgcls_jax.perf is deprecated and will be removed in the next release: use "
    "imgcls_jax.models.flops.vgg_flops, and benchmarks/perf.py (compiled_flops, peak_flops, mfu) "
    "in the source tree",
    DeprecationWarning,
    stacklevel=2,
)

_MOVED = ("compiled_flops", "peak_flops", "mfu")
__all__ = ["MODES", "vgg_flops", *_MOVED]


def __getattr__(name):
    if name in _MOVED:
        try:
            from benchmarks import perf
        except ImportError as exc:
            raise ImportError(
                f"imgcls_jax.perf.{name} moved to benchmarks/perf.py, which ships with the source tree "
                "only: run from the repository root (from benchmarks.perf import ...)"
            ) from exc
        return getattr(perf, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
