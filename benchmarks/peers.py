"""Step runners for the speed benchmarks: imgcls_jax and its peers (PyTorch, Keras 3), of VGG16
and of one model of every other family (:data:`FAMILY_MODELS`; each model's Keras application in
:data:`KERAS_APPS`, its PyTorch peer in :data:`TORCH_PEERS`: torchvision's model where torchvision
has the architecture, else timm's, else none and the PyTorch rows skip saying so).

Every runner builds the model (``arch``, VGG16 by default) without top + global average pooling +
Dense(``NUM_CLASSES``) logits with random weights, makes one synthetic batch already on the
framework's device (images in [0, 255], labels ``i % NUM_CLASSES``), and returns a zero-argument
callable that runs one step and waits for it. Modes:

* ``forward``: inference logits of the batch (imgcls_jax: its jitted eval step, which also
  masks, sums the loss and counts correct predictions).
* ``train``: one full step: forward, cross-entropy, backward through every layer, Adam update.
* ``frozen``: the transfer-learning first phase: base frozen (no backward through it, no
  optimizer state), the Dense head trained with Adam.

Peers that are not installed raise ``pytest.skip`` with the reason; nothing is faked. Only the
imgcls_jax runner is imported by default: torch and keras load when their runner is built.

Both sides get the same batch (the same pixels: uint8 for imgcls_jax, whose step applies the
model's preprocessing, float32 in [0, 255] for PyTorch, which has none), the same classes and the
same optimizer (Adam, lr ``LR``, betas 0.9/0.999, eps 1e-7 as Keras and ``make_optimizer``). The
PyTorch peer gets what a PyTorch user would switch on: ``cudnn.benchmark`` (cuDNN picks its
convolution algorithms by timing them, as XLA autotunes), the fused Adam, channels_last, bf16
autocast on a GPU, ``torch.compile(dynamic=False)`` (one static graph per batch size, as XLA
compiles). Each runner's ``run.settings`` says what it ran.
"""

from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass, field

import numpy as np
import pytest

NUM_CLASSES = 5
LR = 1e-4
ADAM_EPS = 1e-7  #: Keras's and imgcls_jax's make_optimizer default (PyTorch's is 1e-8)
MODES = ("forward", "train", "frozen")


def repeated(run, times: int):
    """``run`` itself, or a callable that calls it ``times`` times: k steps from Python, for a
    framework without one execution of several steps (Keras on JAX, PyTorch)."""
    return run if times == 1 else lambda: [run() for _ in range(times)]


def synthetic_batch(size: int, batch: int):
    """``(images float32[B, size, size, 3] in [0, 255], labels int32[B])``, the same every call."""
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)
    labels = (np.arange(batch) % NUM_CLASSES).astype(np.int32)
    return images, labels


# ---------------------------------------------------------------- imgcls_jax


