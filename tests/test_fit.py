"""fit(): run directory, resume after SIGKILL equals an uninterrupted run, NaN losses."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.config import PhaseConfig, TrainConfig
from imgcls_jax.train.rundir import RunMismatchError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    for name, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (root / name).mkdir()
        for i in range(16):
            pixels = np.clip(rng.normal(color, 40, (40, 40, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def config(data, run_dir, **kw):
    base = dict(
        data=str(data),
        run_dir=str(run_dir),
        weights="random",  # a random frozen base, on purpose: these tests check the mechanics
        image_size=32,
        batch_size=8,
        head_units=(16,),
        seed=3,
        augment={"flip": "horizontal", "translation": 0.1},
        phases=[
            PhaseConfig(epochs=2, trainable="head", learning_rate=1e-2),
            PhaseConfig(epochs=2, trainable="top:1", optimizer="sgd", learning_rate=1e-3),
        ],
    )
    base.update(kw)
    return TrainConfig(**base)


SCRIPT = """
import sys, numpy as np, jax
from flax import nnx
from imgcls_jax.config import TrainConfig
from imgcls_jax.train.loop import fit
result = fit(TrainConfig.from_json(sys.argv[1]))
leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(result.model, nnx.Param)))
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
"""


def run_fit(cfg: TrainConfig, out: Path, *, kill_after_checkpoint: int | None = None):
    cfg_path = out.with_suffix(".json")
    cfg.to_json(cfg_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", SCRIPT, str(cfg_path), str(out)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    if kill_after_checkpoint is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err.decode()[-3000:]
        return
    marker = Path(cfg.run_dir) / "checkpoints" / str(kill_after_checkpoint)
    deadline = time.time() + 600
    while not marker.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_fit_writes_run_directory(tiny_data, tmp_path):
    from imgcls_jax.train.loop import fit

    cfg = config(
        tiny_data, tmp_path / "run", phases=[PhaseConfig(epochs=2, trainable="head", learning_rate=1e-2)],
        kernel_init="he_normal",
    )  # fmt: skip
    result = fit(cfg)
    assert result.model.kernel_init == "he_normal"
    run = tmp_path / "run"
    assert TrainConfig.from_json(run / "config.json") == cfg
    assert len((run / "manifest.csv").read_text().splitlines()) == 33  # header + 32 images
    rows = (run / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,phase,step,train_loss") and len(rows) == 3
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["0", "1"]
    assert [h["epoch"] for h in result.history] == [0, 1]
    assert all(0.0 <= h["val_accuracy"] <= 1.0 for h in result.history)


@pytest.mark.slow  # ~60 s; tests/test_kill_moments.py's quick chain kills and resumes 6 times
def test_resume_after_sigkill_equals_uninterrupted_run(tiny_data, tmp_path):
    # The second phase also grows the images (32 -> 64): the resumed run rebuilds its pipelines.
    phases = [
        PhaseConfig(epochs=2, trainable="head", learning_rate=1e-2),
        PhaseConfig(epochs=2, trainable="top:1", optimizer="sgd", learning_rate=1e-3, image_size=64),
    ]
    run_fit(config(tiny_data, tmp_path / "straight", phases=phases), tmp_path / "straight.npz")
    interrupted = config(tiny_data, tmp_path / "killed", phases=phases)
    run_fit(interrupted, tmp_path / "killed.npz", kill_after_checkpoint=1)  # dies in phase 2
    assert not (tmp_path / "killed.npz").exists()
    run_fit(interrupted, tmp_path / "killed.npz")  # resumes from the latest checkpoint
    straight, resumed = np.load(tmp_path / "straight.npz"), np.load(tmp_path / "killed.npz")
    assert sorted(straight.files) == sorted(resumed.files)
    for key in straight.files:
        np.testing.assert_array_equal(straight[key], resumed[key], err_msg=key)
    metrics = (tmp_path / "killed" / "metrics.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in metrics[1:]] == ["0", "1", "2", "3"]  # no epoch twice


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_data, tmp_path):
    import orbax.checkpoint as ocp

    from imgcls_jax.train.loop import NonFiniteLossError, fit

    cfg = config(
        tiny_data,
        tmp_path / "nan",
        augment={},
        phases=[
            PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2),
            PhaseConfig(epochs=1, trainable="all", optimizer="sgd", learning_rate=1e30, schedule="constant"),
        ],
    )
    with pytest.raises(
        NonFiniteLossError, match=r"at step \d+ \(epoch 1, phase 1\).*Last good checkpoint: epoch 0"
    ):
        fit(cfg)
    manager = ocp.CheckpointManager((tmp_path / "nan" / "checkpoints").absolute())
    assert manager.all_steps() == [0]
    restored = manager.restore(0, args=ocp.args.Composite(params=ocp.args.StandardRestore()))
    assert all(np.isfinite(np.asarray(x)).all() for x in __import__("jax").tree.leaves(restored["params"]))


def test_phases_of_growing_image_sizes(tiny_data, tmp_path, caplog):
    from imgcls_jax import evaluate_run, fit, load_run, predict

    cfg = config(
        tiny_data, tmp_path / "grow", augment={},
        phases=[
            PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2),
            PhaseConfig(epochs=1, trainable="all", learning_rate=1e-4, image_size=64),
        ],
    )  # fmt: skip
    with caplog.at_level("INFO", logger="imgcls_jax.train"):
        fit(cfg)
    text = caplog.text
    assert "phase 0: head trainable" in text and "32x32 images" in text
    assert "phase 1: all trainable" in text and "64x64 images" in text
    loaded = load_run(tmp_path / "grow", "latest")
    assert loaded.epoch == 1 and loaded.image_size == (64, 64)
    report = evaluate_run(tmp_path / "grow", split="val", which="latest")
    assert report.count == 8
    # predict resizes any input to the checkpoint's size
    (pred,) = predict(loaded, np.zeros((20, 30, 3), np.uint8), top_k=1)
    assert pred.label in ("blue", "red")


class _Stop(Exception):
    pass


def _stop_after(last_epoch):
    def callback(epoch, row):
        if epoch == last_epoch:
            raise _Stop

    return callback


def _params(model):
    import jax
    from flax import nnx

    return jax.tree.leaves(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def test_ema_is_validated_saved_and_resumed_exactly(tiny_data, tmp_path):
    import orbax.checkpoint as ocp

    from imgcls_jax.train.loop import fit

    phases = [PhaseConfig(epochs=3, trainable="top:1", learning_rate=1e-3)]
    straight = fit(config(tiny_data, tmp_path / "straight", phases=phases, ema_decay=0.9))
    stopped = config(tiny_data, tmp_path / "stopped", phases=phases, ema_decay=0.9)
    with pytest.raises(_Stop):
        fit(stopped, callbacks=[_stop_after(0)])  # after epoch 0 is checkpointed
    resumed = fit(stopped)
    for a, b in zip(_params(straight.model), _params(resumed.model)):
        np.testing.assert_array_equal(a, b)
    # The saved model is the average; the raw weights are saved beside it to resume with.
    manager = ocp.CheckpointManager((tmp_path / "stopped" / "checkpoints").absolute())
    items = ("params", "state", "ema")
    saved = manager.restore(2, args=ocp.args.Composite(**{k: ocp.args.StandardRestore() for k in items}))
    trainable = {name: saved["params"][name] for name in saved["ema"]}
    assert sorted(trainable) == ["block5_conv1", "block5_conv2", "block5_conv3", "head_fc1", "head_logits"]
    average, model, raw = (jax_leaves(t) for t in (saved["ema"], trainable, saved["state"]["params"]))
    for a, m in zip(average, model):
        np.testing.assert_array_equal(a, m)
    assert any(not np.array_equal(a, r) for a, r in zip(average, raw))
    assert int(saved["state"]["step"]) == straight.history[-1]["step"]


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_ema_cannot_be_added_to_a_run_on_resume(tiny_data, tmp_path):
    """The run folder is the truth: resuming with a weight average the run did not have is refused
    (it changes results), naming the field with both values; nothing in the folder is rewritten."""
    from imgcls_jax.train.loop import fit

    cfg = config(tiny_data, tmp_path / "late", augment={}, phases=[PhaseConfig(epochs=2, learning_rate=1e-2)])
    with pytest.raises(_Stop):
        fit(cfg, callbacks=[_stop_after(0)])
    before = {p: p.read_bytes() for p in (tmp_path / "late").rglob("*") if p.is_file()}
    with pytest.raises(RunMismatchError, match=r"ema_decay: None in the run, 0\.5 now.*--restart"):
        fit(replace(cfg, ema_decay=0.5))
    assert {p: p.read_bytes() for p in (tmp_path / "late").rglob("*") if p.is_file()} == before
    with pytest.raises(ValueError, match=r"ema_decay must be a number in \(0, 1\)"):
        TrainConfig(ema_decay=1.0, weights="random")


def test_image_size_by_phase_and_epoch():
    cfg = TrainConfig(
        weights="random",
        image_size=64,
        phases=[PhaseConfig(epochs=2), PhaseConfig(epochs=3, image_size=96), PhaseConfig(epochs=1)],
    )
    assert [cfg.phase_of_epoch(e) for e in range(7)] == [0, 0, 1, 1, 1, 2, 2]
    assert [cfg.image_size_at(e) for e in range(6)] == [64, 64, 96, 96, 96, 64]
    assert cfg.image_size_at() == 64 and cfg.phase_image_size(1) == 96
    with pytest.raises(ValueError, match="need a pooled head"):
        TrainConfig(weights="random", pooling=None, phases=[PhaseConfig(), PhaseConfig(image_size=96)])
    TrainConfig(
        weights="random", pooling=None, image_size=96, phases=[PhaseConfig(), PhaseConfig(image_size=96)]
    )
    with pytest.raises(ValueError, match=r"image_size must be an integer in \[1, 8192\]"):
        PhaseConfig(image_size=0)


def test_state_item_written_before_ema_still_restores(tmp_path):
    # Before ema_decay the checkpoint item "state" was the TrainState dataclass itself; the loop
    # now saves and restores it as a dict of the same three fields.
    from typing import Any

    import jax
    import jax.numpy as jnp
    import orbax.checkpoint as ocp
    from flax import struct

    from imgcls_jax.train import TrainState
    from imgcls_jax.train.checkpoints import state_item

    @struct.dataclass
    class EarlierState:
        step: Any
        params: Any
        opt_state: Any

    params = {"head_logits": {"kernel": jnp.arange(6.0).reshape(2, 3), "bias": jnp.ones(3)}}
    opt_state = (jnp.full(3, 2.0), {"count": jnp.asarray(5, jnp.int32)})
    manager = ocp.CheckpointManager(tmp_path / "checkpoints")
    earlier = EarlierState(jnp.asarray(7, jnp.int32), params, opt_state)
    manager.save(0, args=ocp.args.Composite(state=ocp.args.StandardSave(earlier)))
    manager.wait_until_finished()
    zeros = jax.tree.map(jnp.zeros_like, (params, opt_state))
    target = state_item(TrainState(jnp.zeros((), jnp.int32), *zeros))
    restored = manager.restore(0, args=ocp.args.Composite(state=ocp.args.StandardRestore(target)))["state"]
    assert int(restored["step"]) == 7
    for a, b in zip(jax_leaves((params, opt_state)), jax_leaves((restored["params"], restored["opt_state"]))):
        np.testing.assert_array_equal(a, b)


def test_device_augmentation_and_grouped_steps_resume_exactly(tiny_data, tmp_path, caplog):
    """augment_on="device" with ``steps_per_execution=2`` (24 train images in batches of 8: a
    group of two steps and a short group of one each epoch): the train step augments (and mixes)
    the uint8 batch with a key folded with the step, so a run stopped after an epoch and resumed
    ends bit-equal to an uninterrupted one; one step per execution ends at the same weights but
    for float rounding, with the same per-epoch losses; without augmentation the weights end
    elsewhere (the augmentation did act). A resume with another ``steps_per_execution`` is refused."""
    from imgcls_jax.train.loop import fit

    augment = {"flip": "horizontal", "translation": 0.1, "rotation": 0.05, "mixup_alpha": 0.4}
    phases = [PhaseConfig(epochs=2, trainable="top:1", learning_rate=1e-3)]
    kw = dict(phases=phases, augment=augment, augment_on="device", steps_per_execution=2)
    with caplog.at_level("INFO", logger="imgcls_jax.train"):
        straight = fit(config(tiny_data, tmp_path / "straight", **kw))
    assert "augmentation on the device" in caplog.text
    assert [h["step"] for h in straight.history] == [3, 6]
    stopped = config(tiny_data, tmp_path / "stopped", **kw)
    with pytest.raises(_Stop):
        fit(stopped, callbacks=[_stop_after(0)])
    with pytest.raises(RunMismatchError, match=r"steps_per_execution: 2 in the run, 1 now"):
        fit(replace(stopped, steps_per_execution=1))
    resumed = fit(stopped)
    for a, b in zip(_params(straight.model), _params(resumed.model)):
        np.testing.assert_array_equal(a, b)
    single = fit(config(tiny_data, tmp_path / "single", **{**kw, "steps_per_execution": 1}))
    for a, b in zip(_params(straight.model), _params(single.model)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        [h["train_loss"] for h in single.history], [h["train_loss"] for h in straight.history], rtol=1e-4
    )
    plain = fit(config(tiny_data, tmp_path / "plain", **{**kw, "augment": {}}))
    assert any(not np.array_equal(a, b) for a, b in zip(_params(straight.model), _params(plain.model)))


def test_non_square_sizes_keras_accepts_train_evaluate_and_predict(tiny_data, tmp_path):
    """image_size [48, 40] (not multiples of 32, as Keras's VGG16 takes): trained, saved,
    evaluated and predicting at that size; below the model's 32 is refused when built."""
    from imgcls_jax import evaluate_run, fit, load_run, predict

    cfg = config(tiny_data, tmp_path / "hw", image_size=[48, 40], augment={},
                 phases=[PhaseConfig(epochs=1, trainable="top:1", learning_rate=1e-3)])  # fmt: skip
    assert cfg.image_size == (48, 40) and TrainConfig.from_json(cfg.to_json()) == cfg
    fit(cfg)
    loaded = load_run(tmp_path / "hw", "latest")
    assert loaded.image_size == (48, 40) and loaded.model.input_shape == (48, 40, 3)
    assert evaluate_run(tmp_path / "hw", split="val", which="latest").count == 8
    (pred,) = predict(loaded, np.zeros((30, 50, 3), np.uint8), top_k=1)
    assert pred.label in ("blue", "red")
    with pytest.raises(ValueError, match="vgg16 takes images of at least 32x32"):
        TrainConfig(image_size=[48, 31], weights="random")
