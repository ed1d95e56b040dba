"""Predict with a model or a trained run: top-k class names and probabilities for files,
folders, arrays.

``predict(model_or_run, inputs)``: ``model_or_run`` is a run folder (its best checkpoint), a run
loaded with :func:`imgcls_jax.evaluate.load_run`, or a model (``create_model``, ``from_keras``);
``inputs`` an image file, a folder (every image in it, recursively, sorted), a list of files, or
an array ``uint8[N, H, W, 3]`` / ``[H, W, 3]`` of RGB pixels. The forward pass is compiled once
per model graph and batch shape in a process and reused by later calls (it holds no weights:
they are an input).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from imgcls_jax.evaluate.runs import LoadedRun, load_run
from imgcls_jax.train.steps import cached_jit

log = logging.getLogger(__name__)


class UnreadableImageError(ValueError):
    """An input image that cannot be decoded (empty, truncated, not an image despite its name);
    the message names the file."""


@dataclass
class Prediction:
    """Top-k classes of one image, most probable first."""

    source: str
    top_k: list[tuple[str, float]]

    @property
    def label(self) -> str:
        return self.top_k[0][0]


def image_files(inputs) -> list[str]:
    """The image files ``inputs`` names: files as given, folders searched recursively (sorted, by
    extension). ``FileNotFoundError`` for a path that does not exist or a folder without images."""
    from imgcls_jax.data import IMAGE_EXTENSIONS

    items = [inputs] if isinstance(inputs, str | os.PathLike) else list(inputs)
    files = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            found = sorted(
                str(p) for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not found:
                raise FileNotFoundError(f"{path}: no image files (extensions {sorted(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(str(path))
        else:
            raise FileNotFoundError(f"{path}: no such file or folder")
    return files


def check_inputs(files: Sequence[str]) -> None:
    """Decode every file once: :class:`UnreadableImageError` listing those that fail (the first
    five, and how many). What ``imgcls-jax predict`` does before it loads the model."""
    from imgcls_jax.data.decode import check_images

    bad = [c for c in check_images(list(files)) if c.reason]
    if bad:
        listing = "; ".join(f"{c.path}: {c.reason}" for c in bad[:5])
        more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise UnreadableImageError(
            f"{len(bad)} of {len(files)} input file(s) cannot be decoded: {listing}{more}"
        )


def predict(
    model_or_run,
    inputs,
    *,
    top_k: int = 5,
    batch_size: int = 32,
    resize: str = "squash",
    class_names: Sequence[str] | None = None,
    which: str | None = None,
) -> list[Prediction]:
    """Top-``top_k`` ``(class name, probability)`` for each input image (see the module docstring).

    Args:
      model_or_run: a run folder (``which`` checkpoint, default as :func:`load_run`), a
        :class:`~imgcls_jax.evaluate.runs.LoadedRun`, or a model; a model predicts at its own
        ``input_shape`` and names its classes ``class_names`` (default ``"0"``, ``"1"``, ...).
      inputs: an image file, a folder, a list of files, or RGB pixels ``[N, H, W, 3]`` /
        ``[H, W, 3]`` (resized with ``resize`` where their size is not the model's).

    Files that cannot be decoded raise an error naming them (nothing is silently dropped).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model, size, names = _predictor(model_or_run, class_names, which)
    if isinstance(inputs, np.ndarray | jax.Array):
        images = np.asarray(inputs)
        if images.ndim == 3:
            images = images[None]
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"arrays must be [N, H, W, 3] or [H, W, 3] RGB, got shape {images.shape}")
        if images.shape[1:3] != size:
            images = np.stack([_resized(im, size, resize) for im in images])
        sources = [f"array[{i}]" for i in range(len(images))]
    else:
        from imgcls_jax.data import load_image

        sources = image_files(inputs)
        images = np.stack([_load(load_image, f, size, resize) for f in sources])
    return _predict_arrays(model, names, images, sources, top_k, batch_size)


