"""The same protocol, two frameworks, one table: flowers5 from scratch with Keras 3 and imgcls_jax.

Opt-in (not part of ``pytest benchmarks/``; tens of minutes per run on a 2-core CPU). From the
repository root::

    nice -n 10 .venv/bin/python -m benchmarks.reference_keras --model vgg16 --seed 1 \
        --out runs/reference_keras/vgg16_s1
    .venv/bin/python -m benchmarks.reference_keras --summarize runs/reference_keras/*/results.json

The protocol is ``examples/configs/flowers5_scratch_cpu.json`` with ``--epochs`` (12) epochs and
``--model`` (:data:`MODELS`: its Keras application and its default size, 32x32 for VGG16, 64x64
for MobileNetV2) from scratch, batch 32, the 65/10/25 stratified split of ``imgcls_jax.data``
(``scan_folder`` / ``split_records`` with seed ``--split-seed``, 0; written once as a pre-split
folder of links, ``OUT/split/{train,val,test}/<class>/``, which both frameworks read, so that the
split stays the same whatever ``--seed`` is), flip / rotation 0.05 / zoom 0.1 / translation 0.1
augmentation (reflect fill), global average pooling -> Dense(256, relu) -> Dropout(0.5) ->
Dense(5), Adam 2e-4 with 2 epochs of linear warmup then cosine decay to 0, label smoothing 0.1;
the best epoch by validation accuracy is evaluated on the test split (accuracy = the confusion
matrix's trace / its sum). ``--seed`` seeds everything else on both sides: the initial weights,
the shuffling, the augmentation, dropout (imgcls_jax's ``TrainConfig.seed``; Keras's
``set_random_seed``, the shuffle's seed, and the augmentation layers' seeds ``10 * seed + 1..4``).

Keras trains on the manifest's own files: ``tf.data`` decoding and resizing as
``image_dataset_from_directory`` does, the uint8-equivalent float images cached in memory, the
last incomplete batch dropped (as imgcls_jax does), ``RandomFlip`` / ``RandomRotation`` /
``RandomZoom`` / ``RandomTranslation`` in the pipeline, the application's ``preprocess_input`` in
the model, ``CosineDecay(warmup_target=, warmup_steps=)``,
``CategoricalCrossentropy(label_smoothing=0.1)``, ``ModelCheckpoint(save_best_only=True)`` on
``val_accuracy``. ``--keras-augment imgcls_jax`` augments Keras's training images with
imgcls_jax's own op instead of the ``Random*`` layers: Keras's layers resample an image once per
layer (rotation, zoom, translation: three bilinear interpolations), imgcls_jax composes the three
into one, so the two pipelines draw the same transformations but Keras's images come out blurrier.

Where the time goes, for each: the whole epoch (wall time between the ends of consecutive
epochs: training, validation, checkpoint), its training part, and (unless ``--accuracy-only``)
the input pipeline alone (one augmented training epoch iterated to host arrays, cache warm) and
the train step alone (the run's own compiled step on one fixed batch, times the steps of an
epoch). The machine's load average is recorded beside the numbers (the 2 cores may be shared).

``--summarize`` reads several runs' ``results.json`` and prints (or puts into ``--results-md``)
one table of them: each run's test accuracy on both sides, and per model the mean and the sample
standard deviation over the seeds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "configs" / "flowers5_scratch_cpu.json"
MARK_START, MARK_END = "<!-- reference_keras:start -->", "<!-- reference_keras:end -->"
SEEDS_START, SEEDS_END = "<!-- reference_keras_seeds:start -->", "<!-- reference_keras_seeds:end -->"
#: The models the protocol runs: registry name -> (``keras.applications`` class, the module whose
#: ``preprocess_input`` the Keras model applies, the default image side in pixels).
MODELS = {
    "vgg16": ("VGG16", "vgg16", 32),
    "vgg19": ("VGG19", "vgg19", 32),
    "resnet50": ("ResNet50", "resnet50", 64),
    "mobilenetv2": ("MobileNetV2", "mobilenet_v2", 64),
    "efficientnetb0": ("EfficientNetB0", "efficientnet", 64),
}
log = logging.getLogger("reference_keras")


def protocol(data: Path, out: Path, epochs: int, model: str = "vgg16", seed: int = 0, size=None,
             learning_rate: float | None = None, bn_momentum: float | None = None,
             steps_per_execution: int = 1):  # fmt: skip
    """The imgcls_jax ``TrainConfig`` of the protocol: ``CONFIG`` with ``epochs`` epochs, ``model``
    at ``size`` (default: its :data:`MODELS` size), ``seed``, reading the pre-split folder
    ``data``, Adam's peak ``learning_rate`` (default ``CONFIG``'s, 2e-4), the base's BatchNorm
    momentum ``bn_momentum`` (default: the application's own) and ``steps_per_execution`` (Keras
    compiles with the same)."""
    from imgcls_jax import TrainConfig

    raw = json.loads(CONFIG.read_text())
    raw.update(model=model, seed=seed, image_size=size or MODELS[model][2])
    raw.update(data=str(data), run_dir=str(out / "imgcls_jax"))
    raw["phases"][0]["epochs"] = epochs
    if learning_rate is not None:
        raw["phases"][0]["learning_rate"] = learning_rate
    if bn_momentum is not None:
        raw["bn_momentum"] = bn_momentum
    raw["steps_per_execution"] = steps_per_execution
    return TrainConfig.from_json(json.dumps(raw))


def presplit_folder(source: str, out: Path, split_seed: int) -> Path:
    """``out/split/{train,val,test}/<class>/<file>``: links to ``source``'s images, split as
    ``CONFIG``'s fractions with ``split_seed`` (``split_records``); made once, then reused (a
    folder of another split is an error)."""
    from imgcls_jax.data import scan_folder, split_records

    raw = json.loads(CONFIG.read_text())
    found = scan_folder(source, exclude=raw["exclude"])
    records = split_records(found.records, raw["splits"], split_seed)
    root, stamp = out / "split", {"source": str(Path(source).resolve()), "split_seed": split_seed}
    if (root / "split.json").is_file():
        if json.loads((root / "split.json").read_text()) != stamp:
            raise RuntimeError(f"{root} holds another split ({(root / 'split.json').read_text()}); remove it")
        return root
    for r in records:
        link = root / r.split / found.class_names[r.label] / Path(r.path).name
        link.parent.mkdir(parents=True, exist_ok=True)
        if link.is_symlink() or link.exists():
            raise RuntimeError(f"{link}: two images of one class share a file name")
        link.symlink_to(Path(r.path).resolve())
    (root / "split.json").write_text(json.dumps(stamp))
    return root


def make_manifest(config, out: Path):
    """The split both frameworks train on (the pre-split folder ``config.data``):
    ``(records, class_names)``, written to ``out/manifest.csv``."""
    from imgcls_jax.data import scan_folder, write_manifest

    found = scan_folder(config.data, exclude=config.exclude)
    if not found.presplit:
        raise RuntimeError(f"{config.data}: not a pre-split folder (see presplit_folder)")
    write_manifest(out / "manifest.csv", found.records, found.class_names, root=found.root)
    return found.records, found.class_names


def load() -> float:
    return os.getloadavg()[0]


# ------------------------------------------------------------------------------------ imgcls_jax
def run_imgcls_jax(config, out: Path) -> dict:
    """Train and evaluate with ``fit`` / ``evaluate_run``; the numbers of the table."""
    from imgcls_jax import evaluate_run, fit

    ends, loads = [], []

    def timer(epoch, row):
        ends.append(time.perf_counter())
        loads.append(load())

    shutil.rmtree(config.run_dir, ignore_errors=True)  # from scratch each time
    start = time.perf_counter()
    result = fit(config, resume=False, callbacks=[timer])
    run = Path(result.run_dir)
    same = (run / "manifest.csv").read_bytes() == (out / "manifest.csv").read_bytes()
    if not same:
        raise RuntimeError(f"{run}/manifest.csv differs from {out}/manifest.csv: not the same split")
    report = evaluate_run(run, split="test", which="best")
    history = result.history
    best = history[json.loads((report.out_dir / "metrics.json").read_text())["epoch"]]  # best/'s epoch
    steps = history[0]["step"]
    train_s = [steps * config.batch_size / r["images_per_s"] for r in history]
    return {
        "test_accuracy": float(np.trace(report.confusion) / report.confusion.sum()),
        "test_correct": int(np.trace(report.confusion)), "test_count": int(report.confusion.sum()),
        "best_val_accuracy": best["val_accuracy"], "best_epoch": best["epoch"],
        "epoch_s": np.diff([start, *ends]).tolist(), "train_s": train_s, "load": loads,
        "steps_per_epoch": steps, "report": report.report_text, "confusion": report.confusion.tolist(),
    }  # fmt: skip


def imgcls_jax_input_and_step(config, out: Path, repeats: int = 2) -> dict:
    """Seconds of one augmented training epoch of the input pipeline alone (cache warm), and of
    the train step alone on one fixed batch, times the steps of an epoch."""
    import jax

    from imgcls_jax.models.registry import model_from_config
    from imgcls_jax.train.inputs import run_inputs
    from imgcls_jax.train.optim import OptimizerSpec
    from imgcls_jax.train.state import init_state, split_model
    from imgcls_jax.train.steps import make_train_step

    names, train, _ = run_inputs(config, out, write=False)
    input_s = _pipeline_seconds(lambda epoch: train.epoch(epoch), repeats)
    batch = next(iter(train.epoch(0)))
    model = model_from_config(config, len(names), weights=None, input_size=config.image_size)
    phase = config.phases[0]
    spec, hyper = OptimizerSpec.for_phase(phase, len(train), model.head_layers)
    split = split_model(model, model.trainable_layers(phase.trainable))
    step = make_train_step(
        split, spec, hyper=hyper, label_smoothing=config.label_smoothing, num_classes=len(names),
        dropout_key=jax.random.key(0),
    )  # fmt: skip
    state, data = init_state(split, spec.build(hyper)), jax.device_put(batch)
    state, metrics = step(state, split.frozen, data)  # compile
    jax.block_until_ready(metrics["loss"])
    start, n = time.perf_counter(), len(train)
    for _ in range(n):
        state, metrics = step(state, split.frozen, data)
    jax.block_until_ready(metrics["loss"])
    return {"input_s": input_s, "step_s": time.perf_counter() - start}


def _pipeline_seconds(epoch_batches, repeats: int) -> float:
    """Median seconds to iterate epochs ``1..repeats`` of a pipeline (epoch 0 fills the cache)."""
    for _ in epoch_batches(0):
        pass
    times = []
    for epoch in range(1, repeats + 1):
        start = time.perf_counter()
        for _ in epoch_batches(epoch):
            pass
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# ----------------------------------------------------------------------------------------- Keras
def keras_augmentation(config, kind: str = "layers"):
    """``batch -> augmented batch`` for Keras's training split: ``"layers"``, Keras's
    ``RandomFlip`` / ``RandomRotation`` / ``RandomZoom`` / ``RandomTranslation`` in a
    ``Sequential`` (what a Keras user writes; each of the last three resamples the image, so a
    training image is interpolated three times), or ``"imgcls_jax"``, imgcls_jax's own op
    (:func:`imgcls_jax.data.augment.augment_batch`: the same transformations composed into one
    resampling), each image with its own seed from ``tf.data.Dataset.random`` (``10 * seed +
    5``, redrawn each epoch). Returns a function of ``(images, seeds)``; ``seeds`` is int64[B, 2]."""
    import keras

    a, s = config.augment, 10 * config.seed
    if kind == "imgcls_jax":
        from imgcls_jax.data.augment import augment_batch

        return lambda images, seeds: augment_batch(images, seeds, a)
    if kind != "layers":
        raise ValueError(f"unknown Keras augmentation {kind!r}; expected 'layers' or 'imgcls_jax'")
    layers = keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=s + 1),
        keras.layers.RandomRotation(a.rotation, fill_mode=a.fill_mode, seed=s + 2),
        keras.layers.RandomZoom(a.zoom, fill_mode=a.fill_mode, seed=s + 3),
        keras.layers.RandomTranslation(a.translation, a.translation, fill_mode=a.fill_mode, seed=s + 4),
    ])  # fmt: skip
    return lambda images, seeds: layers(images, training=True)


def keras_datasets(records, class_names, config, augmentation: str = "layers"):
    """``{split: tf.data.Dataset}`` of ``(float32[B, S, S, 3] in [0, 255], one-hot labels)``:
    decoded and resized as ``image_dataset_from_directory`` does, cached; the training split
    shuffled, batched without its last incomplete batch and augmented (``augmentation``: see
    :func:`keras_augmentation`)."""
    import tensorflow as tf

    size, k = config.image_size, len(class_names)
    augment = keras_augmentation(config, augmentation)

    def decode(path, label):
        image = tf.io.decode_image(tf.io.read_file(path), channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size), method="bilinear"), tf.one_hot(label, k)

    out = {}
    for split in ("train", "val", "test"):
        chosen = [r for r in records if r.split == split]
        ds = tf.data.Dataset.from_tensor_slices(([r.path for r in chosen], [r.label for r in chosen]))
        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE).cache()
        if split == "train":
            ds = ds.shuffle(len(chosen), seed=config.seed, reshuffle_each_iteration=True)
            ds = ds.batch(config.batch_size, drop_remainder=True)
            seeds = tf.data.Dataset.random(seed=10 * config.seed + 5, rerandomize_each_iteration=True)
            ds = tf.data.Dataset.zip(ds, seeds.batch(2 * config.batch_size))
            ds = ds.map(lambda xy, seed: (augment(xy[0], tf.reshape(seed, (-1, 2))), xy[1]),
                        num_parallel_calls=tf.data.AUTOTUNE)  # fmt: skip
        else:
            ds = ds.batch(config.eval_batch_size or config.batch_size)
        out[split] = ds.prefetch(tf.data.AUTOTUNE)
    return out


def keras_model(config, num_classes: int, steps_per_epoch: int):
    """``keras.applications.<MODELS[model]>(include_top=False, weights=None, pooling="avg")`` +
    Dense(256, relu) + Dropout + Dense(k, softmax), its module's ``preprocess_input`` inside;
    Adam with CosineDecay and its warmup. With ``config.bn_momentum``, every BatchNormalization
    layer of the base gets that ``momentum`` (as imgcls_jax's ``TrainConfig.bn_momentum``), and
    their count must equal imgcls_jax's."""
    import keras

    size, phase = config.image_size, config.phases[0]
    application, module, _ = MODELS[config.model]
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(getattr(keras.applications, module).preprocess_input)(inputs)
    base = getattr(keras.applications, application)(
        include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3)
    )
    if config.bn_momentum is not None:
        norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
        ours = imgcls_jax_bn_layers(config)
        if len(norms) != ours:
            raise RuntimeError(f"Keras's base has {len(norms)} BatchNormalization layers; ours {ours}")
        for layer in norms:
            layer.momentum = config.bn_momentum
    x = base(x)
    for units in config.head_units:
        x = keras.layers.Dense(units, activation="relu")(x)
        x = keras.layers.Dropout(config.dropout)(x)
    model = keras.Model(inputs, keras.layers.Dense(num_classes, activation="softmax")(x))
    total, warmup = phase.epochs * steps_per_epoch, int(round(phase.warmup_epochs * steps_per_epoch))
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=total - warmup, alpha=0.0, warmup_target=phase.learning_rate, warmup_steps=warmup
    )
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=config.label_smoothing),
        metrics=["accuracy"],
        steps_per_execution=config.steps_per_execution,
    )
    return model