def jax_runner(
    mode: str,
    size: int,
    batch: int,
    *,
    impl: str = "auto",
    dtype: str = "float32",
    arch: str = "vgg16",
    steps_per_execution: int = 1,
):
    """``(run, step, args)``: ``run()`` does one step; ``step(*args)`` is the jitted function it
    calls (for XLA's cost analysis). Images are uint8 on the default device, as the pipeline
    delivers them; the model's preprocessing runs inside the step. ``impl``: ``conv_impl`` (and
    ``depthwise_impl`` unless ``"auto"``) for the families that take them.
    ``steps_per_execution`` k (train modes): ``run()`` does k steps in one execution, on k
    references to the batch (``make_train_step(..., steps_per_execution=k)``)."""
    import jax
    import jax.numpy as jnp

    from imgcls_jax.models import create_model
    from imgcls_jax.train import (
        init_state,
        make_eval_step,
        make_optimizer,
        make_train_step,
        split_model,
        trainable_layers,
    )

    images, labels = synthetic_batch(size, batch)
    options = _impl_options(arch, impl)
    model = create_model(
        arch, num_classes=NUM_CLASSES, pooling="avg", input_shape=(size, size, 3), dtype=dtype, **options
    )
    x = jax.device_put(jnp.asarray(np.round(images).astype(np.uint8)))
    y = jax.device_put(jnp.asarray(labels))
    if mode == "forward":
        split = split_model(model, trainable_layers(model, "all"))
        step = make_eval_step(split)
        args = (split.trainable, split.frozen, {"image": x, "label": y, "mask": jnp.ones((batch,), bool)})

        def forward():
            jax.block_until_ready(step(*args)["correct"])

        forward.model = model
        return forward, step, args
    split = split_model(model, trainable_layers(model, "all" if mode == "train" else "head"))
    optimizer = make_optimizer("adam", LR)
    step = make_train_step(split, optimizer, steps_per_execution=steps_per_execution)
    holder = {"state": init_state(split, optimizer)}
    data = {"image": x, "label": y}
    if steps_per_execution > 1:
        data = [data] * steps_per_execution

    def run():
        holder["state"], metrics = step(holder["state"], split.frozen, data)
        jax.block_until_ready(metrics["loss"])

    run.model = model  # for the analytic FLOP count (benchmarks.perf.analytic_flops)
    # the cost analysis lowers with a state of the same shapes (the live one is donated)
    return run, step, (init_state(split, optimizer), split.frozen, data)


# ---------------------------------------------------------------- PyTorch


#: The benchmarks' model of each family but VGG (``test_family_step``, the ``families`` section of
#: ``accelerator_run.py``): its first or smallest member, or the one PyTorch's libraries have
#: (EfficientNetV2S: torchvision has no V2-B0; MobileNetV3Large, the usual benchmark of the two;
#: NASNetMobile, though only NASNetLarge has a PyTorch peer: 18x its multiply-adds at 224 px).
FAMILY_MODELS = (
    "resnet50", "resnet50v2", "mobilenetv2", "efficientnetb0", "convnexttiny", "efficientnetv2s",
    "mobilenetv3large", "densenet121", "xception", "inceptionv3", "inceptionresnetv2", "mobilenet",
    "nasnetmobile",
)  # fmt: skip

#: The Keras application each model equals (``keras.applications.<name>``).
KERAS_APPS = {
    "vgg16": "VGG16", "resnet50": "ResNet50", "resnet50v2": "ResNet50V2", "mobilenetv2": "MobileNetV2",
    "efficientnetb0": "EfficientNetB0", "convnexttiny": "ConvNeXtTiny", "efficientnetv2s": "EfficientNetV2S",
    "efficientnetv2b0": "EfficientNetV2B0", "mobilenetv3large": "MobileNetV3Large",
    "mobilenetv3small": "MobileNetV3Small", "densenet121": "DenseNet121", "xception": "Xception",
    "inceptionv3": "InceptionV3", "inceptionresnetv2": "InceptionResNetV2", "mobilenet": "MobileNet",
    "nasnetmobile": "NASNetMobile", "nasnetlarge": "NASNetLarge",
}  # fmt: skip


@dataclass(frozen=True)
class TorchPeer:
    """A model's PyTorch peer: ``library`` ``"torchvision"`` (``torchvision.models.<name>``) or
    ``"timm"`` (``timm.create_model(name)``, the first of ``names`` that this timm registers: timm
    renamed some, e.g. ``xception`` -> ``legacy_xception`` in 0.9), with ``options``; ``note``: how
    it differs from the Keras application, if it does; ``new_head``: Keras's model without top ends
    before torchvision's whole ``classifier`` (MobileNetV3's hidden Linear): that is replaced by one
    Linear, else the last Linear is the head."""

    library: str
    names: tuple[str, ...]
    options: dict = field(default_factory=dict)
    note: str = ""
    new_head: bool = False


