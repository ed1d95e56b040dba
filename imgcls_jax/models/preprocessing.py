"""Input normalisation matching ``keras.applications.imagenet_utils.preprocess_input``.

The model applies the mode its weights were trained with (see :class:`imgcls_jax.models.VGG`),
so data pipelines hand raw RGB pixels in ``[0, 255]`` (uint8 or float) to the model.
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


def check_mode(mode: str) -> str:
    """Return ``mode`` if it is one of :data:`MODES`, else raise ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")
    return mode


def preprocess_input(images, mode: str = "caffe", dtype=jnp.float32):
    """Normalise RGB images the way Keras's ``preprocess_input`` does (channels last).

    Args:
      images: ``uint8`` or float array ``[..., H, W, 3]``, RGB, values in ``[0, 255]``.
      mode: ``"caffe"`` (RGB->BGR, subtract the BGR ImageNet mean, no scaling; Keras VGG16/19),
        ``"torch"`` (``/255`` then per-channel mean/std), ``"tf"`` (``/127.5 - 1``),
        ``"tf128"`` (``/128 - 1``), ``"unit"`` (``/255``) or ``"none"`` (cast only).
      dtype: the float dtype of the result (the arithmetic is done in float32 first).

    Returns:
      A ``dtype`` array of the same shape. Works on numpy and jax arrays, inside ``jit`` too.
    """
    check_mode(mode)
    if images.shape[-1] != 3:
        raise ValueError(f"expected RGB images with 3 channels last, got shape {images.shape}")
    x = jnp.asarray(images).astype(jnp.float32)
    if mode == "tf":
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
