"""A run folder: every path inside it named in one place, its metrics table and its checkpoints.

Layout::

    run_dir/config.json      the TrainConfig (the run can be repeated from it)
    run_dir/manifest.csv     every image with its label and split
    run_dir/metrics.csv      one row per epoch (phase, losses, accuracies, lr, images/s, the mean
                             global gradient norm of its steps)
    run_dir/tensorboard/     TensorBoard events: per-step loss and learning rate, per-epoch metrics
    run_dir/checkpoints/     orbax: the latest ``keep_checkpoints`` epochs
    run_dir/best/            orbax: the model of the best epoch by ``config.monitor``
    run_dir/eval_<split>/    what evaluating a split wrote (report, metrics, plots)

A checkpoint of epoch ``e`` holds the items ``params`` (the model's parameters as
``nnx.to_pure_dict``: what evaluation and prediction load; the weight average with EMA),
``batch_stats`` (its BatchNorm statistics, only for models that have them), ``state`` (the
optimizer step, the trained layers' raw parameters and the optimizer state: what resuming
needs) and ``ema`` (the weight average of the trained layers, with EMA). ``best/`` holds
``params`` (and ``batch_stats``).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

METRIC_FIELDS = [
    "epoch", "phase", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
    "learning_rate", "images_per_s", "grad_norm",
]  # fmt: skip
CHECKPOINT_CHOICES = ("best", "latest")


class NotARunError(FileNotFoundError):
    """A folder that is not a run folder written by ``fit`` (or lacks what is asked of it)."""


class RunMismatchError(ValueError):
    """A run folder that does not match what it is used with: its ``config.json`` or
    ``manifest.csv`` describe another model than its checkpoint holds (a file edited by hand, or
    copied from another run; the message names the layer), or a resumed run's config differs
    from the one stored in the folder in a field that changes results (the message lists each
    field with both values)."""


def _typed(row: dict) -> dict:
    """A ``metrics.csv`` row with the types of a fresh one: ints, floats, "" where empty."""
    ints = ("epoch", "phase", "step")
    return {k: v if v in ("", None) else int(v) if k in ints else float(v) for k, v in row.items()}


class RunDir:
    """The paths of a run folder and what lives in them (see the module docstring)."""

    def __init__(self, path):
        self.root = Path(path).absolute()
        self.config = self.root / "config.json"
        self.manifest = self.root / "manifest.csv"
        self.metrics = self.root / "metrics.csv"
        self.tensorboard = self.root / "tensorboard"
        self.checkpoints = self.root / "checkpoints"
        self.best = self.root / "best"

    def __repr__(self) -> str:
        return f"RunDir({str(self.root)!r})"

    def eval_dir(self, split: str) -> Path:
        return self.root / f"eval_{split}"

    def checkpoint_dir(self, which: str) -> Path:
        """``best/`` or ``checkpoints/`` (``which="latest"``)."""
        if which not in CHECKPOINT_CHOICES:
            raise ValueError(f"which must be one of {CHECKPOINT_CHOICES}, got {which!r}")
        return self.best if which == "best" else self.checkpoints

    def require(self, *names: str) -> RunDir:
        """This run folder, if it holds ``config.json`` and the other named files; else a
        :class:`NotARunError` naming the folder and what is missing."""
        if not self.root.is_dir():
            raise NotARunError(f"{self.root}: no such folder (a run folder written by 'imgcls-jax train')")
        missing = [n for n in ("config.json", *names) if not (self.root / n).exists()]
        if missing:
            raise NotARunError(
                f"{self.root}: not a run folder written by 'imgcls-jax train' (no {', '.join(missing)})"
            )
        return self

    def has_best(self) -> bool:
        return self.best.is_dir() and any(p.name.isdigit() for p in self.best.iterdir())

    def write_config(self, config) -> None:
        """Write ``config.json`` (a ``TrainConfig``) atomically (see :meth:`_replace`)."""
        self._replace(self.config, config.to_json() + "\n", "config.json")

    # ------------------------------------------------------------------------------ metrics.csv
    def read_history(self, upto: int | None = None) -> list[dict]:
        """The rows of ``metrics.csv`` (typed), those of epochs ``<= upto`` when given. A last
        row without its line end (cut short by a full disk) is left out: it is always that of
        an epoch without a checkpoint, which a resumed run trains again."""
        if not self.metrics.is_file():
            return []
        text = self.metrics.read_text()
        if text and not text.endswith("\n"):
            cut = text.rfind("\n") + 1
            log.warning("%s: its last row is incomplete, left out: %r", self.metrics, text[cut:])
            text = text[:cut]
        rows = [_typed(row) for row in csv.DictReader(io.StringIO(text, newline=""))]
        return [r for r in rows if upto is None or r["epoch"] <= upto]

    def write_history(self, rows: list[dict]) -> None:
        """Replace ``metrics.csv`` with the header and ``rows`` (atomically, see :meth:`_replace`)."""
        out = io.StringIO(newline="")
        writer = csv.writer(out)
        writer.writerow(METRIC_FIELDS)
        writer.writerows([row.get(k, "") for k in METRIC_FIELDS] for row in rows)  # "": a column added later
        self._replace(self.metrics, out.getvalue(), "metrics.csv")

    def append_metrics(self, row: dict) -> None:
        """Add an epoch's row to ``metrics.csv`` (an ``OSError`` naming the file if it fails)."""
        out = io.StringIO(newline="")
        csv.writer(out).writerow([row.get(k, "") for k in METRIC_FIELDS])
        try:
            with open(self.metrics, "a", newline="") as f:
                f.write(out.getvalue())
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(
                e.errno, f"{self.metrics}: could not add epoch {row['epoch']}'s row ({e.strerror})"
            ) from e

    def _replace(self, path: Path, text: str, what: str) -> None:
        """Write ``text`` to ``path`` through a temporary file renamed over it: a kill or a full
        disk leaves the old file or the new one, never a torn one; an ``OSError`` naming
        ``path`` if it fails."""
        tmp = path.with_name(path.name + ".tmp")
        try:
            with open(tmp, "w", newline="") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, f"{path}: could not write {what} ({e.strerror})") from e
