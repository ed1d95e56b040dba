"""The input pipeline without TensorFlow: Pillow decoding in threads -> uint8 cache -> NumPy batches.

:class:`NumpyPipeline` has :class:`~imgcls_jax.data.pipeline.Pipeline`'s interface and batches::

    {"image": uint8[B, H, W, 3], "label": int32[B], "mask": bool[B]}

Every image is decoded and resized once (:mod:`.pil_decode`: the tf.data path's pixels) into one
uint8 array, in memory or in a ``.npy`` file read back through a memory map. Training batches are a
permutation seeded by ``(seed, epoch)`` with the incomplete last batch dropped; evaluation batches
keep the order, and the last one is padded with zeros and masked, so every image counts once. There
is no host augmentation: :attr:`NumpyPipeline.augment_on_device` is what the train step applies with
:func:`imgcls_jax.data.device_augment.augment_train_batch` (mixup and cutmix included, so labels
stay int32 here).

:func:`make_pipeline` picks the tf.data pipeline where TensorFlow is importable and this one
otherwise, or either on request.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from imgcls_jax.data import pil_decode
from imgcls_jax.data.augment import AugmentConfig
from imgcls_jax.data.decode import RESIZE_MODES, tensorflow_available
from imgcls_jax.data.pipeline import Source, cache_prefix

log = logging.getLogger(__name__)

BACKENDS = ("auto", "tf", "numpy")


class NumpyPipeline:
    """Batches of one source, epoch by epoch, without TensorFlow (see the module docstring).

    Args:
      source: a :class:`~imgcls_jax.data.pipeline.Source` from ``from_records`` or ``from_arrays``
        (TFDS sources need TensorFlow).
      image_size: ``(height, width)`` of the batches.
      batch_size: images per batch (global, before sharding over devices).
      training: shuffle per ``(seed, epoch)`` and drop the last incomplete batch; otherwise keep
        the order, pad the last batch and mask the padding.
      augment: augmentation for training, done on the device (:attr:`augment_on_device`).
      resize: ``"squash"``, ``"center_crop"`` or ``"pad"`` (``decode.resize_image``'s geometry).
      cache: ``"memory"`` (or ``None``, the same here: images are decoded once per pipeline), or a
        file path prefix: the uint8 images go to ``<prefix>-<H>x<W>-<key>.npy`` (named as the
        tf.data file cache, by ``pipeline.cache_prefix``) and later pipelines of the same files, size
        and resize mode map that file instead of decoding again.
      shuffle_buffer: accepted for ``Pipeline``'s signature; the shuffle here is always exact.
      seed: shuffling seed (and the epoch's augmentation key is the train step's business).
      device_augment: must stay ``True``: this pipeline cannot augment on the host.
      workers: decoding threads (default: 2 per CPU core, at most 32).
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
        cache: str | os.PathLike | None = "memory",
        shuffle_buffer: int | None = None,
        seed: int = 0,
        device_augment: bool = True,
        workers: int | None = None,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if training and source.num_examples < batch_size:
            raise ValueError(
                f"{source.description}: {source.num_examples} training images is fewer than one batch "
                f"of {batch_size}; lower batch_size"
            )
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {resize!r}")
        if source.labels is None or (source.paths is None and source.images is None):
            raise ValueError(
                f"{source.description or 'this source'}: no files or arrays to read without TensorFlow "
                "(TFDS sources need it); use from_records / from_arrays, or the tf.data Pipeline"
            )
        augment = augment if (training and augment is not None and not augment.is_identity) else None
        if augment is not None and not device_augment:
            raise ValueError(
                "the NumPy pipeline does not augment on the host: keep device_augment=True and apply "
                "pipeline.augment_on_device in the train step (device_augment.augment_train_batch)"
            )
        self.source = source
        self.image_size = tuple(int(v) for v in image_size)
        self.batch_size = batch_size
        self.training = training
        # as Pipeline: augmentation only for training, None when it would change nothing
        self.augment = augment if (training and augment is not None and not augment.is_identity) else None
        self.resize = resize
        self.cache = cache
        self.shuffle_buffer = shuffle_buffer or source.num_examples
        self.seed = seed
        self.device_augment = True
        self.workers = workers or min(32, 2 * (os.cpu_count() or 1))
        self.cache_files: Path | None = None
        if cache not in (None, "memory"):
            self.cache_files = cache_prefix(cache, source, self.image_size, resize).with_suffix(".npy")
        self._labels = np.asarray(source.labels, np.int32)
        self._images: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return self.source.num_examples

    @property
    def augment_on_device(self) -> AugmentConfig | None:
        """The augmentation the train step applies on the device (``None``: none)."""
        return self.augment

    def __len__(self) -> int:
        """Batches per epoch."""
        n, b = self.num_examples, self.batch_size
        return n // b if self.training else math.ceil(n / b)

    def resized(self, image_size: tuple[int, int]) -> NumpyPipeline:
        """The same pipeline (source, batches, augmentation, cache kind, seed) at another
        ``image_size``; ``self`` when the size is unchanged."""
        if tuple(image_size) == self.image_size:
            return self
        return NumpyPipeline(
            self.source, image_size=image_size, batch_size=self.batch_size, training=self.training,
            augment=self.augment, resize=self.resize, cache=self.cache,
            shuffle_buffer=self.shuffle_buffer, seed=self.seed, workers=self.workers,
        )  # fmt: skip

    # ------------------------------------------------------------------ the decoded images

    def images(self) -> np.ndarray:
        """All images, decoded and resized: uint8[N, H, W, 3] (built on first use, then kept)."""
        if self._images is None:
            self._images = self._load_cache() if self.cache_files else None
            if self._images is None:
                self._images = self._build()
        return self._images

    def _load_cache(self) -> np.ndarray | None:
        path = self.cache_files
        if not path.exists():
            return None
        expected = (self.num_examples, *self.image_size, 3)
        try:
            images = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            log.warning("%s: unreadable image cache (%s); decoding again", path, exc)
            return None
        if images.shape != expected or images.dtype != np.uint8:
            log.warning("%s: holds %s %s, expected uint8 %s; decoding again", path, images.dtype,
                        images.shape, expected)  # fmt: skip
            return None
        log.info("%s: %d cached images", path, len(images))
        return images

    def _build(self) -> np.ndarray:
        shape = (self.num_examples, *self.image_size, 3)
        partial = None
        if self.cache_files:
            self.cache_files.parent.mkdir(parents=True, exist_ok=True)
            partial = self.cache_files.with_name(f"{self.cache_files.name}.partial-{os.getpid()}")
            out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=shape)
        else:
            out = np.empty(shape, np.uint8)
        start = time.perf_counter()
        src = self.source
        if src.images is not None:

            def fill(i: int) -> None:
                out[i] = pil_decode.resize_image(src.images[i], self.image_size, self.resize)
        else:

            def fill(i: int) -> None:
                image = pil_decode.decode_file(src.paths[i])
                out[i] = pil_decode.resize_image(image, self.image_size, self.resize)

        with ThreadPoolExecutor(self.workers) as pool:
            for _ in pool.map(fill, range(len(out)), chunksize=16):
                pass
        log.info("decoded %d images to %s in %.1f s (%d threads)", len(out), self.image_size,
                 time.perf_counter() - start, self.workers)  # fmt: skip
        if partial is not None:
            out.flush()
            del out
            os.replace(partial, self.cache_files)  # atomic: a killed run leaves only a .partial file
            return np.load(self.cache_files, mmap_mode="r")
        return out

    # ------------------------------------------------------------------ batches

    def order(self, epoch: int = 0) -> np.ndarray:
        """The example indices of ``epoch`` in batch order: int64[N] (a permutation when training)."""
        if not self.training:
            return np.arange(self.num_examples)
        digest = hashlib.sha256(f"{self.seed}\0{epoch}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(self.num_examples)

    def epoch(self, epoch: int = 0) -> Iterator[dict[str, np.ndarray]]:
        """NumPy batches of ``epoch`` (see the module docstring)."""
        images, labels, b = self.images(), self._labels, self.batch_size
        order = self.order(epoch)
        for start in range(0, len(self) * b, b):
            index = order[start : start + b]
            if self.training or len(index) == b:
                yield {"image": images[index], "label": labels[index], "mask": np.ones(b, bool)}
                continue
            real = len(index)
            image = np.zeros((b, *images.shape[1:]), np.uint8)
            image[:real] = images[index]
            label = np.zeros(b, np.int32)
            label[:real] = labels[index]
            yield {"image": image, "label": label, "mask": np.arange(b) < real}

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.epoch(0)


def make_pipeline(source: Source, *, backend: str = "auto", **kwargs):
    """A :class:`~imgcls_jax.data.pipeline.Pipeline` (tf.data) or a :class:`NumpyPipeline`.

    Args:
      source: what to read.
      backend: ``"auto"`` (tf.data where TensorFlow is importable, else NumPy), ``"tf"`` or ``"numpy"``.
      **kwargs: the pipelines' keyword arguments (``image_size``, ``batch_size``, ``training``,
        ``augment``, ``resize``, ``cache``, ``shuffle_buffer``, ``seed``, ``device_augment``);
        ``workers`` is the NumPy pipeline's alone, ``device_augment`` is always on there.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        backend = "tf" if tensorflow_available() else "numpy"
    if backend == "tf":
        if not tensorflow_available():
            raise ValueError(
                "backend='tf' but TensorFlow is not importable here: install tensorflow-cpu or use "
                "backend='numpy' (augmentation then runs on the device)"
            )
        from imgcls_jax.data.pipeline import Pipeline

        kwargs.pop("workers", None)
        return Pipeline(source, **kwargs)
    kwargs.setdefault("device_augment", True)
    return NumpyPipeline(source, **kwargs)
