"""Loading Keras weights into a model: :func:`load_weights`, used by ``create_model(weights=...)``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp

from imgcls_jax.weights.keras import FileLayers, WeightFileError, read_keras_weights, validate
from imgcls_jax.weights.ported import is_ported_dir, read_ported
from imgcls_jax.weights.store import (
    IMAGENET,
    cache_path,
    check_hash,
    load_converted,
    resolve_imagenet,
    save_converted,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedWeights:
    """What :func:`load_weights` loaded: the file, its layout, its preprocessing, cache use."""

    path: Path
    layout: str
    preprocessing: str
    from_cache: bool


def load_weights(
    model, weights, *, preprocessing: str | None = None, use_cache: bool = True
) -> LoadedWeights:
    """Load Keras weights into ``model`` (a :class:`~imgcls_jax.models.Classifier`) in place.

    Args:
      model: the model; its ``layer_specs()`` say which Keras layers the file must provide.
      weights: ``"imagenet"`` (resolved as :func:`resolve_imagenet` describes), a path to a
        legacy ``.h5`` or Keras 3 ``.weights.h5`` file, or a folder written by
        ``imgcls-jax port-weights`` (:func:`save_ported`; its preprocessing is recorded in it).
      preprocessing: the input normalisation the file's weights were trained with, for a
        path; default: the one of the family's published files (``"caffe"`` for VGG and
        ResNet50, ``"tf"`` for MobileNetV2, ``"none"`` for EfficientNet; ``"caffe"`` for a family
        without). For ``"imagenet"`` the published mode is used.
      use_cache: read/write converted parameters from/to the cache (see
        :mod:`imgcls_jax.weights.store`).

    Raises:
      WeightFileError: the file does not fit the model (names, count, shapes), or is not a
        readable Keras weight file. The model is left untouched.
      ValueError: the model's ``preprocessing`` differs from the weights'; ``"imagenet"`` for a
        model with the top and an ``input_shape`` its top was not trained at (Keras's rule, see
        :mod:`imgcls_jax.weights.store`).
      WeightsUnavailableError, ChecksumError: for ``"imagenet"``.
    """
    published = None
    if preprocessing is None:
        family = IMAGENET.get((getattr(model, "arch", None), False))
        preprocessing = family.preprocessing if family is not None else "caffe"
    if isinstance(weights, str) and weights == "imagenet":
        key = getattr(model, "imagenet_key", model.arch)  # MobileNetV3: a file per width
        path, published = resolve_imagenet(key, model.include_top, input_shape=model.input_shape)
        preprocessing = published.preprocessing
    else:
        path = Path(weights).expanduser()
        if is_ported_dir(path):
            return _load_ported(model, path)
        if not path.is_file():
            raise WeightFileError(
                f"{path}: no such file (weights must be None, 'imagenet' or a path to a Keras weight file)"
            )
    if model.preprocessing != preprocessing:
        raise ValueError(
            f"{path}: these weights were trained with {preprocessing!r} preprocessing but the "
            f"model applies {model.preprocessing!r}; build the model with "
            f"preprocessing={preprocessing!r} (or leave it unset)"
        )
    specs = model.layer_specs()

    cached = load_converted(cache_path(path)) if use_cache else None
    if cached is not None:
        layers, meta = cached
        validate(FileLayers(path, meta["layout"], dict(layers)), specs, model.arch)
        layout = meta["layout"]
    else:
        if published is not None:
            check_hash(path, published)
        layers, layout = read_keras_weights(path, specs, model.arch)
        if use_cache:
            try:
                save_converted(cache_path(path), layers, {"layout": layout, "source": str(path)})
            except OSError as exc:  # a read-only cache must not stop a load
                log.warning("could not cache converted weights of %s: %s", path, exc)

    if published is not None and hasattr(model, "adapt_imagenet_weights"):
        layers = model.adapt_imagenet_weights(layers)  # what Keras's application adds to the file
    _assign(model, layers)
    log.info(
        "loaded %s weights (%s layout%s) from %s",
        model.arch,
        layout,
        ", converted cache" if cached is not None else "",
        path,
    )
    return LoadedWeights(path, layout, preprocessing, cached is not None)


def _load_ported(model, path: Path) -> LoadedWeights:
    layers, meta = read_ported(path, model.layer_specs(), model.arch)
    if model.preprocessing != meta["preprocessing"]:
        raise ValueError(
            f"{path}: these weights were trained with {meta['preprocessing']!r} preprocessing but the "
            f"model applies {model.preprocessing!r}; build the model with "
            f"preprocessing={meta['preprocessing']!r}"
        )
    _assign(model, layers)
    log.info("loaded %s weights from the ported folder %s (source %s)", model.arch, path, meta["source"])
    return LoadedWeights(path, "ported", meta["preprocessing"], False)


def _assign(model, layers) -> None:
    """Set each Keras layer's variables (validated arrays, Keras's order) on ``model``."""
    for spec in model.layer_specs():
        for variable, array in zip(model.keras_variables(spec.name), layers[spec.name], strict=True):
            variable.set_value(jnp.asarray(array, dtype=jnp.float32))
