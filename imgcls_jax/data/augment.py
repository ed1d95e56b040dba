"""Seeded image augmentation as TensorFlow ops for ``tf.data`` pipelines (graph mode) or eager use.

TensorFlow is imported lazily: importing this module does not load it. Every draw is stateless and
each op has its own sub-seed, so the same seed gives the same output and switching one op on or off
never changes another's draws. :func:`augment_image` applies flip -> random resized crop -> one affine
warp (rotation, zoom, translation) -> brightness -> contrast -> saturation -> hue; :func:`augment_batch`
does the same to each image of a batch (with each image's own seed); :func:`mix_batch` applies
mixup/cutmix to a batch. Meanings are Keras 3's (symmetric factors) except as noted in
:class:`AugmentConfig` (two-axis flips, saturation and hue follow torchvision's ``ColorJitter``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imgcls_jax.config import FILL_MODES, FLIP_MODES, AugmentConfig  # noqa: F401  (their old home)
from imgcls_jax.data.decode import import_tensorflow

if TYPE_CHECKING:
    import tensorflow as tf

    Seed = tf.Tensor | Sequence[int]

#: One independent sub-seed per op, always split the same way.
_OPS = ("flip_h", "flip_v", "crop", "rotation", "zoom", "translation", "brightness", "contrast", "sat", "hue")
_CROP_ATTEMPTS = 10


def augment_image(image: tf.Tensor, seed: Seed, config: AugmentConfig) -> tf.Tensor:
    """Randomly augments one image; deterministic given ``seed``.

    Args:
      image: float32[H, W, 3] tensor in [0, 255] (other dtypes are cast to float32).
      seed: int32 or int64[2] tensor, the stateless seed (e.g. ``(run_seed, example_index)``).
      config: what to do (see :class:`AugmentConfig`).

    Returns:
      float32[H, W, 3] in [0, 255], the same H and W (and static shape) as ``image``. Works eagerly
      and inside ``tf.data.Dataset.map`` / ``tf.function``.
    """
    tf = import_tensorflow()
    image = tf.cast(tf.convert_to_tensor(image), tf.float32)
    if config.is_identity:
        return image
    return _apply_params(image, _sample_params(tf.shape(image), seed, config), config)


def _sample_params(shape, seed: Seed, config: AugmentConfig) -> dict:
    """The random parameters :func:`augment_image` draws for an image of ``shape`` ([H, W, C]).

    Returns a dict of scalar tensors (those of ops switched off in ``config`` are absent):
    ``flip_h``, ``flip_v`` (bool), ``crop`` (int32[4]: top, left, height, width in input pixels),
    ``angle`` (radians), ``zoom``, ``shift`` (float32[2]: dy, dx in pixels), ``brightness`` (grey
    levels added), ``contrast``, ``saturation`` (factors) and ``hue`` (turns).
    """
    tf = import_tensorflow()
    seeds = dict(zip(_OPS, tf.unstack(tf.random.experimental.stateless_split(seed, len(_OPS)))))
    uniform = tf.random.stateless_uniform
    c = config
    params = {}
    if c.flip in ("horizontal", "horizontal_and_vertical"):
        params["flip_h"] = uniform([], seeds["flip_h"]) < 0.5
    if c.flip in ("vertical", "horizontal_and_vertical"):
        params["flip_v"] = uniform([], seeds["flip_v"]) < 0.5
    if c.random_resized_crop:
        params["crop"] = _sample_crop(shape, seeds["crop"], c.crop_scale, c.crop_ratio)
    if c.rotation > 0 or c.zoom > 0 or c.translation > 0:
        size = tf.cast(shape[:2], tf.float32)
        params["angle"] = uniform([], seeds["rotation"], -c.rotation, c.rotation) * (2 * math.pi)
        params["zoom"] = 1.0 + uniform([], seeds["zoom"], -c.zoom, c.zoom)
        params["shift"] = uniform([2], seeds["translation"], -c.translation, c.translation) * size
    if c.brightness > 0:
        params["brightness"] = uniform([], seeds["brightness"], -c.brightness, c.brightness) * 255
    if c.contrast > 0:
        params["contrast"] = uniform([], seeds["contrast"], 1 - c.contrast, 1 + c.contrast)
    if c.saturation > 0:
        params["saturation"] = uniform([], seeds["sat"], 1 - c.saturation, 1 + c.saturation)
    if c.hue > 0:
        params["hue"] = uniform([], seeds["hue"], -c.hue, c.hue)
    return params


def _apply_params(image, params: dict, config: AugmentConfig):
    """Applies :func:`_sample_params`'s (or any explicit) parameters to float32[H, W, 3] ``image``,
    in :func:`augment_image`'s order; ops without a parameter in ``params`` are skipped."""
    tf = import_tensorflow()
    static_shape = image.shape
    p = params
    if "flip_h" in p:
        image = _flip(image, p["flip_h"], axis=1)
    if "flip_v" in p:
        image = _flip(image, p["flip_v"], axis=0)
    if "crop" in p:
        image = _crop_and_resize(image, p["crop"])
    if "angle" in p:
        size = tf.cast(tf.shape(image)[:2], tf.float32)
        shift = tf.cast(p["shift"], tf.float32)
        matrix = _affine_matrix(size[0], size[1], p["angle"], p["zoom"], shift[1], shift[0])
        image = _apply_affine(image, matrix, config.fill_mode, config.fill_value)
    if "brightness" in p:
        image = _adjust_brightness(image, p["brightness"])
    if "contrast" in p:
        image = _adjust_contrast(image, p["contrast"])
    if "saturation" in p:
        image = _adjust_saturation(image, p["saturation"])
    if "hue" in p:
        image = tf.clip_by_value(tf.image.adjust_hue(image / 255.0, p["hue"]) * 255.0, 0.0, 255.0)
    return tf.ensure_shape(image, static_shape)


