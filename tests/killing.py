"""Harness for the kill-and-resume tests (tests/test_kill_moments.py, tests/test_full_disk.py).

A run is ``imgcls-jax train --config CFG`` in a child process (fit, then the final evaluation),
on a tiny generated folder. :func:`run_child` runs it once, optionally with
``IMGCLS_JAX_TEST_KILL_AT`` (see :mod:`imgcls_jax.train.faults`) or a ``when`` predicate at
which the test kills it from outside (timing-based kills). :func:`inspect_run` reads what a run
folder holds and restores every finished checkpoint in it (each must be usable);
:func:`assert_same_run` compares a run with an uninterrupted one, bit for bit.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.config import PhaseConfig, TrainConfig
from imgcls_jax.train.faults import KILL_ENV
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
CHILD_TIMEOUT = 600

#: The child: ``imgcls-jax ARGS``, after ``{setup}`` (e.g. a patch simulating a fault); with
#: ``{no_tf}`` TensorFlow cannot be imported (as where it is not installed: quicker to start).
#: Logging is set up first, as the command does (importing orbax first would take the root logger).
CHILD = """
import logging, sys
if {no_tf}:
    sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
{setup}
from imgcls_jax import cli
sys.exit(cli.main(sys.argv[1:]))
"""

#: A kill in the window where epoch ``{epoch}``'s checkpoint is finished and its ``best/`` save
#: has not started (the two are written concurrently: a race, made certain here).
KILL_BEFORE_BEST = """
import os, signal
from imgcls_jax.train.checkpoints import Checkpoints
_save_best = Checkpoints._save_best
def save_best(self, epoch, items, metrics):
    if epoch == {epoch}:
        self.latest.wait_until_finished()
        print("KILLED BEFORE BEST", epoch, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    _save_best(self, epoch, items, metrics)
Checkpoints._save_best = save_best
"""

#: A kill while a dropped checkpoint is being deleted: half of its files are gone, then SIGKILL
#: (orbax deletes it, or renames it into ``.deleted/`` which is then emptied: killed in both).
KILL_WHILE_DELETING = """
import os, pathlib, signal
from orbax.checkpoint._src.path import deleter
_delete = deleter.PathDeleter.delete
def delete(self, path, *, destination=None, overwrite=False):
    if destination is not None:
        _delete(self, path, destination=destination, overwrite=overwrite)
        path = destination
    files = sorted(p for p in pathlib.Path(os.fspath(path)).rglob("*") if p.is_file())
    for file in files[: max(1, len(files) // 2)]:
        file.unlink()
    print("KILLED WHILE DELETING", path, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
deleter.PathDeleter.delete = delete
"""


def make_data(root: Path, classes: int = 3, per_class: int = 12, size: int = 32) -> Path:
    """``classes`` folders of ``per_class`` noisy single-colour PNGs (``size`` px square)."""
    rng = np.random.default_rng(0)
    colors = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30)][:classes]
    for c, color in enumerate(colors):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(rng.normal(color, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def make_config(data: Path, run_dir: Path, *, augment: bool, **kw) -> TrainConfig:
    """The multi-phase run of the tests: VGG16 at 32 px, a head of 8 units, batch 8; 2 epochs of
    the head (on cached base features when ``augment`` is off), then 2 epochs of ``top:1``; a
    weight average (EMA) throughout; ``best/`` by validation loss. With ``augment``: flips and
    shifts, tf.data (augmenting on the host, on a CPU); without: the NumPy pipeline (no
    TensorFlow needed)."""
    base = dict(
        data=str(data), run_dir=str(run_dir), weights="random", image_size=32, batch_size=8, head_units=(8,),
        seed=3,
        monitor="val_loss",  # improves at epochs 0 and 1 (best/ saves there), not at 2 and 3
        ema_decay=0.9, augment={"flip": "horizontal", "translation": 0.1} if augment else {},
        data_backend="auto" if augment else "numpy",
        phases=[
            PhaseConfig(epochs=2, trainable="head", learning_rate=1e-2),
            PhaseConfig(epochs=2, trainable="top:1", learning_rate=1e-3),
        ],
    )  # fmt: skip
    base.update(kw)
    return TrainConfig(**base)


@dataclass
class Child:
    """One ``imgcls-jax train`` process: how it ended and what it logged."""

    returncode: int
    log: str
    seconds: float

    @property
    def killed(self) -> bool:
        return self.returncode == -signal.SIGKILL


def run_child(
    cfg_path: Path,
    cache: Path,
    *,
    kill_at: str | None = None,
    when: Callable[[], bool] | None = None,
    extra_env: dict | None = None,
    setup: str = "",
    tensorflow: bool = True,
    log_path: Path | None = None,
) -> Child:
    """Run ``imgcls-jax train --config cfg_path`` to its end, or until it kills itself at
    ``kill_at``, or until ``when()`` (polled every 10 ms) is true, when the test SIGKILLs it.
    ``setup``: Python run first in the child; ``tensorflow=False``: as if not installed."""
    extra = {"TQDM_DISABLE": "1", **(extra_env or {})}
    if kill_at is not None:
        extra[KILL_ENV] = kill_at
    env = helpers.child_env(ROOT, extra, cache)
    script = CHILD.format(no_tf=not tensorflow, setup=setup)
    command = [sys.executable, "-c", script, "train", "--config", str(cfg_path)]
    log_path = log_path or cfg_path.with_suffix(f".{time.monotonic_ns()}.log")
    start = time.monotonic()
    with open(log_path, "w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            deadline = start + CHILD_TIMEOUT
            while proc.poll() is None and time.monotonic() < deadline:
                if when is not None and when():
                    os.kill(proc.pid, signal.SIGKILL)
                    break
                time.sleep(0.01)
        finally:
            if proc.poll() is None and time.monotonic() >= deadline:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return Child(proc.returncode, log_path.read_text(), time.monotonic() - start)


# ------------------------------------------------------------------------- what a run holds
@dataclass
class RunState:
    """A run folder's checkpoints (finished steps; anything else in their folders: orbax
    temporary folders, ``.deleted/``) and metrics epochs."""

    latest: list[int]
    best: list[int]
    tmp: list[str]
    metrics_epochs: list[int]
    problems: list[str] = field(default_factory=list)

    @property
    def latest_step(self) -> int | None:
        return max(self.latest) if self.latest else None


def _steps(folder: Path) -> tuple[list[int], list[str]]:
    if not folder.is_dir():
        return [], []
    steps = sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())
    tmp = sorted(f"{folder.name}/{p.name}" for p in folder.iterdir() if not p.name.isdigit())
    return steps, tmp


def restore_items(folder: Path, step: int) -> dict:
    """Every item of ``folder/step`` restored as NumPy arrays (raises when one is unusable)."""
    import orbax.checkpoint as ocp

    items = [p.name for p in (folder / str(step)).iterdir() if p.is_dir() and p.name != "metrics"]
    options = ocp.CheckpointManagerOptions(read_only=True)
    with ocp.CheckpointManager(folder, options=options) as manager:
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in items})
        restored = manager.restore(step, args=args)
    return {k: restored[k] for k in items}


def inspect_run(run: Path) -> RunState:
    """What ``run`` holds; ``problems`` lists every finished checkpoint that does not restore
    and a ``metrics.csv`` that does not parse."""
    latest, tmp_latest = _steps(run / "checkpoints")
    best, tmp_best = _steps(run / "best")
    state = RunState(latest, best, tmp_latest + tmp_best, [])
    for folder, steps in ((run / "checkpoints", latest), (run / "best", best)):
        for step in steps:
            try:
                restore_items(folder, step)
            except Exception as e:  # noqa: BLE001 - reported as the finding
                state.problems.append(f"{folder.name}/{step}: {type(e).__name__}: {e}"[:300])
    if (run / "metrics.csv").is_file():
        try:
            state.metrics_epochs = [int(r["epoch"]) for r in read_metrics(run)]
        except Exception as e:  # noqa: BLE001
            state.problems.append(f"metrics.csv: {type(e).__name__}: {e}")
    return state


def read_metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------- comparisons
def _leaves(tree) -> list[tuple[str, np.ndarray]]:
    import jax

    return [(jax.tree_util.keystr(p), np.asarray(v)) for p, v in jax.tree_util.tree_leaves_with_path(tree)]


def assert_trees_equal(a, b, what: str) -> int:
    """Bitwise equality of two pytrees (same paths, dtypes, shapes and bits); the leaf count."""
    la, lb = _leaves(a), _leaves(b)
    assert [p for p, _ in la] == [p for p, _ in lb], f"{what}: different leaves"
    for (path, x), (_, y) in zip(la, lb):
        assert x.dtype == y.dtype and x.shape == y.shape, (
            f"{what}{path}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}"
        )
        np.testing.assert_array_equal(x, y, err_msg=f"{what}{path}")
    return len(la)


def assert_same_run(straight: Path, resumed: Path) -> None:
    """``resumed`` ended as ``straight``: the same checkpoints (latest: params, optimizer state,
    raw weights and weight average; best: its epoch and model), bit for bit; the same
    ``metrics.csv`` rows (but the images/s timing), each epoch once; the same final evaluation."""
    a, b = inspect_run(straight), inspect_run(resumed)
    assert not b.problems, b.problems
    assert not b.tmp, f"left behind beside the checkpoints: {b.tmp}"
    assert (b.latest, b.best) == (a.latest, a.best), (b, a)
    for step in a.latest:
        x, y = restore_items(straight / "checkpoints", step), restore_items(resumed / "checkpoints", step)
        assert sorted(x) == sorted(y) and {"params", "state", "ema"} <= set(x), sorted(y)
        assert_trees_equal(x, y, f"checkpoints/{step}")
    for step in a.best:
        assert_trees_equal(
            restore_items(straight / "best", step), restore_items(resumed / "best", step), f"best/{step}"
        )
    rows_a, rows_b = read_metrics(straight), read_metrics(resumed)
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        assert {k: v for k, v in ra.items() if k != "images_per_s"} == {
            k: v for k, v in rb.items() if k != "images_per_s"
        }
    eval_a = json.loads((straight / "eval_val" / "metrics.json").read_text())
    eval_b = json.loads((resumed / "eval_val" / "metrics.json").read_text())
    assert eval_a == eval_b


# ------------------------------------------------------------------------- shared fixtures
@pytest.fixture(scope="session")
def kill_setup(tmp_path_factory) -> tuple[Path, Path, Path]:
    """``(data folder, JAX compilation cache shared by the children, scratch root)``."""
    root = tmp_path_factory.mktemp("kills")
    return make_data(root / "data"), root / "jax_cache", root


def write_config(root: Path, name: str, data: Path, *, augment: bool, run_dir: Path | None = None) -> Path:
    """``root/name/cfg.json`` of :func:`make_config` (run folder ``root/name/run`` by default)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    make_config(data, run_dir or folder / "run", augment=augment).to_json(folder / "cfg.json")
    return folder / "cfg.json"


def uninterrupted(kill_setup, augment: bool) -> Path:
    data, cache, root = kill_setup
    path = write_config(root, f"straight_{'aug' if augment else 'plain'}", data, augment=augment)
    child = run_child(path, cache, tensorflow=augment)
    assert child.returncode == 0, child.log[-4000:]
    return path.parent / "run"


@pytest.fixture(scope="session")
def straight_run(kill_setup) -> Path:
    """The run folder of an uninterrupted run without augmentation (NumPy pipeline)."""
    return uninterrupted(kill_setup, augment=False)


@pytest.fixture(scope="session")
def straight_augmented_run(kill_setup) -> Path:
    """The run folder of an uninterrupted run with augmentation (tf.data)."""
    return uninterrupted(kill_setup, augment=True)