def imgcls_jax_bn_layers(config) -> int:
    """How many BatchNorm layers of imgcls_jax's base ``config.bn_momentum`` sets (the model built
    abstractly: shapes, no arrays)."""
    from flax import nnx

    from imgcls_jax.models.registry import model_from_config

    return len(nnx.eval_shape(lambda: model_from_config(config, 2, weights=None)).base_batchnorms())


def run_keras(config, records, class_names, out: Path, augmentation: str = "layers") -> dict:
    """Train, keep the best epoch by val_accuracy, evaluate it on the test split
    (``augmentation``: see :func:`keras_augmentation`)."""
    import keras
    from sklearn.metrics import classification_report, confusion_matrix

    keras.utils.set_random_seed(config.seed)
    data = keras_datasets(records, class_names, config, augmentation)
    steps = sum(r.split == "train" for r in records) // config.batch_size
    model = keras_model(config, len(class_names), steps)
    best_path = out / "keras" / "best.weights.h5"
    best_path.parent.mkdir(parents=True, exist_ok=True)
    timer = _keras_timer_class()()
    checkpoint = keras.callbacks.ModelCheckpoint(
        best_path, monitor="val_accuracy", mode="max", save_best_only=True, save_weights_only=True
    )
    start = time.perf_counter()
    history = model.fit(
        data["train"], validation_data=data["val"], epochs=config.phases[0].epochs,
        callbacks=[checkpoint, timer], verbose=2,
    ).history  # fmt: skip
    model.load_weights(best_path)
    labels = np.concatenate([np.argmax(y, -1) for _, y in data["test"]])
    predicted = np.argmax(model.predict(data["test"], verbose=0), -1)
    matrix = confusion_matrix(labels, predicted, labels=range(len(class_names)))
    val = history["val_accuracy"]
    best = int(np.argmax(val))  # the first of equal ones, as ModelCheckpoint keeps
    return {
        "test_accuracy": float(np.trace(matrix) / matrix.sum()), "test_correct": int(np.trace(matrix)),
        "test_count": int(matrix.sum()), "best_val_accuracy": float(val[best]), "best_epoch": best,
        "epoch_s": np.diff([start, *timer.ends]).tolist(), "train_s": timer.train_s, "load": timer.loads,
        "steps_per_epoch": steps, "jit_compile": bool(model.jit_compile),
        "report": classification_report(labels, predicted, target_names=class_names, digits=4),
        "confusion": matrix.tolist(), "model": model, "data": data,
    }  # fmt: skip