def augment_batch(images: tf.Tensor, seeds: tf.Tensor, config: AugmentConfig) -> tf.Tensor:
    """:func:`augment_image` of each image with its own seed, for use after ``Dataset.batch``.

    Exactly ``tf.stack([augment_image(images[i], seeds[i], config) for i in range(B)])``, run as one
    ``tf.map_fn`` over the batch. The loop is deliberate: on CPU (2 cores, 224x224) it was faster than
    batched ops (one ``ImageProjectiveTransformV3`` for the batch, etc.), whose kernels cost as much per
    image as on one image and which stream the whole batch through memory once per op, where the loop
    keeps each image in cache. Per-element ``augment_image`` before ``Dataset.batch`` is at least as fast.

    Args:
      images: float32[B, H, W, 3] tensor in [0, 255] (other dtypes are cast to float32).
      seeds: int32 or int64[B, 2] tensor, one stateless seed per image.
      config: what to do (see :class:`AugmentConfig`); mixup and cutmix are :func:`mix_batch`'s.

    Returns:
      float32[B, H, W, 3] in [0, 255], the same shape (and static shape) as ``images``.
    """
    tf = import_tensorflow()
    images = tf.convert_to_tensor(images)
    if config.is_identity:
        return tf.cast(images, tf.float32)
    return tf.map_fn(  # casting each image in the loop, in cache, is faster than casting the batch
        lambda args: augment_image(args[0], args[1], config),
        (images, tf.convert_to_tensor(seeds)),
        fn_output_signature=tf.TensorSpec(images.shape[1:], tf.float32),
    )


def _flip(image, flip, axis: int):
    """``image`` reversed along ``axis`` where the bool scalar ``flip`` is true, else unchanged."""
    tf = import_tensorflow()
    return tf.cond(flip, lambda: tf.reverse(image, [axis]), lambda: image)


