"""Data parallelism (imgcls_jax.parallel): sharded = single-device, checkpoints across device
counts, two processes with jax.distributed on localhost.

Every multi-device run is a child process of this file (``python tests/test_parallel.py MODE``)
with ``XLA_FLAGS=--xla_force_host_platform_device_count=N`` and ``JAX_PLATFORMS=cpu`` in its
environment, killed with its process group on timeout. The model is VGG16 at 32x32 with a 16-unit
head and dropout 0.5, training block5 + head with SGD-momentum on a global batch of 8.

Measured tolerances (max |difference| / max |parameter change|, after 5 steps): see ``TOL``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgcls_jax import parallel
from imgcls_jax.data import shard_records
from tests import helpers

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH, STEPS, SAVE_AT, SIZE, K = 8, 5, 3, 32, 3
EVAL_IMAGES, EVAL_BATCH = 21, 6  # 21 % 8 != 0 and 6 % 4 != 0: both paddings are exercised
# Relative to the largest parameter change; float32 sums in a different order only (measured
# worst: see the report of each assertion). Bit-exact is not expected: the gradient all-reduce
# adds the per-device partial sums in another order than one device does.
TOL = 1e-5
TIMEOUT = 300


# ------------------------------------------------------------------------- child-process helpers
def run_children(
    cmds: list[list[str]], env_extra: list[dict], cache: Path, timeout: float = TIMEOUT
) -> list[str]:
    """Run this file as children (``cmds[i]`` its arguments, ``env_extra[i]`` on top of the
    cleaned environment), concurrently; all must exit 0 within ``timeout`` s.

    ``cache``: a JAX compilation cache shared by the children (model initialisers compile once).
    """
    argvs = [[sys.executable, __file__, *args] for args in cmds]
    envs = [helpers.child_env(ROOT, extra, cache) for extra in env_extra]
    return helpers.run_children(argvs, envs, timeout)


def devices_env(n: int) -> dict:
    return {"XLA_FLAGS": f"--xla_force_host_platform_device_count={n}"}


def max_rel_diff(a: dict, b: dict, start: dict) -> float:
    """max over leaves of |a - b| / max |b - start|."""
    assert a.keys() == b.keys()
    change = max(float(np.abs(b[k] - start[k]).max()) for k in b)
    assert change > 0, "training did not change the parameters"
    return max(float(np.abs(a[k] - b[k]).max()) for k in a) / change


def load(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# ------------------------------------------------------------------- what the children run
class Steps(NamedTuple):
    """fit's sharded path: the steps, the mesh and the trained state's layout."""

    mesh: object
    train: object
    evaluate: object
    state_sharding: object


def _setup(mesh_devices=None, fsdp_min_size=None, steps_per_execution=1):
    """The model, optimizer, steps and placed state and frozen parameters, as ``fit`` makes them
    (``make_train_step(..., placement=(mesh, fsdp_min_size))`` on a state placed with
    ``tree_shardings``)."""
    import jax

    import imgcls_jax
    from imgcls_jax import parallel
    from imgcls_jax.train import (
        init_state,
        make_eval_step,
        make_optimizer,
        make_train_step,
        split_model,
        trainable_layers,
    )

    model = imgcls_jax.create_model(
        "vgg16", input_shape=(SIZE, SIZE, 3), num_classes=K, pooling="avg", head_units=(16,), dropout=0.5
    )
    split = split_model(model, trainable_layers(model, "top:1"))
    opt = make_optimizer("sgd", 0.02, momentum=0.9)
    mesh = parallel.make_mesh(mesh_devices)
    state = init_state(split, opt)
    state_sharding = parallel.tree_shardings(state, mesh, fsdp_min_size=fsdp_min_size)
    train = make_train_step(
        split, opt, dropout_key=jax.random.key(7), placement=(mesh, fsdp_min_size),
        steps_per_execution=steps_per_execution,
    )  # fmt: skip
    steps = Steps(mesh, train, make_eval_step(split), state_sharding)
    frozen = parallel.place(split.frozen, parallel.replicated(mesh))
    return split, opt, steps, parallel.place(state, state_sharding), frozen


def evaluate(steps, params, frozen, batches) -> dict:
    """The one evaluation loop (fit's validation, evaluate_run) over ``batches`` on the mesh."""
    from imgcls_jax.train import evaluate_batches

    totals = evaluate_batches(lambda b: steps.evaluate(params, frozen, b), batches, mesh=steps.mesh)
    return {"loss": totals.loss, "accuracy": totals.accuracy, "count": totals.count}


def synthetic_batch(i: int, n: int = GLOBAL_BATCH) -> dict:
    rng = np.random.default_rng(100 + i)
    return {
        "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
        "label": rng.integers(0, K, n).astype(np.int32),
    }


def flat(params) -> dict:
    import jax

    from imgcls_jax.parallel import to_host

    leaves = jax.tree_util.tree_leaves_with_path(to_host(params))
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves}


