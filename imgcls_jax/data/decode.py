"""Image files -> uint8 RGB tensors: format sniffing, verification, decoding and resizing.

TensorFlow is imported lazily (inside functions): importing this module does not load it.

Formats: JPEG, PNG (8- and 16-bit), BMP and GIF (first frame). Grayscale is expanded to RGB and
RGBA loses its alpha channel, as ``keras.utils.image_dataset_from_directory`` does. Files are
identified by their first bytes, not their extension, so a text file named ``.jpg`` is caught.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from imgcls_jax.data.formats import (  # noqa: F401  (their home before formats.py)
    CROP_FRACTION,
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    ImageCheck,
    read_image_file,
    sniff_format,
)

log = logging.getLogger(__name__)


def tensorflow_available() -> bool:
    """Whether TensorFlow can be imported here, without importing it (``False`` also where an
    import hook or ``sys.modules["tensorflow"] = None`` blocks it). Where it is not, this module's
    checks and :func:`load_image` use Pillow (:mod:`imgcls_jax.data.pil_decode`)."""
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"] is not None
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def import_tensorflow():
    """``import tensorflow``, its start-up notices kept out of the user's terminal.

    TensorFlow's C++ start-up lines (oneDNN, CPU features, "All log messages before
    absl::InitializeLog()") are written to file descriptor 2 before ``TF_CPP_MIN_LOG_LEVEL`` is
    read, so the first import runs with that descriptor pointed at a temporary file; what it
    wrote is logged at DEBUG level (``imgcls-jax -v`` shows it) and, if the import fails, part
    of the error. ``TF_CPP_MIN_LOG_LEVEL`` defaults to 2 for what TensorFlow logs later."""
    if "TF_CPP_MIN_LOG_LEVEL" not in os.environ:  # not setdefault: AutoGraph warns on converting it
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    if "tensorflow" in sys.modules:
        import tensorflow as tf

        return tf
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as notices:
        os.dup2(notices.fileno(), 2)
        try:
            import tensorflow as tf
        except BaseException as exc:
            os.dup2(saved, 2)
            exc.add_note(_read_back(notices))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        text = _read_back(notices)
    if text:
        log.debug("TensorFlow's start-up notices:\n%s", text)
    return tf


def _read_back(file) -> str:
    file.seek(0)
    return file.read().decode("utf-8", "replace").strip()


def check_image(path: str) -> ImageCheck:
    """Read and fully decode one file; never raises (the failure is in ``reason``). With
    TensorFlow's decoders, the ones the tf.data pipeline uses; with Pillow's where TensorFlow is not
    importable."""
    if not tensorflow_available():
        from imgcls_jax.data import pil_decode

        return pil_decode.check_image(path)
    tf = import_tensorflow()
    read = read_image_file(path)
    if isinstance(read, ImageCheck):
        return read
    data, fmt = read
    try:
        image = tf.io.decode_image(data, expand_animations=False)
    except (tf.errors.InvalidArgumentError, tf.errors.UnknownError) as exc:
        message = str(exc).split("\n")[0].split("}}")[-1].strip() or type(exc).__name__
        return ImageCheck(path, f"corrupt or truncated {fmt.upper()}: {message}", fmt)
    height, width, channels = (int(d) for d in image.shape)
    if height == 0 or width == 0:
        return ImageCheck(path, f"{fmt.upper()} has no pixels ({height}x{width})", fmt)
    return ImageCheck(path, None, fmt, height, width, channels)


def check_images(paths: Sequence[str], workers: int | None = None) -> list[ImageCheck]:
    """:func:`check_image` for many files, in threads (TF's and Pillow's decoding release the GIL)."""
    workers = workers or min(8, (os.cpu_count() or 1) * 2)
    if len(paths) < 2 * workers:
        return [check_image(p) for p in paths]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(check_image, paths, chunksize=16))


def decode_image(data):
    """Encoded bytes (a scalar ``tf.string``) -> ``uint8[H, W, 3]``; usable inside tf.data.

    16-bit PNGs are scaled to 8 bits; grayscale becomes RGB; alpha is dropped; GIF gives its
    first frame. JPEGs use libjpeg's accurate integer IDCT (``dct_method="INTEGER_ACCURATE"``, the
    default of libjpeg itself, Pillow and torchvision), not TensorFlow's default fast one, which is
    up to ~20 grey levels off on real photos; so this and Pillow's decoding
    (:mod:`imgcls_jax.data.pil_decode`) give the same pixels.
    """
    tf = import_tensorflow()
    image = tf.cond(
        tf.io.is_jpeg(data),
        lambda: tf.io.decode_jpeg(data, channels=3, dct_method="INTEGER_ACCURATE"),
        lambda: tf.io.decode_image(data, channels=3, dtype=tf.uint8, expand_animations=False),
    )
    image.set_shape([None, None, 3])
    return image


def resize_image(image, size: tuple[int, int], mode: str = "squash"):
    """Resize ``uint8``/float ``[H, W, 3]`` to ``float32[size[0], size[1], 3]`` in [0, 255].

    Modes: ``"squash"`` (stretch to size, bilinear; Keras's default), ``"center_crop"``
    (resize the shorter side to ``size / 0.875`` keeping the aspect ratio, then crop the center:
    ImageNet evaluation), ``"pad"`` (fit inside size keeping the aspect ratio, pad with zeros).
    """
    tf = import_tensorflow()
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    height, width = size
    image = tf.cast(image, tf.float32)
    if mode == "squash":
        out = tf.image.resize(image, (height, width), method="bilinear")
    elif mode == "pad":
        out = tf.image.resize_with_pad(image, height, width, method="bilinear")
    else:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale = tf.reduce_max(tf.constant([height, width], tf.float32) / CROP_FRACTION / shape)
        new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
        resized = tf.image.resize(image, new, method="bilinear")
        top = (new[0] - height) // 2
        left = (new[1] - width) // 2
        out = resized[top : top + height, left : left + width]
    out = tf.clip_by_value(out, 0.0, 255.0)
    out.set_shape([height, width, 3])
    return out


def load_image(path: str, size: tuple[int, int] | None = None, mode: str = "squash"):
    """Read, decode and (optionally) resize one file eagerly; returns a numpy array.

    ``uint8[H, W, 3]`` without ``size``; ``uint8[size[0], size[1], 3]`` (rounded) with it.
    Raises ``ValueError`` naming the file for anything :func:`check_image` rejects. Where TensorFlow is
    not importable, ``pil_decode.load_image`` (the same pixels).
    """
    if not tensorflow_available():
        from imgcls_jax.data import pil_decode

        return pil_decode.load_image(path, size, mode)
    tf = import_tensorflow()
    check = check_image(path)
    if check.reason:
        raise ValueError(f"{path}: {check.reason}")
    image = decode_image(tf.io.read_file(path))
    if size is not None:
        image = tf.cast(tf.round(resize_image(image, size, mode)), tf.uint8)
    return image.numpy()
