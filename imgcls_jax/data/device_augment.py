"""Augmentation as jitted JAX functions on a batch already on the device: no TensorFlow, no host work.

The same ops, ranges and order as :mod:`imgcls_jax.data.augment` (flip -> random resized crop -> one
affine warp (rotation, zoom, translation, Keras's fill modes) -> brightness -> contrast -> saturation
-> hue; then batch mixup/cutmix), configured by the same :class:`~imgcls_jax.data.augment.AugmentConfig`.
Each op is split in two: :func:`sample_params` draws explicit per-example parameters from a key, and
:func:`apply_params` applies them. The geometry and colour arithmetic follow TensorFlow's kernels
(``ResizeBilinear`` with half-pixel centres, ``ImageProjectiveTransformV3``, ``AdjustHue``), so the
same explicit parameters give the same pixels as the tf.data path to float rounding; the random
draws themselves differ (JAX's PRNG, not TensorFlow's).

Randomness: example ``i`` of a batch uses ``jax.random.split(key, B)[i]``, and each op folds its own
index into that key, so switching one op on or off never changes another's draws. A train step passes
``jax.random.fold_in(run_key, step)``: a resumed run replays the same augmentation exactly.

Everything is shape-static and runs under ``jax.jit`` with ``config`` static (the public functions
here are already jitted that way); a batch sharded over devices stays sharded.
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from imgcls_jax.data.augment import _CROP_ATTEMPTS, _OPS, AugmentConfig

_OP_INDEX = {name: i for i, name in enumerate(_OPS)}


class AugmentParams(NamedTuple):
    """Explicit per-example parameters of :func:`apply_params`; every field has leading axis B.

    Fields of ops that ``config`` switches off hold their identity values and are not used.
    """

    flip_h: jax.Array  #: bool[B], mirror left-right
    flip_v: jax.Array  #: bool[B], mirror top-bottom
    crop: jax.Array  #: int32[B, 4], (top, left, height, width) of the crop in input pixels
    angle: jax.Array  #: float32[B], rotation in radians (positive: counter-clockwise as Keras)
    zoom: jax.Array  #: float32[B], scale (> 1 zooms out)
    shift: jax.Array  #: float32[B, 2], (dy, dx) translation in pixels (positive: down, right)
    brightness: jax.Array  #: float32[B], grey levels added
    contrast: jax.Array  #: float32[B], contrast factor
    saturation: jax.Array  #: float32[B], saturation factor
    hue: jax.Array  #: float32[B], hue rotation in turns


class MixParams(NamedTuple):
    """Explicit batch-level parameters of :func:`apply_mix` (scalars: one draw per batch)."""

    use_cutmix: jax.Array  #: bool[], cutmix (True) or mixup (False)
    lam: jax.Array  #: float32[], mixup: weight of each image itself
    box: jax.Array  #: int32[4], cutmix: (y0, y1, x0, x1), pasted from the reversed batch


# ----------------------------------------------------------------------------- sampling


def _uniform(key, low: float, high: float, shape=()) -> jax.Array:
    return jax.random.uniform(key, shape, jnp.float32, low, high)


def _sample_crop(key, h: int, w: int, scale: tuple[float, float], ratio: tuple[float, float]) -> jax.Array:
    """torchvision's RandomResizedCrop box (10 tries, then the largest centred crop of clamped aspect
    ratio), as ``augment._sample_crop``: int32[4] (top, left, height, width)."""
    k_area, k_ratio, k_offset = jax.random.split(key, 3)
    fh, fw = jnp.float32(h), jnp.float32(w)
    area = fh * fw * _uniform(k_area, scale[0], scale[1], (_CROP_ATTEMPTS,))
    aspect = jnp.exp(_uniform(k_ratio, math.log(ratio[0]), math.log(ratio[1]), (_CROP_ATTEMPTS,)))
    cw, ch = jnp.round(jnp.sqrt(area * aspect)), jnp.round(jnp.sqrt(area / aspect))
    fits = (cw >= 1) & (cw <= fw) & (ch >= 1) & (ch <= fh)
    found, first = jnp.any(fits), jnp.argmax(fits)
    fallback_w = jnp.round(fh * ratio[1]) if w / h > ratio[1] else fw
    fallback_h = jnp.round(fw / ratio[0]) if w / h < ratio[0] else fh
    cw, ch = jnp.where(found, cw[first], fallback_w), jnp.where(found, ch[first], fallback_h)
    u = jax.random.uniform(k_offset, (2,), jnp.float32)
    top = jnp.where(found, jnp.minimum(jnp.floor(u[0] * (fh - ch + 1)), fh - ch), jnp.floor((fh - ch) / 2))
    left = jnp.where(found, jnp.minimum(jnp.floor(u[1] * (fw - cw + 1)), fw - cw), jnp.floor((fw - cw) / 2))
    return jnp.stack([top, left, ch, cw]).astype(jnp.int32)


def _sample_one(key, h: int, w: int, c: AugmentConfig) -> AugmentParams:
    k = {name: jax.random.fold_in(key, i) for name, i in _OP_INDEX.items()}
    false, zero, one = jnp.bool_(False), jnp.float32(0.0), jnp.float32(1.0)
    flip_h = (
        jax.random.bernoulli(k["flip_h"]) if c.flip in ("horizontal", "horizontal_and_vertical") else false
    )
    flip_v = jax.random.bernoulli(k["flip_v"]) if c.flip in ("vertical", "horizontal_and_vertical") else false
    if c.random_resized_crop:
        crop = _sample_crop(k["crop"], h, w, c.crop_scale, c.crop_ratio)
    else:
        crop = jnp.array([0, 0, h, w], jnp.int32)
    size = jnp.array([h, w], jnp.float32)
    return AugmentParams(
        flip_h=flip_h,
        flip_v=flip_v,
        crop=crop,
        angle=_uniform(k["rotation"], -c.rotation, c.rotation) * (2 * math.pi) if c.rotation else zero,
        zoom=1.0 + _uniform(k["zoom"], -c.zoom, c.zoom) if c.zoom else one,
        shift=_uniform(k["translation"], -c.translation, c.translation, (2,)) * size
        if c.translation
        else jnp.zeros(2, jnp.float32),
        brightness=_uniform(k["brightness"], -c.brightness, c.brightness) * 255 if c.brightness else zero,
        contrast=_uniform(k["contrast"], 1 - c.contrast, 1 + c.contrast) if c.contrast else one,
        saturation=_uniform(k["sat"], 1 - c.saturation, 1 + c.saturation) if c.saturation else one,
        hue=_uniform(k["hue"], -c.hue, c.hue) if c.hue else zero,
    )


@partial(jax.jit, static_argnames=("batch_size", "image_size", "config"))
def sample_params(key: jax.Array, batch_size: int, image_size: tuple[int, int], config: AugmentConfig):
    """Per-example parameters for a batch: example ``i`` draws from ``jax.random.split(key, B)[i]``.

    Args:
      key: a PRNG key (``jax.random.key`` or a raw ``uint32[2]`` key).
      batch_size: B.
      image_size: ``(H, W)`` of the images the parameters are for (a tuple: it is static).
      config: the ranges (see :class:`~imgcls_jax.data.augment.AugmentConfig`).

    Returns:
      :class:`AugmentParams` with leading axis B.
    """
    h, w = (int(v) for v in image_size)
    keys = jax.random.split(key, batch_size)
    return jax.vmap(lambda k: _sample_one(k, h, w, config))(keys)


# ----------------------------------------------------------------------------- geometry


def _resize_indices(start, length, out_size: int):
    """TF ``ResizeBilinear`` (half-pixel centres) source rows for ``out_size`` outputs from the
    ``length`` rows starting at ``start``: (lower, upper) int32[out] and the lerp float32[out]."""
    scale = length.astype(jnp.float32) / jnp.float32(out_size)
    source = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale - 0.5
    floor = jnp.floor(source)
    lower = jnp.maximum(floor, 0).astype(jnp.int32)
    upper = jnp.minimum(jnp.ceil(source).astype(jnp.int32), length - 1)
    return start + lower, start + upper, source - floor


def _crop_and_resize(image, box):
    """``image[top:top+height, left:left+width]`` resized (bilinear, as ``tf.image.resize``) to
    the image's own [H, W]; ``box`` is int32[4] (top, left, height, width)."""
    h, w = image.shape[:2]
    y_lo, y_hi, y_lerp = _resize_indices(box[0], box[2], h)
    x_lo, x_hi, x_lerp = _resize_indices(box[1], box[3], w)
    top_rows, bottom_rows = image[y_lo], image[y_hi]
    x_lerp = x_lerp[None, :, None]
    top = top_rows[:, x_lo] + (top_rows[:, x_hi] - top_rows[:, x_lo]) * x_lerp
    bottom = bottom_rows[:, x_lo] + (bottom_rows[:, x_hi] - bottom_rows[:, x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp[:, None, None]


def _map_coordinate(coord, size: int, fill_mode: str):
    """TF ``ImageProjectiveTransformV3``'s mapping of an input coordinate outside [0, size - 1]."""
    if fill_mode == "constant":
        return coord
    if size <= 1 and fill_mode in ("reflect", "wrap"):
        return jnp.zeros_like(coord)
    n = jnp.float32(size)
    if fill_mode == "reflect":  # [abcd] -> [dcba|abcd|dcba]
        below = 2 * n * jnp.trunc(-coord / (2 * n)) + coord
        below = jnp.where(below < -n, below + 2 * n, -below - 1)
        above = coord - 2 * n * jnp.trunc(coord / (2 * n))
        above = jnp.where(above >= n, 2 * n - above - 1, above)
    elif fill_mode == "wrap":  # [abcd] -> [abcd|abcd|abcd]
        below = coord + n * (jnp.trunc(-coord / (n - 1)) + 1)
        above = coord - n * jnp.trunc(coord / (n - 1))
    else:  # nearest
        below = above = coord
    coord = jnp.where(coord < 0, below, jnp.where(coord > n - 1, above, coord))
    return jnp.clip(coord, 0.0, n - 1)


def _affine_coefficients(h: int, w: int, angle, zoom, dy, dx):
    """Output -> input pixel map of rotation, then zoom, then translation (``augment._affine_matrix``):
    ``input = c + zoom * Rot(angle) @ (output - (dx, dy) - c)``; returns (a0, a1, a2, b0, b1, b2)."""
    cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
    a0, a1 = zoom * jnp.cos(angle), -zoom * jnp.sin(angle)
    b0, b1 = zoom * jnp.sin(angle), zoom * jnp.cos(angle)
    a2 = cx - a0 * (dx + cx) - a1 * (dy + cy)
    b2 = cy - b0 * (dx + cx) - b1 * (dy + cy)
    return a0, a1, a2, b0, b1, b2


def _warp(image, coefficients, fill_mode: str, fill_value: float):
    """Bilinear warp of float32[H, W, C] by ``input = A @ (x, y, 1)``, as TF's ``ImageProjectiveTransformV3``
    (``fill_mode`` maps outside coordinates; with ``"constant"`` the neighbours outside the image are
    ``fill_value``, so the edge blends into it over one pixel)."""
    h, w, channels = image.shape
    a0, a1, a2, b0, b1, b2 = coefficients
    ys, xs = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    x = _map_coordinate(a0 * xs + a1 * ys + a2, w, fill_mode)
    y = _map_coordinate(b0 * xs + b1 * ys + b2, h, fill_mode)
    x_floor, y_floor = jnp.floor(x), jnp.floor(y)
    flat = image.reshape(h * w, channels)
    fill = jnp.float32(fill_value)

    def read(yi, xi):  # pixel (yi, xi), fill_value outside the image
        yi, xi = yi.astype(jnp.int32), xi.astype(jnp.int32)
        inside = (yi >= 0) & (yi < h) & (xi >= 0) & (xi < w)
        index = jnp.clip(yi, 0, h - 1) * w + jnp.clip(xi, 0, w - 1)
        return jnp.where(inside[..., None], jnp.take(flat, index, axis=0), fill)

    wx0, wx1 = (x_floor + 1 - x)[..., None], (x - x_floor)[..., None]
    wy0, wy1 = (y_floor + 1 - y)[..., None], (y - y_floor)[..., None]
    top = wx0 * read(y_floor, x_floor) + wx1 * read(y_floor, x_floor + 1)
    bottom = wx0 * read(y_floor + 1, x_floor) + wx1 * read(y_floor + 1, x_floor + 1)
    return wy0 * top + wy1 * bottom


# ----------------------------------------------------------------------------- colour


def _adjust_contrast(image, factor):
    mean = jnp.mean(image, axis=(0, 1), keepdims=True)
    return jnp.clip((image - mean) * factor + mean, 0.0, 255.0)


def _adjust_saturation(image, factor):
    """HSV saturation times ``factor`` (capped at 1), hue and value kept (``tf.image.adjust_saturation``)."""
    v, low = jnp.max(image, -1, keepdims=True), jnp.min(image, -1, keepdims=True)
    spread = v - low
    k = jnp.minimum(factor, jnp.where(spread > 0, v / jnp.where(spread > 0, spread, 1.0), 0.0))
    return jnp.maximum(v - (v - image) * k, 0.0)


def _adjust_hue(image, delta):
    """Hue rotated by ``delta`` turns, saturation and value kept (``tf.image.adjust_hue``), via the
    hexcone formula: channel n of (r, g, b) = v - chroma * clip(min(k, 4 - k), 0, 1) with
    k = (5, 3, 1)[n] + 6 * hue mod 6."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    v, low = jnp.max(image, -1), jnp.min(image, -1)
    chroma = v - low
    safe = jnp.where(chroma > 0, chroma, 1.0)
    # the branch by argmax, not `v == r`: XLA may recompute r inside a fusion with other rounding
    largest = jnp.argmax(image, -1)
    sector = jnp.where(
        largest == 0, (g - b) / safe, jnp.where(largest == 1, (b - r) / safe + 2.0, (r - g) / safe + 4.0)
    )
    sector = jnp.where(chroma > 0, sector, 0.0) + 6.0 * delta  # hue in sixths of a turn
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = jnp.mod(n + sector, 6.0)
        channels.append(v - chroma * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0))
    return jnp.clip(jnp.stack(channels, -1), 0.0, 255.0)


# ----------------------------------------------------------------------------- apply


def _apply_one(image, p: AugmentParams, c: AugmentConfig):
    h, w = image.shape[:2]
    if c.flip in ("horizontal", "horizontal_and_vertical"):
        image = jnp.where(p.flip_h, image[:, ::-1], image)
    if c.flip in ("vertical", "horizontal_and_vertical"):
        image = jnp.where(p.flip_v, image[::-1], image)
    if c.random_resized_crop:
        image = _crop_and_resize(_barrier(image), p.crop)
    if c.rotation > 0 or c.zoom > 0 or c.translation > 0:
        coefficients = _affine_coefficients(h, w, p.angle, p.zoom, p.shift[0], p.shift[1])
        image = _warp(_barrier(image), coefficients, c.fill_mode, c.fill_value)
    # Each stage reads its input several times (channel max/min, means, 4 bilinear taps): the
    # barriers make XLA compute each stage once rather than fuse (recompute) the previous one's
    # gathers into every read.
    if c.brightness > 0:
        image = jnp.clip(_barrier(image) + p.brightness, 0.0, 255.0)
    if c.contrast > 0:
        image = _adjust_contrast(_barrier(image), p.contrast)
    if c.saturation > 0:
        image = _adjust_saturation(_barrier(image), p.saturation)
    if c.hue > 0:
        image = _adjust_hue(_barrier(image), p.hue)
    return image


def _barrier(image):
    return jax.lax.optimization_barrier(image)


def _check_images(images) -> None:
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [B, H, W, 3], got shape {tuple(images.shape)}")


@partial(jax.jit, static_argnames="config")
def apply_params(images: jax.Array, params: AugmentParams, config: AugmentConfig) -> jax.Array:
    """Applies explicit per-example ``params`` (only the ops ``config`` switches on).

    Args:
      images: uint8 or float[B, H, W, 3] in [0, 255].
      params: :class:`AugmentParams` with leading axis B (e.g. from :func:`sample_params`).
      config: which ops run, the fill mode and fill value.

    Returns:
      float32[B, H, W, 3] in [0, 255].
    """
    _check_images(images)
    images = images.astype(jnp.float32)
    if config.is_identity:
        return images
    return jax.vmap(lambda x, p: _apply_one(x, p, config))(images, params)


@partial(jax.jit, static_argnames="config")
def augment_batch(images: jax.Array, key: jax.Array, config: AugmentConfig) -> jax.Array:
    """Randomly augments each image of a device batch (mixup/cutmix are :func:`mix_batch`'s).

    Args:
      images: uint8 (or float) [B, H, W, 3] in [0, 255], on the device, possibly batch-sharded.
      key: PRNG key for this batch, e.g. ``jax.random.fold_in(run_key, step)``.
      config: what to do (the same meanings and ranges as the tf.data ops).

    Returns:
      float32[B, H, W, 3] in [0, 255], the same sharding as ``images``.
    """
    _check_images(images)
    params = sample_params(key, images.shape[0], tuple(images.shape[1:3]), config)
    return apply_params(images, params, config)


# ----------------------------------------------------------------------------- mixup / cutmix


def _cutmix_box(key, h: int, w: int, lam):
    """CutMix's box (``augment._cutmix_box``): int32[4] (y0, y1, x0, x1)."""
    cut = jnp.sqrt(1.0 - lam)
    half_h = (jnp.float32(h) * cut).astype(jnp.int32) // 2
    half_w = (jnp.float32(w) * cut).astype(jnp.int32) // 2
    u = jax.random.uniform(key, (2,), jnp.float32)
    cy = jnp.minimum((u[0] * h).astype(jnp.int32), h - 1)
    cx = jnp.minimum((u[1] * w).astype(jnp.int32), w - 1)
    return jnp.stack(
        [jnp.clip(cy - half_h, 0, h), jnp.clip(cy + half_h, 0, h), jnp.clip(cx - half_w, 0, w),
         jnp.clip(cx + half_w, 0, w)]
    )  # fmt: skip


def _beta(key, alpha: float):
    """Beta(alpha, alpha) as float32; 1 (keep the image) where tiny alphas underflow to NaN."""
    lam = jax.random.beta(key, alpha, alpha, dtype=jnp.float32)
    return jnp.where(jnp.isfinite(lam), lam, 1.0)


@partial(jax.jit, static_argnames=("image_size", "config"))
def sample_mix_params(key: jax.Array, image_size: tuple[int, int], config: AugmentConfig) -> MixParams:
    """One batch's mixup/cutmix draw: with both alphas > 0 each is chosen with probability 1/2;
    ``lam ~ Beta(alpha, alpha)`` of the chosen one; the cutmix box as :func:`augment.mix_batch`'s."""
    h, w = (int(v) for v in image_size)
    k_choice, k_lam, k_box = (jax.random.fold_in(key, i) for i in range(3))
    mixup, cutmix = float(config.mixup_alpha), float(config.cutmix_alpha)
    if mixup > 0 and cutmix > 0:
        use_cutmix = jax.random.bernoulli(k_choice)
        lam = jnp.where(use_cutmix, _beta(k_lam, cutmix), _beta(k_lam, mixup))
    else:
        use_cutmix = jnp.bool_(cutmix > 0)
        lam = _beta(k_lam, cutmix or mixup) if (cutmix or mixup) else jnp.float32(1.0)
    return MixParams(use_cutmix, lam, _cutmix_box(k_box, h, w, lam))


@partial(jax.jit, static_argnames="config")
def apply_mix(images: jax.Array, labels: jax.Array, params: MixParams, config: AugmentConfig):
    """Mixes each sample i with sample B-1-i (the batch reversed) by explicit ``params``.

    Args:
      images: float32[B, H, W, 3]; labels: float32[B, K] (one-hot or soft).
      params: :class:`MixParams`; config: which of mixup/cutmix can occur (static).

    Returns:
      ``(images float32[B, H, W, 3], labels float32[B, K])``.
    """
    reversed_images, reversed_labels = images[::-1], labels[::-1]
    outputs = []
    if config.mixup_alpha > 0:
        lam = params.lam
        outputs.append(
            (lam * images + (1 - lam) * reversed_images, lam * labels + (1 - lam) * reversed_labels)
        )
    if config.cutmix_alpha > 0:
        h, w = images.shape[1:3]
        y0, y1, x0, x1 = params.box[0], params.box[1], params.box[2], params.box[3]
        rows, cols = jnp.arange(h)[:, None], jnp.arange(w)[None, :]
        inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)
        kept = 1.0 - ((y1 - y0) * (x1 - x0)).astype(jnp.float32) / (h * w)
        cut = jnp.where(inside[None, :, :, None], reversed_images, images)
        outputs.append((cut, kept * labels + (1.0 - kept) * reversed_labels))
    if len(outputs) == 2:
        (mix_x, mix_y), (cut_x, cut_y) = outputs
        return jnp.where(params.use_cutmix, cut_x, mix_x), jnp.where(params.use_cutmix, cut_y, mix_y)
    return outputs[0] if outputs else (images, labels)


@partial(jax.jit, static_argnames=("config", "num_classes"))
def mix_batch(images: jax.Array, labels: jax.Array, key: jax.Array, config: AugmentConfig, num_classes: int):
    """Batch mixup/cutmix on the device (timm's ``Mixup`` in ``"batch"`` mode, as ``augment.mix_batch``).

    Args:
      images: uint8 or float[B, H, W, 3] in [0, 255].
      labels: int[B] class indices (one-hot encoded here) or float[B, K] soft labels.
      key: PRNG key for this batch. config: uses ``mixup_alpha`` and ``cutmix_alpha``.
      num_classes: K.

    Returns:
      ``(images float32[B, H, W, 3] in [0, 255], labels float32[B, K])``, rows of labels summing to 1.
      Both alphas 0: the inputs (as float32, labels one-hot).
    """
    _check_images(images)
    images = images.astype(jnp.float32)
    if labels.ndim == 1:
        labels = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    elif labels.shape[-1] != num_classes:
        raise ValueError(f"labels have {labels.shape[-1]} classes, num_classes is {num_classes}")
    labels = labels.astype(jnp.float32)
    if config.mixup_alpha == 0 and config.cutmix_alpha == 0:
        return images, labels
    return apply_mix(images, labels, sample_mix_params(key, tuple(images.shape[1:3]), config), config)


def augment_train_batch(batch: dict, key: jax.Array, config: AugmentConfig, num_classes: int) -> dict:
    """What a train step calls on a device batch ``{"image": uint8[B, H, W, 3], "label": int32[B], ...}``:
    :func:`augment_batch` with ``fold_in(key, 0)``, then (when an alpha is set) :func:`mix_batch` with
    ``fold_in(key, 1)``. Returns the batch with ``"image"`` float32 in [0, 255] and, when mixing,
    ``"label"`` float32[B, K]; other entries (``"mask"``) unchanged. Traceable inside a jitted step."""
    images = augment_batch(batch["image"], jax.random.fold_in(key, 0), config)
    out = {**batch, "image": images}
    if config.mixup_alpha > 0 or config.cutmix_alpha > 0:
        out["image"], out["label"] = mix_batch(
            images, batch["label"], jax.random.fold_in(key, 1), config, num_classes
        )
    return out