def _eval_sums(steps, params, frozen) -> dict:
    data = synthetic_batch(99, EVAL_IMAGES)
    batches = [{k: v[i : i + EVAL_BATCH] for k, v in data.items()} for i in range(0, EVAL_IMAGES, EVAL_BATCH)]
    for b in batches:  # the data layer's eval batches: fixed size, padded and masked
        real = len(b["label"])
        b.update(
            {
                k: np.concatenate([v, np.zeros((EVAL_BATCH - real, *v.shape[1:]), v.dtype)])
                for k, v in b.items()
            }
        )
        b["mask"] = np.arange(EVAL_BATCH) < real
    return evaluate(steps, params, frozen, batches)


def child_train(out: str, mode: str) -> None:
    """Train STEPS steps from the same start; save a checkpoint after SAVE_AT (mode 'ckpt');
    mode 'grouped': two steps per execution (groups of 2, 2 and 1)."""
    import jax
    import orbax.checkpoint as ocp

    from imgcls_jax.parallel import to_global

    if mode == "single":  # no cluster variables, no arguments: the single-process no-op path
        from imgcls_jax.parallel import initialize_distributed

        assert initialize_distributed() is False
    split, _, steps, state, frozen = _setup(
        fsdp_min_size=4096 if mode == "fsdp" else None, steps_per_execution=2 if mode == "grouped" else 1
    )
    if mode == "ckpt":  # 4 devices: batches that do not divide are refused, naming the value
        with pytest.raises(ValueError, match="global batch size 6 does not divide over 4 devices"):
            parallel.process_batch_size(6, steps.mesh)
        with pytest.raises(ValueError, match=r"batch\['image'\] has shape \(6, 32, 32, 3\)"):
            to_global(synthetic_batch(0, 6), steps.mesh)
    result = {"devices": jax.device_count(), "eval_start": _eval_sums(steps, state.params, frozen)}
    start = flat(state.params)
    if mode == "fsdp":
        specs = [x.sharding.spec for x in jax.tree.leaves(state.params)]
        result["sharded_leaves"] = sum(any(p is not None for p in spec) for spec in specs)
        result["replicated_leaves"] = sum(all(p is None for p in spec) for spec in specs)
    if mode == "grouped":
        for first in range(0, STEPS, 2):
            group = [to_global(synthetic_batch(i), steps.mesh) for i in range(first, min(first + 2, STEPS))]
            state, metrics = steps.train(state, frozen, group)
            assert metrics["loss"].shape == (len(group),)
        metrics = {"loss": metrics["loss"][-1]}
    for i in range(STEPS if mode != "grouped" else 0):
        state, metrics = steps.train(state, frozen, to_global(synthetic_batch(i), steps.mesh))
        if i + 1 == SAVE_AT and mode == "ckpt":
            with ocp.CheckpointManager(Path(out) / "ckpt") as manager:
                manager.save(SAVE_AT, args=ocp.args.StandardSave(state))
                manager.wait_until_finished()
    result["loss"] = float(metrics["loss"])
    result["eval_end"] = _eval_sums(steps, state.params, frozen)
    np.savez(Path(out) / f"{mode}.npz", **flat(state.params))
    if mode == "ckpt":
        np.savez(Path(out) / "start.npz", **start)
    (Path(out) / f"{mode}.json").write_text(json.dumps(result))


