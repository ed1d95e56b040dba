"""What a Keras model does to its input pixels, as a per-channel affine map.

An imgcls_jax model takes raw RGB pixels in ``[0, 255]`` and maps them itself (one of
:data:`imgcls_jax.models.MODES`, and for some families a layer of their own such as
EfficientNet's ``Normalization``). A Keras model takes whatever its user gives it (raw pixels, or
pixels already passed through ``keras.applications.<family>.preprocess_input``) and often maps
them further in its first layers: ``Rescaling``, ``Normalization``, or ``preprocess_input``
applied to the symbolic input, which Keras 3 records as operation layers (``GetItem`` x 3 +
``Stack`` for the RGB -> BGR reversal, ``Add`` / ``Subtract`` / ``TrueDivide`` / ``Multiply`` with
constants) and Keras 2 as ``TFOpLambda`` / ``SlicingOpLambda`` layers. All of them are
per-channel affine maps, possibly reordering the channels, so whatever the user and the first
layers do together is one :class:`Affine`, read from the graph by :func:`input_affine` without
running anything.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from imgcls_jax.models.preprocessing import (
    CAFFE_MEAN_BGR,
    MODES,
    TORCH_MEAN_RGB,
    TORCH_STD_RGB,
    affine_mode,
    parse_affine,
)
from imgcls_jax.weights.keras import WeightFileError
from imgcls_jax.weights.keras_layers import KerasGraph, Node

#: Layers (and operations) that map pixels affinely, read in front of the base.
INPUT_LAYERS = (
    "Rescaling",
    "Normalization",
    "TFOpLambda",
    "SlicingOpLambda",
    "TrueDivide",
    "Divide",
    "Subtract",
    "Multiply",
    "Add",
    "GetItem",
    "Stack",
)
#: Layers that are the identity at inference (Keras's ``predict``, or ``training=False``):
#: augmentation and noise; skipped wherever they are (and listed in the import's notes).
IDENTITY_AT_INFERENCE = (
    "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast", "RandomBrightness",
    "RandomCrop", "RandomHeight", "RandomWidth", "GaussianNoise", "GaussianDropout", "AlphaDropout",
    "ActivityRegularization",
)  # fmt: skip
_TF_OPS = {  # Keras 2 TFOpLambda "function" -> (operation, keyword holding the operand)
    "nn.bias_add": ("add", "bias"),
    "math.add": ("add", "y"),
    "__operators__.add": ("add", "y"),
    "math.subtract": ("subtract", "y"),
    "math.multiply": ("multiply", "y"),
    "math.truediv": ("divide", "y"),
    "math.divide": ("divide", "y"),
}
_KERAS3_OPS = {"TrueDivide": "divide", "Divide": "divide", "Subtract": "subtract", "Multiply": "multiply",
               "Add": "add"}  # fmt: skip
IDENTITY = (0, 1, 2)


@dataclass(frozen=True)
class Affine:
    """``x[..., c] = scale[c] * pixels[..., perm[c]] + offset[c]`` (float64 per channel)."""

    perm: tuple[int, int, int]
    scale: np.ndarray
    offset: np.ndarray

    @staticmethod
    def identity() -> Affine:
        return Affine(IDENTITY, np.ones(3), np.zeros(3))

    def then(self, op: str, value) -> Affine:
        """This map followed by ``x <op> value`` (``value`` a number or one per channel)."""
        value = np.broadcast_to(np.asarray(value, np.float64), (3,))
        if op == "add":
            return Affine(self.perm, self.scale, self.offset + value)
        if op == "subtract":
            return Affine(self.perm, self.scale, self.offset - value)
        if op == "multiply":
            return Affine(self.perm, self.scale * value, self.offset * value)
        if op == "divide":
            return Affine(self.perm, self.scale / value, self.offset / value)
        raise ValueError(op)

    def reversed(self) -> Affine:
        """The channels reversed (RGB <-> BGR)."""
        return Affine(self.perm[::-1], self.scale[::-1], self.offset[::-1])

    def after(self, first: Affine) -> Affine:
        """This map applied to ``first``'s output."""
        perm = tuple(first.perm[p] for p in self.perm)
        scale = self.scale * first.scale[list(self.perm)]
        return Affine(perm, scale, self.scale * first.offset[list(self.perm)] + self.offset)

    def inverse(self) -> Affine:
        """The map undoing this one (``scale`` must be non-zero)."""
        perm = [0, 0, 0]
        for c, p in enumerate(self.perm):
            perm[p] = c
        scale = 1.0 / self.scale[perm]
        return Affine(tuple(perm), scale, -self.offset[perm] * scale)

    def equals(self, other: Affine) -> bool:
        """Equal to float32 rounding."""
        return (
            self.perm == other.perm
            and np.allclose(self.scale, other.scale, rtol=1e-5, atol=0)
            and np.allclose(self.offset, other.offset, rtol=1e-5, atol=1e-5)
        )

    def as_mode(self) -> str | None:
        """This map as an affine preprocessing mode (None when it reorders the channels otherwise
        than reversing them)."""
        if self.perm not in (IDENTITY, (2, 1, 0)):
            return None
        return affine_mode(self.scale, self.offset, bgr=self.perm == (2, 1, 0))

    def describe(self) -> str:
        order = "".join("RGB"[p] for p in self.perm)
        return (
            f"x = {np.round(self.scale, 6).tolist()} * pixels[{order}] + {np.round(self.offset, 4).tolist()}"
        )


