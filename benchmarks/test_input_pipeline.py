"""Input pipeline throughput on real JPEGs: decode + augment + resize to 224, batch 32.

Side by side in one run, on the same files: imgcls_jax's Pipeline (cold: decoding every file;
cached: a later epoch served from the in-memory uint8 cache) and Keras's
``image_dataset_from_directory`` followed by the equivalent Keras augmentation layers
(RandomFlip, RandomRotation, RandomZoom, RandomTranslation) mapped in tf.data.

``imgcls_jax-cached-noaug`` is the cached epoch without augmentation (shuffle + batch only):
the ceiling of the host side once images are cached.

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
    "pipeline", ["keras", "imgcls_jax-cold", "imgcls_jax-cached", "imgcls_jax-cached-noaug"]
)
def test_pipeline_throughput(benchmark, dataset, pipeline):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    benchmark.group = f"input-pipeline {dataset} 224px batch {BATCH}"
    if pipeline == "keras":
        pytest.importorskip("keras")
        make, images = _keras(dataset)
    else:
        make, images = _ours(dataset, cached="cached" in pipeline, augment=not pipeline.endswith("noaug"))
    rounds = 2 if dataset == "hymenoptera" else 1
    rate = benchmark.pedantic(
        _epoch_rate, args=(make, images), rounds=rounds, warmup_rounds=1 if rounds > 1 else 0
    )
    benchmark.extra_info["images_per_s"] = round(rate, 1)
    RATES[(dataset, pipeline)] = rate


def test_report_ratios():
    if not RATES:
        pytest.skip("no pipeline measured in this run")
    lines = ["", f"{'dataset':<12} {'pipeline':<20} {'images/s':>9} {'vs keras':>9}"]
    for (dataset, pipeline), rate in sorted(RATES.items()):
        keras_rate = RATES.get((dataset, "keras"))
        ratio = f"{rate / keras_rate:.2f}x" if keras_rate else "-"
        lines.append(f"{dataset:<12} {pipeline:<20} {rate:>9.1f} {ratio:>9}")
    print("\n".join(lines))
