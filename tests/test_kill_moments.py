"""Kills at many moments (issue #19, item 1): a multi-phase ``imgcls-jax train`` run SIGKILLed at
chosen moments, then resumed by the same command, ends bit-equal to an uninterrupted run.

The run (:func:`tests.killing.make_config`): VGG16 at 32 px, 3 classes x 12 PNGs (27 train
images: 3 steps of 8 per epoch; 9 val images: 2 batches), a head phase of 2 epochs then 2
epochs of ``top:1``, with a weight average (EMA); then the final evaluation of ``best/``.
Without augmentation (NumPy pipeline, TensorFlow not importable) the head phase trains on cached
base features; with augmentation (tf.data) on images.

Each chain kills one run folder again and again, one moment per child process, each child
resuming what the previous one left. A moment is a stage of :mod:`imgcls_jax.train.faults`
(the child kills itself there: exact and repeatable), a condition on the run folder or the log
polled by the test, which then kills the child from outside (whatever it is doing then), or a
simulated kill inside orbax's deletion of an old checkpoint. After every kill: every finished
checkpoint restores; the next child logs that it resumed from the latest one. At the end: the
checkpoints (parameters, optimizer state, raw weights, weight average; ``best/``),
``metrics.csv`` (each epoch once) and the final evaluation equal an uninterrupted run's, bit
for bit, and nothing is left beside the checkpoints. The fixtures (``kill_setup``,
``straight_run``, ``straight_augmented_run``) are in tests/killing.py, shared through conftest.py.

``test_kill_at_each_stage_resumes_bit_equal`` (6 moments) is the quick one; the two ``slow``
chains add 15 moments (a plain ``pytest`` leaves them out; ``pytest -m slow`` or ``-m ""`` runs them).
"""

from __future__ import annotations

import csv
import logging
import random
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from imgcls_jax.train.callbacks import improvements
from imgcls_jax.train.checkpoints import TMP_SUFFIX
from tests.killing import (
    KILL_BEFORE_BEST,
    KILL_WHILE_DELETING,
    RunState,
    assert_same_run,
    inspect_run,
    run_child,
    write_config,
)

log = logging.getLogger(__name__)

VAL_BATCHES = 2  # 9 val images in batches of 8
EPOCHS = 4


@dataclass
class Moment:
    """A kill: ``kill_at`` (a faults stage spec: the child kills itself), ``when(run_dir,
    latest_epoch, log_path)`` (a condition the test polls, then kills the child) or ``setup``
    (Python run first in the child that kills it). ``may_finish``: a timed kill that may come
    after the child has finished (then not counted)."""

    name: str
    kill_at: str | None = None
    when: Callable | None = None
    setup: str = ""
    may_finish: bool = False
    expect: str = ""  # in the child's log when the kill came at the intended moment


def _has_tmp(folder: Path) -> bool:
    return folder.is_dir() and any(TMP_SUFFIX in p.name for p in folder.iterdir())


def during_async_save(run: Path, _latest, _log):
    """Polled: an orbax temporary folder exists (a checkpoint is being written)."""
    return lambda: _has_tmp(run / "checkpoints") or _has_tmp(run / "best")


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


def random_moment(rng: random.Random) -> Moment:
    seconds = rng.uniform(0.0, 8.0)
    return Moment(
        f"{seconds:.2f} s after training starts (random)",
        when=seconds_after_training_starts(seconds),
        may_finish=True,
    )


def next_epoch(state: RunState | None) -> int:
    """The first epoch not in ``checkpoints/`` nor ``best/`` (a resumed run skips the ``best/``
    save of an epoch whose ``best/`` save finished before the kill)."""
    return 1 + max([-1, *state.latest, *state.best]) if state else 0


def final_eval_batch(state: RunState | None, k: int = 1) -> Moment:
    """The ``k``-th batch of the final evaluation of a child that first trains the epochs after
    the latest checkpoint (each validated in ``VAL_BATCHES`` batches)."""
    latest = state.latest_step if state else None
    trained = EPOCHS - (0 if latest is None else latest + 1)
    name = f"during the final evaluation (after training {trained} epochs)"
    kill_at = f"eval_batch:{VAL_BATCHES * trained + k}"
    return Moment(name, kill_at=kill_at, expect="imgcls_jax.evaluate.runs: loaded best checkpoint")


