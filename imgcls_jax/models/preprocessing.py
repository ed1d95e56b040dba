"""Input normalisation matching ``keras.applications.imagenet_utils.preprocess_input``.

The model applies the mode its weights were trained with (see :class:`imgcls_jax.models.VGG`),
so data pipelines hand raw RGB pixels in ``[0, 255]`` (uint8 or float) to the model.

Besides the named :data:`MODES`, a mode may be any per-channel affine map, written
``"affine:s0,s1,s2:o0,o1,o2"`` (``x[..., c] * s_c + o_c``; ``"affine:...:...:bgr"`` reverses the
channels first): what a Keras model's own ``Rescaling`` / ``Normalization`` layers compute, so
that an imported model applies exactly that (:func:`affine_mode`).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

#: Modes understood by :func:`preprocess_input`; ``"none"`` is the identity, ``"unit"`` scales
#: to ``[0, 1]`` (what a Keras model with a ``Rescaling(1/255)`` layer in front computes),
#: ``"tf128"`` to ``[-1, 1)`` by ``x / 128 - 1`` (EfficientNetV2-S/M/L's ``Rescaling(1/128,
#: offset=-1)``; ``"tf"`` divides by 127.5).
MODES = ("caffe", "torch", "tf", "none", "unit", "tf128")

# Keras's constants, verbatim: caffe means are in BGR order, torch statistics in RGB order.
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
TORCH_MEAN_RGB = (0.485, 0.456, 0.406)
TORCH_STD_RGB = (0.229, 0.224, 0.225)


def parse_affine(mode: str) -> tuple[bool, np.ndarray, np.ndarray] | None:
    """``(bgr, scale, offset)`` (float64[3] each) of an ``"affine:..."`` mode; None for another
    string; ``ValueError`` for a malformed one."""
    if not isinstance(mode, str) or not mode.startswith("affine:"):
        return None
    parts = mode.split(":")
    try:
        if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "bgr"):
            raise ValueError
        scale, offset = (np.array([float(v) for v in part.split(",")], np.float64) for part in parts[1:3])
        if (
            scale.shape != (3,)
            or offset.shape != (3,)
            or not (np.isfinite(scale).all() and np.isfinite(offset).all())
        ):
            raise ValueError
        if (scale == 0).any():
            raise ValueError
    except ValueError:
        raise ValueError(
            f"preprocessing mode {mode!r}: an affine mode is 'affine:s0,s1,s2:o0,o1,o2' (non-zero finite "
            "scales, finite offsets; ':bgr' after them reverses the channels first)"
        ) from None
    return len(parts) == 4, scale, offset


def affine_mode(scale, offset, bgr: bool = False) -> str:
    """The mode text of ``x[..., c] * scale[c] + offset[c]`` (channels reversed first if ``bgr``)."""
    text = "affine:" + ":".join(
        ",".join(repr(float(v)) for v in np.broadcast_to(a, (3,))) for a in (scale, offset)
    )
    return text + (":bgr" if bgr else "")


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES` or an affine mode, else raise ``ValueError``."""
    if mode in MODES or parse_affine(mode) is not None:
        return mode
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES} or 'affine:...'")


def preprocess_input(images, mode: str = "caffe", dtype=jnp.float32):
    """Normalise RGB images the way Keras's ``preprocess_input`` does (channels last).

    Args:
      images: ``uint8`` or float array ``[..., H, W, 3]``, RGB, values in ``[0, 255]``.
      mode: ``"caffe"`` (RGB->BGR, subtract the BGR ImageNet mean, no scaling; Keras VGG16/19),
        ``"torch"`` (``/255`` then per-channel mean/std), ``"tf"`` (``/127.5 - 1``),
        ``"tf128"`` (``/128 - 1``), ``"unit"`` (``/255``), ``"none"`` (cast only) or an affine mode
        (see the module docstring).
      dtype: the float dtype of the result (the arithmetic is done in float32 first).

    Returns:
      A ``dtype`` array of the same shape. Works on numpy and jax arrays, inside ``jit`` too.
    """
    check_mode(mode)
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    x = jnp.asarray(images).astype(jnp.float32)
    affine = parse_affine(mode)
    if affine is not None:
        bgr, scale, offset = affine
        x = (x[..., ::-1] if bgr else x) * scale.astype(np.float32) + offset.astype(np.float32)
    elif mode == "tf":
        x = x / 127.5 - 1.0
    elif mode == "tf128":
        x = x * (1.0 / 128.0) - 1.0
    elif mode == "torch":
        x = (x / 255.0 - np.asarray(TORCH_MEAN_RGB, np.float32)) / np.asarray(TORCH_STD_RGB, np.float32)
    elif mode == "unit":
        x = x / 255.0
    elif mode == "caffe":
        x = x[..., ::-1] - np.asarray(CAFFE_MEAN_BGR, np.float32)
    return x.astype(dtype)