def child_restore(out: str, ckpt: str) -> None:
    """Restore the 4-device checkpoint onto this process's mesh and train the remaining steps."""
    import jax
    import orbax.checkpoint as ocp

    from imgcls_jax.parallel import restore_target, to_global

    _, _, steps, state, frozen = _setup()
    with ocp.CheckpointManager(Path(ckpt)) as manager:
        state = manager.restore(
            SAVE_AT, args=ocp.args.StandardRestore(restore_target(state, steps.state_sharding))
        )
    shardings = {x.sharding for x in jax.tree.leaves(state)}
    assert shardings == {steps.state_sharding.step}, shardings
    assert int(state.step) == SAVE_AT, int(state.step)
    for i in range(SAVE_AT, STEPS):
        state, _ = steps.train(state, frozen, to_global(synthetic_batch(i), steps.mesh))
    np.savez(Path(out) / f"restored_{jax.device_count()}.npz", **flat(state.params))


def child_distributed(out: str, data: str, steps_to_run: str) -> None:
    """One of two processes: env-var init, a disjoint share of the files, a few sharded steps."""
    from imgcls_jax import parallel

    assert parallel.initialize_distributed()  # from IMGCLS_JAX_* set by the parent
    import jax
    import orbax.checkpoint as ocp

    from imgcls_jax.data import Pipeline, from_records, scan_folder, shard_records

    found = scan_folder(data)
    share = shard_records(found.records, equal_sizes=True, seed=0)
    split, _, steps, state, frozen = _setup()
    pid = jax.process_index()
    assert len(steps.mesh.local_devices) == 2 and steps.mesh.devices.size == 4
    local = GLOBAL_BATCH // jax.process_count()
    pipe = Pipeline(
        from_records(share, found.class_names),
        image_size=(SIZE, SIZE),
        batch_size=local,
        training=True,
        seed=0,
    )
    fed, epoch = [], 0
    while len(fed) < int(steps_to_run):
        for batch in pipe.epoch(epoch):
            if len(fed) == int(steps_to_run):
                break
            batch = {k: batch[k] for k in ("image", "label")}
            fed.append(batch)
            state, _ = steps.train(state, frozen, parallel.to_global(batch, steps.mesh))
        epoch += 1
    with ocp.CheckpointManager(Path(out) / "dist_ckpt") as manager:  # every process calls save
        manager.save(int(state.step), args=ocp.args.StandardSave(state))
        manager.wait_until_finished()
    np.savez(Path(out) / f"dist_params_{pid}.npz", **flat(state.params))
    np.savez(
        Path(out) / f"dist_batches_{pid}.npz", **{f"{k}_{i}": b[k] for i, b in enumerate(fed) for k in b}
    )
    (Path(out) / f"dist_share_{pid}.json").write_text(json.dumps([r.path for r in share]))
    # evaluation over unequal shares (11 and 10 of 21 files, 2 per batch: 6 and 5 batches)
    eval_share = shard_records(found.records, seed=0)
    eval_pipe = Pipeline(
        from_records(eval_share, found.class_names), image_size=(SIZE, SIZE), batch_size=2, training=False
    )
    eval_batches = list(eval_pipe.epoch(0))
    result = evaluate(steps, state.params, frozen, eval_batches)
    real = {k: np.concatenate([b[k][b["mask"]] for b in eval_batches]) for k in ("image", "label")}
    np.savez(Path(out) / f"dist_eval_images_{pid}.npz", **real)
    (Path(out) / f"dist_eval_{pid}.json").write_text(json.dumps({**result, "batches": len(eval_batches)}))
    jax.distributed.shutdown()


def child_replay(out: str, steps_to_run: str) -> None:
    """On one device: the distributed run's global batches (process 0's rows, then process 1's)."""
    import orbax.checkpoint as ocp

    from imgcls_jax.parallel import restore_target, to_global

    _, _, steps, state, frozen = _setup()
    parts = [load(Path(out) / f"dist_batches_{p}.npz") for p in (0, 1)]
    np.savez(Path(out) / "replay_start.npz", **flat(state.params))
    for i in range(int(steps_to_run)):
        batch = {k: np.concatenate([p[f"{k}_{i}"] for p in parts]) for k in ("image", "label")}
        state, _ = steps.train(state, frozen, to_global(batch, steps.mesh))
    np.savez(Path(out) / "replay.npz", **flat(state.params))
    with ocp.CheckpointManager(Path(out) / "dist_ckpt") as manager:
        target = restore_target(state, steps.state_sharding)
        restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(target))
    np.savez(Path(out) / "dist_restored.npz", **flat(restored.params))
    images = [load(Path(out) / f"dist_eval_images_{p}.npz") for p in (0, 1)]
    every = {k: np.concatenate([p[k] for p in images]) for k in ("image", "label")}
    result = evaluate(steps, restored.params, frozen, [every])
    (Path(out) / "replay_eval.json").write_text(json.dumps(result))