def run_chain(kill_setup, name: str, moments: list, straight: Path, *, augment: bool) -> list[str]:
    """Kill one run at each of ``moments`` (a Moment, or a function of what the run folder holds
    giving one), resume it to the end, compare it with ``straight``; one line per moment."""
    data, cache, root = kill_setup
    path = write_config(root, name, data, augment=augment)
    run = path.parent / "run"
    findings = []
    for i, moment in enumerate(moments):
        state = inspect_run(run) if run.is_dir() else None
        latest = state.latest_step if state else None
        if not isinstance(moment, Moment):
            moment = moment(state)
        log_path = path.parent / f"child{i}.log"
        when = moment.when(run, latest, log_path) if moment.when is not None else None
        child = run_child(
            path, cache, kill_at=moment.kill_at, when=when, setup=moment.setup, tensorflow=augment,
            log_path=log_path,
        )  # fmt: skip
        if moment.may_finish and child.returncode == 0:
            findings.append(f"{moment.name}: the child finished first (not counted)")
            continue
        assert child.killed, f"{moment.name}: not killed (exit {child.returncode}):\n{child.log[-3000:]}"
        assert moment.expect in child.log, f"{moment.name}: no {moment.expect!r} in\n{child.log[-3000:]}"
        if latest is not None:
            assert f"resuming {run} after epoch {latest}" in child.log, child.log[-3000:]
        after = inspect_run(run)
        assert not after.problems, f"{moment.name}: {after.problems}"
        last = [line for line in child.log.splitlines() if " imgcls_jax." in line][-1:] or ["(nothing)"]
        findings.append(
            f"{moment.name}: killed after {child.seconds:.0f} s; resumed from {latest}; left latest "
            f"{after.latest}, best {after.best}, other {after.tmp}, metrics epochs {after.metrics_epochs}; "
            f"last log: {re.sub(r'^.*? (INFO|WARNING) ', '', last[0])[:100]}"
        )
    latest = inspect_run(run).latest_step
    child = run_child(path, cache, tensorflow=augment, log_path=path.parent / "final.log")
    assert child.returncode == 0, child.log[-4000:]
    if latest is not None:
        assert f"resuming {run} after epoch {latest}" in child.log, child.log[-3000:]
    assert_same_run(straight, run)
    for line in findings:
        log.warning("%s: %s", name, line)
    return findings


def _improving_epochs(run: Path) -> list[int]:
    """The epochs whose monitored validation loss improves on every earlier one (Keras's rule)."""
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    better = improvements([float(r["val_loss"]) for r in rows], mode_max=False)
    return [int(r["epoch"]) for r, b in zip(rows, better, strict=True) if b]


def test_kill_at_each_stage_resumes_bit_equal(kill_setup, straight_run):
    """The feature cache build; an async checkpoint save (head phase); between an improving
    epoch's checkpoint and its best/ save (best/ completed at the next start); mid-epoch
    (fine-tuning); validation (EMA resumed inside the phase); the final evaluation (nothing left to
    train)."""
    assert _improving_epochs(straight_run) == [0, 1]  # best/ saves happen at epochs 0 and 1 only
    moments = [
        Moment("during the feature cache build", kill_at="features:3"),
        Moment("during the async save of epoch 0", kill_at="save@0:1"),
        Moment(
            "epoch 1's checkpoint finished, its best/ save not started (simulated)",
            setup=KILL_BEFORE_BEST.format(epoch=1),
            expect="KILLED BEFORE BEST 1",
        ),
        Moment("mid-epoch 2 (fine-tuning, first epoch of phase 1)", kill_at="train_step@2:2"),
        Moment("during validation of epoch 3 (EMA resumed inside phase 1)", kill_at="validate@3:2"),
        final_eval_batch,  # nothing left to train
    ]
    run_chain(kill_setup, "fast", moments, straight_run, augment=False)


@pytest.mark.slow
def test_kill_at_more_moments_resumes_bit_equal(kill_setup, straight_run):
    """The other stages, kills from outside (while orbax's temporary folder exists; as soon as
    a checkpoint is finished), inside the deletion of an old checkpoint, and in the final
    evaluation of a child that trained."""
    moments = [
        Moment("mid-epoch 0 (head on cached features)", kill_at="train_step@0:2"),
        lambda state: Moment(f"during best/'s save of epoch {next_epoch(state)}",
                              kill_at=f"save_best@{next_epoch(state)}:1"),  # epoch 0: it improves
        Moment("while a checkpoint's temporary folder exists (polled)", when=during_async_save),
        Moment("as soon as a checkpoint is finished (polled)", when=right_after_save),
        Moment(
            "while an old checkpoint is being deleted (simulated)",
            setup=KILL_WHILE_DELETING,
            expect="KILLED WHILE DELETING",
        ),
        lambda state: Moment(f"after epoch {next_epoch(state)}'s metrics row, before its checkpoint",
                              kill_at=f"metrics@{next_epoch(state)}:1"),
        lambda state: Moment(f"during the async save of epoch {next_epoch(state)}",
                              kill_at=f"save@{next_epoch(state)}:1"),
        final_eval_batch,
    ]  # fmt: skip
    run_chain(kill_setup, "slow", moments, straight_run, augment=False)


@pytest.mark.slow
def test_kill_augmented_run_at_random_moments_resumes_bit_equal(kill_setup, straight_augmented_run):
    """Augmentation on (tf.data): the head trains on images. Stage kills and kills at random
    times once training has started."""
    rng = random.Random(19)
    moments = [  # the fixed moments first: a random kill may land after a later fixed one (found in CI)
        Moment("mid-epoch 1 (head on augmented images)", kill_at="train_step@1:3"),
        Moment("during the async save of epoch 1", kill_at="save@1:1"),
        Moment("during validation of epoch 2", kill_at="validate@2:1"),
        Moment("mid-epoch 3 (augmented, EMA)", kill_at="train_step@3:1"),
        random_moment(rng),
        random_moment(rng),
        random_moment(rng),
    ]
    run_chain(kill_setup, "augmented", moments, straight_augmented_run, augment=True)
