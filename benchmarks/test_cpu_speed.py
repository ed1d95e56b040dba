"""VGG16 on CPU, side by side: imgcls_jax (conv_impl xla / im2col / auto) vs Keras 3 (TF backend)
vs PyTorch (a plain ``torch.nn`` VGG16, channels_last).

Every model is VGG16 without top + global average pooling + Dense(5) logits, float32, random
weights. Two modes: ``forward`` (inference, logits of one batch) and ``train`` (one full step:
forward, cross-entropy, backward through all layers, Adam update). Images are float32 in
[0, 255], made once per shape and already on the framework's side; imgcls_jax also applies its
caffe preprocessing inside the model (an elementwise op, negligible). Compile/trace time is
excluded (one warm-up round); medians of warm rounds.

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

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from imgcls_jax.models.vgg import VGG
from imgcls_jax.train import init_state, make_optimizer, make_train_step, split_model, trainable_layers

NUM_CLASSES = 5
LR = 1e-4
ROUNDS = float(os.environ.get("IMGCLS_BENCH_ROUNDS", "1"))
FRAMEWORKS = ("jax-xla", "jax-im2col", "jax-auto", "keras-tf", "torch")
PEERS = ("keras-tf", "torch")
# (mode, image size, batch, rounds): the test and example shapes, plus one 224 forward.
CASES = [
    ("forward", 32, 16, 8),
    ("forward", 32, 32, 6),
    ("forward", 64, 16, 5),
    ("forward", 64, 32, 4),
    ("train", 32, 16, 5),
    ("train", 32, 32, 4),
    ("train", 64, 16, 3),
    ("train", 64, 32, 3),
    ("forward", 224, 4, 2),
]

RESULTS: dict[tuple[str, int, int, str], float] = {}  # (mode, size, batch, framework) -> img/s
_RUNNERS: dict[tuple, object] = {}


def _data(size: int, batch: int):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    labels = (np.arange(batch) % NUM_CLASSES).astype(np.int32)
    return images, labels


# ---------------------------------------------------------------- imgcls_jax


def _jax_runner(impl: str, mode: str, size: int, batch: int):
    images, labels = _data(size, batch)
    model = VGG(
        "vgg16",
        include_top=False,
        pooling="avg",
        num_classes=NUM_CLASSES,
        input_shape=(size, size, 3),
        conv_impl=impl,
        rngs=nnx.Rngs(params=0, dropout=1),
    )
    x = jnp.asarray(images)
    if mode == "forward":
        graph, state = nnx.split(model)
        forward = jax.jit(lambda state, x: nnx.merge(graph, state)(x))
        return lambda: forward(state, x).block_until_ready()
    split = split_model(model, trainable_layers(model, "all"))
    optimizer = make_optimizer("adam", LR)
    step = make_train_step(split, optimizer)
    holder = {"state": init_state(split, optimizer)}
    batch_ = {"image": x, "label": jnp.asarray(labels)}

    def run():
        holder["state"], metrics = step(holder["state"], split.frozen, batch_)
        jax.block_until_ready(metrics["loss"])

    return run


# ---------------------------------------------------------------- Keras 3, TF backend


def _keras_runner(mode: str, size: int, batch: int):
    keras = pytest.importorskip("keras")
    if keras.backend.backend() != "tensorflow":
        pytest.skip(f"Keras backend is {keras.backend.backend()!r}; set KERAS_BACKEND=tensorflow")
    images, labels = _data(size, batch)
    keras.utils.set_random_seed(0)
    base = keras.applications.VGG16(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
    )
    model = keras.Sequential([base, keras.layers.Dense(NUM_CLASSES)])
    # jit_compile=False: TF's own (oneDNN) kernels, Keras's default on a CPU-only machine.
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    import tensorflow as tf

    x, y = tf.constant(images), tf.constant(labels)
    if mode == "forward":
        return lambda: model.predict_on_batch(x)
    return lambda: model.train_on_batch(x, y)


# ---------------------------------------------------------------- PyTorch


def _torch_runner(mode: str, size: int, batch: int):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    images, labels = _data(size, batch)
    torch.manual_seed(0)
    layers, cin = [], 3
    for n_conv, filters in zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)):
        for _ in range(n_conv):
            layers += [nn.Conv2d(cin, filters, 3, padding=1), nn.ReLU(inplace=True)]
            cin = filters
        layers.append(nn.MaxPool2d(2, 2))
    model = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, NUM_CLASSES))
    model = model.to(memory_format=torch.channels_last)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels).long()
    if mode == "forward":
        model.eval()

        def forward():
            with torch.inference_mode():
                return model(x)

        return forward
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    loss_fn = nn.CrossEntropyLoss()

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def _runner(framework: str, mode: str, size: int, batch: int):
    key = (framework, mode, size, batch)
    if key not in _RUNNERS:
        _RUNNERS.clear()  # keep one model alive at a time (memory)
        if framework.startswith("jax-"):
            _RUNNERS[key] = _jax_runner(framework[4:], mode, size, batch)
        elif framework == "keras-tf":
            _RUNNERS[key] = _keras_runner(mode, size, batch)
        else:
            _RUNNERS[key] = _torch_runner(mode, size, batch)
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
