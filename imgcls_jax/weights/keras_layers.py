"""A saved Keras model's architecture (its config JSON) as a graph of layer calls.

Keras writes a model's architecture as nested JSON: ``{"class_name": "Functional" | "Sequential"
| "Model", "config": {"layers": [...]}}``, where a layer may itself be a model (a ResNet50 base
used as one layer) and each layer of a functional model names the layers whose outputs it takes
(``inbound_nodes``). Keras 3 (``.keras`` archives, ``model.to_json()``) and Keras 2 / tf.keras
(the ``model_config`` attribute of a whole-model ``.h5``) differ in details: the input shape key
(``batch_shape`` / ``batch_input_shape``), how a call names its inputs and its constant
arguments (Keras 3's operation layers such as ``TrueDivide``, ``GetItem``; Keras 2's
``TFOpLambda``) and dtype policies. :func:`read_graph` reads both into one
:class:`KerasGraph`: every call of a leaf layer is a :class:`Node`, nested models inlined (their
inputs are the tensors they are called on), in the config's order (which is a call order).

Each layer also says where its weights are in the files Keras writes with it:

* Keras 3 (``model.weights.h5`` in a ``.keras`` archive, ``.weights.h5``): the group
  ``layers/<key>/.../vars`` where ``<key>`` is the snake-case class name made unique within
  its model (``conv2d``, ``conv2d_1``, ...; a Sequential model does not count its input layer),
  which carries the layer's name as its ``name`` attribute;
* legacy HDF5 (``model_weights/<top-level layer name>``): the top-level layer's group lists its
  (and its nested layers') weights in ``weight_names`` as ``<layer name>/<weight>`` (Keras 2 adds
  ``:0``), trainable weights first.

Refused, naming the layer: a layer called more than once (shared), a layer with several
outputs, a second model input, a model with several outputs. No Keras needed: this is JSON only.
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
    ``legacy_group``: name of the top-level layer whose legacy HDF5 group holds its weights.
    ``trainable``: its Keras ``trainable`` flag, and its enclosing models' (a frozen base freezes
    its layers). ``call_kwargs``, ``call_args``: arguments of its call (the operands of Keras 2
    ``TFOpLambda`` and Keras 3 operation layers such as ``TrueDivide``; ``call_args`` is empty for
    Keras 2).
    """

    class_name: str
    name: str
    config: dict
    keras3_path: str
    legacy_group: str
    trainable: bool = True
    call_kwargs: dict = field(default_factory=dict)
    call_args: tuple = ()


@dataclass(frozen=True)
class Node:
    """One call of a leaf layer: ``inputs`` are the ids of the nodes whose outputs it takes, in
    the call's order; ``input_shape`` the first one's shape as Keras recorded it (Keras 3 only;
    ``(None, H, W, C)``), or None."""

    id: int
    layer: KerasLayer
    inputs: tuple[int, ...]
    input_shape: tuple | None = None

    @property
    def class_name(self) -> str:
        return self.layer.class_name

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def config(self) -> dict:
        return self.layer.config


@dataclass
class KerasGraph:
    """A Keras model read by :func:`read_graph`: its nodes in call order (``nodes[i].id == i``;
    node 0 is the model's input, an ``InputLayer``), its output node, its input shape ``(H, W, C)``
    with None for free dimensions, and its dtype policy."""

    nodes: list[Node]
    output: int
    input_shape: tuple | None
    dtype_policy: str = "float32"
    consumers: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self):
        for node in self.nodes:
            for source in node.inputs:
                self.consumers.setdefault(source, []).append(node.id)

    def describe(self, node_id: int) -> str:
        node = self.nodes[node_id]
        return f"layer {node.name!r} ({node.class_name})"


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


