"""The same protocol, two frameworks, one table: flowers5 from scratch with Keras 3 and imgcls_jax.

Opt-in (not part of ``pytest benchmarks/``; an hour or more on a 2-core CPU). From the repository
root::

    nice -n 10 .venv/bin/python -m benchmarks.reference_keras --results-md benchmarks/RESULTS.md

The protocol is ``examples/configs/flowers5_scratch_cpu.json`` with ``--epochs`` (12) epochs:
VGG16 from scratch at 32x32, batch 32, the 65/10/25 stratified split of ``imgcls_jax.data``
(``scan_folder`` / ``split_records`` / ``write_manifest``, seed 0), flip / rotation 0.05 / zoom 0.1
/ translation 0.1 augmentation (reflect fill), global average pooling -> Dense(256, relu) ->
Dropout(0.5) -> Dense(5), Adam 2e-4 with 2 epochs of linear warmup then cosine decay to 0, label
smoothing 0.1; the best epoch by validation accuracy is evaluated on the test split (accuracy =
the confusion matrix's trace / its sum).

Keras trains on the manifest's own files: ``tf.data`` decoding and resizing as
``image_dataset_from_directory`` does, the uint8-equivalent float images cached in memory, the
last incomplete batch dropped (as imgcls_jax does), ``RandomFlip`` / ``RandomRotation`` /
``RandomZoom`` / ``RandomTranslation`` in the pipeline, ``preprocess_input`` in the model,
``CosineDecay(warmup_target=, warmup_steps=)``, ``CategoricalCrossentropy(label_smoothing=0.1)``,
``ModelCheckpoint(save_best_only=True)`` on ``val_accuracy``.

Where the time goes, for each: the whole epoch (wall time between the ends of consecutive
epochs: training, validation, checkpoint), its training part, the input pipeline alone (one
augmented training epoch iterated to host arrays, cache warm) and the train step alone (the
run's own compiled step on one fixed batch, times the steps of an epoch). The machine's load
average is recorded beside the numbers (the 2 cores may be shared).
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
log = logging.getLogger("reference_keras")


def protocol(data: str, out: Path, epochs: int):
    """The imgcls_jax ``TrainConfig`` of the protocol (``CONFIG`` with ``epochs`` epochs)."""
    from imgcls_jax import TrainConfig

    config = TrainConfig.from_json(CONFIG)
    config.data, config.run_dir = str(data), str(out / "imgcls_jax")
    config.phases[0].epochs = epochs
    return TrainConfig.from_json(config.to_json())  # validated again


def make_manifest(config, out: Path):
    """The split both frameworks train on: ``(records, class_names)``, written to
    ``out/manifest.csv``."""
    from imgcls_jax.data import scan_folder, split_records, write_manifest

    found = scan_folder(config.data, exclude=config.exclude)
    records = split_records(found.records, config.splits, config.seed)
    write_manifest(out / "manifest.csv", records, found.class_names, root=found.root)
    return records, found.class_names


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
def keras_datasets(records, class_names, config):
    """``{split: tf.data.Dataset}`` of ``(float32[B, S, S, 3] in [0, 255], one-hot labels)``:
    decoded and resized as ``image_dataset_from_directory`` does, cached; the training split
    shuffled, batched without its last incomplete batch and augmented."""
    import keras
    import tensorflow as tf

    size, k, a = config.image_size, len(class_names), config.augment
    augment = keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=1),
        keras.layers.RandomRotation(a.rotation, fill_mode=a.fill_mode, seed=2),
        keras.layers.RandomZoom(a.zoom, fill_mode=a.fill_mode, seed=3),
        keras.layers.RandomTranslation(a.translation, a.translation, fill_mode=a.fill_mode, seed=4),
    ])  # fmt: skip

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
            ds = ds.map(lambda x, y: (augment(x, training=True), y), num_parallel_calls=tf.data.AUTOTUNE)
        else:
            ds = ds.batch(config.eval_batch_size or config.batch_size)
        out[split] = ds.prefetch(tf.data.AUTOTUNE)
    return out


def keras_model(config, num_classes: int, steps_per_epoch: int):
    """VGG16(include_top=False, weights=None, pooling="avg") + Dense(256, relu) + Dropout +
    Dense(k, softmax), ``preprocess_input`` inside; Adam with CosineDecay and its warmup."""
    import keras

    size, phase = config.image_size, config.phases[0]
    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(keras.applications.vgg16.preprocess_input)(inputs)
    x = keras.applications.VGG16(include_top=False, weights=None, pooling="avg", input_shape=(size, size, 3))(
        x
    )
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
    )
    return model


def run_keras(config, records, class_names, out: Path) -> dict:
    """Train, keep the best epoch by val_accuracy, evaluate it on the test split."""
    import keras
    from sklearn.metrics import classification_report, confusion_matrix

    keras.utils.set_random_seed(config.seed)
    data = keras_datasets(records, class_names, config)
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
    """The markdown section for RESULTS.md."""
    j, k = results["imgcls_jax"], results["keras"]

    def row(name, fn, fmt):
        return f"| {name} | {fmt(fn(j))} | {fmt(fn(k))} | {fn(j) / fn(k):.2f} |"

    pct, sec = (lambda v: f"{100 * v:.2f}%"), (lambda v: f"{v:.1f} s")
    lines = [
        f"## The same protocol, two frameworks (flowers5, 32x32, from scratch), {meta['date']}", "",
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
        row("input pipeline alone, one epoch", lambda r: r["input_s"], sec),
        row(f"train step alone x {j['steps_per_epoch']} steps", lambda r: r["step_s"], sec), "",
    ]  # fmt: skip
    return "\n".join(lines)


def update_results(path: Path, section: str) -> None:
    """Put ``section`` between the markers of ``path`` (appended with them the first time)."""
    text = path.read_text()
    block = f"{MARK_START}\n{section}\n{MARK_END}"
    if MARK_START in text:
        head, rest = text.split(MARK_START, 1)
        text = head + block + rest.split(MARK_END, 1)[1]
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
    parser.add_argument("--epochs", default=12, type=int)
    parser.add_argument("--results-md", type=Path, help="put the table into this markdown file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "date": datetime.date.today().isoformat(), "load_start": load(),
        "command": "nice -n 10 python -m benchmarks.reference_keras " + " ".join(argv or sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})",
        "versions": versions(),
    }  # fmt: skip
    config = protocol(args.data, args.out, args.epochs)
    records, class_names = make_manifest(config, args.out)
    counts = {name: sum(r.split == name for r in records) for name in ("train", "val", "test")}
    meta["split"] = ", ".join(f"{n} {name}" for name, n in counts.items()) + " images (stratified, seed 0)"
    results = {"imgcls_jax": run_imgcls_jax(config, args.out)}
    results["imgcls_jax"].update(imgcls_jax_input_and_step(config, args.out))
    keras_run = run_keras(config, records, class_names, args.out)
    keras_run.update(
        keras_input_and_step(keras_run.pop("model"), keras_run.pop("data"), keras_run["steps_per_epoch"])
    )
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