#: The PyTorch peer of each model: torchvision's where torchvision has the architecture, else timm's.
TORCH_PEERS = {
    "resnet50": TorchPeer("torchvision", ("resnet50",)),
    "resnet50v2": TorchPeer(
        "timm", ("resnetv2_50",),
        note="pre-activation as Keras's; timm strides in each stage's first block, Keras in its last",
    ),
    "mobilenetv2": TorchPeer("torchvision", ("mobilenet_v2",)),
    "efficientnetb0": TorchPeer("torchvision", ("efficientnet_b0",)),
    "convnexttiny": TorchPeer(
        "torchvision", ("convnext_tiny",), {"stochastic_depth_prob": 0.0}, "no stochastic depth, as Keras"
    ),
    "efficientnetv2s": TorchPeer("torchvision", ("efficientnet_v2_s",)),
    "efficientnetv2b0": TorchPeer(
        "timm", ("tf_efficientnetv2_b0",), note="timm's TensorFlow-compatible port (SAME padding at run time)"
    ),
    "mobilenetv3large": TorchPeer("torchvision", ("mobilenet_v3_large",), new_head=True),
    "mobilenetv3small": TorchPeer("torchvision", ("mobilenet_v3_small",), new_head=True),
    "densenet121": TorchPeer("torchvision", ("densenet121",)),
    "inceptionv3": TorchPeer(
        "torchvision", ("inception_v3",), {"aux_logits": False, "init_weights": False}, "no auxiliary head"
    ),
    "xception": TorchPeer("timm", ("legacy_xception", "xception")),
    "inceptionresnetv2": TorchPeer("timm", ("inception_resnet_v2",)),
    "mobilenet": TorchPeer("timm", ("mobilenetv1_100",)),
    "nasnetlarge": TorchPeer("timm", ("nasnetalarge",)),
}  # fmt: skip

#: Why a model has no PyTorch peer (its PyTorch rows skip with this).
NO_TORCH_PEER = {
    "nasnetmobile": "no PyTorch peer known for nasnetmobile: neither torchvision nor timm has NASNet-A "
    "Mobile (timm has NASNet-A Large: IMGCLS_BENCH_FAMILIES=nasnetlarge)",
}


def image_size(arch: str, size: int) -> int:
    """The side a benchmark of ``arch`` runs at: ``size``, or the model's smallest input side if
    larger (Xception 71, InceptionV3 / InceptionResNetV2 75)."""
    from imgcls_jax.models import model_info

    return max(size, model_info(arch).min_size)


def _impl_options(arch: str, impl: str) -> dict:
    """``conv_impl`` (and ``depthwise_impl`` where not ``"auto"``) for the families that take them."""
    from imgcls_jax.models import model_info
    from imgcls_jax.models.conv import DEPTHWISE_IMPLS

    info, options = model_info(arch), {}
    if info.accepts("conv_impl"):
        options["conv_impl"] = impl
    if impl != "auto" and impl in DEPTHWISE_IMPLS and info.accepts("depthwise_impl"):
        options["depthwise_impl"] = impl
    return options


def _torch_vgg16(nn):
    """VGG16's convolutional base + global average pooling, and a Dense head."""
    layers, cin = [], 3
    for n_conv, filters in zip((2, 2, 3, 3, 3), (64, 128, 256, 512, 512)):
        for _ in range(n_conv):
            layers += [nn.Conv2d(cin, filters, 3, padding=1), nn.ReLU(inplace=True)]
            cin = filters
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), nn.Linear(512, NUM_CLASSES)


