"""Deprecated alias (0.1) of :mod:`imgcls_jax.evaluate.runs`, kept for one release."""

import warnings

from imgcls_jax.evaluate.runs import EvalResult, evaluate_model, evaluate_run, format_report  # noqa: F401

warnings.warn(
    "imgcls_jax.runs is deprecated: use imgcls_jax.evaluate_run (imgcls_jax.evaluate.runs)",
    DeprecationWarning,
    stacklevel=2,
)
