"""What a Keras model does to its input pixels, as one of imgcls_jax's preprocessing modes.

An imgcls_jax model takes raw RGB pixels in ``[0, 255]`` and applies one of
:data:`imgcls_jax.models.MODES` itself. A Keras model takes whatever its user gives it: usually
pixels already passed through ``keras.applications.vgg16.preprocess_input`` ("caffe"), and
sometimes raw pixels that a ``Rescaling`` layer (or Keras 2's ``TFOpLambda`` operations such as
``tf.nn.bias_add``) normalises inside the model. Both are per-channel affine maps of the pixels,
possibly with the channels reversed (RGB -> BGR), so the composition of "what the user applies"
and "what the model's first layers apply" is an :class:`Affine`; it must equal one of the modes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from imgcls_jax.models.preprocessing import CAFFE_MEAN_BGR, MODES, TORCH_MEAN_RGB, TORCH_STD_RGB
from imgcls_jax.weights.keras import WeightFileError
from imgcls_jax.weights.keras_layers import KerasLayer

#: Layers (and operations) in front of the convolutional base that map pixels affinely.
INPUT_LAYERS = (
    "Rescaling",
    "TFOpLambda",
    "SlicingOpLambda",
    "TrueDivide",
    "Divide",
    "Subtract",
    "Multiply",
    "Add",
)
_TF_OPS = {  # Keras 2 TFOpLambda "function" -> (operation, keyword holding the operand)
    "nn.bias_add": ("add", "bias"),
    "math.add": ("add", "y"),
    "__operators__.add": ("add", "y"),
    "math.subtract": ("subtract", "y"),
    "math.multiply": ("multiply", "y"),
    "math.truediv": ("divide", "y"),
    "math.divide": ("divide", "y"),
}
_KERAS3_OPS = {
    "TrueDivide": "divide",
    "Divide": "divide",
    "Subtract": "subtract",
    "Multiply": "multiply",
    "Add": "add",
}


@dataclass(frozen=True)
class Affine:
    """``x[..., c] = scale[c] * pixels[..., c'] + offset[c]`` with ``c' = 2 - c`` when ``flip``."""

    flip: bool
    scale: np.ndarray  # float64[3]
    offset: np.ndarray  # float64[3]

    def then(self, op: str, value: np.ndarray) -> Affine:
        """This map followed by ``x <op> value`` (``value`` float64[3], per channel)."""
        if op == "add":
            return Affine(self.flip, self.scale, self.offset + value)
        if op == "subtract":
            return Affine(self.flip, self.scale, self.offset - value)
        if op == "multiply":
            return Affine(self.flip, self.scale * value, self.offset * value)
        if op == "divide":
            return Affine(self.flip, self.scale / value, self.offset / value)
        if op == "flip":
            return Affine(not self.flip, self.scale[::-1], self.offset[::-1])
        raise ValueError(op)

    def describe(self) -> str:
        order = "BGR" if self.flip else "RGB"
        return (
            f"x = {np.round(self.scale, 6).tolist()} * pixels[{order}] + {np.round(self.offset, 4).tolist()}"
        )


def mode_affine(mode: str) -> Affine:
    """The map :func:`imgcls_jax.models.preprocess_input` applies in ``mode``."""
    ones = np.ones(3)
    if mode == "caffe":
        return Affine(True, ones, -np.asarray(CAFFE_MEAN_BGR, np.float64))
    if mode == "tf":
        return Affine(False, ones / 127.5, -ones)
    if mode == "torch":
        std = np.asarray(TORCH_STD_RGB, np.float64)
        return Affine(False, 1.0 / (255.0 * std), -np.asarray(TORCH_MEAN_RGB, np.float64) / std)
    if mode == "unit":
        return Affine(False, ones / 255.0, 0 * ones)
    if mode == "tf128":
        return Affine(False, ones / 128.0, -ones)
    if mode == "none":
        return Affine(False, ones, 0 * ones)
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")


def matching_mode(affine: Affine) -> str | None:
    """The mode that computes ``affine`` (to float32 rounding), or None."""
    for mode in MODES:
        want = mode_affine(mode)
        if (
            want.flip == affine.flip
            and np.allclose(affine.scale, want.scale, rtol=1e-5, atol=0)
            and np.allclose(affine.offset, want.offset, rtol=1e-5, atol=1e-6)
        ):
            return mode
    return None


def _channels(value, layer: KerasLayer, where: str) -> np.ndarray:
    if isinstance(value, dict) and value.get("class_name") == "__tensor__":
        value = value["config"]["value"]
    try:
        array = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if array.size not in (1, 3):
        raise WeightFileError(
            f"{where}: layer {layer.name!r} ({layer.class_name}) applies {value!r} to the pixels: "
            "only a number or one value per channel can be imported"
        )
    return np.broadcast_to(array, (3,)).astype(np.float64)


def _is_channel_flip(spec) -> bool:
    """Keras 2's ``x[..., ::-1]``: ``[ellipsis, {start: None, stop: None, step: -1}]``."""
    return (
        isinstance(spec, list)
        and len(spec) == 2
        and isinstance(spec[0], dict)
        and spec[0].get("class_name") == "__ellipsis__"
        and spec[1] == {"start": None, "stop": None, "step": -1}
    )


def apply_layer(affine: Affine, layer: KerasLayer, where: str) -> Affine:
    """``affine`` followed by the input layer ``layer`` (one of :data:`INPUT_LAYERS`)."""
    config, kwargs = layer.config, layer.call_kwargs
    if layer.class_name == "Rescaling":
        scaled = affine.then("multiply", _channels(config.get("scale", 1.0), layer, where))
        return scaled.then("add", _channels(config.get("offset", 0.0), layer, where))
    if layer.class_name == "SlicingOpLambda" and _is_channel_flip(kwargs.get("slice_spec")):
        return affine.then("flip", np.zeros(3))
    if layer.class_name == "TFOpLambda" and config.get("function") in _TF_OPS:
        op, key = _TF_OPS[config["function"]]
        if key in kwargs:
            return affine.then(op, _channels(kwargs[key], layer, where))
    if layer.class_name in _KERAS3_OPS and len(layer.call_args) == 2 and not kwargs:
        first, operand = layer.call_args
        if isinstance(first, dict) and first.get("class_name") == "__keras_tensor__":
            return affine.then(_KERAS3_OPS[layer.class_name], _channels(operand, layer, where))
    raise WeightFileError(
        f"{where}: layer {layer.name!r} ({layer.class_name}"
        f"{' ' + str(config.get('function')) if 'function' in config else ''}) in front of the "
        "convolutional base cannot be imported: only Rescaling layers and adding, subtracting, "
        "multiplying or dividing by constants (and Keras 2's channel reversal) are understood. Apply "
        "this preprocessing outside the model and pass it as preprocessing=..."
    )


def resolve_preprocessing(layers: list[KerasLayer], preprocessing: str | None, where: str) -> tuple[str, str]:
    """``(model mode, input preprocessing)`` for a Keras model whose first ``layers`` (the ones
    in :data:`INPUT_LAYERS`) see pixels that its user passed through ``preprocessing`` (a mode;
    None: ``"none"`` when there are such layers, else ``"caffe"``, Keras VGG's own)."""
    if preprocessing is None:
        preprocessing = "none" if layers else "caffe"
    affine = mode_affine(preprocessing)
    for layer in layers:
        affine = apply_layer(affine, layer, where)
    mode = matching_mode(affine)
    if mode is None:
        names = ", ".join(f"{layer.name!r} ({layer.class_name})" for layer in layers) or "none"
        raise WeightFileError(
            f"{where}: with preprocessing={preprocessing!r} applied outside the model and the model's "
            f"own input layers ({names}), the convolutional base sees {affine.describe()}, which is "
            f"none of imgcls_jax's preprocessing modes {MODES}. Pass the preprocessing you apply to "
            "raw RGB pixels before calling the Keras model (e.g. preprocessing='none' when you feed "
            "it raw pixels)"
        )
    return mode, preprocessing