def _tensor_refs(value) -> list[tuple[str, int]]:
    """``(layer name, tensor index)`` of the layer outputs in a Keras 3 call's arguments."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            history = value["config"]["keras_history"]
            return [(str(history[0]), int(history[2]) if len(history) > 2 else 0)]
        return [r for v in value.values() for r in _tensor_refs(v)]
    if isinstance(value, list | tuple):
        return [r for v in value for r in _tensor_refs(v)]
    return []


def _first_shape(value) -> tuple | None:
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            shape = value["config"].get("shape")
            return tuple(shape) if shape is not None else None
        return next((s for v in value.values() if (s := _first_shape(v)) is not None), None)
    if isinstance(value, list | tuple):
        return next((s for v in value if (s := _first_shape(v)) is not None), None)
    return None


def _inbound(entry: dict, where: str) -> tuple[list[tuple[str, int]], dict, tuple, tuple | None]:
    """``(inputs as (layer, tensor index), call kwargs, call args, first input's shape)`` of a
    functional layer's single call."""
    nodes = entry.get("inbound_nodes") or []
    if not nodes:
        return [], {}, (), None
    if len(nodes) > 1:
        raise WeightFileError(
            f"{where}: layer {_layer_name(entry)!r} ({entry.get('class_name')}) is called {len(nodes)} "
            "times (a shared layer): only layers called once can be imported"
        )
    node = nodes[0]
    if isinstance(node, dict):  # Keras 3: {"args": [...], "kwargs": {...}}
        args = node.get("args", [])
        return _tensor_refs(args), dict(node.get("kwargs", {})), tuple(args), _first_shape(args)
    if node and isinstance(node[0], str):  # Keras 2 TFOpLambda: [name, node, tensor, kwargs]
        return [(node[0], int(node[2]))], dict(node[3]) if len(node) > 3 else {}, (), None
    refs = [(str(ref[0]), int(ref[2]) if len(ref) > 2 else 0) for ref in node]  # Keras 2: [[name, ...], ...]
    kwargs = dict(node[0][3]) if node and len(node[0]) > 3 else {}
    return refs, kwargs, (), None


def _input_shape(config: dict) -> tuple | None:
    shape = config.get("batch_shape") or config.get("batch_input_shape")
    return tuple(shape[1:]) if shape else None


def _dtype_policy(config: dict) -> str:
    dtype = config.get("dtype", "float32")
    if isinstance(dtype, dict):  # Keras 3: {"class_name": "DTypePolicy", "config": {"name": ...}}
        dtype = dtype.get("config", {}).get("name", "float32")
    return str(dtype)


def _io_names(value) -> list[str]:
    """Layer names of a config's ``input_layers`` / ``output_layers``."""
    value = value or []
    if value and isinstance(value[0], str):  # Keras 3 single: [name, node, tensor]
        value = [value]
    return [str(v[0]) for v in value]


@dataclass
class _Walk:
    where: str
    nodes: list[Node] = field(default_factory=list)
    input_shape: tuple | None = None


def read_graph(model_config: dict, where: str) -> KerasGraph:
    """Read a Keras model config (Keras 2 or 3) into its graph of layer calls.

    ``where`` names the source (a file) in error messages. Raises :class:`WeightFileError` when
    the config is not a model, or has several inputs or outputs, or a shared or multi-output layer.
    """
    if model_config.get("class_name") not in MODEL_CLASSES or "layers" not in model_config.get("config", {}):
        raise WeightFileError(
            f"{where}: not a Keras model config (class_name {model_config.get('class_name')!r}; "
            f"expected one of {MODEL_CLASSES} with a 'layers' list)"
        )
    walk = _Walk(where)
    output = _walk_model(model_config, walk, None, "", None, True)
    if not walk.nodes or walk.nodes[0].class_name != "InputLayer":
        raise WeightFileError(f"{where}: the model has no input layer (build it on keras.Input(...) first)")
    return KerasGraph(walk.nodes, output, walk.input_shape, _dtype_policy(model_config["config"]))


def _add(walk: _Walk, layer: KerasLayer, inputs, shape=None) -> int:
    walk.nodes.append(Node(len(walk.nodes), layer, tuple(inputs), shape))
    return len(walk.nodes) - 1


def _walk_model(entry: dict, walk: _Walk, inputs: list[int] | None, path: str, group: str | None,
                trainable: bool) -> int:  # fmt: skip
    """Append the leaf layers of the model ``entry`` called on the nodes ``inputs`` (None: the
    top model) to ``walk``; returns its output node."""
    config, where = entry["config"], walk.where
    sequential = entry["class_name"] == "Sequential"
    trainable = trainable and config.get("trainable", True) is not False
    if sequential and inputs is None and config.get("build_input_shape"):
        walk.input_shape = tuple(config["build_input_shape"][1:])
    outputs: dict[str, int] = {}
    used: dict[str, int] = {}
    previous = None if inputs is None else inputs[0]
    model_inputs = _io_names(config.get("input_layers"))
    for layer_entry in config["layers"]:
        class_name, name = str(layer_entry.get("class_name")), _layer_name(layer_entry)
        layer_config = layer_entry.get("config", {})
        if class_name == "InputLayer":
            outputs[name] = previous = _input_node(walk, layer_entry, inputs, model_inputs, name)
            continue  # no weights
        if sequential:
            if previous is None:  # a Sequential model without InputLayer (Keras 2): its first layer's shape
                shape = layer_config.get("batch_input_shape") or layer_config.get("batch_shape")
                previous = _input_node(walk, {"config": {"batch_shape": shape}}, inputs, [], "input")
            refs, kwargs, args, shape = [previous], {}, (), None
        else:
            named, kwargs, args, shape = _inbound(layer_entry, where)
            refs = []
            for source, index in named:
                if source not in outputs:
                    raise WeightFileError(
                        f"{where}: layer {name!r} ({class_name}) takes the output of {source!r}, which is "
                        "not a layer before it in the same model"
                    )
                if index:
                    raise WeightFileError(
                        f"{where}: layer {name!r} ({class_name}) takes output {index} of {source!r}: layers "
                        "with several outputs cannot be imported"
                    )
                refs.append(outputs[source])
        key = _unique(snake_case(class_name), used)
        owner = name if group is None else group
        if class_name in MODEL_CLASSES and "layers" in layer_config:
            outputs[name] = _walk_model(layer_entry, walk, refs, f"{path}layers/{key}/", owner, trainable)
        else:
            own = layer_config.get("trainable", True) is not False
            layer = KerasLayer(class_name, name, layer_config, f"{path}layers/{key}/vars", owner,
                               trainable and own, kwargs, args)  # fmt: skip
            outputs[name] = _add(walk, layer, refs, shape)
        previous = outputs[name]
    if sequential:
        return previous
    names = _io_names(config.get("output_layers"))
    if len(names) != 1:
        raise WeightFileError(
            f"{where}: the model {config.get('name', '?')!r} has {len(names)} outputs {names}: only models "
            "with one output (the class scores) can be imported"
        )
    return outputs[names[0]]


def _input_node(walk: _Walk, entry: dict, inputs, model_inputs: list[str], name: str) -> int:
    """The node an ``InputLayer`` stands for: the tensor a nested model is called on, else (the
    top model's) a new input node; a second top input is an error."""
    if inputs is not None:
        position = model_inputs.index(name) if name in model_inputs else 0
        if position >= len(inputs):
            raise WeightFileError(f"{walk.where}: the nested model's input {name!r} is not given a tensor")
        return inputs[position]
    if walk.nodes:
        raise WeightFileError(
            f"{walk.where}: a second model input {name!r} (InputLayer): only models with one input "
            "(the images) can be imported"
        )
    config = entry.get("config", {})
    walk.input_shape = _input_shape(config) or walk.input_shape
    layer = KerasLayer("InputLayer", name, config, "", name)
    return _add(walk, layer, [])
