"""A saved Keras model's architecture (its config JSON) as a flat chain of layers.

Keras writes a model's architecture as nested JSON: ``{"class_name": "Functional" | "Sequential"
| "Model", "config": {"layers": [...]}}``, where a layer may itself be a model (a VGG16 base
used as one layer). Keras 3 (``.keras`` archives, ``model.to_json()``) and Keras 2 / tf.keras
(the ``model_config`` attribute of a whole-model ``.h5``) differ in details: the input shape
key (``batch_shape`` / ``batch_input_shape``), how a layer names its inputs (``inbound_nodes``)
and dtype policies. :func:`flatten_model` reads both into one list of :class:`KerasLayer`, in
call order, with nested models inlined, and refuses anything that is not a single chain.

Each layer also says where its weights are in the files Keras writes with it:

* Keras 3 (``model.weights.h5`` in a ``.keras`` archive, ``.weights.h5``): the group
  ``layers/<key>/.../vars`` where ``<key>`` is the snake-case class name made unique within
  its model (``conv2d``, ``conv2d_1``, ...; a Sequential model does not count its input layer);
* legacy HDF5 (``model_weights/<top-level layer name>``): the top-level layer's group lists its
  (and its nested layers') weights in ``weight_names``, in call order.

No Keras needed: this is JSON only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from imgcls_jax.weights.keras import WeightFileError

MODEL_CLASSES = ("Functional", "Model", "Sequential")


@dataclass(frozen=True)
class KerasLayer:
    """One leaf layer of a Keras model.

    ``keras3_path``: its weights group in a Keras 3 weights file (``layers/conv2d_1/vars``).
    ``legacy_group``: name of the top-level layer whose legacy HDF5 group holds its weights;
    ``legacy_index``: position of its first weight in that group's ``weight_names``.
    ``call_kwargs``, ``call_args``: arguments of the call (the operands of Keras 2 ``TFOpLambda``
    and Keras 3 operation layers such as ``TrueDivide``; ``call_args`` is empty for Keras 2).
    """

    class_name: str
    name: str
    config: dict
    keras3_path: str
    legacy_group: str
    legacy_index: int
    call_kwargs: dict = field(default_factory=dict)
    call_args: tuple = ()

    @property
    def num_weights(self) -> int:
        """How many weight arrays Keras saves for this layer (0 for unknown layers with none)."""
        if self.class_name in ("Conv2D", "Dense"):
            return 2 if self.config.get("use_bias", True) else 1
        return 0  # layers with weights that cannot be imported are refused before any is read


@dataclass
class FlatModel:
    """A Keras model read by :func:`flatten_model`: its input shape and its leaf layers."""

    input_shape: tuple | None  # (H, W, C) with None for free dimensions, or None if unknown
    layers: list[KerasLayer]
    dtype_policy: str = "float32"


def snake_case(name: str) -> str:
    """Keras's ``naming.to_snake_case`` (the key of a layer in a Keras 3 weights file)."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _unique(key: str, used: dict[str, int]) -> str:
    if key in used:
        used[key] += 1
        return f"{key}_{used[key]}"
    used[key] = 0
    return key


def _layer_name(entry: dict) -> str:
    return str(entry.get("name") or entry.get("config", {}).get("name", "?"))


def _tensor_refs(value) -> list[str]:
    """Names of the layers whose outputs appear in a Keras 3 call's arguments."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            return [str(value["config"]["keras_history"][0])]
        return [r for v in value.values() for r in _tensor_refs(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in _tensor_refs(v)]
    return []


def _inbound(entry: dict, where: str) -> tuple[list[str], dict, tuple]:
    """``(input layer names, call kwargs, call args)`` of a functional layer's single call."""
    nodes = entry.get("inbound_nodes") or []
    if not nodes:
        return [], {}, ()
    if len(nodes) > 1:
        raise WeightFileError(
            f"{where}: layer {_layer_name(entry)!r} is called {len(nodes)} times (a shared layer); "
            "only a single chain of layers can be imported"
        )
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        args = node.get("args", [])
        return _tensor_refs(args), dict(node.get("kwargs", {})), tuple(args)
    if node and isinstance(node[0], str):  # Keras 2 TFOpLambda: [name, node, tensor, kwargs]
        return [node[0]], dict(node[3]) if len(node) > 3 else {}, ()
    names = [str(ref[0]) for ref in node]  # Keras 2: [[name, node, tensor, kwargs], ...]
    kwargs = dict(node[0][3]) if node and len(node[0]) > 3 else {}
    return names, kwargs, ()


