"""What a user's mistake is, for the ``imgcls-jax`` command (see :mod:`imgcls_jax.cli`), and the
argument checks that raise it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import math
import os
import sys
from pathlib import Path

#: the help of every command's ``--checkpoint`` (evaluate.runs.resolve_checkpoint decides)
CHECKPOINT_HELP = "best or latest (default best; the latest for a run without a validation split)"


class UsageError(Exception):
    """A mistake in how a command was called: printed as one line, exit status 2."""


#: Exception classes that only a user's input can cause, as ``module:class``: a user's mistake
#: wherever they are raised. Looked up only in modules already imported (a class whose module
#: was never imported cannot have been raised), so telling a mistake imports nothing more
#: (TensorFlow, h5py, Optuna) than the command did.
USER_ERRORS = (
    "imgcls_jax.config:ConfigError",
    "imgcls_jax.data.folders:DatasetError",
    "imgcls_jax.train.rundir:NotARunError",
    "imgcls_jax.train.rundir:RunMismatchError",
    "imgcls_jax.evaluate.prediction:UnreadableImageError",
    "imgcls_jax.weights.keras:WeightFileError",
    "imgcls_jax.weights.store:WeightsUnavailableError",
    "imgcls_jax.weights.store:ChecksumError",
)


def user_error_classes(*, load: bool = False) -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose module is imported (all of them with ``load``)."""
    found = [UsageError]
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        if load:
            importlib.import_module(module)
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user's mistake (see the module docstring)."""
    return isinstance(exc, user_error_classes())


@contextlib.contextmanager
def reading_input():
    """Mark the code that reads a command's arguments and input files: a ``ValueError`` or
    ``OSError`` it raises is the user's mistake (a :class:`UsageError` with the same message)."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        raise UsageError(_message(e)) from e


def _message(exc: BaseException) -> str:
    """``exc``'s message on one line (its class name when it has none), printable in UTF-8: a
    path from undecodable command-line bytes (``\udcff``) is shown escaped."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose errors raise :class:`UsageError` (one line, exit status 2, from
    :func:`main`) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _image_size(text: str):
    """``S`` or ``HxW`` (pixels, each >= 1) -> ``S`` or ``(H, W)``."""
    parts = text.lower().split("x")
    try:
        sides = [int(p) for p in parts]
    except ValueError:
        sides = []
    if len(sides) not in (1, 2) or min(sides, default=0) < 1:
        raise argparse.ArgumentTypeError(
            f"must be a size in pixels, S or HxW (e.g. 224 or 180x240), got {text!r}"
        )
    return sides[0] if len(sides) == 1 else tuple(sides)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _make_folder(path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) where it is missing; ``UsageError`` when it
    cannot be (a file in the way, no permission, a read-only file system)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot create it: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: not writable")
    return path