def _keras_timer_class():
    import keras

    class Timer(keras.callbacks.Callback):
        """Epoch ends (after every other callback), the training part of each epoch, the load."""

        def __init__(self):
            super().__init__()
            self.ends, self.train_s, self.loads = [], [], []

        def on_epoch_begin(self, epoch, logs=None):
            self.begin = time.perf_counter()

        def on_test_begin(self, logs=None):
            self.train_s.append(time.perf_counter() - self.begin)

        def on_epoch_end(self, epoch, logs=None):
            self.ends.append(time.perf_counter())
            self.loads.append(load())

    return Timer


def keras_input_and_step(model, data, steps: int, repeats: int = 2) -> dict:
    """As :func:`imgcls_jax_input_and_step`, for Keras: the augmented training dataset iterated
    alone, and ``fit``'s own train function on one fixed batch (``steps`` steps, after one warm
    epoch)."""
    import tensorflow as tf

    train = data["train"]
    input_s = _pipeline_seconds(lambda epoch: (b for b in train.as_numpy_iterator()), repeats)
    x, y = next(iter(train))
    fixed = tf.data.Dataset.from_tensors((x, y)).repeat()
    model.fit(fixed, steps_per_epoch=steps, epochs=1, verbose=0)  # warm
    start = time.perf_counter()
    model.fit(fixed, steps_per_epoch=steps, epochs=1, verbose=0)
    return {"input_s": input_s, "step_s": time.perf_counter() - start}