def _sample_crop(shape, seed, scale: tuple[float, float], ratio: tuple[float, float]):
    """torchvision's RandomResizedCrop sampling (10 tries, then a centre crop) for an image of
    ``shape`` ([H, W, C]): int32[4], the box's (top, left, height, width)."""
    tf = import_tensorflow()
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    s_area, s_ratio, s_offset = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    area = h * w * tf.random.stateless_uniform([_CROP_ATTEMPTS], s_area, scale[0], scale[1])
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    aspect = tf.exp(tf.random.stateless_uniform([_CROP_ATTEMPTS], s_ratio, *log_ratio))
    cw, ch = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (cw >= 1) & (cw <= w) & (ch >= 1) & (ch <= h)
    found = tf.reduce_any(fits)
    first = tf.argmax(tf.cast(fits, tf.int32))  # the first attempt that fits
    # Fallback: the largest centred crop whose aspect ratio is clamped to ``ratio``.
    fw = tf.where(w / h > ratio[1], tf.round(h * ratio[1]), w)
    fh = tf.where(w / h < ratio[0], tf.round(w / ratio[0]), h)
    cw, ch = tf.where(found, cw[first], fw), tf.where(found, ch[first], fh)
    u = tf.random.stateless_uniform([2], s_offset)
    top = tf.where(found, tf.minimum(tf.floor(u[0] * (h - ch + 1)), h - ch), tf.floor((h - ch) / 2))
    left = tf.where(found, tf.minimum(tf.floor(u[1] * (w - cw + 1)), w - cw), tf.floor((w - cw) / 2))
    return tf.cast(tf.stack([top, left, ch, cw]), tf.int32)


def _crop_and_resize(image, box):
    """The ``box`` (int32[4]: top, left, height, width) of ``image``, resized (bilinear) back to [H, W]."""
    tf = import_tensorflow()
    top, left, ch, cw = tf.unstack(tf.cast(box, tf.int32))
    crop = image[top : top + ch, left : left + cw]
    return tf.image.resize(crop, tf.shape(image)[:2], method="bilinear")


def _affine_matrix(height, width, angle, zoom, dx, dy):
    """The 8-vector output->input pixel map of rotation, then zoom, then translation.

    Equals Keras's RandomRotation (angle in radians, about ((W-1)/2, (H-1)/2)), RandomZoom (``zoom``
    for both axes) and RandomTranslation (``dx``, ``dy`` in pixels, positive = right/down) applied in
    that order, composed into one map (one interpolation instead of three):
    ``input = c + zoom * Rot(angle) @ (output - (dx, dy) - c)``.
    """
    tf = import_tensorflow()
    cx, cy = (width - 1.0) / 2.0, (height - 1.0) / 2.0
    a0, a1 = zoom * tf.cos(angle), -zoom * tf.sin(angle)
    b0, b1 = zoom * tf.sin(angle), zoom * tf.cos(angle)
    a2 = cx - a0 * (dx + cx) - a1 * (dy + cy)
    b2 = cy - b0 * (dx + cx) - b1 * (dy + cy)
    zero = tf.zeros_like(a0)
    return tf.cast(tf.stack([a0, a1, a2, b0, b1, b2, zero, zero]), tf.float32)


def _apply_affine(image, matrix, fill_mode: str, fill_value: float):
    """Warps float32[H, W, C] by the 8-vector ``matrix`` (bilinear), as Keras's affine_transform."""
    tf = import_tensorflow()
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=image[None],
        transforms=matrix[None],
        output_shape=tf.shape(image)[:2],
        fill_value=tf.constant(fill_value, tf.float32),
        interpolation="BILINEAR",
        fill_mode=fill_mode.upper(),
    )
    return out[0]


def _adjust_brightness(image, delta):
    """``clip(image + delta, 0, 255)``: Keras RandomBrightness with value_range (0, 255)."""
    return import_tensorflow().clip_by_value(image + delta, 0.0, 255.0)