def _input_shape(config: dict) -> tuple | None:
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    return tuple(shape[1:]) if shape else None


def _dtype_policy(config: dict) -> str:
    dtype = config.get("dtype", "float32")
    if isinstance(dtype, dict):  # Keras 3: {"class_name": "DTypePolicy", "config": {"name": ...}}
        dtype = dtype.get("config", {}).get("name", "float32")
    return str(dtype)


def _output_names(config: dict) -> list[str]:
    outputs = config.get("output_layers") or []
    if outputs and isinstance(outputs[0], str):  # Keras 3 single output: [name, node, tensor]
        outputs = [outputs]
    return [str(o[0]) for o in outputs]


def flatten_model(model_config: dict, where: str) -> FlatModel:
    """Read a Keras model config (Keras 2 or 3) into its chain of leaf layers.

    ``where`` names the source (a file) in error messages. Raises :class:`WeightFileError` when
    the config is not a model, or its layers do not form a single chain (branches, several
    inputs or outputs, shared layers).
    """
    if model_config.get("class_name") not in MODEL_CLASSES or "layers" not in model_config.get("config", {}):
        raise WeightFileError(
            f"{where}: not a Keras model config (class_name {model_config.get('class_name')!r}; "
            f"expected one of {MODEL_CLASSES} with a 'layers' list)"
        )
    flat = FlatModel(None, [], _dtype_policy(model_config["config"]))
    _walk(model_config, where, "", None, [0], flat, top=True)
    return flat


def _walk(model_config, where, path, legacy_group, counter, flat: FlatModel, top: bool) -> None:
    """Append ``model_config``'s leaf layers to ``flat.layers``; ``counter[0]`` counts the
    legacy weights of ``legacy_group`` seen so far."""
    config = model_config["config"]
    sequential = model_config["class_name"] == "Sequential"
    entries = config["layers"]
    used: dict[str, int] = {}
    previous = None
    if sequential and top and config.get("build_input_shape"):
        flat.input_shape = tuple(config["build_input_shape"][1:])
    for entry in entries:
        class_name, name = entry.get("class_name"), _layer_name(entry)
        layer_config = entry.get("config", {})
        if sequential:
            inputs, kwargs, args = ([previous] if previous else []), {}, ()
        else:
            inputs, kwargs, args = _inbound(entry, where)
            if previous is not None and inputs != [previous]:
                raise WeightFileError(
                    f"{where}: layer {name!r} ({class_name}) takes its input from {inputs}, not from the "
                    f"layer before it ({previous!r}): only a single chain of layers (a VGG16/VGG19 base "
                    "and a head) can be imported"
                )
        previous = name
        if class_name == "InputLayer":
            if top and flat.input_shape is None:
                flat.input_shape = _input_shape(layer_config)
            if sequential:  # a Sequential model's `layers` (and weight keys) skip its input
                continue
        elif top and flat.input_shape is None and layer_config.get("batch_input_shape"):
            flat.input_shape = _input_shape(layer_config)  # Keras 2 Sequential without InputLayer
        key = _unique(snake_case(str(class_name)), used)
        sub_path = f"{path}layers/{key}"
        group = legacy_group if legacy_group is not None else name
        if top:
            counter = [0]
        if class_name in MODEL_CLASSES and "layers" in layer_config:
            _walk(entry, where, f"{sub_path}/", group, counter, flat, top=False)
            continue
        if class_name == "InputLayer":
            continue
        layer = KerasLayer(
            str(class_name), name, layer_config, f"{sub_path}/vars", group, counter[0], kwargs, args
        )
        counter[0] += layer.num_weights
        flat.layers.append(layer)
    if not sequential and entries:
        outputs = _output_names(config)
        if outputs and outputs != [previous]:
            raise WeightFileError(
                f"{where}: the model's outputs are {outputs}, not its last layer {previous!r}: only a "
                "single chain of layers with one output can be imported"
            )
