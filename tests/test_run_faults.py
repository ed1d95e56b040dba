"""What a kill or a full disk leaves in a run folder, piece by piece (issue #19, items 1 and 3):
orbax temporary folders and half-deleted checkpoints, a ``best/`` save cut short, a torn
``metrics.csv`` row, a checkpoint write failing in orbax's background thread, a resumed run that
had finished or stopped early. The whole runs are in tests/test_kill_moments.py and
tests/test_full_disk.py."""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest

from imgcls_jax.train.checkpoints import TRASH, Checkpoints, CheckpointWriteError, finished_steps
from imgcls_jax.train.faults import parse_kill_spec
from imgcls_jax.train.rundir import METRIC_FIELDS, RunDir


def _items(value: float) -> dict:
    return {"params": {"w": np.full((3, 2), value, np.float32)}, "state": {"step": np.int32(value)}}


def _row(epoch: int, val_accuracy: float) -> dict:
    row = dict.fromkeys(METRIC_FIELDS, 0.0)
    row.update(epoch=epoch, phase=0, step=epoch, val_loss=1.0 - val_accuracy, val_accuracy=val_accuracy)
    return row


def _checkpoints(run: RunDir) -> Checkpoints:
    return Checkpoints(run, keep=2, monitor="val_accuracy", mode_max=True)


def _best_params(run: RunDir, step: int) -> np.ndarray:
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(run.best, options=ocp.CheckpointManagerOptions(read_only=True)) as m:
        restored = m.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    return np.asarray(restored["params"]["w"])


def test_kill_spec_parsing():
    assert parse_kill_spec("train_step@3:2") == ("train_step", 3, 2)
    assert parse_kill_spec("eval_batch:5") == ("eval_batch", None, 5)
    for bad in ("features", "features:0", "save@x:1", ":1", "save@:1"):
        with pytest.raises(ValueError, match="IMGCLS_JAX_TEST_KILL_AT"):
            parse_kill_spec(bad)


def test_leftovers_of_a_kill_go_at_start(tmp_path):
    """A save's temporary folder and a half-deleted checkpoint moved to .deleted/ (what a kill
    leaves) are removed when the run starts again; finished checkpoints stay."""
    run = RunDir(tmp_path)
    with _checkpoints(run) as ckpt:
        ckpt.save(0, _items(0), {"val_loss": 1.0, "val_accuracy": 0.1})
    for folder in (run.checkpoints, run.best):
        (folder / "1.orbax-checkpoint-tmp" / "params").mkdir(parents=True)
        (folder / TRASH / "7" / "params").mkdir(parents=True)
    with _checkpoints(run) as ckpt:
        assert ckpt.latest_step() == 0
    for folder in (run.checkpoints, run.best):
        assert sorted(p.name for p in folder.iterdir()) == ["0"], list(folder.iterdir())


def test_dropped_checkpoints_are_moved_away_whole_then_deleted(tmp_path):
    run = RunDir(tmp_path)
    with _checkpoints(run) as ckpt:
        for epoch in range(4):
            ckpt.save(epoch, _items(epoch), {"val_loss": 1.0, "val_accuracy": 0.1 * epoch})
    assert finished_steps(run.checkpoints) == [2, 3] and finished_steps(run.best) == [3]
    assert not (run.checkpoints / TRASH).exists() and not (run.best / TRASH).exists()


@pytest.mark.parametrize("best_epoch", [1, 0])
def test_complete_best_redoes_the_best_save_a_kill_cut_short(tmp_path, best_epoch):
    """Epoch 1's checkpoint finished but not its best/ save (a kill between the two): the next
    start saves it into best/ when it is the best (else best/ keeps epoch 0, as it is), as an
    uninterrupted run would have."""
    import orbax.checkpoint as ocp

    accuracies = [0.5, 0.9] if best_epoch == 1 else [0.5, 0.2]
    history = [_row(e, a) for e, a in enumerate(accuracies)]
    straight, killed = RunDir(tmp_path / "straight"), RunDir(tmp_path / "killed")
    with _checkpoints(straight) as ckpt:
        for row in history:
            ckpt.save(row["epoch"], _items(row["epoch"]), {k: row[k] for k in ("val_loss", "val_accuracy")})
    with _checkpoints(killed) as ckpt:
        ckpt.save(0, _items(0), {"val_loss": history[0]["val_loss"], "val_accuracy": accuracies[0]})
        ckpt.latest.save(
            1, args=ocp.args.Composite(**{k: ocp.args.StandardSave(v) for k, v in _items(1).items()})
        )
    assert finished_steps(killed.best) == [0]
    with _checkpoints(killed) as ckpt:
        asked = []
        ckpt.complete_best(history, lambda epoch: asked.append(epoch) or _items(epoch))
        ckpt.complete_best(history, lambda epoch: asked.append(epoch) or _items(epoch))  # nothing more
    assert asked == ([1] if best_epoch == 1 else [])  # a worse epoch would be dropped again
    assert finished_steps(killed.best) == finished_steps(straight.best) == [best_epoch]
    np.testing.assert_array_equal(_best_params(killed, best_epoch), _best_params(straight, best_epoch))


def _fail_background_writes(monkeypatch):
    """Make orbax's background commit fail as it does on a full disk (tensorstore's error)."""
    from orbax.checkpoint._src.serialization import ocdbt_utils

    async def full(*args, **kwargs):
        raise ValueError(
            'RESOURCE_EXHAUSTED: Failed writing: "x": Failed to write 511 bytes to file 11: '
            "No space left on device [os_error_code='28']"
        )

    monkeypatch.setattr(ocdbt_utils, "merge_ocdbt_per_process_files", full)


