"""A run's orbax checkpoints: the latest epochs, the best one, and a model's variables in and out.

Items are described in :mod:`imgcls_jax.train.rundir`. Restores go straight onto the device mesh
given as targets (abstract arrays with shardings), so a checkpoint written on any device count
restores onto any other.

After a kill: orbax writes each checkpoint into a temporary folder renamed when complete, so a
kill leaves finished checkpoints and temporary folders, which the next start deletes
(:func:`remove_leftovers`). An old checkpoint is deleted by renaming it into ``.deleted/`` first
(emptied after each save and at start), so a kill while it is being deleted leaves no
half-deleted checkpoint. The
``checkpoints/`` and ``best/`` saves of an epoch finish in either order;
:meth:`Checkpoints.complete_best` redoes the ``best/`` saves a kill cut short. A save that fails
(a full disk) is a :class:`CheckpointWriteError` naming the folder and the last finished
checkpoint, raised at the latest when the next save starts or the run ends.
"""

from __future__ import annotations

import errno
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from imgcls_jax.train.callbacks import improvements
from imgcls_jax.train.faults import kill_point
from imgcls_jax.train.rundir import RunDir

log = logging.getLogger(__name__)

#: Where orbax moves the checkpoints it drops (``checkpoints/.deleted/``), emptied by us.
TRASH = ".deleted"
#: The suffix of the temporary folder orbax writes a checkpoint into before renaming it.
TMP_SUFFIX = ".orbax-checkpoint-tmp"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (a full disk, a lost mount); the message names the
    folder, the epoch and the last finished checkpoint, the one a new start resumes from."""


def finished_steps(folder: Path) -> list[int]:
    """The epochs of the finished checkpoints in an orbax folder (temporary folders excluded)."""
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def remove_leftovers(folder: Path) -> None:
    """Delete what interrupted saves left in an orbax folder: temporary folders (a save cut
    short) and ``.deleted/`` (a dropped checkpoint being deleted)."""
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if TMP_SUFFIX in path.name:
            log.info("%s: removing an unfinished checkpoint save (the run was interrupted)", path)
        if TMP_SUFFIX in path.name or path.name == TRASH:
            shutil.rmtree(path, ignore_errors=True)


def _is_disk_full(error: BaseException) -> bool:
    text = str(error)
    return getattr(error, "errno", None) == errno.ENOSPC or "No space left" in text or "code='28'" in text


def model_items(model) -> dict[str, Any]:
    """The model's variables as checkpoint items: ``params`` (every ``nnx.Param``) and, for
    models with BatchNorm, ``batch_stats`` (every ``nnx.BatchStat``), as pure dicts."""
    items = {"params": nnx.to_pure_dict(nnx.state(model, nnx.Param))}
    stats = nnx.state(model, nnx.BatchStat)
    if jax.tree.leaves(stats):
        items["batch_stats"] = nnx.to_pure_dict(stats)
    return items


def set_model_items(model, items: dict[str, Any]) -> None:
    """Put restored :func:`model_items` back into ``model`` (in place)."""
    for name, kind in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        if name in items:
            state = nnx.state(model, kind)
            nnx.replace_by_pure_dict(state, items[name])
            nnx.update(model, state)


def state_item(state) -> dict[str, Any]:
    """The checkpoint item ``state`` of a ``TrainState``: step, the trained layers' raw parameters
    and the optimizer state, as a dict (the layout of every version, restorable from checkpoints
    that saved the 0.1 ``TrainState`` dataclass itself)."""
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}


def _orbax():
    import orbax.checkpoint as ocp

    return ocp


class Checkpoints:
    """The latest ``keep`` epochs (``checkpoints/``) and the best epoch by ``monitor``
    (``best/``) of a run. Saves are asynchronous on one process and synchronous with several (two
    managers finalizing in background threads at once collide on orbax's multi-host barrier
    names)."""

    def __init__(self, run: RunDir, *, keep: int, monitor: str, mode_max: bool):
        ocp = _orbax()
        if jax.process_index() == 0:
            for folder in (run.checkpoints, run.best):
                remove_leftovers(folder)
        # todelete_subdir: a dropped checkpoint is renamed away whole before it is deleted
        common: dict[str, Any] = {"todelete_subdir": TRASH}
        if jax.process_count() > 1:
            common["enable_async_checkpointing"] = False
        self.latest = ocp.CheckpointManager(
            run.checkpoints, options=ocp.CheckpointManagerOptions(max_to_keep=keep, **common)
        )
        self.best = ocp.CheckpointManager(
            run.best,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[monitor], best_mode="max" if mode_max else "min", **common
            ),
        )
        self._writing: dict[Any, int] = {}  # manager -> the epoch it may still be writing
        self._monitor, self._mode_max = monitor, mode_max

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is None:
            self.close()
            return
        try:  # already failing: finish the saves, but let the first error be the one raised
            self.close()
        except Exception as e:  # noqa: BLE001
            log.error("%s", e)

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def has_item(self, step: int, item: str) -> bool:
        """Whether epoch ``step``'s checkpoint holds ``item`` (orbax's layout: a folder per item)."""
        return (self.latest.directory / str(step) / item).is_dir()

    def save(self, epoch: int, items: dict[str, Any], best_metrics: dict[str, float] | None) -> None:
        """Save ``items`` (pytrees by item name) as epoch ``epoch``; with ``best_metrics`` (the
        epoch's ``val_loss`` and ``val_accuracy``) also the model items into ``best/`` when the
        epoch is the best so far. The writing goes on in the background (one process); a
        :class:`CheckpointWriteError` here may be the previous epoch's."""
        ocp = _orbax()
        self._finish(self.latest)  # orbax waits for the previous save anyway: its failure is named
        self._writing[self.latest] = epoch
        with self._failure(epoch, self.latest.directory):
            saved = self.latest.save(
                epoch, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
            )
        if not saved:  # orbax skips, silently, an epoch not newer than the folder's latest
            raise FileExistsError(
                f"{self.latest.directory}: epoch {epoch} was not saved: the folder already holds epoch "
                f"{self.latest.latest_step()} of an earlier run (resume=False into a used run folder?). "
                "Resume instead, or train into a new run_dir."
            )
        kill_point("save", epoch)
        if best_metrics is not None:
            self._save_best(epoch, items, best_metrics)

    def _save_best(self, epoch: int, items: dict[str, Any], metrics: dict[str, float]) -> None:
        if epoch in self.best.all_steps():  # saved before a kill; a resumed run redoes it bit-equal
            return
        self._finish(self.best)
        self._writing[self.best] = epoch
        ocp = _orbax()
        model = {k: ocp.args.StandardSave(items[k]) for k in ("params", "batch_stats") if k in items}
        with self._failure(epoch, self.best.directory):
            self.best.save(epoch, args=ocp.args.Composite(**model), metrics=metrics)
        kill_point("save_best", epoch)

    def complete_best(self, history: list[dict], model_items_of: Callable[[int], dict[str, Any]]) -> None:
        """When resuming: the ``best/`` saves of the finished checkpoints newer than ``best/``'s
        newest, which a kill cut short (``history``: the ``metrics.csv`` rows;
        ``model_items_of(epoch)``: that checkpoint's model items). An epoch goes into ``best/``
        when its score improves on every earlier one (:func:`~imgcls_jax.train.callbacks.improvements`,
        as :meth:`Trainer.save <imgcls_jax.train.loop.Trainer.save>` decides)."""
        newest = max(self.best.all_steps(), default=-1)
        scored = [row for row in history if row["val_loss"] != ""]
        improved = dict(
            zip(
                (row["epoch"] for row in scored),
                improvements([float(row[self._monitor]) for row in scored], mode_max=self._mode_max),
                strict=True,
            )
        )
        rows = {row["epoch"]: row for row in scored}
        for epoch in sorted(self.latest.all_steps()):
            if epoch <= newest or not improved.get(epoch, False):
                continue
            log.info("epoch %d's best/ save did not finish before the interruption: saving it now", epoch)
            metrics = {"val_loss": rows[epoch]["val_loss"], "val_accuracy": rows[epoch]["val_accuracy"]}
            self._save_best(epoch, model_items_of(epoch), metrics)

    def restore(self, epoch: int, targets: dict[str, Any]) -> dict[str, Any]:
        """Epoch ``epoch``'s items named in ``targets`` (item -> target tree, e.g. abstract arrays
        from :func:`imgcls_jax.parallel.restore_target`)."""
        ocp = _orbax()
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in targets.items()})
        return dict(self.latest.restore(epoch, args=args))

    def wait(self) -> None:
        """Block until the asynchronous saves have finished; a :class:`CheckpointWriteError` if
        one failed."""
        for manager in (self.latest, self.best):
            self._finish(manager)

    def _finish(self, manager) -> None:
        """Wait for ``manager``'s save; then empty its ``.deleted/`` (what the save dropped)."""
        with self._failure(self._writing.get(manager), manager.directory):
            manager.wait_until_finished()
        if jax.process_index() == 0:
            shutil.rmtree(Path(manager.directory) / TRASH, ignore_errors=True)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for manager in (self.latest, self.best):
                try:
                    manager.close()
                except Exception as e:  # noqa: BLE001 - the failure was raised by wait()
                    log.debug("closing %s: %s", manager.directory, e)

    @contextmanager
    def _failure(self, epoch: int | None, folder) -> Iterator[None]:
        """Turn a failed save into a :class:`CheckpointWriteError` saying what to do."""
        try:
            yield
        except CheckpointWriteError:
            raise
        except Exception as e:
            folder = Path(folder)
            good = finished_steps(self.latest.directory)
            full = " (No space left on device: the disk is full)" if _is_disk_full(e) else ""
            last = (
                f"The last finished checkpoint is epoch {good[-1]} in {self.latest.directory}: run the same "
                "command again to resume from it once there is room."
                if good
                else "No checkpoint is finished: a new start begins from scratch."
            )
            raise CheckpointWriteError(
                errno.ENOSPC if full else errno.EIO,
                f"{folder}: could not write the checkpoint of epoch {epoch}{full}: "
                f"{type(e).__name__}: {str(e)[:500]}. {last}",
            ) from e


def restore_model(run: RunDir, which: str, model, target=None) -> int:
    """Load the ``best`` or ``latest`` checkpoint of ``run`` into ``model`` (in place); returns
    its epoch. ``target``: map the model items' trees to restore targets (default: as they are)."""
    ocp = _orbax()
    directory = run.checkpoint_dir(which)
    if not directory.is_dir():
        hint = " (a run without a validation split has no best checkpoint: use which='latest')"
        raise FileNotFoundError(
            f"{run.root}: no {which} checkpoint in {directory}" + (hint if which == "best" else "")
        )
    with ocp.CheckpointManager(directory) as manager:
        step = manager.best_step() if which == "best" else manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{directory}: no finished checkpoint")
        items = model_items(model)
        if "batch_stats" in items and not (directory / str(step) / "batch_stats").is_dir():
            raise FileNotFoundError(
                f"{directory}/{step}: the model has BatchNorm but the checkpoint has no statistics"
            )
        targets = items if target is None else {k: target(v) for k, v in items.items()}
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in targets.items()})
        set_model_items(model, manager.restore(step, args=args))
    return int(step)