def _predictor(model_or_run, class_names, which) -> tuple[nnx.Module, tuple[int, int], list[str]]:
    """``(model, input (height, width), class names)`` of what :func:`predict` was given."""
    if isinstance(model_or_run, str | os.PathLike):
        model_or_run = load_run(model_or_run, which)
    elif which is not None:
        raise ValueError("which= chooses a run folder's checkpoint; not for a loaded run or a model")
    if isinstance(model_or_run, LoadedRun):
        if class_names is not None:
            raise ValueError("class_names= names a model's outputs; a run has its own (its manifest)")
        return model_or_run.model, model_or_run.image_size, list(model_or_run.class_names)
    model = model_or_run
    if not isinstance(model, nnx.Module) or not hasattr(model, "input_shape"):
        raise TypeError(
            f"predict takes a run folder, a loaded run or a model, got {type(model_or_run).__name__}"
        )
    size = tuple(int(d) for d in model.input_shape[:2])
    count = getattr(model, "num_classes", None)
    if not count:
        raise ValueError(f"{type(model).__name__} has no classifier (num_classes unset): nothing to predict")
    names = [str(i) for i in range(count)] if class_names is None else [str(c) for c in class_names]
    if len(names) != count:
        raise ValueError(f"class_names has {len(names)} names; the model has {count} classes")
    return model, size, names


def _resized(image: np.ndarray, size: tuple[int, int], mode: str) -> np.ndarray:
    """``image`` resized as the data pipelines resize (TensorFlow's, else the same in NumPy)."""
    from imgcls_jax.data import tensorflow_available

    if tensorflow_available():
        from imgcls_jax.data.decode import resize_image

        return np.round(resize_image(image, size, mode).numpy()).astype(np.uint8)
    from imgcls_jax.data.pil_decode import resize_image

    return resize_image(image, size, mode)


def _load(load_image, path: str, size: tuple[int, int], resize: str) -> np.ndarray:
    """``load_image``, its "cannot decode this file" ``ValueError`` as :class:`UnreadableImageError`."""
    from imgcls_jax.data.decode import RESIZE_MODES

    if resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    try:
        return load_image(path, size, resize)
    except ValueError as e:
        raise UnreadableImageError(f"{e} (not an image this library can decode)") from e


def _probabilities(graphdef):
    """The jitted ``(state, images) -> probabilities`` of models of ``graphdef``, built once per
    graph in a process (:func:`~imgcls_jax.train.steps.cached_jit`): later calls with the same
    shapes reuse its executable, and it holds no weights (``state`` is an input)."""

    def build():
        def probabilities(state, images):
            model = nnx.merge(graphdef, state)
            model.eval()  # inference mode (dropout off, BatchNorm's moving statistics), as Keras's predict
            logits = model(images)
            # softmax, or sigmoid for a model with sigmoid outputs (an imported Keras model)
            if hasattr(model, "probabilities"):
                return model.probabilities(logits)
            return jax.nn.softmax(logits.astype(np.float32), -1)

        return jax.jit(probabilities)

    return cached_jit(("predict", graphdef), build)


def _predict_arrays(model, class_names, images, sources: Sequence[str], top_k: int, batch_size: int):
    graphdef, state = nnx.split(model)
    probabilities = _probabilities(graphdef)
    k = min(top_k, len(class_names))
    out = []
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        real = len(chunk)
        if real < batch_size and len(images) > batch_size:  # one compiled shape for every batch
            chunk = np.concatenate([chunk, np.zeros((batch_size - real, *chunk.shape[1:]), chunk.dtype)])
        probs = np.asarray(probabilities(state, chunk))[:real]
        for i, p in enumerate(probs):
            order = np.argsort(-p, kind="stable")[:k]
            out.append(Prediction(sources[start + i], [(class_names[j], float(p[j])) for j in order]))
    return out
