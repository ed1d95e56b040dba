"""A run's inputs: splits, each process's share, the tf.data pipelines, cached base features.

TensorFlow (through :mod:`imgcls_jax.data`) is imported only when these functions run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import jax

from imgcls_jax.config import TrainConfig
from imgcls_jax.data.folders import DatasetError
from imgcls_jax.train.features import FeatureBatches, compute_features

log = logging.getLogger(__name__)


def input_placement(config: TrainConfig) -> tuple[str, bool]:
    """``(data backend, augment on the device)`` for ``config``'s ``data_backend`` and
    ``augment_on`` (see :class:`~imgcls_jax.config.TrainConfig`): ``"auto"`` is tf.data where
    TensorFlow imports; augmentation goes to the device on a GPU/TPU or with the NumPy pipeline."""
    from imgcls_jax.data import tensorflow_available

    backend = config.data_backend
    if backend == "auto":
        backend = "tf" if tensorflow_available() else "numpy"
    if backend == "tf" and not tensorflow_available():
        raise ValueError("TrainConfig.data_backend='tf' but TensorFlow is not importable here; use 'numpy'")
    on_device = config.augment_on == "device" or (
        config.augment_on == "auto" and (backend == "numpy" or jax.default_backend() != "cpu")
    )
    if backend == "numpy" and not on_device:
        raise ValueError("the NumPy pipeline (no TensorFlow) augments on the device: set augment_on 'device'")
    return backend, on_device


def run_records(config: TrainConfig, run_dir: Path, *, reuse: bool, write: bool = True):
    """``(records, class names)``: every image of a run with its split.

    ``reuse`` (a run resumed from its folder): read from the folder's ``manifest.csv``, never
    rescanned: images added to the data folder since do not enter the run, and an image of the
    manifest that is gone is a ``DatasetError`` naming it. Otherwise scanned from
    ``config.data``: presplit folders as they are, else ``split_records`` with ``config.seed``;
    ``write`` saves them as ``manifest.csv``."""
    from imgcls_jax.data import read_manifest, scan_folder, split_records

    manifest = run_dir / "manifest.csv"
    if reuse:
        records, class_names = read_manifest(manifest, root=config.data)
        splits = sorted({r.split for r in records})
        read_manifest(manifest, root=config.data, check_splits=splits)  # every image still there
        log.info("%s: %d images read from the run's manifest (not rescanned)", manifest, len(records))
        return records, class_names
    found = scan_folder(config.data, exclude=config.exclude)
    records = found.records if found.presplit else split_records(found.records, config.splits, config.seed)
    if write:
        write_manifest_atomically(manifest, records, found.class_names, root=found.root)
    return records, found.class_names


def run_inputs(config: TrainConfig, records, class_names):
    """The train pipeline and one pipeline per evaluation split of a run's ``records`` (tf.data
    or NumPy ones, see :func:`input_placement`). With several processes each pipeline holds this
    process's share (see :func:`process_share`) and batches of its per-process size."""
    from imgcls_jax.data import from_records, make_pipeline

    by_split: dict[str, list] = {}
    for r in records:
        by_split.setdefault(r.split, []).append(r)
    if "train" not in by_split:
        raise DatasetError(f"{config.data}: no 'train' split (splits: {sorted(by_split)})")
    batch, eval_batch = config.batch_size, config.eval_batch_size or config.batch_size
    if jax.process_count() > 1:
        by_split, batch, eval_batch = process_share(config, by_split, batch, eval_batch)
    backend, on_device = input_placement(config)
    size = config.size_at(0)  # the first phase's; fit resizes for later phases
    train = make_pipeline(
        from_records(by_split["train"], class_names), backend=backend, image_size=size,
        batch_size=batch, training=True, augment=config.augment, cache=config.cache, seed=config.seed,
        device_augment=on_device,
    )  # fmt: skip
    evals = {
        name: make_pipeline(
            from_records(rs, class_names),
            backend=backend,
            image_size=size,
            batch_size=eval_batch,
            training=False,
            cache=config.cache,
            device_augment=backend == "numpy",
        )  # fmt: skip
        for name, rs in by_split.items()
        if name != "train"
    }
    log.info("input: %s pipeline, augmentation on the %s", backend, "device" if on_device else "host")
    return train, evals


def write_manifest_atomically(path: Path, records, class_names, root) -> None:
    """:func:`imgcls_jax.data.write_manifest` through a temporary file renamed over ``path``: a
    kill or a full disk leaves the old manifest or the new one, never a torn one."""
    from imgcls_jax.data import write_manifest

    tmp = path.with_name(path.name + ".tmp")
    try:
        write_manifest(tmp, records, class_names, root=root)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OSError(e.errno, f"{path}: could not write the manifest ({e.strerror})") from e


def process_share(config: TrainConfig, by_split: dict, batch: int, eval_batch: int):
    """This process's records of each split and its per-step batch sizes (of the global ones).

    Train shares are equal (a few images left out) so that every process runs the same number of
    steps; evaluation shares may differ by one image and together hold every image once."""
    from imgcls_jax import parallel
    from imgcls_jax.data import shard_records

    mesh = parallel.make_mesh()
    batch, eval_batch = (
        parallel.process_batch_size(batch, mesh),
        parallel.process_batch_size(eval_batch, mesh),
    )
    shares = {
        name: shard_records(rs, seed=config.seed, equal_sizes=name == "train")
        for name, rs in by_split.items()
    }
    index, count, train = jax.process_index(), jax.process_count(), shares["train"]
    if len(train) < batch:
        raise ValueError(
            f"process {index} of {count}: its share of the train split has {len(train)} images "
            f"({len(by_split['train'])} in all), fewer than its batch of {batch} (global batch_size="
            f"{config.batch_size}); lower batch_size or add images"
        )
    log.info(
        "process %d of %d reads %d of %d train images, %d per step (global batch %d)",
        index, count, len(train), len(by_split["train"]), batch, config.batch_size,
    )  # fmt: skip
    log.debug("process %d train share: %s", index, json.dumps(sorted(str(r.path) for r in train)))
    return shares, batch, eval_batch


def feature_inputs(config: TrainConfig, model, train, evals: dict):
    """The frozen base's outputs for the train and evaluation images, as ``FeatureBatches`` with
    the batch sizes of ``train`` and ``evals`` (see :mod:`imgcls_jax.train.features`)."""
    from imgcls_jax.data import NumpyPipeline, make_pipeline

    start = time.perf_counter()
    bs = config.eval_batch_size or config.batch_size
    # every train image once, in order, read as ``train`` reads them (tf.data or NumPy: TensorFlow
    # may not be importable)
    backend = "numpy" if isinstance(train, NumpyPipeline) else "tf"
    ordered = make_pipeline(
        train.source, backend=backend, image_size=train.image_size, batch_size=bs, training=False, cache=None
    )
    feats, labels = compute_features(model, ordered)
    phase_train = FeatureBatches(feats, labels, batch_size=config.batch_size, training=True, seed=config.seed)
    phase_evals = {}
    for name, pipeline in evals.items():
        f, y = compute_features(model, pipeline)
        phase_evals[name] = FeatureBatches(f, y, batch_size=pipeline.batch_size, training=False)
    log.info(
        "frozen base, no augmentation: base outputs %s computed once in %.1f s; the head trains on them",
        feats.shape[1:], time.perf_counter() - start,
    )  # fmt: skip
    return phase_train, phase_evals