def _adjust_contrast(image, factor):
    """``clip((x - mean) * factor + mean, 0, 255)``, mean per channel over H, W: Keras RandomContrast."""
    tf = import_tensorflow()
    mean = tf.reduce_mean(image, axis=[-3, -2], keepdims=True)
    return tf.clip_by_value((image - mean) * factor + mean, 0.0, 255.0)


def _adjust_saturation(image, factor):
    """HSV saturation times ``factor`` (at most 1), hue and value kept: ``tf.image.adjust_saturation`` in
    closed form (which is faster than that op): each channel x becomes ``v - k * (v - x)``, with v the
    pixel's largest channel and ``k = min(factor, v / (v - smallest channel))``."""
    tf = import_tensorflow()
    v, low = tf.reduce_max(image, -1, keepdims=True), tf.reduce_min(image, -1, keepdims=True)
    k = tf.minimum(factor, tf.math.divide_no_nan(v, v - low))
    return tf.maximum(v - (v - image) * k, 0.0)  # and <= v <= 255


def _sample_beta(seed, alpha: float):
    """One float32 draw of Beta(alpha, alpha), as the ratio of two stateless Gamma(alpha) draws."""
    tf = import_tensorflow()
    s1, s2 = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    g1 = tf.random.stateless_gamma([], s1, alpha, dtype=tf.float64)
    g2 = tf.random.stateless_gamma([], s2, alpha, dtype=tf.float64)
    total = g1 + g2  # both can underflow to 0 for tiny alpha: then keep the image (lambda = 1)
    return tf.cast(tf.where(total > 0, tf.math.divide_no_nan(g1, total), 1.0), tf.float32)


def mix_batch(
    images: tf.Tensor, labels_onehot: tf.Tensor, seed: Seed, config: AugmentConfig
) -> tuple[tf.Tensor, tf.Tensor]:
    """Batch-level mixup and/or cutmix (timm's ``Mixup`` in ``"batch"`` mode); each sample i is
    paired with sample B-1-i (the batch reversed).

    Mixup: ``lambda ~ Beta(mixup_alpha, mixup_alpha)``, images and labels become
    ``lambda * x + (1 - lambda) * x_reversed``. CutMix: ``lambda ~ Beta(cutmix_alpha, cutmix_alpha)``, one
    box of about ``(1 - lambda) * H * W`` pixels (sides ``sqrt(1 - lambda)`` times H and W, random centre,
    clipped to the image) is pasted from the reversed batch, and labels are mixed by the box's actual
    area fraction. With both alphas > 0 one of the two is chosen per batch with probability 1/2.

    Args:
      images: float32[B, H, W, 3] in [0, 255].
      labels_onehot: float32[B, K], one-hot (or already soft) labels.
      seed: int32 or int64[2] tensor, the stateless seed for this batch.
      config: uses ``mixup_alpha`` and ``cutmix_alpha``; both 0 returns the inputs unchanged.

    Returns:
      ``(images, labels)``: float32[B, H, W, 3] in [0, 255] and float32[B, K] (rows still sum to 1).
    """
    tf = import_tensorflow()
    images = tf.cast(tf.convert_to_tensor(images), tf.float32)
    labels = tf.cast(tf.convert_to_tensor(labels_onehot), tf.float32)
    mixup, cutmix = float(config.mixup_alpha), float(config.cutmix_alpha)
    if mixup == 0 and cutmix == 0:
        return images, labels
    s_choice, s_lam, s_box = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    if mixup > 0 and cutmix > 0:
        use_cutmix = tf.random.stateless_uniform([], s_choice) < 0.5
        return tf.cond(
            use_cutmix,
            lambda: _cutmix(images, labels, _sample_beta(s_lam, cutmix), s_box),
            lambda: _mixup(images, labels, _sample_beta(s_lam, mixup)),
        )
    if cutmix > 0:
        return _cutmix(images, labels, _sample_beta(s_lam, cutmix), s_box)
    return _mixup(images, labels, _sample_beta(s_lam, mixup))


