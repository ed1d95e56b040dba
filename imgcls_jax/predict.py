"""Deprecated alias (0.1) of :mod:`imgcls_jax.evaluate.predict` and ``load_run``, kept for one
release: use ``imgcls_jax.load_run`` and ``imgcls_jax.predict``.

Importing this module makes ``imgcls_jax.predict`` this module rather than the function (Python
sets a submodule as its package's attribute); the module is therefore callable as the function.
"""

import sys
import types
import warnings

from imgcls_jax.evaluate.predict import Prediction, predict  # noqa: F401
from imgcls_jax.evaluate.runs import CHECKPOINTS, LoadedRun, load_run, run_class_names  # noqa: F401

warnings.warn(
    "imgcls_jax.predict (the module) is deprecated: use imgcls_jax.load_run and imgcls_jax.predict",
    DeprecationWarning,
    stacklevel=2,
)


class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