# ----------------------------------------------------------------------------------------- table
def _median(values, skip_first=True) -> float:
    return statistics.median(values[1:] if skip_first and len(values) > 1 else values)


def table(results: dict, meta: dict) -> str:
    """The markdown section of one run (both frameworks)."""
    j, k = results["imgcls_jax"], results["keras"]

    def row(name, fn, fmt):
        return f"| {name} | {fmt(fn(j))} | {fmt(fn(k))} | {fn(j) / fn(k):.2f} |"

    pct, sec = (lambda v: f"{100 * v:.2f}%"), (lambda v: f"{v:.1f} s")
    size = meta.get("image_size", 32)
    lines = [
        f"## The same protocol, two frameworks ({meta.get('model', 'vgg16')}, flowers5, {size}x{size}, "
        f"from scratch, seed {meta.get('seed', 0)}), {meta['date']}", "",
        f"`{meta['command']}`; {meta['machine']}; load average {meta['load_start']:.1f} at the start, "
        f"{meta['load_end']:.1f} at the end (during the epochs: imgcls_jax {min(j['load']):.1f}-"
        f"{max(j['load']):.1f}, Keras {min(k['load']):.1f}-{max(k['load']):.1f}). {meta['versions']}; "
        f"Keras's `jit_compile=\"auto\"` resolved to {k['jit_compile']}. Split: {meta['split']}.", "",
        "| | imgcls_jax | Keras 3 (TF backend) | ratio |", "|---|---|---|---|",
        f"| test accuracy (trace / {j['test_count']}) | {pct(j['test_accuracy'])} ({j['test_correct']}) | "
        f"{pct(k['test_accuracy'])} ({k['test_correct']}) | |",
        f"| best validation accuracy (epoch) | {pct(j['best_val_accuracy'])} ({j['best_epoch']}) | "
        f"{pct(k['best_val_accuracy'])} ({k['best_epoch']}) | |",
        row("s per epoch (median of epochs 1+)", lambda r: _median(r["epoch_s"]), sec),
        row("of which training", lambda r: _median(r["train_s"]), sec),
        row("of which validation, checkpoint, logging",
            lambda r: _median(r["epoch_s"]) - _median(r["train_s"]), sec),
        row("epoch 0 (compilation, cache filling)", lambda r: r["epoch_s"][0], sec),
    ]  # fmt: skip
    if "input_s" in j and "input_s" in k:
        lines += [
            row("input pipeline alone, one epoch", lambda r: r["input_s"], sec),
            row(f"train step alone x {j['steps_per_epoch']} steps", lambda r: r["step_s"], sec),
        ]
    return "\n".join([*lines, ""])