# ------------------------------------------------------------------ in-process unit tests
class Rec(NamedTuple):
    path: str
    label: int


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 12), min_size=1, max_size=5),
    processes=st.integers(1, 5),
    seed=st.integers(0, 3),
    equal=st.booleans(),
)
def test_shard_records_partition_stratified_deterministic(counts, processes, seed, equal):
    records = [Rec(f"c{c}/{i:03d}.png", c) for c, n in enumerate(counts) for i in range(n)]
    if len(records) < processes:
        with pytest.raises(ValueError, match="cannot give each"):
            shard_records(records, 0, processes)
        return
    shuffled = list(reversed(records))  # the input order must not matter
    shares = [shard_records(records, p, processes, seed=seed, equal_sizes=equal) for p in range(processes)]
    assert shares == [
        shard_records(shuffled, p, processes, seed=seed, equal_sizes=equal) for p in range(processes)
    ]
    paths = [r.path for share in shares for r in share]
    assert len(paths) == len(set(paths))  # disjoint
    left_out = len(records) - len(paths)
    assert left_out == (len(records) % processes if equal else 0)
    sizes = {len(share) for share in shares}
    assert len(sizes) == 1 if equal else max(sizes) - min(sizes) <= 1
    for c in range(len(counts)):  # every class split as evenly as whole records allow
        per = [sum(r.label == c for r in share) for share in shares]
        assert max(per) - min(per) <= 1 + (1 if equal else 0), (c, per)


def test_shard_records_rejects_bad_index():
    with pytest.raises(ValueError, match="process_index < process_count, got 2 of 2"):
        shard_records([Rec("a", 0), Rec("b", 0)], 2, 2)


def test_fsdp_spec_picks_largest_divisible_dimension():
    from jax.sharding import PartitionSpec as P

    assert parallel.fsdp_spec((3, 3, 512, 256), 4, "data", 1024) == P(None, None, "data", None)
    assert parallel.fsdp_spec((6, 1024), 4, "data", 1024) == P(None, "data")
    assert parallel.fsdp_spec((10, 3), 4, "data", 1) == P()  # nothing divides
    assert parallel.fsdp_spec((512,), 4, "data", 1024) == P()  # too small
    assert parallel.fsdp_spec((4096,), 1, "data", 1) == P()  # one device


def test_pad_batch_masks_padding_and_rejects_ragged():
    batch = {"image": np.ones((5, 2, 2, 3), np.uint8), "label": np.arange(5, dtype=np.int32)}
    out = parallel.pad_batch(batch, 4)
    assert out["image"].shape == (8, 2, 2, 3) and out["label"].tolist() == [0, 1, 2, 3, 4, 0, 0, 0]
    assert out["mask"].tolist() == [True] * 5 + [False] * 3
    masked = {**batch, "mask": np.array([True, True, False, True, False])}
    assert parallel.pad_batch(masked, 2)["mask"].tolist() == [True, True, False, True, False, False]
    with pytest.raises(ValueError, match="disagree on the batch size"):
        parallel.pad_batch({"image": np.zeros((4, 1)), "label": np.zeros(3)}, 2)


def test_process_batch_size():
    mesh = parallel.make_mesh()  # this process holds every device of its mesh
    assert parallel.process_batch_size(8 * mesh.devices.size, mesh) == 8 * mesh.devices.size
    assert parallel.global_batch_size(8, mesh) == parallel.local_batch_size(8, mesh) == 8 * mesh.devices.size
    with pytest.raises(ValueError, match="global batch size 0 does not divide"):
        parallel.process_batch_size(0, mesh)


def test_to_global_names_the_bad_array():
    with pytest.raises(ValueError, match="batch\\['label'\\] has shape \\(\\)"):
        parallel.to_global({"label": np.int32(3)}, parallel.make_mesh())


