"""Image files -> uint8 RGB arrays with Pillow and NumPy: the TensorFlow-free twin of :mod:`.decode`.

The same formats (JPEG, PNG 8/16-bit, BMP, GIF first frame; identified by their first bytes, not
their extension), the same conversions (grayscale -> RGB, alpha dropped, 16-bit scaled to 8) and the
same resize geometry as ``decode.resize_image``: ``tf.image.resize``'s bilinear interpolation
(half-pixel centres, no antialiasing) written in NumPy, with TensorFlow's float32 size arithmetic for
``"center_crop"`` and ``"pad"``, then rounded half to even as ``tf.round``. Pillow releases the GIL
while decoding, so :func:`check_images` and :func:`load_images` use threads.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from imgcls_jax.data.formats import CROP_FRACTION, RESIZE_MODES, ImageCheck, read_image_file, sniff_format

log = logging.getLogger(__name__)

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def _pil():
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - Pillow is a dependency
        raise ImportError("decoding images without TensorFlow needs Pillow: pip install pillow") from exc
    return Image


def _decode_bytes(data: bytes) -> np.ndarray:
    """Encoded bytes -> uint8[H, W, 3] (raises Pillow's errors for corrupt or truncated data)."""
    Image = _pil()
    import io

    with Image.open(io.BytesIO(data)) as image:
        image.load()  # the first frame; decoding errors (truncation) surface here
        if image.mode in _SIXTEEN_BIT_MODES:  # 16-bit grayscale PNG: the high byte, as TF
            grey = (np.asarray(image).astype(np.uint32) >> 8).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=-1)  # (16-bit RGB is read as 8-bit MSBs already)
        if image.mode != "RGB":
            image = image.convert("RGB")  # L, LA, P, PA, RGBA, 1, CMYK: alpha dropped, grey repeated
        return np.asarray(image, np.uint8).copy()


def check_image(path: str) -> ImageCheck:
    """Read and fully decode one file with Pillow; never raises (the failure is in ``reason``).

    The same reasons as ``decode.check_image``: unreadable, empty, not a supported image (by its
    first bytes), corrupt or truncated, no pixels.
    """
    read = read_image_file(path)
    if isinstance(read, ImageCheck):
        return read
    data, fmt = read
    try:
        image = _decode_bytes(data)
    except Exception as exc:  # Pillow raises OSError, SyntaxError, ValueError, struct.error, ...
        message = str(exc).split("\n")[0] or type(exc).__name__
        return ImageCheck(path, f"corrupt or truncated {fmt.upper()}: {message}", fmt)
    height, width, channels = image.shape
    if height == 0 or width == 0:
        return ImageCheck(path, f"{fmt.upper()} has no pixels ({height}x{width})", fmt)
    return ImageCheck(path, None, fmt, height, width, channels)


def _pool_map(fn: Callable, items: Sequence, workers: int | None):
    workers = workers or min(16, (os.cpu_count() or 1) * 2)
    if len(items) < 2 * workers:
        return [fn(item) for item in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items, chunksize=8))


def check_images(paths: Sequence[str], workers: int | None = None) -> list[ImageCheck]:
    """:func:`check_image` for many files, in threads."""
    return _pool_map(check_image, list(paths), workers)


