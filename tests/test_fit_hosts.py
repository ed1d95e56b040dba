"""fit() on two processes (jax.distributed on localhost, 2 forced CPU devices each).

Both processes run the same ``fit(config)`` on a tiny generated folder (2 classes x 12-13 PNGs, 32x32,
global batch 8, a head phase then a ``top:1`` phase, 1 epoch each). Each child is started in its
own session and killed with its process group on timeout or when the other one fails.
"""

from __future__ import annotations

import csv
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.config import PhaseConfig, TrainConfig
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240

CHILD = """
import logging, sys
import numpy as np
from imgcls_jax import parallel
assert parallel.initialize_distributed()  # from the IMGCLS_JAX_* variables
import jax
from flax import nnx
from imgcls_jax.config import TrainConfig
from imgcls_jax.train.loop import fit
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
logging.basicConfig(level=logging.INFO, stream=sys.stdout, format=FORMAT)
logging.getLogger("imgcls_jax.train").setLevel(logging.DEBUG)
assert jax.process_count() == 2 and jax.device_count() == 4 and jax.local_device_count() == 2
result = fit(TrainConfig.from_json(sys.argv[1]))
leaves = jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(result.model, nnx.Param)))
np.savez(sys.argv[2], **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
print("HISTORY " + __import__("json").dumps([{k: str(v) for k, v in h.items()} for h in result.history]))
jax.distributed.shutdown()
"""


def run_two_processes(cfg_path: Path, outs: list[Path], cache: Path, child: str = CHILD) -> list[str]:
    """Run ``child`` (:data:`CHILD`) as processes 0 and 1; both must exit 0 within ``TIMEOUT`` s."""
    port = helpers.free_port()
    envs = [
        helpers.child_env(
            ROOT,
            {
                "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                "IMGCLS_JAX_COORDINATOR": f"127.0.0.1:{port}",
                "IMGCLS_JAX_NUM_PROCESSES": "2",
                "IMGCLS_JAX_PROCESS_ID": str(pid),
                "TQDM_DISABLE": "1",
            },
            cache,
        )
        for pid in range(len(outs))
    ]
    argvs = [[sys.executable, "-c", child, str(cfg_path), str(out)] for out in outs]
    return helpers.run_children(argvs, envs, TIMEOUT)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hosts_data")
    rng = np.random.default_rng(0)
    for name, color, n in (("red", (200, 30, 30), 12), ("blue", (30, 30, 200), 13)):
        (root / name).mkdir()
        for i in range(n):
            pixels = np.clip(rng.normal(color, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


PHASES = [
    PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2),
    PhaseConfig(epochs=1, trainable="top:1", optimizer="sgd", learning_rate=1e-2, momentum=0.9),
]


def fit_two_processes(data: Path, run_dir: Path, phases: list, cache: Path) -> tuple[list[Path], list[str]]:
    """Both processes run ``fit`` of one config; returns their parameter files and outputs."""
    cfg = TrainConfig(
        data=str(data), run_dir=str(run_dir), weights="random", image_size=32, batch_size=8, head_units=(8,),
        seed=3, augment={"flip": "horizontal"}, eval_batch_size=4, splits={"train": 0.8, "val": 0.2},
        phases=phases,
    )  # fmt: skip
    cfg_path = run_dir.with_suffix(".json")
    cfg.to_json(cfg_path)
    outs = [run_dir.parent / f"{run_dir.name}_params_{p}.npz" for p in (0, 1)]
    return outs, run_two_processes(cfg_path, outs, cache)


@pytest.fixture(scope="module")
def straight(tiny_folder, tmp_path_factory):
    """One uninterrupted two-phase run: (run_dir, parameter files, outputs)."""
    tmp = tmp_path_factory.mktemp("hosts_run")
    outs, logs = fit_two_processes(tiny_folder, tmp / "run", PHASES, tmp / "jax_cache")
    return tmp / "run", outs, logs


def test_fit_on_two_processes(tiny_folder, straight):
    run_dir, outs, logs = straight
    p0, p1 = (dict(np.load(o)) for o in outs)
    assert p0.keys() == p1.keys() and len(p0) > 0
    differ = [k for k in p0 if not np.array_equal(p0[k], p1[k])]
    assert not differ, f"parameters differ between the processes: {differ}"

    with open(run_dir / "manifest.csv", newline="") as f:
        manifest = list(csv.DictReader(f))
    train = {str(tiny_folder / r["path"]) for r in manifest if r["split"] == "train"}
    val = [r for r in manifest if r["split"] == "val"]
    # 5 val images: shares of 3 and 2, 2 a step per process: process 1 feeds one masked batch
    assert len(train) + len(val) == 25 and len(val) == 5
    shares = []
    for pid, out in enumerate(logs):
        found = re.findall(rf"process {pid} train share: (\[.*\])", out)
        assert len(found) == 1, out[-3000:]
        shares.append({str(Path(p)) for p in json.loads(found[0])})
    assert not shares[0] & shares[1], "the train shares overlap"
    assert len(shares[0]) == len(shares[1]) == len(train) // 2
    assert shares[0] | shares[1] <= train and len(train - (shares[0] | shares[1])) == len(train) % 2

    with open(run_dir / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0][0] == "epoch" and [r[0] for r in rows[1:]] == ["0", "1"], rows  # written once
    header = rows[0]
    steps = [int(r[header.index("step")]) for r in rows[1:]]
    assert steps == [len(train) // 2 // 4] * 2, steps  # 4 images a step per process, 1 epoch a phase
    histories = [json.loads(re.findall(r"HISTORY (.*)", out)[0]) for out in logs]
    for h in histories[0] + histories[1]:
        h.pop("images_per_s")  # each process's own clock
    assert histories[0] == histories[1]  # the same losses and validation numbers on both processes
    for h, row in zip(histories[0], rows[1:]):
        assert float(h["val_loss"]) == pytest.approx(float(row[header.index("val_loss")]))
    val_counts = [re.findall(r"validation on (\d+) images", out) for out in logs]
    assert val_counts[0] == val_counts[1] == [str(len(val))] * 2, val_counts

    assert sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == [0, 1]
    assert any((run_dir / "best").iterdir())
    assert (run_dir / "config.json").is_file() and len(list((run_dir / "tensorboard").iterdir())) == 1


@pytest.mark.slow  # two processes twice (~35 s)
def test_resume_on_two_processes_restores_onto_the_mesh(tiny_folder, straight, tmp_path):
    """Phase 0 alone, then both phases resuming from its checkpoint: the parameters restored on
    the mesh continue exactly as the uninterrupted run."""
    run_dir, cache = tmp_path / "run", straight[0].parent / "jax_cache"
    fit_two_processes(tiny_folder, run_dir, PHASES[:1], cache)
    outs, logs = fit_two_processes(tiny_folder, run_dir, PHASES, cache)
    assert all("resuming" in out and "after epoch 0" in out for out in logs)
    resumed, uninterrupted = dict(np.load(outs[0])), dict(np.load(straight[1][0]))
    assert resumed.keys() == uninterrupted.keys()
    differ = [k for k in resumed if not np.array_equal(resumed[k], uninterrupted[k])]
    assert not differ, f"resumed parameters differ from the uninterrupted run: {differ}"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["0", "1"], rows