def test_initialize_distributed_argument_errors_and_single_process(monkeypatch):
    assert parallel.initialize_distributed(num_processes=1) is False
    monkeypatch.setenv("IMGCLS_JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="IMGCLS_JAX_NUM_PROCESSES='two' is not an integer"):
        parallel.initialize_distributed()
    monkeypatch.setenv("IMGCLS_JAX_NUM_PROCESSES", "2")
    with pytest.raises(ValueError, match="process_id must be in \\[0, num_processes=2\\), got 5"):
        parallel.initialize_distributed(process_id=5)
    monkeypatch.setenv("IMGCLS_JAX_LOCAL_DEVICE_IDS", "0;1")
    with pytest.raises(ValueError, match="IMGCLS_JAX_LOCAL_DEVICE_IDS='0;1'"):
        parallel.initialize_distributed()


def test_auto_detection_after_jax_started_is_a_single_process_run(monkeypatch, caplog):
    for name in ("IMGCLS_JAX_COORDINATOR", "IMGCLS_JAX_NUM_PROCESSES", "IMGCLS_JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    jax.devices()  # the backend is up, as in a test run or a notebook
    with caplog.at_level("WARNING", logger="imgcls_jax.parallel"):
        assert parallel.initialize_distributed() is False
    assert "auto-detection was skipped" in caplog.text
    assert jax.process_count() == 1


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache):
    """4 devices (replicated + checkpoint, FSDP), then 1 and 2 devices (reference + restores)."""
    out = tmp_path_factory.mktemp("parallel")
    run_children(
        [["train", str(out), "ckpt", "--", "train", str(out), "fsdp", "--", "train", str(out), "grouped"]],
        [devices_env(4)],
        cache,
    )
    ckpt = str(out / "ckpt")
    run_children(
        [["train", str(out), "single", "--", "restore", str(out), ckpt], ["restore", str(out), ckpt]],
        [devices_env(1), devices_env(2)],
        cache,
    )
    return out


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for c, n in (("a", 7), ("b", 8), ("c", 6)):  # 21 files: equal shares drop one
        (root / c).mkdir()
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


# --------------------------------------------------------------------------------------- tests
def test_sharded_training_equals_single_device(runs):
    start, single = load(runs / "start.npz"), load(runs / "single.npz")
    four, fsdp, grouped = (load(runs / f"{m}.npz") for m in ("ckpt", "fsdp", "grouped"))
    d4, dfsdp = max_rel_diff(four, single, start), max_rel_diff(fsdp, single, start)
    dgrouped = max_rel_diff(grouped, single, start)
    print(f"\nrelative parameter difference after {STEPS} steps vs 1 device: 4 devices {d4:.2e}, ", end="")
    print(f"FSDP {dfsdp:.2e}, 4 devices 2 steps per execution {dgrouped:.2e}")
    assert d4 < TOL and dfsdp < TOL and dgrouped < TOL
    info = {m: json.loads((runs / f"{m}.json").read_text()) for m in ("single", "ckpt", "fsdp", "grouped")}
    assert [info[m]["devices"] for m in ("single", "ckpt", "fsdp", "grouped")] == [1, 4, 4, 4]
    for m in ("ckpt", "grouped"):
        assert abs(info[m]["loss"] - info["single"]["loss"]) < 1e-4 * abs(info["single"]["loss"]), m
    # FSDP really split something (block5 kernels over 4 devices) and left small leaves whole
    assert info["fsdp"]["sharded_leaves"] > 0 and info["fsdp"]["replicated_leaves"] > 0, info["fsdp"]


def test_sharded_eval_counts_every_image_once(runs):
    info = {m: json.loads((runs / f"{m}.json").read_text()) for m in ("single", "ckpt", "fsdp")}
    for when in ("eval_start", "eval_end"):
        ref = info["single"][when]
        assert ref["count"] == EVAL_IMAGES
        for m in ("ckpt", "fsdp"):
            got = info[m][when]
            assert got["count"] == EVAL_IMAGES
            if when == "eval_start":  # identical parameters: the same images right
                assert got["accuracy"] == ref["accuracy"]
            print(f"\n{m} {when}: loss {got['loss']!r} vs 1 device {ref['loss']!r}")
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)


def test_checkpoint_from_4_devices_continues_on_1_and_2(runs):
    start, four = load(runs / "start.npz"), load(runs / "ckpt.npz")
    for n in (1, 2):
        d = max_rel_diff(load(runs / f"restored_{n}.npz"), four, start)
        print(f"\nsaved on 4, continued on {n} vs continued on 4: relative difference {d:.2e}")
        assert d < TOL


