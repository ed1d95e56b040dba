"""A run's orbax checkpoints: the latest epochs, the best one, and a model's variables in and out.

Items are described in :mod:`imgcls_jax.train.rundir`. Restores go straight onto the device mesh
given as targets (abstract arrays with shardings), so a checkpoint written on any device count
restores onto any other.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import nnx

from imgcls_jax.train.rundir import RunDir


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
        sync = {"enable_async_checkpointing": False} if jax.process_count() > 1 else {}
        self.latest = ocp.CheckpointManager(
            run.checkpoints, options=ocp.CheckpointManagerOptions(max_to_keep=keep, **sync)
        )
        self.best = ocp.CheckpointManager(
            run.best,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: m[monitor], best_mode="max" if mode_max else "min", **sync
            ),
        )

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self.latest.latest_step()

    def has_item(self, step: int, item: str) -> bool:
        """Whether epoch ``step``'s checkpoint holds ``item`` (orbax's layout: a folder per item)."""
        return (self.latest.directory / str(step) / item).is_dir()

    def save(self, epoch: int, items: dict[str, Any], best_metrics: dict[str, float] | None) -> None:
        """Save ``items`` (pytrees by item name) as epoch ``epoch``; with ``best_metrics`` (the
        epoch's ``val_loss`` and ``val_accuracy``) also the model items into ``best/`` when the
        epoch is the best so far."""
        ocp = _orbax()
        self.latest.save(
            epoch, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in items.items()})
        )
        if best_metrics is not None:
            model = {k: ocp.args.StandardSave(items[k]) for k in ("params", "batch_stats") if k in items}
            self.best.save(epoch, args=ocp.args.Composite(**model), metrics=best_metrics)

    def restore(self, epoch: int, targets: dict[str, Any]) -> dict[str, Any]:
        """Epoch ``epoch``'s items named in ``targets`` (item -> target tree, e.g. abstract arrays
        from :func:`imgcls_jax.parallel.restore_target`)."""
        ocp = _orbax()
        args = ocp.args.Composite(**{k: ocp.args.StandardRestore(v) for k, v in targets.items()})
        return dict(self.latest.restore(epoch, args=args))

    def wait(self) -> None:
        """Block until the asynchronous saves have finished."""
        self.latest.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.latest.close()
        self.best.close()


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
