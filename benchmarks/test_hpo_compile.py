"""Compile once per shape: what search trials that share shapes save by reusing compiled steps.

Runs the same small trial (head of a random-weight VGG16 on 32x32 flower photos, 3 epochs; and
with ``--hpo-phase2`` style fine-tuning of block5 too) four times with different learning rate,
weight decay and label smoothing, twice: with the process's compiled-step cache (what
``imgcls_jax.hpo.search`` gets) and with every cache cleared before each trial (what each trial
paid before the steps took these numbers as inputs). Prints seconds per trial and XLA compile
seconds per trial (from ``jax.monitoring``). Data: ``../shared/data/flowers5``.

    .venv/bin/pytest -q -s benchmarks/test_hpo_compile.py
"""

import statistics
import time
from pathlib import Path

import pytest
from PIL import Image

FLOWERS = Path(__file__).resolve().parents[2] / "shared" / "data" / "flowers5"
pytestmark = pytest.mark.skipif(not FLOWERS.is_dir(), reason=f"{FLOWERS} not found (shared real-photo data)")
TRIALS = [(3e-3, 1e-4, 0.0), (1e-2, 1e-5, 0.1), (3e-4, 1e-3, 0.05), (1e-3, 3e-4, 0.2)]


@pytest.fixture(scope="module")
def flowers(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowers_tiny")
    for name in sorted(p.name for p in FLOWERS.iterdir() if p.is_dir())[:3]:
        (root / name).mkdir()
        for f in sorted((FLOWERS / name).iterdir())[:16]:
            Image.open(f).convert("RGB").resize((32, 32), Image.BILINEAR).save(root / name / f"{f.stem}.png")
    return root


def _compile_seconds():
    import jax

    events = []

    def listener(name, seconds, **kw):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(seconds)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events


@pytest.mark.parametrize("phases", ["head", "head+top1"])
def test_trials_that_share_shapes_reuse_compiled_steps(flowers, tmp_path, phases):
    import jax

    from imgcls_jax.config import PhaseConfig, TrainConfig
    from imgcls_jax.train import steps
    from imgcls_jax.train.loop import fit

    compiles = _compile_seconds()
    results = {}
    for mode in ("cold", "reuse"):
        steps._JIT_CACHE.clear()
        jax.clear_caches()
        seconds, compile_s = [], []
        for i, (lr, wd, smoothing) in enumerate(TRIALS):
            if mode == "cold":
                steps._JIT_CACHE.clear()
                jax.clear_caches()
            plan = [PhaseConfig(epochs=3, learning_rate=lr, weight_decay=wd, schedule="constant")]
            if phases == "head+top1":
                plan.append(PhaseConfig(epochs=1, trainable="top:1", optimizer="sgd", learning_rate=lr / 10))
            cfg = TrainConfig(
                data=str(flowers), run_dir=str(tmp_path / f"{mode}{i}"), image_size=32, batch_size=8,
                weights="random", head_units=(16,), augment={}, label_smoothing=smoothing, keep_checkpoints=1,
                phases=plan,
            )  # fmt: skip
            before, start = len(compiles), time.perf_counter()
            fit(cfg, resume=False)
            seconds.append(time.perf_counter() - start)
            compile_s.append(sum(compiles[before:]))
        results[mode] = seconds, compile_s
        print(
            f"\n{phases} {mode}: s/trial {[round(s, 2) for s in seconds]}, "
            f"XLA compile s/trial {[round(c, 2) for c in compile_s]}"
        )
    cold, reuse = results["cold"], results["reuse"]
    later_cold, later_reuse = statistics.median(cold[0][1:]), statistics.median(reuse[0][1:])
    print(
        f"{phases}: trials 2-4 median {later_cold:.2f} s cold vs {later_reuse:.2f} s reusing "
        f"({later_cold - later_reuse:.2f} s saved per trial); compile "
        f"{statistics.median(cold[1][1:]):.2f} s vs {statistics.median(reuse[1][1:]):.2f} s"
    )
    # Later trials with the same shapes compile (almost) nothing when steps are reused.
    assert statistics.median(reuse[1][1:]) < 0.2 * statistics.median(cold[1][1:])