def _key(run: dict) -> tuple:
    """``(model, image side, epochs, learning rate, BatchNorm momentum, Keras's augmentation)`` of
    a run's ``results.json`` (older runs: VGG16 at 32, 12 epochs, 2e-4; None: the application's
    own momentum; Keras's Random* layers)."""
    m = run["meta"]
    model, size, epochs = m.get("model", "vgg16"), m.get("image_size", 32), m.get("epochs", 12)
    return (
        model,
        size,
        epochs,
        m.get("learning_rate", 2e-4),
        m.get("bn_momentum"),
        m.get("keras_augment", "layers"),
    )


def _schedule(key: tuple) -> str:
    """The "epochs, Adam peak rate" cell of a :func:`_key` (and the BatchNorm momentum if set)."""
    out = f"{key[2]}, {key[3]:g}" + (f", BN momentum {key[4]:g}" if key[4] is not None else "")
    return out + (", Keras augmented by imgcls_jax's op" if key[5] == "imgcls_jax" else "")


def summary(paths) -> str:
    """One markdown table of several runs' ``results.json`` (``paths``): each run, then per model
    and size the mean and sample standard deviation of the test accuracy over its seeds, and
    the difference of the means (imgcls_jax minus Keras, in points)."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    runs.sort(key=lambda r: (_key(r), r["meta"].get("seed", 0)))

    def pct(v):
        return f"{100 * v:.2f}%"

    lines = [
        "| model | size | epochs, Adam peak rate | seed | test, imgcls_jax | test, Keras | best val (epoch), "
        "imgcls_jax | best val (epoch), Keras | s/epoch imgcls_jax / Keras | date, load |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, list] = {}
    for r in runs:
        m, j, k = r["meta"], r["imgcls_jax"], r["keras"]
        key = _key(r)
        groups.setdefault(key, []).append(r)
        lines.append(
            f"| {key[0]} | {key[1]} | {_schedule(key)} | {m.get('seed', 0)} | {pct(j['test_accuracy'])} "
            f"({j['test_correct']}/"
            f"{j['test_count']}) | {pct(k['test_accuracy'])} ({k['test_correct']}/{k['test_count']}) | "
            f"{pct(j['best_val_accuracy'])} ({j['best_epoch']}) | {pct(k['best_val_accuracy'])} "
            f"({k['best_epoch']}) | {_median(j['epoch_s']):.1f} / {_median(k['epoch_s']):.1f} s | "
            f"{m['date']}, {m['load_start']:.1f}-{m['load_end']:.1f} |"
        )
    lines += [
        "", "| model | size | epochs, Adam peak rate | seeds | imgcls_jax mean +- sd | Keras mean +- sd "
        "| difference of means |", "|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for key, rs in groups.items():
        acc = {side: [100 * r[side]["test_accuracy"] for r in rs] for side in ("imgcls_jax", "keras")}
        sd = {side: statistics.stdev(v) if len(v) > 1 else float("nan") for side, v in acc.items()}
        mean = {side: statistics.mean(v) for side, v in acc.items()}
        cells = [f"{mean[side]:.2f} +- {sd[side]:.2f}" for side in ("imgcls_jax", "keras")]
        seeds = ", ".join(str(r["meta"].get("seed", 0)) for r in rs)
        lines.append(
            f"| {key[0]} | {key[1]} | {_schedule(key)} | {seeds} | {cells[0]} | {cells[1]} | "
            f"{mean['imgcls_jax'] - mean['keras']:+.2f} points |"
        )
    return "\n".join([*lines, ""])


def update_results(path: Path, section: str, marks=(MARK_START, MARK_END)) -> None:
    """Put ``section`` between the markers ``marks`` of ``path`` (appended with them the first
    time)."""
    start, end = marks
    text = path.read_text()
    block = f"{start}\n{section}\n{end}"
    if start in text:
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def versions() -> str:
    import flax
    import jax
    import keras
    import optax
    import tensorflow as tf

    return (
        f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
        f"keras {keras.__version__}, tensorflow {tf.__version__}, Python {platform.python_version()}"
    )


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers5"))
    parser.add_argument("--out", default="runs/reference_keras", type=Path)
    parser.add_argument("--model", default="vgg16", choices=sorted(MODELS))
    parser.add_argument("--image-size", type=int, help="default: the model's (see MODELS)")
    parser.add_argument("--seed", default=0, type=int, help="weights, shuffling, augmentation, dropout")
    parser.add_argument("--split-seed", default=0, type=int, help="the train/val/test split's seed")
    parser.add_argument("--epochs", default=12, type=int)
    parser.add_argument("--learning-rate", type=float, help="Adam's peak rate (default the config's, 2e-4)")
    parser.add_argument("--bn-momentum", type=float, help="the base's BatchNorm momentum, both sides")
    parser.add_argument("--keras-augment", default="layers", choices=("layers", "imgcls_jax"),
                        help="Keras: its Random* layers (default) or imgcls_jax's op")  # fmt: skip
    parser.add_argument("--accuracy-only", action="store_true", help="skip the input/step timings")
    parser.add_argument(
        "--steps-per-execution", default=1, type=int,
        help="train steps per execution, both sides (Keras: compile(steps_per_execution=))",
    )  # fmt: skip
    parser.add_argument("--results-md", type=Path, help="put the table into this markdown file")
    parser.add_argument("--summarize", nargs="+", type=Path, metavar="RESULTS_JSON",
                        help="only print (or put into --results-md) the table of these runs")  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarize:
        section = summary(args.summarize)
        if args.results_md:
            update_results(args.results_md, section, (SEEDS_START, SEEDS_END))
        print(section)
        return {}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(), "load_start": load(),
        "command": (f"nice -n {os.nice(0)} " if os.nice(0) else "")  # the niceness it ran at
        + "python -m benchmarks.reference_keras " + " ".join(argv or sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "versions": versions(), "model": args.model, "seed": args.seed, "split_seed": args.split_seed,
    }  # fmt: skip
    data = presplit_folder(args.data, args.out, args.split_seed)
    config = protocol(data, args.out, args.epochs, args.model, args.seed, args.image_size, args.learning_rate,
                      args.bn_momentum, args.steps_per_execution)  # fmt: skip
    meta.update(
        image_size=config.image_size,
        epochs=args.epochs,
        learning_rate=config.phases[0].learning_rate,
        bn_momentum=config.bn_momentum,
        keras_augment=args.keras_augment,
        steps_per_execution=config.steps_per_execution,
    )
    records, class_names = make_manifest(config, args.out)
    counts = {name: sum(r.split == name for r in records) for name in ("train", "val", "test")}
    listing = ", ".join(f"{n} {name}" for name, n in counts.items())
    meta["split"] = f"{listing} images (stratified, seed {args.split_seed})"
    results = {"imgcls_jax": run_imgcls_jax(config, args.out)}
    if not args.accuracy_only:
        results["imgcls_jax"].update(imgcls_jax_input_and_step(config, args.out))
    keras_run = run_keras(config, records, class_names, args.out, args.keras_augment)
    model, keras_data = keras_run.pop("model"), keras_run.pop("data")
    if not args.accuracy_only:
        keras_run.update(keras_input_and_step(model, keras_data, keras_run["steps_per_epoch"]))
    results["keras"] = keras_run
    meta["load_end"] = load()
    (args.out / "results.json").write_text(json.dumps({"meta": meta, **results}, indent=2))
    section = table(results, meta)
    (args.out / "table.md").write_text(section)
    for name, r in results.items():
        (args.out / f"{name}_test_report.txt").write_text(r["report"])
    if args.results_md:
        update_results(args.results_md, section)
    print(section)
    return results


if __name__ == "__main__":
    main()
