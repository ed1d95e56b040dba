"""The tf.data input pipeline: source -> decode -> resize -> cache -> shuffle -> augment ->
batch -> prefetch, one epoch at a time.

Batches are dicts of numpy arrays::

    {"image": uint8[B, H, W, 3], "label": int32[B] (float32[B, K] with mixup/cutmix),
     "mask": bool[B]}

Images stay uint8 up to the device (4x less host-to-device traffic than float32); the model
normalises them inside the jitted step. Evaluation batches are padded to the full batch size
and ``mask`` marks the real images, so every image counts exactly once. Training batches drop
the incomplete last batch (all ``mask`` True).

Each epoch is a separate, seeded dataset over the same cached images, so epoch ``e`` can be
rebuilt exactly (for resuming) and augmentation seeds are ``(seed, e * N + i)`` per image.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from imgcls_jax.data.augment import AugmentConfig, augment_image, mix_batch
from imgcls_jax.data.decode import decode_image, import_tensorflow, resize_image
from imgcls_jax.data.folders import Record

log = logging.getLogger(__name__)


@dataclass
class Source:
    """Decoded images and labels to feed a pipeline: use :func:`from_records`,
    :func:`from_arrays` or :func:`from_tfds` to make one."""

    num_examples: int
    class_names: list[str]
    make: object = field(repr=False)  # () -> tf.data.Dataset of (uint8[H, W, 3], int32)
    description: str = ""
    #: () -> a hex digest of the images and labels (the key of a file cache); ``None``: the
    #: source cannot be cached in files.
    fingerprint: Callable[[], str] | None = field(default=None, repr=False)
    #: int32[N] class indices, and the files (``paths``) or uint8[N, H, W, 3] ``images`` they
    #: label: what the TensorFlow-free :class:`~imgcls_jax.data.numpy_pipeline.NumpyPipeline`
    #: reads (``None`` for TFDS sources, which need TensorFlow).
    labels: np.ndarray | None = field(default=None, repr=False)
    paths: list[str] | None = field(default=None, repr=False)
    images: np.ndarray | None = field(default=None, repr=False)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def from_records(records: Sequence[Record], class_names: Sequence[str]) -> Source:
    """Image files (from :func:`~imgcls_jax.data.folders.scan_folder` / ``split_records``)."""
    if not records:
        raise ValueError("no records: nothing to read")
    paths = [r.path for r in records]
    labels = np.asarray([r.label for r in records], np.int32)
    if labels.min() < 0 or labels.max() >= len(class_names):
        raise ValueError(f"labels must be in [0, {len(class_names)}), found {labels.min()}..{labels.max()}")

    def make():
        tf = import_tensorflow()
        ds = tf.data.Dataset.from_tensor_slices((paths, labels))
        return ds.map(
            lambda p, y: (decode_image(tf.io.read_file(p)), y),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )

    def fingerprint():
        digest = hashlib.sha256()
        for path, label in zip(paths, labels.tolist()):
            try:
                stat = os.stat(path)
                when = f"{stat.st_size}:{stat.st_mtime_ns}"
            except OSError:
                when = "missing"  # reading it fails later, naming the file
            digest.update(f"{path}\0{label}\0{when}\n".encode())
        return digest.hexdigest()

    return Source(
        len(paths), list(class_names), make, f"{len(paths)} files", fingerprint, labels=labels, paths=paths
    )


def from_arrays(images: np.ndarray, labels, class_names: Sequence[str] | None = None) -> Source:
    """In-memory ``uint8[N, H, W, 3]`` images (grayscale ``[N, H, W]`` or ``[N, H, W, 1]`` is
    expanded to RGB) with integer labels ``[N]``."""
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"images must be [N, H, W, 3] (or grayscale), got shape {images.shape}")
    if images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got {images.dtype}")
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"labels must be integers of shape ({len(images)},), got {labels.dtype} {labels.shape}"
        )
    if images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    names = list(class_names) if class_names is not None else [str(i) for i in range(int(labels.max()) + 1)]
    if labels.min() < 0 or labels.max() >= len(names):
        raise ValueError(f"labels must be in [0, {len(names)}), found {labels.min()}..{labels.max()}")

    def make():
        tf = import_tensorflow()
        return tf.data.Dataset.from_tensor_slices((images, labels.astype(np.int32)))

    def fingerprint():
        digest = hashlib.sha256(str(images.shape).encode())
        digest.update(np.ascontiguousarray(images).data)
        digest.update(labels.astype(np.int64).tobytes())
        return digest.hexdigest()

    return Source(
        len(images), names, make, f"{len(images)} arrays", fingerprint,
        labels=labels.astype(np.int32), images=images,
    )  # fmt: skip


def from_tfds(name: str, split: str, *, data_dir=None, image_key="image", label_key="label") -> Source:
    """A TFDS dataset already prepared in ``data_dir`` (nothing is downloaded here)."""
    tf = import_tensorflow()  # first: it keeps TensorFlow's start-up notices quiet
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    info = builder.info
    if image_key not in info.features or label_key not in info.features:
        raise ValueError(
            f"TFDS {name!r} has features {list(info.features)}; need {image_key!r}, {label_key!r}"
        )
    names = list(info.features[label_key].names)

    def as_dataset():
        try:
            return builder.as_dataset(split=split, shuffle_files=False)
        except AssertionError as exc:  # TFDS's way of saying the data is not there
            raise ValueError(
                f"TFDS dataset {name!r} is not prepared in {builder.data_dir}: run "
                f"tfds.builder({name!r}).download_and_prepare() where the internet is reachable and "
                f"copy the data_dir here (nothing is downloaded at run time). TFDS said: {exc}"
            ) from exc

    if info.splits:
        num = info.splits[split].num_examples
    else:  # split metadata absent (e.g. under tfds.testing.mock_data): count the examples
        num = int(as_dataset().reduce(0, lambda count, _: count + 1))

    def make():
        ds = as_dataset()

        def to_pair(ex):
            image = ex[image_key]
            if image.shape.rank == 3 and image.shape[-1] == 1:
                image = tf.image.grayscale_to_rgb(image)
            return tf.cast(image, tf.uint8), tf.cast(ex[label_key], tf.int32)

        return ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)

    def fingerprint():
        key = f"{name}\0{split}\0{builder.data_dir}\0{info.version}\0{image_key}\0{label_key}"
        return hashlib.sha256(key.encode()).hexdigest()

    return Source(num, names, make, f"tfds {name}[{split}]", fingerprint)


def cache_prefix(prefix, source: Source, image_size: tuple[int, int], resize: str) -> Path:
    """The file prefix under which a pipeline caches ``source`` at ``image_size``: ``prefix``
    plus a key of the images, labels, size and resize mode, so that pipelines of different
    splits, sizes or folder contents sharing one ``prefix`` never read each other's files."""
    if source.fingerprint is None:
        raise ValueError(
            f"{source.description or 'this source'}: no fingerprint, so it cannot be cached in files "
            "(use cache='memory' or None, or give the Source a fingerprint)"
        )
    key = hashlib.sha256(f"{source.fingerprint()}\0{tuple(image_size)}\0{resize}".encode()).hexdigest()
    prefix = Path(prefix)
    return prefix.with_name(f"{prefix.name}-{image_size[0]}x{image_size[1]}-{key[:16]}")