def _torch_family(arch: str, nn):
    """``(base, head, what)``: ``arch``'s PyTorch peer (:data:`TORCH_PEERS`) with ``NUM_CLASSES``
    outputs, split into the base (pooled features) and the head (one Linear layer), and what it
    is. Skips (``pytest.skip``) saying why where no peer is known or its library is not installed."""
    peer = TORCH_PEERS.get(arch)
    if peer is None:
        pytest.skip(NO_TORCH_PEER.get(arch, f"no PyTorch peer known for {arch} (peers.TORCH_PEERS)"))
    if peer.library == "timm":
        return _timm_family(arch, peer, nn)
    name, options = peer.names[0], {"weights": None, "num_classes": NUM_CLASSES, **peer.options}
    what = f"torchvision {name}({', '.join(f'{k}={v}' for k, v in options.items())})"
    try:
        import torchvision

        model = getattr(torchvision.models, name)(**options)
    except (ImportError, RuntimeError) as error:  # the PyPI wheel needs the CUDA torch
        from benchmarks import torch_models

        if arch not in torch_models.ARCHS:
            why = "not installed" if isinstance(error, ImportError) else f"does not load ({error})"
            pytest.skip(f"no PyTorch peer installed for {arch}: its peer is torchvision's {name}, and "
                        f"torchvision {why} (pip install torchvision)")  # fmt: skip
        model = torch_models.build(arch, NUM_CLASSES)
        what = f"torchvision's {name} rebuilt in torch.nn (benchmarks/torch_models.py; torchvision: {error})"
    if peer.new_head:
        features = next(m for m in model.classifier.modules() if isinstance(m, nn.Linear)).in_features
        model.classifier = nn.Identity()
        what += f", classifier replaced by Linear({features}, {NUM_CLASSES}) as Keras's model without top"
        return model, nn.Linear(features, NUM_CLASSES), what + (f"; {peer.note}" if peer.note else "")
    return (*_split_last_linear(model, nn), what + (f"; {peer.note}" if peer.note else ""))


def _timm_family(arch: str, peer: TorchPeer, nn):
    """timm's model of ``peer``: base = the model with its classifier reset (pooled features),
    head = a new Linear on them."""
    try:
        import timm
    except (ImportError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        pytest.skip(f"no PyTorch peer installed for {arch}: its peer is timm's {peer.names[0]}, and timm "
                    f"is not installed ({error}; pip install timm)")  # fmt: skip
    name = next((n for n in peer.names if timm.is_model(n)), None)
    if name is None:
        pytest.skip(f"no PyTorch peer installed for {arch}: timm {timm.__version__} has none of {peer.names}")
    model = timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **peer.options)
    model.reset_classifier(0)  # the base ends at the pooled features
    what = f"timm {timm.__version__} {name}(pretrained=False), classifier reset, head Linear("
    what += f"{model.num_features}, {NUM_CLASSES})" + (f"; {peer.note}" if peer.note else "")
    return model, nn.Linear(model.num_features, NUM_CLASSES), what


def _split_last_linear(model, nn):
    """``(base, head)``: ``model`` with its last Linear layer replaced by the identity, and that layer."""
    name, head = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, nn.Identity())
    return model, head


