"""BatchNorm through ``fit`` (issue #17): EfficientNetB0 (BatchNorm in every block) from a seeded
random start at 32 px on a tiny folder (2 classes x 12-13 PNGs), global batch 8, augmentation on
(so the frozen base runs in every step, not through the feature cache): 1 epoch of the head
(frozen base), then 1 epoch of ``top:1``, SGD with momentum.

* Frozen means inference mode: after the head phase (epoch 0's checkpoint) every BatchNorm moving
  statistic equals the start's, bit for bit; after fine-tuning only the trained stage's statistics
  moved, every other one is still bit-equal to the start.
* A run SIGKILLed after epoch 0's checkpoint and resumed ends with the parameters and statistics of
  the uninterrupted run, bit for bit.
* On 4 forced CPU devices (synchronised BatchNorm: the batch statistics are those of the global
  batch) the parameters and statistics equal 1 device's within :data:`TOL` of how far training
  moved them. Two ``jax.distributed`` processes of 2 devices each end identical, and move the
  statistics of the same layers as 1 device.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from imgcls_jax.config import PhaseConfig, TrainConfig
from tests import helpers
from tests.test_fit_hosts import CHILD, run_two_processes, tiny_folder  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "efficientnetb0"
#: max |n devices - 1 device| / max |change| over parameters and statistics. Only the float32
#: summation order differs, but BatchNorm divides by the standard deviation of 8 values per channel
#: (1x1 maps at 32 px), which amplifies it: measured 2.9e-3 on 4 devices (VGG, without BatchNorm:
#: < 1e-4, tests/test_fit_devices.py). Statistics of each device's 2 images instead of the global
#: batch's 8 would differ by the size of the change itself.
TOL = 1e-2
#: every parameter and BatchNorm statistic of a model, by path, as NumPy
DUMP = """
def dump(model, path):
    import jax, numpy as np
    from flax import nnx
    state = nnx.to_pure_dict(nnx.state(model, nnx.Any(nnx.Param, nnx.BatchStat)))
    leaves = jax.tree_util.tree_leaves_with_path(state)
    np.savez(path, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
"""
ONE_HOST = (
    DUMP
    + """
import sys
from imgcls_jax.config import TrainConfig
from imgcls_jax.models import model_from_config
from imgcls_jax.train.loop import fit
config = TrainConfig.from_json(sys.argv[1])
dump(model_from_config(config, 2, weights=None, input_size=32), sys.argv[2] + ".start.npz")
dump(fit(config).model, sys.argv[2])
"""
)
TWO_HOSTS = CHILD.replace(
    "leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(result.model, nnx.Param)))\n"
    "np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})\n",
    DUMP + "dump(result.model, sys.argv[2])\n",
)


def bn_config(data: Path, run_dir: Path) -> TrainConfig:
    return TrainConfig(
        data=str(data), run_dir=str(run_dir), model=MODEL, weights="random", image_size=32, batch_size=8,
        seed=3, augment={"flip": "horizontal"}, eval_batch_size=4, splits={"train": 0.8, "val": 0.2},
        keep_checkpoints=2,
        phases=[
            PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2),
            PhaseConfig(epochs=1, trainable="top:1", optimizer="sgd", learning_rate=1e-2, momentum=0.9),
        ],
    )  # fmt: skip


def start_fit(config: TrainConfig, out: Path, devices: int, cache: Path) -> subprocess.Popen:
    cfg_path = out.with_suffix(".json")
    config.to_json(cfg_path)
    env = helpers.child_env(ROOT, {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}, cache)
    return subprocess.Popen(
        [sys.executable, "-c", ONE_HOST, str(cfg_path), str(out)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )  # fmt: skip


def fit_on(config: TrainConfig, out: Path, devices: int, cache: Path) -> dict[str, np.ndarray]:
    proc = start_fit(config, out, devices, cache)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err.decode()[-3000:]
    return dict(np.load(out))


@pytest.fixture(scope="module")
def one_device(tiny_folder, tmp_path_factory):  # noqa: F811
    """The uninterrupted 1-device run: (run folder, start, end, JAX cache folder)."""
    tmp = tmp_path_factory.mktemp("bn_fit")
    end = fit_on(bn_config(tiny_folder, tmp / "run"), tmp / "one.npz", 1, tmp / "jax_cache")
    return tmp / "run", dict(np.load(tmp / "one.npz.start.npz")), end, tmp / "jax_cache"


def _layer(key: str) -> str:
    return key.split("']")[0].strip("['")


def _is_stat(key: str) -> bool:
    return key.endswith(("['mean']", "['var']", "['variance']", "['count']"))


def _checkpoint_stats(run: Path, epoch: int) -> dict[str, np.ndarray]:
    import jax
    import orbax.checkpoint as ocp

    tree = ocp.StandardCheckpointer().restore(run / "checkpoints" / str(epoch) / "batch_stats")
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def test_frozen_phase_keeps_the_statistics_and_fine_tuning_moves_only_its_stages(one_device):
    from imgcls_jax.models import model_from_config

    run, start, end, _ = one_device
    stats = {k: v for k, v in start.items() if _is_stat(k)}
    assert len(stats) > 100  # EfficientNetB0: 49 BatchNorms x (mean, var) and the Normalization
    after_head = _checkpoint_stats(run, 0)
    assert after_head.keys() == stats.keys()
    moved = [k for k in stats if not np.array_equal(after_head[k], stats[k])]
    assert not moved, f"the frozen head phase moved BatchNorm statistics: {moved[:5]}"

    model = model_from_config(bn_config(Path("x"), Path("y")), 2, weights=None)
    trained = set(model.trainable_layers("top:1"))  # the head phase's layers and more
    moved = {_layer(k) for k in stats if not np.array_equal(end[k], stats[k])}
    bn_trained = {_layer(k) for k in stats if _layer(k) in trained}
    assert bn_trained and moved == bn_trained, sorted(moved ^ bn_trained)
    frozen_params = [k for k in start if not _is_stat(k) and _layer(k) not in trained]
    changed = [k for k in frozen_params if not np.array_equal(end[k], start[k])]
    assert not changed, f"frozen parameters changed: {changed[:5]}"


@pytest.mark.slow  # a whole EfficientNet fit in subprocesses (~35 s)
def test_killed_after_a_checkpoint_and_resumed_is_bit_equal(one_device, tiny_folder, tmp_path):  # noqa: F811
    _, _, end, cache = one_device
    config = bn_config(tiny_folder, tmp_path / "run")
    proc = start_fit(config, tmp_path / "killed.npz", 1, cache)
    marker, deadline = tmp_path / "run" / "checkpoints" / "0", time.time() + 900
    while not marker.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "training finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = fit_on(config, tmp_path / "resumed.npz", 1, cache)
    assert resumed.keys() == end.keys()
    differ = [k for k in end if not np.array_equal(resumed[k], end[k])]
    assert not differ, f"resumed != uninterrupted: {differ[:5]}"


def _worst(other: dict, end: dict, start: dict) -> float:
    assert other.keys() == end.keys() == start.keys()
    change = max(float(np.abs(end[k] - start[k]).max()) for k in end)
    return max(float(np.abs(other[k] - end[k]).max()) for k in end) / change


@pytest.mark.slow  # a whole EfficientNet fit in subprocesses (~35 s)
def test_four_devices_equal_one_with_synchronised_batch_norm(one_device, tiny_folder, tmp_path):  # noqa: F811
    _, start, end, cache = one_device
    four = fit_on(bn_config(tiny_folder, tmp_path / "run"), tmp_path / "four.npz", 4, cache)
    worst = _worst(four, end, start)
    print(f"4 devices vs 1 (parameters and statistics): max |diff| / max |change| = {worst:.2e}")
    assert worst < TOL


@pytest.mark.slow  # a whole EfficientNet fit in subprocesses (~35 s)
def test_two_processes_end_identical(one_device, tiny_folder, tmp_path):  # noqa: F811
    """Each process trains on its own share of the images, so the batches are not 1 device's:
    the two end identical, with the trained stage's statistics moved and the others the start's."""
    _, start, end, cache = one_device
    config = bn_config(tiny_folder, tmp_path / "run")
    config.to_json(tmp_path / "run.json")
    outs = [tmp_path / f"p{i}.npz" for i in (0, 1)]
    run_two_processes(tmp_path / "run.json", outs, cache, child=TWO_HOSTS)
    p0, p1 = (dict(np.load(o)) for o in outs)
    assert p0.keys() == p1.keys() == start.keys()
    assert not [k for k in p0 if not np.array_equal(p0[k], p1[k])], "the processes differ"
    stats = [k for k in start if _is_stat(k)]
    moved = {k for k in stats if not np.array_equal(p0[k], start[k])}
    assert moved == {k for k in stats if not np.array_equal(end[k], start[k])}  # 1 device's layers
