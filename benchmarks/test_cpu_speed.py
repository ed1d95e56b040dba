"""CPU training speed side by side: imgcls_jax (``conv_impl`` xla / im2col / auto, auto being
oneDNN's convolutions where they are available) against Keras 3 on TensorFlow, PyTorch (CPU
wheel, channels_last) and Keras 3 on the JAX backend.

``test_family_train_step``: one full training step (forward in training mode, cross-entropy,
backward through every layer, Adam) of VGG16, ResNet50, MobileNetV2 and EfficientNetB0 at 64x64
batch 16 and VGG16 at 224x224 batch 8 (:data:`FAMILY_CASES`), every framework at the same shape in
turn; Keras on JAX and PyTorch run in a subprocess each (Keras picks one backend per process;
PyTorch then shares no OpenMP runtime with imgcls_jax, whose kernels slowed it 1.3-2x here until
commit 54d8e25). The table it prints gives each framework's ms per step and imgcls_jax's (auto) speed
over the fastest peer.
``IMGCLS_BENCH_SPE=k`` times rounds of k steps instead (ms per step = a round's time / k), each
framework as its ``fit`` runs with ``steps_per_execution=k``: imgcls_jax and Keras on TensorFlow
in one execution of k steps (an XLA while loop; a ``tf.while_loop``), Keras on JAX and PyTorch
as k steps from Python (what Keras's JAX trainer does with it; PyTorch has no such setting).

``test_vgg16_speed``: VGG16 at 32 and 64 px, forward and train, the ``conv_impl`` choices.

Every model is VGG16 without top + global average pooling + Dense(5) logits, float32, random
weights (the runners of ``benchmarks/peers.py``). Two modes: ``forward`` (inference on one batch;
imgcls_jax: its eval step) and ``train`` (one full step: forward, cross-entropy, backward
through all layers, Adam update). Images in [0, 255] are made once per shape and already on
the framework's side (imgcls_jax: uint8, as its pipeline delivers them, with the caffe
preprocessing inside the step; the peers: float32). Compile/trace time is excluded (one warm-up
round; :data:`FAMILY_WARMUP` for the family steps, which also time with Python's garbage
collector off, every framework alike); medians of warm rounds.

Cases run grouped by shape, the frameworks one after another, so load from other processes
hits them alike; rerun (``--benchmark-...`` options as usual) to see the spread.
``IMGCLS_BENCH_ROUNDS`` scales the rounds. A table of img/s and the ratio to the faster peer
(Keras or PyTorch) for the default ``auto`` is printed by the last test.

    .venv/bin/pytest benchmarks/test_cpu_speed.py -q -p no:cacheprovider
    .venv/bin/pytest benchmarks/test_cpu_speed.py -q -p no:cacheprovider -k family
    IMGCLS_BENCH_SPE=4 .venv/bin/pytest benchmarks/test_cpu_speed.py -q -p no:cacheprovider -k family

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


#: (model, image size, batch, timed rounds) of ``test_family_train_step``.
FAMILY_CASES = [
    ("vgg16", 64, 16, 3),
    ("resnet50", 64, 16, 3),
    ("mobilenetv2", 64, 16, 4),
    ("efficientnetb0", 64, 16, 4),
    ("vgg16", 224, 8, 2),
]
#: Untimed steps before the timed ones of ``test_family_train_step``, every framework alike: the
#: first steps after a model's compilation also pay first-touch costs (fresh memory, caches and
#: allocator pools growing), which an epoch of hundreds of steps does not see.
FAMILY_WARMUP = 2

#: Steps per timed round of ``test_family_train_step`` (``IMGCLS_BENCH_SPE``; see the docstring).
FAMILY_STEPS = int(os.environ.get("IMGCLS_BENCH_SPE", "1"))

FAMILY_FRAMEWORKS = ("jax-auto", "jax-xla", "keras-tf", "torch", "keras-jax")
FAMILY_PEERS = ("keras-tf", "torch", "keras-jax")
FAMILY_MS: dict[tuple[str, int, int, str], float] = {}  # (arch, size, batch, framework) -> ms per step


def _family_runner(framework: str, arch: str, size: int, batch: int):
    """A round of :data:`FAMILY_STEPS` training steps of ``framework``."""
    k = FAMILY_STEPS
    if framework.startswith("jax-"):
        return peers.jax_runner("train", size, batch, impl=framework[4:], arch=arch, steps_per_execution=k)[0]
    if framework == "keras-tf":
        if os.environ.get("KERAS_BACKEND") != "tensorflow":
            pytest.skip("the Keras-TF peer needs TensorFlow")
        return peers.keras_runner("train", size, batch, arch=arch, steps_per_execution=k)
    raise ValueError(f"{framework} runs in a process of its own (peers.subprocess_times)")


@pytest.mark.parametrize(
    "arch, size, batch, rounds, framework",
    [(*case, fw) for case in FAMILY_CASES for fw in FAMILY_FRAMEWORKS],
    ids=[f"{c[0]}-{c[1]}px-b{c[2]}-{fw}" for c in FAMILY_CASES for fw in FAMILY_FRAMEWORKS],
)
def test_family_train_step(benchmark, arch, size, batch, rounds, framework):
    benchmark.group = f"train {arch} {size}px batch {batch}"
    rounds = max(2, round(rounds * ROUNDS))
    _RUNNERS.clear()
    if framework in ("keras-jax", "torch"):  # each in its own process (see peers.subprocess_times)
        times = peers.subprocess_times(
            framework, "train", size, batch, rounds, arch=arch, warmup=FAMILY_WARMUP,
            steps_per_execution=FAMILY_STEPS,
        )  # fmt: skip
        benchmark.pedantic(lambda: None, rounds=1, iterations=1)
        benchmark.extra_info["subprocess_step_s"] = times
        median = sorted(times)[len(times) // 2]
    else:
        run = _family_runner(framework, arch, size, batch)
        with peers.no_gc():
            benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=FAMILY_WARMUP)
        median = benchmark.stats.stats.median
        run = None
    FAMILY_MS[(arch, size, batch, framework)] = 1e3 * median / FAMILY_STEPS
    benchmark.extra_info.update(
        step_ms=round(1e3 * median / FAMILY_STEPS, 1), steps_per_round=FAMILY_STEPS,
        load_average=os.getloadavg()[0],
    )  # fmt: skip


def test_print_family_table(capsys):
    if not FAMILY_MS:
        pytest.skip("needs test_family_train_step in the same run")
    lines = [
        f"| model | px | batch | {' | '.join(FAMILY_FRAMEWORKS)} | auto vs fastest peer |",
        "|" + "---|" * (len(FAMILY_FRAMEWORKS) + 4),
    ]
    for arch, size, batch, _ in FAMILY_CASES:
        row = {fw: FAMILY_MS.get((arch, size, batch, fw)) for fw in FAMILY_FRAMEWORKS}
        if not any(row.values()):
            continue
        peer = min((row[p] for p in FAMILY_PEERS if row[p]), default=None)
        ours = row["jax-auto"]
        ratio = f"{peer / ours:.2f}x" if peer and ours else "-"
        cells = " | ".join(f"{row[fw]:.0f}" if row[fw] else "-" for fw in FAMILY_FRAMEWORKS)
        lines.append(f"| {arch} | {size} | {batch} | {cells} | {ratio} |")
    with capsys.disabled():
        print(
            f"\nms per full training step (median of warm rounds of {FAMILY_STEPS} step(s), "
            f"steps_per_execution={FAMILY_STEPS}); load average {os.getloadavg()[0]:.1f}"
        )
        print("\n".join(lines))
    if os.environ.get("IMGCLS_BENCH_TABLE"):
        with open(os.environ["IMGCLS_BENCH_TABLE"], "a") as f:
            f.write("\n".join(lines) + "\n")
    assert len(lines) > 2