def decode_file(path: str) -> np.ndarray:
    """One file -> uint8[H, W, 3]; ``ValueError`` naming the file for anything :func:`check_image`
    rejects."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        if sniff_format(data[:16]) is not None:
            image = _decode_bytes(data)
            if image.size:
                return image
    except Exception:  # noqa: S110 - check_image below says what went wrong
        pass
    reason = check_image(path).reason or "cannot be decoded"
    raise ValueError(f"{path}: {reason} (scan_folder(verify=True) skips such files)")


# ----------------------------------------------------------------------------- resizing


def _source_rows(in_size: int, out_size: int):
    """``tf.image.resize`` bilinear (half-pixel centres): lower, upper int[out] and lerp float32[out]."""
    scale = np.float32(in_size) / np.float32(out_size)
    source = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(source)
    lower = np.maximum(floor, 0).astype(np.intp)
    upper = np.minimum(np.ceil(source).astype(np.intp), in_size - 1)
    return lower, upper, (source - floor).astype(np.float32)


def resize_bilinear(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 or float[H, W, C] -> float32[height, width, C], as ``tf.image.resize(method="bilinear")``
    (no antialiasing: downscaling samples, as Keras's ``image_dataset_from_directory``)."""
    y_lo, y_hi, y_lerp = _source_rows(image.shape[0], height)
    x_lo, x_hi, x_lerp = _source_rows(image.shape[1], width)
    # gather the output's samples first, in uint8 (rows, then columns: np.take copies whole rows)
    rows_lo, rows_hi = image.take(y_lo, axis=0), image.take(y_hi, axis=0)
    top_left, bottom_left = (r.take(x_lo, axis=1).astype(np.float32) for r in (rows_lo, rows_hi))
    top_right, bottom_right = (r.take(x_hi, axis=1).astype(np.float32) for r in (rows_lo, rows_hi))
    x_lerp = x_lerp[None, :, None]
    top = top_left + (top_right - top_left) * x_lerp  # TF's order of operations
    bottom = bottom_left + (bottom_right - bottom_left) * x_lerp
    return top + (bottom - top) * y_lerp[:, None, None]


def resize_image(image: np.ndarray, size: tuple[int, int], mode: str = "squash") -> np.ndarray:
    """uint8[H, W, 3] -> uint8[size[0], size[1], 3] with ``decode.resize_image``'s geometry, rounded.

    Modes: ``"squash"`` (stretch), ``"center_crop"`` (shorter side to ``size / 0.875``, then the
    centre), ``"pad"`` (fit inside, zero borders), as :func:`imgcls_jax.data.decode.resize_image`.
    """
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    height, width = size
    f32 = np.float32
    in_h, in_w = image.shape[:2]
    if mode == "squash":
        out = resize_bilinear(image, height, width)
    elif mode == "center_crop":
        shape = np.array([in_h, in_w], f32)
        scale = np.max(np.array([height, width], f32) / f32(CROP_FRACTION) / shape)
        new_h, new_w = np.ceil(shape * scale).astype(np.int64)
        resized = resize_bilinear(image, int(new_h), int(new_w))
        top, left = (new_h - height) // 2, (new_w - width) // 2
        out = resized[top : top + height, left : left + width]
    else:  # pad, with tf.image.resize_with_pad's float32 arithmetic
        ratio = max(f32(in_w) / f32(width), f32(in_h) / f32(height))
        new_h_f, new_w_f = f32(in_h) / ratio, f32(in_w) / ratio
        new_h, new_w = int(np.floor(new_h_f)), int(np.floor(new_w_f))
        if new_h < 1 or new_w < 1:  # TensorFlow fails here too ("output dimensions must be positive")
            raise ValueError(
                f"resize='pad' of a {in_h}x{in_w} image to {height}x{width} leaves a {new_h}x{new_w} "
                "image: use resize='squash' or 'center_crop' for so extreme an aspect ratio"
            )
        pad_top = max(0, int(np.floor((f32(height) - new_h_f) / f32(2))))
        pad_left = max(0, int(np.floor((f32(width) - new_w_f) / f32(2))))
        out = np.zeros((height, width, image.shape[2]), np.float32)
        out[pad_top : pad_top + new_h, pad_left : pad_left + new_w] = resize_bilinear(image, new_h, new_w)
    return np.round(np.clip(out, 0.0, 255.0)).astype(np.uint8)


def load_image(path: str, size: tuple[int, int] | None = None, mode: str = "squash") -> np.ndarray:
    """Read, decode and (optionally) resize one file: ``decode.load_image`` without TensorFlow.

    ``uint8[H, W, 3]`` without ``size``; ``uint8[size[0], size[1], 3]`` with it. Raises
    ``ValueError`` naming the file for anything :func:`check_image` rejects.
    """
    image = decode_file(path)
    return image if size is None else resize_image(image, size, mode)