@dataclass(frozen=True)
class _Channel:
    """One channel (``GetItem`` ``x[..., k]``): ``scale * pixels[..., source] + offset``."""

    source: int
    scale: float
    offset: float


def mode_affine(mode: str) -> Affine:
    """The map :func:`imgcls_jax.models.preprocess_input` applies in ``mode``."""
    ones = np.ones(3)
    parsed = parse_affine(mode)
    if parsed is not None:
        bgr, scale, offset = parsed
        return Affine((2, 1, 0) if bgr else IDENTITY, scale, offset)
    if mode == "caffe":
        return Affine((2, 1, 0), ones, -np.asarray(CAFFE_MEAN_BGR, np.float64))
    if mode == "tf":
        return Affine(IDENTITY, ones / 127.5, -ones)
    if mode == "torch":
        std = np.asarray(TORCH_STD_RGB, np.float64)
        return Affine(IDENTITY, 1.0 / (255.0 * std), -np.asarray(TORCH_MEAN_RGB, np.float64) / std)
    if mode == "unit":
        return Affine(IDENTITY, ones / 255.0, 0 * ones)
    if mode == "tf128":
        return Affine(IDENTITY, ones / 128.0, -ones)
    if mode == "none":
        return Affine.identity()
    raise ValueError(f"unknown preprocessing mode {mode!r}; expected one of {MODES}")


def matching_mode(affine: Affine, modes=MODES) -> str | None:
    """The first of ``modes`` that computes ``affine`` (to float32 rounding), or None."""
    return next((mode for mode in modes if mode_affine(mode).equals(affine)), None)


def _channels(value, node: Node, where: str) -> np.ndarray:
    if isinstance(value, dict) and value.get("class_name") == "__tensor__":
        value = value["config"]["value"]
    try:
        array = np.asarray(value, np.float64).reshape(-1)
    except (TypeError, ValueError):
        array = np.zeros(0)
    if array.size not in (1, 3):
        raise WeightFileError(
            f"{where}: layer {node.name!r} ({node.class_name}) applies {value!r} to the pixels: only a "
            "number or one value per channel can be read"
        )
    return np.broadcast_to(array, (3,)).astype(np.float64)


def _is_tensor(value) -> bool:
    return isinstance(value, dict) and value.get("class_name") == "__keras_tensor__"


def _index(spec) -> int | str | None:
    """``x[..., k]`` -> k; ``x[..., ::-1]`` -> ``"reverse"``; anything else None."""
    if not (isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], dict)):
        return None
    if spec[0].get("class_name") != "__ellipsis__":
        return None
    last = spec[1]
    if isinstance(last, int) and not isinstance(last, bool):
        return last % 3
    if isinstance(last, dict):
        last = last.get("config", last) if last.get("class_name") == "__slice__" else last
        if {k: last.get(k) for k in ("start", "stop", "step")} == {"start": None, "stop": None, "step": -1}:
            return "reverse"
    return None


def _error(node: Node, where: str, why: str) -> WeightFileError:
    function = node.config.get("function")  # TFOpLambda's op name; a Lambda's Python code is a dict
    function = f" {function}" if isinstance(function, str) else " with Python code" if function else ""
    return WeightFileError(f"{where}: layer {node.name!r} ({node.class_name}{function}) {why}")


_NOT_AFFINE = (
    "in front of the base cannot be read: only Rescaling and Normalization layers, keras.applications' "
    "preprocess_input applied to the input (Keras 3's GetItem/Stack/Add/Subtract/TrueDivide/Multiply "
    "with constants, Keras 2's TFOpLambda) are understood. Apply this preprocessing outside the model "
    "and say so with preprocessing=..."
)


