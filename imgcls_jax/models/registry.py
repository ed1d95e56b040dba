"""A small registry of models by name, and :func:`create_model`."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.vgg import VGG

_MODELS: dict[str, Callable[..., nnx.Module]] = {}


def register_model(name: str):
    """Decorator: register ``fn(**kwargs) -> model`` under ``name`` for :func:`create_model`."""

    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = fn
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


@register_model("vgg16")
def vgg16(**kwargs) -> VGG:
    return VGG("vgg16", **kwargs)


@register_model("vgg19")
def vgg19(**kwargs) -> VGG:
    return VGG("vgg19", **kwargs)


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    include_top: bool | None = None,
    pooling: str | None = None,
    head_units: Sequence[int] = (),
    dropout: float = 0.0,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    dtype="float32",
    preprocessing: str | None = None,
    seed: int = 0,
    conv_impl: str = "auto",
    kernel_init: str = "glorot_uniform",
):
    """Build a registered model, optionally with Keras weights.

    Args:
      name: a name from :func:`list_models` (``"vgg16"``, ``"vgg19"``).
      num_classes: classes of the classifier. With the default ``include_top=None`` the Keras
        ImageNet top is used when ``num_classes`` is ``None`` or 1000 (and no head is asked for);
        any other ``num_classes`` gets a transfer head on the convolutional base.
      weights: ``None`` (random init, seeded), ``"imagenet"`` (Keras's published file, see
        :func:`imgcls_jax.weights.resolve_imagenet`) or a path to a Keras weight file.
        Never falls back silently: a file that can't be found or loaded is an error.
      include_top, pooling, head_units, dropout, input_shape: see :class:`VGG`.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; parameters stay float32.
      preprocessing: input normalisation; default: the one the weights were trained with
        (``"caffe"`` for Keras's VGG files, also the default without weights). Setting one that
        contradicts the published weights is an error.
      seed: seeds parameter init (head and random weights) and the dropout stream.
      conv_impl: how 3x3 convolutions compute: ``"auto"`` (per backend and shape, see
        :mod:`imgcls_jax.models.conv`), ``"xla"`` or ``"im2col"``; same parameters and outputs.
      kernel_init: initializer of the kernels that ``weights`` does not set: ``"glorot_uniform"``
        (Keras's default), ``"he_normal"`` or ``"he_uniform"`` (see :class:`VGG`).

    Returns:
      The model, in inference mode (``model.train()`` turns dropout on).
    """
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    if include_top is None:
        include_top = num_classes in (None, 1000) and not head_units and not dropout
    if weights == "imagenet" and include_top and num_classes not in (None, 1000):
        raise ValueError(
            f"the ImageNet top has 1000 classes, not {num_classes}: use include_top=False "
            "(a transfer head) for another number of classes"
        )
    model = _MODELS[name](
        include_top=include_top,
        pooling=pooling,
        num_classes=num_classes,
        head_units=head_units,
        dropout=dropout,
        input_shape=input_shape,
        dtype=jnp.dtype(dtype),
        preprocessing=preprocessing or "caffe",
        rngs=nnx.Rngs(params=seed, dropout=seed + 1),
        conv_impl=conv_impl,
        kernel_init=kernel_init,
    )
    if weights is not None:
        from imgcls_jax.weights import load_weights

        if weights == "imagenet":
            load_weights(model, "imagenet")
        else:
            load_weights(model, weights, preprocessing=preprocessing or "caffe")
    return model