def test_an_epoch_the_folder_already_holds_is_an_error_not_a_silent_skip(tmp_path):
    """orbax does not save an epoch <= its folder's latest (``save`` returns False): a run
    started afresh (resume=False) into a used run folder would keep the old run's checkpoints."""
    run = RunDir(tmp_path)
    with _checkpoints(run) as ckpt:
        ckpt.save(0, _items(0), None)
    with pytest.raises(FileExistsError, match=r"epoch 0 was not saved: the folder already holds epoch 0"):
        with _checkpoints(run) as ckpt:
            ckpt.save(0, _items(5), None)


def test_a_failed_background_write_is_a_clear_error_at_the_next_save(tmp_path, monkeypatch):
    run = RunDir(tmp_path / "run")
    ckpt = _checkpoints(run)
    ckpt.save(0, _items(0), None)
    ckpt.wait()
    _fail_background_writes(monkeypatch)
    ckpt.save(1, _items(1), None)  # returns: the write fails in orbax's background thread
    with pytest.raises(CheckpointWriteError) as caught:
        ckpt.save(2, _items(2), None)
    message = str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    full = "(No space left on device: the disk is full)"
    assert f"{run.checkpoints}: could not write the checkpoint of epoch 1 {full}" in message
    assert f"The last finished checkpoint is epoch 0 in {run.checkpoints}" in message
    monkeypatch.undo()
    ckpt.close()
    with _checkpoints(run) as again:  # the next start: epoch 0, no temporary folder left
        assert again.latest_step() == 0
    assert sorted(p.name for p in run.checkpoints.iterdir()) == ["0"]


def test_a_failed_last_write_is_raised_when_the_run_ends(tmp_path, monkeypatch):
    """The last epoch's save fails after fit's loop is over: leaving the ``with`` raises it."""
    run = RunDir(tmp_path / "run")
    _fail_background_writes(monkeypatch)
    with pytest.raises(
        CheckpointWriteError,
        match=r"epoch 0 \(No space left on device: the disk is full\).*No checkpoint is finished",
    ):
        with _checkpoints(run) as ckpt:
            ckpt.save(0, _items(0), {"val_loss": 1.0, "val_accuracy": 0.5})


def test_a_failed_write_does_not_hide_the_error_already_raised(tmp_path, monkeypatch, caplog):
    run = RunDir(tmp_path / "run")
    _fail_background_writes(monkeypatch)
    with caplog.at_level(logging.ERROR), pytest.raises(KeyError, match="first"):
        with _checkpoints(run) as ckpt:
            ckpt.save(0, _items(0), None)
            raise KeyError("first")
    assert "could not write the checkpoint of epoch 0" in caplog.text


def test_a_torn_last_metrics_row_is_left_out(tmp_path, caplog):
    """A full disk can cut the row being appended; it is of an epoch without a checkpoint."""
    run = RunDir(tmp_path)
    run.write_history([_row(0, 0.5), _row(1, 0.6)])
    with open(run.metrics, "a") as f:
        f.write("2,0,2,0.9,0.")
    with caplog.at_level(logging.WARNING):
        rows = run.read_history(upto=1)
    assert [r["epoch"] for r in rows] == [0, 1] and rows[1]["val_accuracy"] == 0.6
    assert "its last row is incomplete, left out: '2,0,2,0.9,0.'" in caplog.text


def test_metrics_and_config_writes_name_the_file_when_the_disk_is_full(tmp_path, monkeypatch):
    import builtins

    from imgcls_jax.config import TrainConfig

    run = RunDir(tmp_path)
    run.write_config(TrainConfig(data="x", weights="random"))
    before = run.config.read_text()
    real_open = builtins.open

    class Full:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, text):
            self.f.write(text[: len(text) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(builtins, "open", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError, match=rf"{run.metrics}: could not add epoch 3's row \(No space left"):
        run.append_metrics(_row(3, 0.5))
    with pytest.raises(OSError, match=rf"{run.config}: could not write config.json \(No space left"):
        run.write_config(TrainConfig(data="y", weights="random"))
    monkeypatch.undo()
    assert run.config.read_text() == before and not list(tmp_path.glob("*.tmp"))
    assert TrainConfig.from_json(run.config).data == "x"


def test_resuming_an_early_stopped_run_trains_nothing_and_returns_its_model(tmp_path, caplog):
    """Running the same command again after a run stopped early (e.g. killed in its final
    evaluation) must not train past the epoch it stopped at; ``fit`` returns the checkpoint's
    model, not an untrained one."""
    import jax
    from flax import nnx

    from imgcls_jax.config import PhaseConfig, TrainConfig
    from imgcls_jax.train import fit
    from tests.killing import make_data, restore_items

    cfg = TrainConfig(
        data=str(make_data(tmp_path / "data", classes=2)), run_dir=str(tmp_path / "run"), weights="random",
        image_size=32,
        batch_size=8, head_units=(8,), early_stopping_patience=1,
        phases=[PhaseConfig(epochs=4, trainable="head", learning_rate=1e-30)],  # val_accuracy stays
    )  # fmt: skip
    first = fit(cfg)
    assert first.stopped_early and [h["epoch"] for h in first.history] == [0, 1]
    with caplog.at_level(logging.INFO, logger="imgcls_jax.train"):
        again = fit(cfg)
    assert "finished before (epoch 1 checkpointed), nothing to train" in caplog.text
    assert again.stopped_early and again.history == first.history
    assert len(RunDir(tmp_path / "run").read_history()) == 2
    saved = restore_items(tmp_path / "run" / "checkpoints", 1)["params"]
    returned = nnx.to_pure_dict(nnx.state(again.model, nnx.Param))
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(returned)):
        np.testing.assert_array_equal(a, np.asarray(b))