def torch_runner(
    mode: str, size: int, batch: int, *, compile: bool = False, bf16: bool = False, arch: str = "vgg16"
):
    """PyTorch eager (or ``torch.compile``d, static shapes) ``arch`` (VGG16 built here, the others
    from torchvision or timm: :data:`TORCH_PEERS`; skips where none is known or installed),
    channels_last, on CUDA when available, with ``cudnn.benchmark`` and the fused Adam. ``bf16``:
    ``torch.autocast`` to bfloat16 (GPU), parameters float32. The returned ``run`` has
    ``run.settings``: what it runs, for the results."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed (pip install torch)")
    nn = torch.nn
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if bf16 and device == "cpu":
        pytest.skip("bf16 autocast peer only on GPU")
    torch.backends.cudnn.benchmark = True  # cuDNN times its algorithms per shape, as XLA autotunes
    images, labels = synthetic_batch(size, batch)
    torch.manual_seed(0)
    if arch == "vgg16":
        (base, head), what = _torch_vgg16(nn), f"VGG16 built as Keras's ({_VGG_NOTE})"
    else:
        base, head, what = _torch_family(arch, nn)
    model = nn.Sequential(base, head).to(device=device, memory_format=torch.channels_last)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).to(device).contiguous(memory_format=torch.channels_last)
    y = torch.from_numpy(labels).long().to(device)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    compiled = (lambda module: torch.compile(module, dynamic=False)) if compile else (lambda module: module)
    settings = {
        "model": what,
        "device": device, "memory_format": "channels_last", "cudnn.benchmark": True,
        "autocast": "bfloat16" if bf16 else None, "torch": torch.__version__,
        "compile": "torch.compile(dynamic=False), default mode" if compile else "eager",
        "input": "float32 NCHW channels_last in [0, 255] on the device (no preprocessing)",
    }  # fmt: skip
    if mode == "forward":
        model.eval()
        run = _torch_forward(torch, compiled(model), x, autocast, sync)
    else:
        run = _torch_train(torch, mode, base, head, model, compiled, x, y, autocast, sync)
        settings["optimizer"] = run.optimizer
    run.settings = settings
    return run


_VGG_NOTE = "13 conv + ReLU, max pooling, global average pooling, Dense head"


def _torch_forward(torch, forward, x, autocast, sync):
    def run():
        with torch.inference_mode(), autocast:
            forward(x)
        sync()

    return run


def _torch_train(torch, mode, base, head, model, compiled, x, y, autocast, sync):
    """One step of the full train (``mode="train"``) or of the head on frozen base features."""
    nn = torch.nn
    if mode == "frozen":
        base.requires_grad_(False)
        base.eval()
    else:
        model.train()
    trained = head if mode == "frozen" else model
    # the fused Adam (one kernel group for every parameter), as the PyTorch docs advise on CUDA
    optimizer = torch.optim.Adam(trained.parameters(), lr=LR, eps=ADAM_EPS, fused=True)
    loss_fn = nn.CrossEntropyLoss()
    features_of = compiled(base) if mode == "frozen" else base
    logits_of = compiled(model) if mode == "train" else model

    def run():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if mode == "frozen":
                with torch.no_grad():
                    features = features_of(x)
                logits = head(features)
            else:
                logits = logits_of(x)
            loss = loss_fn(logits.float(), y)
        loss.backward()
        optimizer.step()
        sync()

    run.optimizer = f"torch.optim.Adam(lr={LR}, eps={ADAM_EPS}, fused=True)"
    return run


# ---------------------------------------------------------------- Keras 3


def keras_runner(
    mode: str, size: int, batch: int, *, bf16: bool = False, arch: str = "vgg16", steps_per_execution: int = 1
):
    """Keras 3 ``applications.<arch>`` (VGG16 by default) + Dense on the configured backend
    (``KERAS_BACKEND``; the benchmarks' conftest picks tensorflow when TF is installed, else jax). TF backend:
    ``jit_compile=False`` (TF's oneDNN kernels, Keras's default on CPU); JAX backend: jitted.
    ``bf16``: the ``mixed_bfloat16`` policy. ``steps_per_execution`` k > 1 (train): ``run()`` does
    k steps as ``fit`` does with ``compile(steps_per_execution=k)``: on TensorFlow one call of
    the train function (a ``tf.while_loop`` over k steps) on an iterator repeating the batch; on
    JAX, whose Keras trainer loops over its jitted step in Python, k ``train_on_batch`` calls."""
    keras = pytest.importorskip("keras", reason="Keras not installed (pip install keras)")
    backend = keras.backend.backend()
    images, labels = synthetic_batch(size, batch)
    keras.utils.set_random_seed(0)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if bf16 else "float32")
    try:
        base = getattr(keras.applications, KERAS_APPS[arch])(
            weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
        )
        model = keras.Sequential([base, keras.layers.Dense(NUM_CLASSES, dtype="float32")])
    finally:
        keras.mixed_precision.set_global_policy(previous)
    if mode == "frozen":
        base.trainable = False
    model.compile(
        optimizer=keras.optimizers.Adam(LR),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=backend != "tensorflow",
        steps_per_execution=steps_per_execution if backend == "tensorflow" else 1,
    )
    if backend == "tensorflow":
        import tensorflow as tf

        x, y = tf.constant(images), tf.constant(labels)
    else:  # already on the backend's default device
        x, y = keras.ops.convert_to_tensor(images), keras.ops.convert_to_tensor(labels)
    if mode == "forward":
        return lambda: np.asarray(model.predict_on_batch(x))
    if steps_per_execution == 1 or backend != "tensorflow":
        return repeated(lambda: np.asarray(model.train_on_batch(x, y)), steps_per_execution)
    model.make_train_function()
    batches = iter(tf.data.Dataset.from_tensors((x, y)).repeat())
    return lambda: np.asarray(model.train_function(batches)["loss"])


@contextlib.contextmanager
def no_gc():
    """Python's garbage collector collected, then off within the block (as ``timeit`` does), for
    timed steps: the suite's process holds every framework's objects, and a full collection took
    up to 1.2 s by its last cases (2026-12-07), landing in whichever framework's step it fell."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def subprocess_times(
    framework: str,
    mode: str,
    size: int,
    batch: int,
    rounds: int,
    *,
    arch: str = "vgg16",
    warmup: int = 1,
    steps_per_execution: int = 1,
) -> list[float]:
    """Seconds per round of ``framework`` measured in a process of its own: ``"keras-jax"``
    (Keras 3 on its JAX backend, ``jit_compile=True``: Keras picks its backend once per process,
    and the suite's is TensorFlow) or ``"torch"`` (PyTorch: alone, it shares no OpenMP runtime or
    threads with imgcls_jax; until commit 54d8e25 imgcls_jax's oneDNN kernels left that runtime at
    one thread, and PyTorch's steps in the suite's process took 1.3-2x as long: benchmarks/RESULTS.md).
    ``warmup`` untimed rounds, then ``rounds`` timed ones,
    each of ``steps_per_execution`` steps (:func:`keras_runner`, :func:`repeated`). Skips if the
    framework is not installed."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    if framework == "keras-jax":
        pytest.importorskip("keras", reason="Keras not installed (pip install keras)")
    else:
        pytest.importorskip("torch", reason="PyTorch not installed (pip install torch)")
    root = Path(__file__).resolve().parents[1]
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": path}
    command = [sys.executable, "-m", "benchmarks.peers", framework, mode, arch]
    command += [str(v) for v in (size, batch, rounds, warmup, steps_per_execution)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800, cwd=root)
    if done.returncode != 0:
        raise RuntimeError(f"{framework} failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["times"]


def _main(argv=None) -> None:
    """``python -m benchmarks.peers FRAMEWORK MODE ARCH SIZE BATCH ROUNDS [WARMUP [STEPS]]``
    (``FRAMEWORK``: ``keras-jax``, Keras on the backend ``KERAS_BACKEND`` names, or ``torch``):
    time its round of ``STEPS`` (default 1) steps after ``WARMUP`` (default 1) untimed ones, print
    ``{"times": [s, ...]}`` as the last line."""
    import json
    import sys
    import time

    framework, mode, arch, size, batch, rounds, *more = argv or sys.argv[1:]
    warmup, steps = (int(v) for v in [*more, 1, 1][:2])
    if framework == "torch":
        run = repeated(torch_runner(mode, int(size), int(batch), arch=arch), steps)
    else:
        run = keras_runner(mode, int(size), int(batch), arch=arch, steps_per_execution=steps)
    for _ in range(warmup):
        run()
    times = []
    with no_gc():  # as test_cpu_speed.py times the frameworks in its own process
        for _ in range(int(rounds)):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
    print(json.dumps({"times": times}))


if __name__ == "__main__":
    _main()
