"""VGG16 on CPU, side by side: imgcls_jax (conv_impl xla / im2col / auto) vs Keras 3 (TF backend)
vs PyTorch (a plain ``torch.nn`` VGG16, channels_last).

Every model is VGG16 without top + global average pooling + Dense(5) logits, float32, random
weights (the runners of ``benchmarks/peers.py``). Two modes: ``forward`` (inference on one batch;
imgcls_jax: its eval step) and ``train`` (one full step: forward, cross-entropy, backward
through all layers, Adam update). Images in [0, 255] are made once per shape and already on
the framework's side (imgcls_jax: uint8, as its pipeline delivers them, with the caffe
preprocessing inside the step; the peers: float32). Compile/trace time is excluded (one warm-up
round); medians of warm rounds.

Cases run grouped by shape, the frameworks one after another, so load from other processes
hits them alike; rerun (``--benchmark-...`` options as usual) to see the spread.
``IMGCLS_BENCH_ROUNDS`` scales the rounds. A table of img/s and the ratio to the faster peer
(Keras or PyTorch) for the default ``auto`` is printed by the last test.

    .venv/bin/pytest benchmarks/test_cpu_speed.py -q -p no:cacheprovider

Peers that are not installed are skipped with the reason. PyTorch: ``pip install torch==2.13.0``
(a CPU wheel); it is never a dependency of imgcls_jax.
"""

from __future__ import annotations

import os

import pytest

from benchmarks import peers

ROUNDS = float(os.environ.get("IMGCLS_BENCH_ROUNDS", "1"))
FRAMEWORKS = ("jax-xla", "jax-im2col", "jax-auto", "keras-tf", "torch")
PEERS = ("keras-tf", "torch")
# (mode, image size, batch, rounds): the tests' shape (32 px) and the example's (64 px, batch 16);
# IMGCLS_BENCH_FULL=1 adds batch 16/32 variants and one 224 forward (about 3x the time).
CASES = [
    ("forward", 32, 32, 6),
    ("train", 32, 32, 4),
    ("forward", 64, 16, 5),
    ("train", 64, 16, 3),
]
if os.environ.get("IMGCLS_BENCH_FULL"):
    CASES += [
        ("forward", 32, 16, 8),
        ("forward", 64, 32, 4),
        ("train", 32, 16, 5),
        ("train", 64, 32, 3),
        ("forward", 224, 4, 2),
    ]

RESULTS: dict[tuple[str, int, int, str], float] = {}  # (mode, size, batch, framework) -> img/s
_RUNNERS: dict[tuple, object] = {}


def _runner(framework: str, mode: str, size: int, batch: int):
    key = (framework, mode, size, batch)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # keep one model alive at a time (memory)
        if framework.startswith("jax-"):
            _RUNNERS[key] = peers.jax_runner(mode, size, batch, impl=framework[4:])[0]
        elif framework == "keras-tf":
            if os.environ.get("KERAS_BACKEND") != "tensorflow":
                pytest.skip("the Keras peer here is the TensorFlow backend (TensorFlow not installed)")
            _RUNNERS[key] = peers.keras_runner(mode, size, batch)
        else:
            _RUNNERS[key] = peers.torch_runner(mode, size, batch)
    return _RUNNERS[key]


@pytest.mark.parametrize(
    "mode, size, batch, rounds, framework",
    [(*case, fw) for case in CASES for fw in FRAMEWORKS],
    ids=[f"{c[0]}-{c[1]}px-b{c[2]}-{fw}" for c in CASES for fw in FRAMEWORKS],
)
def test_vgg16_speed(benchmark, mode, size, batch, rounds, framework):
    run = _runner(framework, mode, size, batch)
    benchmark.group = f"{mode} {size}px batch {batch}"
    benchmark.pedantic(run, rounds=max(2, round(rounds * ROUNDS)), iterations=1, warmup_rounds=1)
    RESULTS[(mode, size, batch, framework)] = batch / benchmark.stats.stats.median


def test_print_table(capsys):
    if not RESULTS:
        pytest.skip("needs test_vgg16_speed in the same run")
    lines = [
        f"| mode | px | batch | {' | '.join(FRAMEWORKS)} | auto / faster peer |",
        "|" + "---|" * (len(FRAMEWORKS) + 4),
    ]
    for mode, size, batch, _ in CASES:
        row = {fw: RESULTS.get((mode, size, batch, fw)) for fw in FRAMEWORKS}
        if not any(row.values()):
            continue
        peer = max((row[p] for p in PEERS if row[p]), default=None)
        ours = row["jax-auto"]
        ratio = f"{ours / peer:.2f}x" if peer and ours else "-"
        cells = " | ".join(f"{row[fw]:.1f}" if row[fw] else "-" for fw in FRAMEWORKS)
        lines.append(f"| {mode} | {size} | {batch} | {cells} | {ratio} |")
    with capsys.disabled():
        print("\nVGG16 img/s (median of warm rounds), ratio = jax-auto / faster peer")
        print("\n".join(lines))
    assert len(lines) > 2