@pytest.mark.slow  # two processes (~23 s); test_fit_hosts.py::test_fit_on_two_processes is in the quick tier
def test_two_processes_jax_distributed(tiny_folder, tmp_path, cache):
    steps = "3"
    port = helpers.free_port()
    envs = [
        {
            **devices_env(2),
            "IMGCLS_JAX_COORDINATOR": f"127.0.0.1:{port}",
            "IMGCLS_JAX_NUM_PROCESSES": "2",
            "IMGCLS_JAX_PROCESS_ID": str(p),
        }
        for p in (0, 1)
    ]
    run_children([["distributed", str(tmp_path), str(tiny_folder), steps]] * 2, envs, cache, timeout=240)
    shares = [set(json.loads((tmp_path / f"dist_share_{p}.json").read_text())) for p in (0, 1)]
    every = {str(p) for p in tiny_folder.rglob("*.png")}
    assert not shares[0] & shares[1]
    assert len(shares[0]) == len(shares[1]) == 10 and len(every - (shares[0] | shares[1])) == 1
    p0, p1 = load(tmp_path / "dist_params_0.npz"), load(tmp_path / "dist_params_1.npz")
    assert p0.keys() == p1.keys() and all(np.array_equal(p0[k], p1[k]) for k in p0)
    # the same global batches on one device give the same parameters; the multi-host checkpoint
    # restores onto one device exactly
    run_children([["replay", str(tmp_path), steps]], [devices_env(1)], cache)
    start, replay = load(tmp_path / "replay_start.npz"), load(tmp_path / "replay.npz")
    restored = load(tmp_path / "dist_restored.npz")
    assert all(np.array_equal(restored[k], p0[k]) for k in p0)
    evals = [json.loads((tmp_path / f"dist_eval_{p}.json").read_text()) for p in (0, 1)]
    assert [e.pop("batches") for e in evals] == [6, 5]  # process 1 fed one fully masked batch
    assert evals[0] == evals[1] and evals[0]["count"] == 21
    one = json.loads((tmp_path / "replay_eval.json").read_text())
    assert one["count"] == 21 and one["accuracy"] == evals[0]["accuracy"]
    assert one["loss"] == pytest.approx(evals[0]["loss"], rel=1e-6)
    print(f"\ndistributed eval {evals[0]} vs 1 device {one}")
    d = max_rel_diff(p0, replay, start)
    print(f"\n2 processes x 2 devices vs the same global batches on 1 device: relative difference {d:.2e}")
    assert d < TOL


CHILDREN = {
    "train": child_train,
    "restore": child_restore,
    "distributed": child_distributed,
    "replay": child_replay,
}

if __name__ == "__main__":  # MODE ARGS... [-- MODE ARGS...]: one JAX start-up for several runs
    words = sys.argv[1:]
    while words:
        end = words.index("--") if "--" in words else len(words)
        CHILDREN[words[0]](*words[1:end])
        words = words[end + 1 :]


def test_masked_tail_pads_a_short_share_with_masked_batches():
    batches = [{"image": np.full((2, 1), i + 1), "mask": np.ones(2, bool)} for i in range(2)]
    out = list(parallel.masked_tail(iter(batches), 4))
    assert len(out) == 4 and out[:2] == batches
    for extra in out[2:]:
        assert extra["image"].shape == (2, 1) and not extra["image"].any() and not extra["mask"].any()
    assert list(parallel.masked_tail(iter(batches), None)) == batches
    assert list(parallel.masked_tail(iter(batches), 1)) == batches  # never drops a batch
    with pytest.raises(ValueError, match="no batch to take the batch shape from"):
        list(parallel.masked_tail(iter([]), 1))


def test_run_children_kills_the_rest_when_one_fails_or_time_runs_out():
    sleeper = [sys.executable, "-c", "import time; time.sleep(60)"]
    env = helpers.child_env(ROOT, {})
    start = time.time()
    with pytest.raises(AssertionError, match=r"a child failed[\s\S]*exited 3"):
        helpers.run_children([[sys.executable, "-c", "raise SystemExit(3)"], sleeper], [env, env], timeout=60)
    with pytest.raises(AssertionError, match="timed out after 1 s"):
        helpers.run_children([sleeper], [env], timeout=1)
    assert time.time() - start < 30  # neither waited for the sleepers