def _mixup(images, labels, lam):
    return lam * images + (1 - lam) * images[::-1], lam * labels + (1 - lam) * labels[::-1]


def _cutmix(images, labels, lam, seed):
    shape = import_tensorflow().shape(images)
    return _paste_box(images, labels, _cutmix_box(shape[1], shape[2], lam, seed))


def _cutmix_box(h, w, lam, seed):
    """CutMix's box for ``h x w`` images and weight ``lam``: int32[4], (y0, y1, x0, x1), rows
    ``y0 <= y < y1`` and columns ``x0 <= x < x1`` (sides ``sqrt(1 - lam)`` times h and w, centre
    uniform, clipped to the image)."""
    tf = import_tensorflow()
    cut = tf.sqrt(1.0 - lam)
    half_h = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32) // 2
    half_w = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32) // 2
    u = tf.random.stateless_uniform([2], seed)
    cy = tf.minimum(tf.cast(u[0] * tf.cast(h, tf.float32), tf.int32), h - 1)
    cx = tf.minimum(tf.cast(u[1] * tf.cast(w, tf.float32), tf.int32), w - 1)
    y0, y1 = tf.clip_by_value(cy - half_h, 0, h), tf.clip_by_value(cy + half_h, 0, h)
    x0, x1 = tf.clip_by_value(cx - half_w, 0, w), tf.clip_by_value(cx + half_w, 0, w)
    return tf.stack([y0, y1, x0, x1])


def _paste_box(images, labels, box):
    """Pastes ``box`` (int32[4]: y0, y1, x0, x1) of the reversed batch into each image; labels are
    mixed by the box's area fraction."""
    tf = import_tensorflow()
    shape = tf.shape(images)
    h, w = shape[1], shape[2]
    y0, y1, x0, x1 = tf.unstack(tf.cast(box, tf.int32))
    rows, cols = tf.range(h)[:, None], tf.range(w)[None, :]
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
    mixed = tf.where(inside[None, :, :, None], images[::-1], images)
    kept = 1.0 - tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
    return mixed, kept * labels + (1.0 - kept) * labels[::-1]


def save_augmentation_grid(
    images: np.ndarray | Sequence[np.ndarray],
    path: str | os.PathLike,
    config: AugmentConfig,
    *,
    samples_per_image: int = 8,
    seed: int = 0,
) -> Path:
    """Writes a PNG grid to eyeball an augmentation: one row per image, the original first.

    Args:
      images: uint8[N, H, W, 3] array, or a list of N uint8[H, W, 3] arrays of one size.
      path: the PNG file to write (parent folders are created).
      config: the augmentation to show.
      samples_per_image: augmented copies per row; copy j of image i uses seed ``(seed, i * S + j)``.
      seed: the first half of every augmentation seed.

    Returns:
      ``path``, a uint8 RGB PNG of ``N * H`` rows and ``(samples_per_image + 1) * W`` columns.
    """
    tf = import_tensorflow()
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8 or len(array) == 0:
        raise ValueError(
            f"images must be uint8[N, H, W, 3] with N >= 1, got {array.dtype}{list(array.shape)}; "
            "cast or decode them to uint8 RGB first"
        )
    if samples_per_image < 1:
        raise ValueError(f"samples_per_image must be >= 1, got {samples_per_image}")
    augment = tf.function(lambda image, s: augment_image(image, s, config))
    rows = []
    for i, image in enumerate(array):
        original = tf.constant(image, tf.float32)
        tiles = [original]
        for j in range(samples_per_image):
            tiles.append(augment(original, tf.constant([seed, i * samples_per_image + j], tf.int64)))
        rows.append(tf.concat(tiles, axis=1))
    grid = tf.cast(tf.round(tf.clip_by_value(tf.concat(rows, axis=0), 0.0, 255.0)), tf.uint8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tf.io.write_file(str(path), tf.io.encode_png(grid))
    return path
