"""Kills at many moments (issue #19, item 1): a multi-phase ``imgcls-jax train`` run SIGKILLed at
chosen moments, then resumed by the same command, ends bit-equal to an uninterrupted run.

The run (:func:`tests.killing.make_config`): VGG16 at 32 px, 3 classes x 12 PNGs (27 train
images: 3 steps of 8 per epoch; 9 val images: 2 batches), a head phase of 2 epochs then 2
epochs of ``top:1``, with a weight average (EMA). Without augmentation the head phase trains on
cached base features; with augmentation (the slow chain) on images.

Each chain kills one run folder again and again, one moment per child process, each child
resuming what the previous one left (so one chain covers many moments at the cost of one child
each). A moment is a stage of :mod:`imgcls_jax.train.faults` (the child kills itself there:
exact and repeatable) or a condition on the run folder polled by the test (the test kills it
from outside, at whatever the child is doing then: realism). After every kill: every finished
checkpoint restores; the next child says it resumed from the latest one. At the end: the
checkpoints (model, optimizer state, raw weights, weight average; ``best/``), ``metrics.csv``
(each epoch once) and the final evaluation equal those of an uninterrupted run, bit for bit.

``test_kill_at_each_stage_resumes_bit_equal`` (5 moments) runs in every test run;
the ``slow`` chains (13 more moments) too unless deselected with ``-m "not slow"``.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.killing import TMP_SUFFIX, assert_same_run, inspect_run, make_config, make_data, run_child

log = logging.getLogger(__name__)

VAL_BATCHES = 2  # 9 val images in batches of 8
EPOCHS = 4


@dataclass
class Moment:
    """A kill: ``kill_at`` (a faults stage spec, the child kills itself), or ``when(run_dir,
    latest_epoch, log_path)`` giving a condition the test polls and then kills the child.
    ``may_finish``: a timed kill that may come after the child has finished (not counted then)."""

    name: str
    kill_at: str | None = None
    when: Callable | None = None
    may_finish: bool = False


def _tmp_in(folder: Path) -> bool:
    return folder.is_dir() and any(TMP_SUFFIX in p.name for p in folder.iterdir())


def during_async_save(run: Path, _latest, _log):
    """Polled: an orbax temporary folder exists (a checkpoint is being written)."""
    return lambda: _tmp_in(run / "checkpoints") or _tmp_in(run / "best")


def right_after_save(run: Path, latest, _log):
    """Polled: a checkpoint newer than ``latest`` has just been finished."""

    def new_step() -> bool:
        folder = run / "checkpoints"
        steps = [int(p.name) for p in folder.iterdir() if p.name.isdigit()] if folder.is_dir() else []
        return bool(steps) and max(steps) > (-1 if latest is None else latest)

    return new_step


def seconds_after_training_starts(seconds: float):
    """Polled: ``seconds`` after the child logged the start of a phase (imports and startup
    take a time that varies too much from machine to machine to aim at)."""

    def make(_run, _latest, log_path: Path):
        started = []

        def due() -> bool:
            if not started and log_path.is_file() and " phase " in log_path.read_text():
                started.append(time.monotonic())
            return bool(started) and time.monotonic() - started[0] > seconds

        return due

    return make


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    return make_data(root / "data"), root / "jax_cache", root


def _uninterrupted(setup, augment: bool) -> Path:
    data, cache, root = setup
    cfg = make_config(data, root / f"straight_{augment}" / "run", augment=augment)
    path = root / f"straight_{augment}" / "cfg.json"
    path.parent.mkdir(exist_ok=True)
    cfg.to_json(path)
    if not (Path(cfg.run_dir) / "eval_val").is_dir():
        child = run_child(path, cache)
        assert child.returncode == 0, child.log[-4000:]
    return Path(cfg.run_dir)


@pytest.fixture(scope="module")
def straight(setup):
    return _uninterrupted(setup, augment=False)


@pytest.fixture(scope="module")
def straight_augmented(setup):
    return _uninterrupted(setup, augment=True)


def final_eval_batch(latest: int | None, k: int = 1) -> str:
    """The spec of the ``k``-th batch of the final evaluation in a child that first trains the
    epochs after ``latest`` (each validated in ``VAL_BATCHES`` batches)."""
    trained = EPOCHS - (0 if latest is None else latest + 1)
    return f"eval_batch:{VAL_BATCHES * trained + k}"


def run_chain(setup, name: str, moments: list, straight: Path, *, augment: bool) -> list[str]:
    """Kill one run at each of ``moments`` (a Moment, or a function of the latest epoch giving
    one), resume it to the end, compare it with ``straight``; one line per moment."""
    data, cache, root = setup
    cfg = make_config(data, root / name / "run", augment=augment)
    run, path = Path(cfg.run_dir), root / name / "cfg.json"
    path.parent.mkdir()
    cfg.to_json(path)
    findings = []
    for i, moment in enumerate(moments):
        before = inspect_run(run) if run.is_dir() else None
        latest = before.latest_step if before else None
        if not isinstance(moment, Moment):
            moment = moment(latest)
        log_path = root / name / f"child{i}.log"
        when = moment.when(run, latest, log_path) if moment.when is not None else None
        child = run_child(path, cache, kill_at=moment.kill_at, when=when, log_path=log_path)
        if moment.may_finish and child.returncode == 0:
            findings.append(f"{moment.name}: the child finished first (not counted)")
            continue
        assert child.killed, f"{moment.name}: not killed (exit {child.returncode}):\n{child.log[-3000:]}"
        if latest is not None:
            assert f"resuming {run} after epoch {latest}" in child.log, child.log[-3000:]
        after = inspect_run(run)
        assert not after.problems, f"{moment.name}: {after.problems}"
        # what the child was doing: the last line the library logged
        last = [line for line in child.log.splitlines() if " imgcls_jax." in line][-1:] or ["(nothing)"]
        findings.append(
            f"{moment.name}: killed after {child.seconds:.0f} s; resumed from {latest}; left latest "
            f"{after.latest}, best {after.best}, tmp {after.tmp}, metrics epochs {after.metrics_epochs}; "
            f"last log: {re.sub(r'^.*? (INFO|WARNING) ', '', last[0])[:100]}"
        )
    latest = inspect_run(run).latest_step
    child = run_child(path, cache)
    assert child.returncode == 0, child.log[-4000:]
    if latest is not None:
        assert f"resuming {run} after epoch {latest}" in child.log or latest == EPOCHS - 1
    assert_same_run(straight, run)
    for line in findings:
        log.warning("%s: %s", name, line)
    return findings


def test_kill_at_each_stage_resumes_bit_equal(setup, straight):
    """Feature cache build, an async checkpoint save (head phase), mid-epoch and validation of
    the fine-tuning phase (EMA resumed inside the phase), the final evaluation."""
    moments = [
        Moment("during the feature cache build", kill_at="features:3"),
        Moment("during the async save of epoch 0", kill_at="save@0:1"),
        Moment("mid-epoch 2 (fine-tuning, first epoch of phase 1)", kill_at="train_step@2:2"),
        Moment("during validation of epoch 3 (EMA resumed inside phase 1)", kill_at="validate@3:2"),
        lambda latest: Moment("during the final evaluation", kill_at=final_eval_batch(latest)),
    ]
    run_chain(setup, "fast", moments, straight, augment=False)


@pytest.mark.slow
def test_kill_at_more_moments_resumes_bit_equal(setup, straight):
    """The other stages, and kills from outside: while orbax's temporary folder exists, as soon
    as a checkpoint is finished, at a random time."""
    moments = [
        Moment("mid-epoch 0 (head on cached features)", kill_at="train_step@0:2"),
        Moment("after epoch 0's metrics row, before its checkpoint", kill_at="metrics@0:1"),
        Moment("during the best/ save of epoch 1", kill_at="save_best@1:1"),
        Moment("while a checkpoint's temporary folder exists (polled)", when=during_async_save),
        Moment("as soon as a checkpoint is finished (polled)", when=right_after_save),
        Moment("during the async save of epoch 3, the last", kill_at="save@3:1"),
        Moment("during the final evaluation, nothing left to train", kill_at="eval_batch:2"),
    ]
    run_chain(setup, "slow", moments, straight, augment=False)


def random_moment(rng: random.Random) -> Moment:
    seconds = rng.uniform(0.0, 3.0)
    return Moment(
        f"{seconds:.2f} s after training starts (random)",
        when=seconds_after_training_starts(seconds),
        may_finish=True,
    )


@pytest.mark.slow
def test_kill_augmented_run_at_random_moments_resumes_bit_equal(setup, straight_augmented):
    """Augmentation on: the head trains on images. Stage kills and two kills at random times."""
    rng = random.Random(19)
    moments = [
        Moment("mid-epoch 1 (head on augmented images)", kill_at="train_step@1:3"),
        Moment("during the async save of epoch 1", kill_at="save@1:1"),
        random_moment(rng),
        Moment("during validation of epoch 2", kill_at="validate@2:1"),
        random_moment(rng),
        Moment("mid-epoch 3 (augmented, EMA)", kill_at="train_step@3:1"),
    ]
    run_chain(setup, "augmented", moments, straight_augmented, augment=True)
