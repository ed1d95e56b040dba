"""Data-parallel train-step throughput on 1, 2 and 4 forced CPU devices (weak scaling).

A correctness-of-scaling view, not a speed claim: ``--xla_force_host_platform_device_count=N``
splits one CPU into N logical devices that share the same cores (2 on the reference machine),
so the best possible outcome is a constant *total* throughput and a per-device throughput that
falls as 1/N. What the table shows is the overhead of the sharded program (partitioning, the
gradient all-reduce, per-device dispatch) on top of that, with a fixed per-device batch.

Each device count runs in its own process (the device count is fixed when JAX starts): VGG16 at
32x32, block5 + a 16-unit head trainable, SGD-momentum, per-device batch 8, dropout 0.5; the
median of ``TIMED`` steps after ``WARMUP`` (compile included in the first).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_DEVICE, SIZE, WARMUP, TIMED = 8, 32, 2, 6
# (devices, per-device batch): weak scaling, then one device with the 4-device global batch (the
# same work in one program: the difference to the 4-device row is the cost of sharding it)
RUNS = ((1, PER_DEVICE), (2, PER_DEVICE), (4, PER_DEVICE), (1, 4 * PER_DEVICE))


def child(devices: int, per_device: int) -> None:
    """Run in a process started with ``devices`` forced CPU devices; print one JSON line."""
    import jax
    import numpy as np

    import imgcls_jax
    from imgcls_jax import parallel
    from imgcls_jax.train import init_state, make_optimizer, make_train_step, split_model, trainable_layers

    assert jax.device_count() == devices, jax.devices()
    model = imgcls_jax.create_model(
        "vgg16", input_shape=(SIZE, SIZE, 3), num_classes=5, pooling="avg", head_units=(16,), dropout=0.5
    )
    split = split_model(model, trainable_layers(model, "top:1"))
    opt = make_optimizer("sgd", 0.01, momentum=0.9)
    mesh = parallel.make_mesh()
    state = init_state(split, opt)
    # fit's path: the state placed on the mesh, the step keeping its layout
    state = parallel.place(state, parallel.tree_shardings(state, mesh))
    frozen = parallel.place(split.frozen, parallel.replicated(mesh))
    train = make_train_step(split, opt, placement=(mesh, None))
    n = parallel.global_batch_size(per_device, mesh)
    rng = np.random.default_rng(0)
    batch = parallel.to_global(
        {
            "image": rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8),
            "label": rng.integers(0, 5, n).astype(np.int32),
        },
        mesh,
    )
    times = []
    for _ in range(WARMUP + TIMED):
        start = time.perf_counter()
        state, metrics = train(state, frozen, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[WARMUP:])
    print(json.dumps({"devices": devices, "global_batch": n, "step_s": step_s, "first_step_s": times[0]}))


def run_child(devices: int, per_device: int) -> dict:
    from tests import helpers

    env = helpers.child_env(ROOT, {"XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"})
    proc = subprocess.run(
        [sys.executable, __file__, str(devices), str(per_device)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_data_parallel_scaling():
    rows = [run_child(d, b) for d, b in RUNS]
    lines = [
        "",
        f"Data-parallel train step, VGG16 {SIZE}px, block5+head, per-device batch {PER_DEVICE} "
        f"(forced CPU devices sharing {os.cpu_count()} cores: a correctness-of-scaling view)",
        f"{'devices':>7} {'global batch':>12} {'step s':>8} {'img/s':>8} {'img/s/device':>13}"
        f" {'1st step s':>10}",
    ]
    for r in rows:
        rate = r["global_batch"] / r["step_s"]
        lines.append(
            f"{r['devices']:>7} {r['global_batch']:>12} {r['step_s']:>8.3f} {rate:>8.1f} "
            f"{rate / r['devices']:>13.1f} {r['first_step_s']:>10.2f}"
        )
    print("\n".join(lines))
    assert [r["global_batch"] for r in rows] == [d * b for d, b in RUNS]
    assert all(r["step_s"] > 0 for r in rows)


if __name__ == "__main__":
    child(int(sys.argv[1]), int(sys.argv[2]))
