"""Input pipeline throughput on real JPEGs: decode + augment + resize to 224, batch 32.

Side by side in one run, on the same files: imgcls_jax's Pipeline (cold: decoding every file;
cached: a later epoch served from the in-memory uint8 cache) and Keras's
``image_dataset_from_directory`` followed by the equivalent Keras augmentation layers
(RandomFlip, RandomRotation, RandomZoom, RandomTranslation) mapped in tf.data.

``imgcls_jax-cached-noaug`` is the cached epoch without augmentation (shuffle + batch only):
the ceiling of the host side once images are cached.

Without TensorFlow (rows ``numpy-cold`` / ``numpy-cached``): ``NumpyPipeline`` decoding with Pillow
in threads, then epochs from its uint8 cache; it does not augment, the device does: group
``device-augment`` times ``device_augment.augment_batch`` (jitted, compile excluded) on a batch of
32 already on the device, with this file's augmentation and with the whole set.

Data: ``../shared/data/hymenoptera`` (398 photos, mostly 500x375) and ``flowers5`` (4,317
photos, 128x128). Skipped when that folder is absent.
"""

import os
import time
from pathlib import Path

import pytest

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE, BATCH = (224, 224), 32
AUG = dict(flip="horizontal", rotation=0.05, zoom=0.1, translation=0.1)
RATES: dict[tuple[str, str], float] = {}

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} not found (shared real-photo data)")


def _epoch_rate(make_iterable, images):
    start = time.perf_counter()
    seen = 0
    for batch in make_iterable():
        seen += len(batch[0]) if isinstance(batch, tuple) else int(batch["mask"].sum())
    elapsed = time.perf_counter() - start
    assert seen >= images - BATCH
    return seen / elapsed


def _ours(dataset: str, cached: bool, augment: bool = True):
    from imgcls_jax.data import AugmentConfig, Pipeline, from_records, scan_folder

    found = scan_folder(DATA / dataset)
    pipe = Pipeline(
        from_records(found.records, found.class_names),
        image_size=SIZE,
        batch_size=BATCH,
        training=True,
        augment=AugmentConfig(**AUG) if augment else None,
        cache="memory" if cached else None,
        seed=0,
    )
    if cached:
        for _ in pipe.epoch(0):  # fill the cache
            pass
    counter = iter(range(1, 10_000))
    return (lambda: pipe.epoch(next(counter))), len(found.records)


def _numpy(dataset: str, cached: bool):
    from imgcls_jax.data import NumpyPipeline, from_records, scan_folder

    found = scan_folder(DATA / dataset)
    source = from_records(found.records, found.class_names)

    def build():
        return NumpyPipeline(source, image_size=SIZE, batch_size=BATCH, training=True, seed=0)

    if not cached:  # each epoch decodes every file again (a new pipeline)
        return (lambda: build().epoch(0)), len(found.records)
    pipe = build()
    pipe.images()
    counter = iter(range(1, 10_000))
    return (lambda: pipe.epoch(next(counter))), len(found.records)


def _keras(dataset: str):
    import keras
    import tensorflow as tf

    directories = (
        [DATA / dataset / s for s in ("train", "val")] if dataset == "hymenoptera" else [DATA / dataset]
    )
    parts = [
        keras.utils.image_dataset_from_directory(
            d, image_size=SIZE, batch_size=BATCH, shuffle=True, seed=0, verbose=False
        )
        for d in directories
    ]
    ds = parts[0] if len(parts) == 1 else parts[0].concatenate(parts[1])
    augment = keras.Sequential(
        [
            keras.layers.RandomFlip("horizontal", seed=0),
            keras.layers.RandomRotation(AUG["rotation"], seed=1),
            keras.layers.RandomZoom(AUG["zoom"], seed=2),
            keras.layers.RandomTranslation(AUG["translation"], AUG["translation"], seed=3),
        ]
    )
    ds = ds.map(
        lambda x, y: (tf.cast(augment(x, training=True), tf.uint8), y), num_parallel_calls=tf.data.AUTOTUNE
    )
    ds = ds.prefetch(tf.data.AUTOTUNE)
    count = sum(len(list((DATA / dataset).rglob(f"*.{e}"))) for e in ("jpg", "jpeg", "gif"))
    return (lambda: ds.as_numpy_iterator()), count


@pytest.mark.parametrize("dataset", ["hymenoptera", "flowers5"])
@pytest.mark.parametrize(
    "pipeline",
    [
        "keras",
        "imgcls_jax-cold",
        "imgcls_jax-cached",
        "imgcls_jax-cached-noaug",
        "numpy-cold",
        "numpy-cached",
    ],
)
def test_pipeline_throughput(benchmark, dataset, pipeline):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    benchmark.group = f"input-pipeline {dataset} 224px batch {BATCH}"
    if pipeline == "keras":
        pytest.importorskip("keras")
        pytest.importorskip("tensorflow")
        make, images = _keras(dataset)
    elif pipeline.startswith("numpy"):
        make, images = _numpy(dataset, cached=pipeline == "numpy-cached")
    else:
        pytest.importorskip("tensorflow")
        make, images = _ours(dataset, cached="cached" in pipeline, augment=not pipeline.endswith("noaug"))
    rounds = 2 if dataset == "hymenoptera" else 1
    rate = benchmark.pedantic(
        _epoch_rate, args=(make, images), rounds=rounds, warmup_rounds=1 if rounds > 1 else 0
    )
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    RATES[(dataset, pipeline)] = rate


@pytest.mark.parametrize("config", ["geometry", "everything"])
def test_device_augment_throughput(benchmark, config):
    import jax
    import numpy as np

    from imgcls_jax.data import AugmentConfig
    from imgcls_jax.data.device_augment import augment_batch

    full = dict(AUG, random_resized_crop=True, brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05)
    cfg = AugmentConfig(**(AUG if config == "geometry" else full))
    images = jax.device_put(np.random.default_rng(0).integers(0, 256, (BATCH, *SIZE, 3), dtype=np.uint8))
    keys = [jax.random.key(i) for i in range(64)]
    run = jax.jit(lambda x, k: augment_batch(x, k, cfg))
    run(images, keys[0]).block_until_ready()  # compile
    counter = iter(range(1, 10_000))
    benchmark.group = f"device-augment {SIZE[0]}px batch {BATCH} on {jax.default_backend()}"
    benchmark.pedantic(lambda: run(images, keys[next(counter) % 64]).block_until_ready(), rounds=10)
    rate = BATCH / benchmark.stats.stats.median
    benchmark.extra_info.update(images_per_s=round(rate, 1), batch_ms=round(1e3 * BATCH / rate, 2))
    RATES[("device-augment", config)] = rate


def test_report_ratios():
    if not RATES:
        pytest.skip("no pipeline measured in this run")
    lines = ["", f"{'dataset':<12} {'pipeline':<20} {'images/s':>9} {'vs keras':>9}"]
    for (dataset, pipeline), rate in sorted(RATES.items()):
        keras_rate = RATES.get((dataset, "keras"))
        ratio = f"{rate / keras_rate:.2f}x" if keras_rate else "-"
        lines.append(f"{dataset:<12} {pipeline:<20} {rate:>9.1f} {ratio:>9}")
    print("\n".join(lines))