def _clear_unfinished_cache(prefix: Path) -> None:
    """Delete the partial files of a cache whose writer died (tf.data leaves a lockfile, and
    then refuses to write it again); a finished cache (its ``.index`` file) is kept."""
    partial = sorted(prefix.parent.glob(glob.escape(prefix.name) + "*"))
    if not any(p.name.endswith(".lockfile") for p in partial):
        return
    if any(p.name.endswith(".index") for p in partial):
        return
    log.warning(
        "removing the unfinished tf.data cache %s* left by an interrupted run (%d files); if another "
        "process is writing this cache right now, give each run its own cache path",
        prefix, len(partial),
    )  # fmt: skip
    for p in partial:
        p.unlink(missing_ok=True)


class Pipeline:
    """Batches of one source, epoch by epoch (see the module docstring).

    Args:
      source: a :class:`Source`.
      image_size: ``(height, width)`` of the batches.
      batch_size: images per batch (global, before sharding over devices).
      training: shuffle, augment and drop the last incomplete batch; otherwise keep the order,
        pad the last batch and mask the padding.
      augment: augmentation for training (ignored otherwise).
      resize: ``"squash"``, ``"center_crop"`` or ``"pad"`` (see ``decode.resize_image``).
      cache: ``"memory"``, a file path prefix (for datasets that do not fit in memory) or
        ``None``: decoded-and-resized uint8 images are cached after the first epoch. File
        caches are named by :func:`cache_prefix` (one per source, size and resize mode); the
        partial files of an interrupted first epoch are removed when the pipeline is built.
      shuffle_buffer: default: the whole dataset (exact shuffle of the cached uint8 images).
      seed: shuffling and augmentation seed.
      device_augment: leave ``augment`` (mixup and cutmix too) to the train step on the device
        (:func:`imgcls_jax.data.device_augment.augment_train_batch` with
        :attr:`augment_on_device`): batches are the cached images, unaugmented, labels int32.
    """

    def __init__(
        self,
        source: Source,
        *,
        image_size: tuple[int, int],
        batch_size: int,
        training: bool,
        augment: AugmentConfig | None = None,
        resize: str = "squash",
        cache: str | None = "memory",
        shuffle_buffer: int | None = None,
        seed: int = 0,
        device_augment: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if training and source.num_examples < batch_size:
            raise ValueError(
                f"{source.description}: {source.num_examples} training images is fewer than one batch "
                f"of {batch_size}; lower batch_size"
            )
        self.source = source
        self.image_size = tuple(image_size)
        self.batch_size = batch_size
        self.training = training
        self.augment = augment if (training and augment is not None and not augment.is_identity) else None
        self.resize = resize
        self.seed = seed
        self.device_augment = device_augment
        self.cache = cache
        self.cache_files: Path | None = None  # the file prefix of a file cache
        self.shuffle_buffer = shuffle_buffer or source.num_examples
        tf = import_tensorflow()
        size = self.image_size

        def prepare(image, label):
            return tf.cast(tf.round(resize_image(image, size, resize)), tf.uint8), label

        base = source.make().map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        if cache == "memory":
            base = base.cache()
        elif cache:
            self.cache_files = cache_prefix(cache, source, size, resize)
            self.cache_files.parent.mkdir(parents=True, exist_ok=True)
            _clear_unfinished_cache(self.cache_files)
            base = base.cache(str(self.cache_files))
        self._base = base

    @property
    def num_examples(self) -> int:
        return self.source.num_examples

    @property
    def augment_on_device(self) -> AugmentConfig | None:
        """The augmentation the train step must apply on the device (``None``: nothing to do, the
        batches are augmented already or augmentation is off)."""
        return self.augment if self.device_augment else None

    def resized(self, image_size: tuple[int, int]) -> Pipeline:
        """The same pipeline (source, batches, augmentation, cache kind, seed) at another
        ``image_size``; ``self`` when the size is unchanged."""
        if tuple(image_size) == self.image_size:
            return self
        return Pipeline(
            self.source, image_size=image_size, batch_size=self.batch_size, training=self.training,
            augment=self.augment, resize=self.resize, cache=self.cache,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, device_augment=self.device_augment,
        )  # fmt: skip

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.training else math.ceil(n / b)

    def dataset(self, epoch: int = 0):
        """The ``tf.data.Dataset`` of batches for ``epoch`` (a fresh, reproducible order)."""
        tf = import_tensorflow()
        ds = self._base
        n = self.num_examples
        if self.training:
            ds = ds.shuffle(
                self.shuffle_buffer, seed=self.seed * 1_000_003 + epoch, reshuffle_each_iteration=False
            )
            ds = ds.enumerate(start=epoch * n)
            aug, seed = (None if self.device_augment else self.augment), self.seed

            def train_map(index, example):
                image, label = example
                if aug is not None:
                    element_seed = tf.stack([tf.cast(seed, tf.int64), index])
                    image = augment_image(tf.cast(image, tf.float32), element_seed, aug)
                    image = tf.cast(tf.round(image), tf.uint8)
                return {"image": image, "label": label}

            ds = ds.map(train_map, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
            ds = ds.batch(self.batch_size, drop_remainder=True, num_parallel_calls=tf.data.AUTOTUNE)
            if aug is not None and (aug.mixup_alpha > 0 or aug.cutmix_alpha > 0):
                k = self.source.num_classes
                ds = ds.enumerate().map(
                    lambda i, b: self._mix(b, i, epoch, k), num_parallel_calls=tf.data.AUTOTUNE
                )
            ds = ds.map(lambda b: {**b, "mask": tf.ones([self.batch_size], tf.bool)})
        else:
            b = self.batch_size
            ds = ds.map(lambda image, label: {"image": image, "label": label})
            ds = ds.batch(b, drop_remainder=False)

            def pad(batch):
                real = tf.shape(batch["label"])[0]
                out = {
                    k: tf.pad(v, [[0, b - real]] + [[0, 0]] * (len(v.shape) - 1)) for k, v in batch.items()
                }
                out["mask"] = tf.range(b) < real
                out["image"].set_shape([b, *self.image_size, 3])
                return out

            ds = ds.map(pad)
        return ds.prefetch(tf.data.AUTOTUNE)

    def _mix(self, batch, index, epoch, num_classes):
        tf = import_tensorflow()
        seed = tf.stack([tf.cast(self.seed + 7919, tf.int64), epoch * 1_000_003 + index])
        onehot = tf.one_hot(batch["label"], num_classes, dtype=tf.float32)
        images, labels = mix_batch(tf.cast(batch["image"], tf.float32), onehot, seed, self.augment)
        return {"image": tf.cast(tf.round(images), tf.uint8), "label": labels}

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """Numpy batches of ``epoch``."""
        return self.dataset(epoch).as_numpy_iterator()

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.epoch(0)