def apply_node(node: Node, values: list, weights_of: Callable[[Node], list[np.ndarray]], where: str):
    """The value (:class:`Affine` or one channel) of ``node`` given its inputs' ``values``."""
    config, kwargs, name = node.config, node.layer.call_kwargs, node.class_name
    value = values[0] if values else None
    if name == "Stack":
        axis = config.get("axis", node.layer.call_kwargs.get("axis", 0))
        if len(values) == 3 and all(isinstance(v, _Channel) for v in values) and axis in (-1, 3):
            return Affine(tuple(v.source for v in values), np.array([v.scale for v in values]),
                          np.array([v.offset for v in values]))  # fmt: skip
        raise _error(node, where, "stacks something other than three channels along the last axis")
    if isinstance(value, _Channel):
        raise _error(node, where, "works on one channel: only stacking the channels back is understood")
    if name == "Rescaling":
        scale = _channels(config.get("scale", 1.0), node, where)
        return value.then("multiply", scale).then("add", _channels(config.get("offset", 0.0), node, where))
    if name == "Normalization":
        return _normalization(node, value, weights_of, where)
    if name == "GetItem" and len(node.layer.call_args) == 2:
        index = _index(node.layer.call_args[1])
        if index == "reverse":
            return value.reversed()
        if isinstance(index, int):
            return _Channel(value.perm[index], float(value.scale[index]), float(value.offset[index]))
    if name == "SlicingOpLambda" and _index(kwargs.get("slice_spec")) == "reverse":
        return value.reversed()
    if name == "TFOpLambda" and config.get("function") in _TF_OPS:
        op, key = _TF_OPS[config["function"]]
        if key in kwargs:
            return value.then(op, _channels(kwargs[key], node, where))
    if name in _KERAS3_OPS and len(node.layer.call_args) == 2 and not kwargs:
        first, second = node.layer.call_args
        op = _KERAS3_OPS[name]
        if _is_tensor(first) and not _is_tensor(second):
            return value.then(op, _channels(second, node, where))
        if _is_tensor(second) and not _is_tensor(first) and op in ("add", "multiply", "subtract"):
            constant = _channels(first, node, where)  # c - x = -x + c
            if op == "subtract":
                return value.then("multiply", -1.0).then("add", constant)
            return value.then(op, constant)
    raise _error(node, where, _NOT_AFFINE)


def _normalization(node: Node, value: Affine, weights_of, where: str) -> Affine:
    """Keras's ``Normalization``: ``(x - mean) / max(sqrt(variance), 1e-7)`` (``invert``: the
    reverse), with ``mean`` / ``variance`` from its config or its weights."""
    config = node.config
    axis = config.get("axis", -1)
    if axis not in (-1, 3, [-1], [3], (-1,), (3,)):
        raise _error(node, where, f"normalizes over axis {axis}: only the channels (axis -1) can be read")
    if config.get("mean") is not None and config.get("variance") is not None:
        mean, variance = _channels(config["mean"], node, where), _channels(config["variance"], node, where)
    else:
        arrays = weights_of(node)
        if len(arrays) < 2:
            raise _error(node, where, "has no mean and variance (neither in its config nor in the weights)")
        mean, variance = (np.broadcast_to(np.asarray(a, np.float64).reshape(-1), (3,)) for a in arrays[:2])
    std = np.maximum(np.sqrt(variance), 1e-7)
    if config.get("invert"):
        return value.then("multiply", std).then("add", mean)
    return value.then("subtract", mean).then("divide", std)


def input_affine(graph: KerasGraph, weights_of, where: str) -> tuple[int, Affine, list[int]]:
    """``(boundary, affine, prefix)``: the node whose output the first non-affine layers take (the
    model input when there is no such layer), that output as an affine map of the model's input,
    and the affine nodes in front of it (:data:`INPUT_LAYERS`).

    ``weights_of(node)``: a Normalization node's arrays (mean, variance, count). Raises
    :class:`WeightFileError` naming a layer in front of the base that is not affine (a Lambda, a
    custom layer) or a prefix whose outputs go to more than one place."""
    values: dict[int, object] = {0: Affine.identity()}
    prefix: list[int] = []
    for node in graph.nodes[1:]:
        if not node.inputs or not all(i in values for i in node.inputs):
            continue
        if node.class_name in IDENTITY_AT_INFERENCE and len(node.inputs) == 1:
            values[node.id] = values[node.inputs[0]]
            prefix.append(node.id)
            continue
        if node.class_name not in INPUT_LAYERS:
            if any(node.inputs[0] != i for i in node.inputs) or node.class_name == "Lambda":
                raise _error(node, where, _NOT_AFFINE)
            continue
        values[node.id] = apply_node(node, [values[i] for i in node.inputs], weights_of, where)
        prefix.append(node.id)
    outside = {i for n in graph.nodes if n.id not in values for i in n.inputs if i in values}
    if graph.output in values:
        raise WeightFileError(f"{where}: the model only rescales its input: there is no base to import")
    if len(outside) != 1:
        names = ", ".join(graph.describe(i) if i else "the input" for i in sorted(outside))
        raise WeightFileError(
            f"{where}: the input and its preprocessing ({names}) feed more than one branch of the model: "
            "only one image input flowing into the base can be imported"
        )
    boundary = outside.pop()
    if not isinstance(values[boundary], Affine):
        raise _error(graph.nodes[boundary], where, "leaves one channel of the image for the base")
    for node_id in prefix:  # the prefix must not leak into the rest of the model but at its end
        for consumer in graph.consumers.get(node_id, []):
            if consumer not in values and node_id != boundary:
                raise _error(graph.nodes[node_id], where, "feeds the model twice (a skip around the base)")
    used = set()
    stack = [boundary]
    while stack:  # the prefix that the boundary depends on (drop unused branches)
        node_id = stack.pop()
        if node_id and node_id not in used:
            used.add(node_id)
            stack += list(graph.nodes[node_id].inputs)
    return boundary, values[boundary], [i for i in prefix if i in used]
