"""And back out: ``to_keras(model, path)`` writes an imgcls_jax model as a Keras model file.

Written without Keras, in Keras's own layouts:

* ``.keras``: a Keras 3 archive (``metadata.json``, ``config.json``, ``model.weights.h5``), read
  by ``keras.saving.load_model`` (no custom objects);
* ``.h5``: a whole-model legacy HDF5 file (``model_config`` in Keras 2 / tf.keras form, and
  ``model_weights``), read by ``keras.saving.load_model``.

The Keras model is what a Keras user builds for transfer learning: an input, an optional
``Rescaling`` layer, the family's base as Keras's application builds it
(:mod:`imgcls_jax.weights.keras_families`: the same graph import goes by), nested as one layer
named after the family (``vgg16``, ``resnet50``, ...; ``nested=False`` writes its layers flat),
the pooling (``GlobalAveragePooling2D``, ``GlobalMaxPooling2D`` or ``Flatten``) and the head's
layers (``Dense``, ``Dropout``, ``BatchNormalization``, ``LayerNormalization``, ``Activation``),
the last ``Dense`` with the output's activation. A model with Keras's ImageNet top gets the
family's top layers under Keras's names (``fc1``, ``fc2``, ``predictions``; ``avg_pool``,
``top_dropout``, ``predictions``). Zero paddings that Keras computes from the input size
(``imagenet_utils.correct_pad``) are written for the model's ``input_shape``.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from imgcls_jax.weights.keras_families import application, family_config, lead, lead_is_mode
from imgcls_jax.weights.keras_families import final_norm as keras_final_norm
from imgcls_jax.weights.keras_inputs import mode_affine
from imgcls_jax.weights.keras_layers import read_graph

#: Keras version whose file formats are written (read by Keras 3.x and tf.keras 2.x alike).
KERAS3_FORMAT_VERSION = "3.15.1"
LEGACY_FORMAT_VERSION = "2.21.0"
_POOL_LAYERS = {
    "avg": ("GlobalAveragePooling2D", "global_average_pooling2d"),
    "max": ("GlobalMaxPooling2D", "global_max_pooling2d"),
    None: ("Flatten", "flatten"),
}
_HEAD_CLASSES = {"dense": ("Dense", "dense"), "dropout": ("Dropout", "dropout"),
                 "batchnorm": ("BatchNormalization", "batch_normalization"),
                 "layernorm": ("LayerNormalization", "layer_normalization"),
                 "activation": ("Activation", "activation")}  # fmt: skip


# ------------------------------------------------------------------------------ the config
@dataclass
class _Builder:
    """Builds a Functional model config (Keras 3 form, or Keras 2 form with ``legacy``)."""

    name: str
    legacy: bool
    layers: list = field(default_factory=list)
    used: dict = field(default_factory=dict)
    ranks: dict = field(default_factory=dict)  # layer name -> its output's rank (Keras 3 needs one)

    def unique(self, base: str) -> str:
        """``base``, ``base_1``, ... as Keras names layers it was given no name for."""
        n = self.used.get(base, -1) + 1
        self.used[base] = n
        return base if n == 0 else f"{base}_{n}"

    def input(self, name: str, shape) -> str:
        key = "batch_input_shape" if self.legacy else "batch_shape"
        config = {key: [None, *shape], "dtype": "float32", "sparse": False, "ragged": False, "name": name}
        self.layers.append(self._entry("InputLayer", name, config, []))
        self.ranks[name] = 4
        return name

    def add(self, class_name: str, name: str, config: dict, inputs: list[str]) -> str:
        config = {"name": name, "trainable": True, "dtype": "float32", **config}
        self.layers.append(self._entry(class_name, name, config, inputs))
        pooled = class_name.startswith("Global") or class_name == "Flatten"
        self.ranks[name] = 2 if pooled else self.ranks.get(inputs[0], 4)
        return name

    def op(self, class_name: str, config: dict, args: list) -> str:
        """A Keras 3 operation layer (what ``keras.ops`` on a symbolic tensor records), ``args``
        with ``str`` for the inputs' layer names."""
        name = self.unique({"GetItem": "get_item", "Stack": "stack"}[class_name])

        def arg(value):
            if isinstance(value, str):
                return self._inbound([value], merge=False)[0]["args"][0]
            return [arg(v) for v in value] if isinstance(value, list) else value

        entry = {"module": "keras.src.ops.numpy", "class_name": class_name,
                 "config": {"name": name, **config}, "registered_name": class_name, "name": name,
                 "inbound_nodes": [{"args": [arg(a) for a in args], "kwargs": {}}]}  # fmt: skip
        self.layers.append(entry)
        self.ranks[name] = 3 if class_name == "GetItem" else 4
        return name

    def add_entry(self, entry: dict, rename: dict[str, str]) -> str:
        """A layer entry as Keras wrote it (a family graph's) in this builder's form, its inputs
        that are layers of ``rename`` taking the renamed ones."""
        refs = [rename.get(r, r) for r in _refs(entry)]
        if self.legacy:
            entry = _legacy_entry(entry)
            entry["inbound_nodes"] = self._inbound(refs, merge=False)
        else:
            entry = {**entry, "inbound_nodes": _renamed(entry.get("inbound_nodes") or [], rename)}
        self.layers.append(entry)
        self.ranks[entry["name"]] = 2 if entry["class_name"] in ("GlobalAveragePooling2D", "Flatten") else 4
        return entry["name"]

    def add_model(self, entry: dict, inputs: list[str]) -> str:
        """A nested model (Keras 3 form) called on ``inputs``."""
        self.layers.append({**entry, "inbound_nodes": self._inbound(inputs, merge=False)})
        self.ranks[entry["name"]] = 4
        return entry["name"]

    def _entry(self, class_name: str, name: str, config: dict, inputs: list[str]) -> dict:
        entry = {"class_name": class_name, "config": config, "name": name}
        if not self.legacy:
            entry.update(module="keras.layers", registered_name=None)
        entry["inbound_nodes"] = self._inbound(inputs, merge=False)
        return entry

    def _inbound(self, inputs: list[str], merge: bool):
        if not inputs:
            return []
        if self.legacy:
            return [[[name, 0, 0, {}] for name in inputs]]
        refs = [
            {"class_name": "__keras_tensor__",
             "config": {"shape": [None] * self.ranks.get(name, 4), "dtype": "float32",
                        "keras_history": [name, 0, 0]}}
            for name in inputs
        ]  # fmt: skip
        return [{"args": [refs] if merge else refs, "kwargs": {}}]

    def config(self, inputs: str, output: str) -> dict:
        io = ({"input_layers": [[inputs, 0, 0]], "output_layers": [[output, 0, 0]]} if self.legacy
              else {"input_layers": [inputs, 0, 0], "output_layers": [output, 0, 0]})  # fmt: skip
        config = {"name": self.name, "trainable": True, "layers": self.layers, **io}
        out = {"class_name": "Functional", "config": config}
        if not self.legacy:
            out.update({"module": "keras.src.models.functional", "registered_name": "Functional"})
        return out


def _refs(entry: dict) -> list[str]:
    from imgcls_jax.weights.keras_layers import _tensor_refs

    nodes = entry.get("inbound_nodes") or []
    return [name for name, _ in _tensor_refs(nodes[0].get("args", []))] if nodes else []


def _renamed(value, rename: dict[str, str]):
    """A Keras 3 call's arguments with the tensors of layers in ``rename`` taken from the renamed."""
    if isinstance(value, dict):
        if value.get("class_name") == "__keras_tensor__":
            history = list(value["config"]["keras_history"])
            history[0] = rename.get(history[0], history[0])
            return {**value, "config": {**value["config"], "keras_history": history}}
        return {k: _renamed(v, rename) for k, v in value.items()}
    if isinstance(value, list):
        return [_renamed(v, rename) for v in value]
    return value


def _legacy_entry(entry: dict) -> dict:
    """A Keras 3 layer entry in Keras 2 form: plain dtype, no initializers or regularizers (Keras
    takes its defaults; they do not change predictions), no module keys. ``ValueError`` for a
    Keras 3 operation on a tensor and a constant (MobileNetV3's hard sigmoid ``x + 3``, ``x / 6``)
    or a layer class of an application's own module (InceptionResNetV2's ``CustomScaleLayer``),
    which a Keras 2 config cannot hold (Keras finds them by their module only)."""
    module = str(entry.get("module") or "keras.layers")
    if module != "keras.layers":
        what = "operation" if module.startswith("keras.src.ops") else "layer"
        raise ValueError(
            f"this family's Keras base holds the {what} {entry['name']!r} ({entry['class_name']} of "
            f"{module}), which a legacy .h5 model config cannot name: export a .keras file"
        )
    config = {k: v for k, v in entry["config"].items()
              if not any(w in k for w in ("initializer", "regularizer", "constraint"))}  # fmt: skip
    config["dtype"] = "float32"
    return {"class_name": entry["class_name"], "config": config, "name": entry["name"]}


def _base_config(arch: str, input_shape) -> dict:
    """The Keras config of ``arch``'s base for ``input_shape``: the stored graph with its input
    size set and its ``correct_pad`` paddings recomputed for the sizes of the maps they pad (each
    from the maps before it, so a corrected padding's size carries on)."""
    config = family_config(arch)
    layers = config["config"]["layers"]
    stored = layers[0]["config"]["batch_shape"][1:3]  # None for most families; NASNet's fixed size
    layers[0]["config"]["batch_shape"] = [None, *input_shape]
    graph = read_graph(config, arch)
    sizes: dict[int, tuple | None] = {0: tuple(input_shape[:2])}
    sizes_stored: dict[int, tuple | None] = {0: None if None in stored else tuple(stored)}
    correct, entries = application(arch).correct_pad, {entry["name"]: entry for entry in layers}
    for node in graph.nodes[1:]:  # (a nested model's layers are nodes, not entries of the base)
        source = node.inputs[0] if node.inputs else None
        before, c = sizes.get(source), dict(node.config)  # (node.config is the entry's: edited below)
        sizes_stored[node.id] = _output_size(node.class_name, c, sizes_stored.get(source))
        if correct and node.class_name == "ZeroPadding2D" and _pads_for_stride(graph, node):
            c["padding"] = _correct_pad(c["padding"], sizes_stored.get(source), before)
            entries[node.name]["config"]["padding"] = c["padding"]
        sizes[node.id] = _output_size(node.class_name, c, before)
    return config


def _pads_for_stride(graph, node) -> bool:
    """Whether a ``ZeroPadding2D`` can be a ``correct_pad``: it feeds only strided VALID
    convolutions or poolings (NASNet's fixed ``((0, 1), (0, 1))`` before a ``Cropping2D`` is not)."""
    consumers = [graph.nodes[i] for i in graph.consumers.get(node.id, [])]
    strided = ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D")
    return bool(consumers) and all(
        c.class_name in strided
        and c.config.get("padding", "valid") == "valid"
        and _pair(c.config.get("strides") or c.config.get("pool_size") or 1) != (1, 1)
        for c in consumers
    )


def _correct_pad(padding, stored, size):
    """``padding`` as Keras's ``correct_pad`` writes it for a map of ``size`` if it is what
    ``correct_pad`` wrote for the stored graph's map (of side ``stored``, None: unknown), else
    ``padding`` unchanged (a fixed padding). ``correct_pad(k)`` pads ``k//2`` on both sides of an
    odd side, ``(k//2 - 1, k//2)`` on an even or unknown one."""
    if size is None or not (isinstance(padding, list) and all(isinstance(p, list) for p in padding)):
        return padding
    stored = stored or (None, None)

    def pad(half: int, n) -> list[int]:
        return [half, half] if n is not None and n % 2 else [half - 1, half]

    if any(p != pad(p[1], n) for p, n in zip(padding, stored)):
        return padding
    return [pad(p[1], n) for p, n in zip(padding, size)]


def _output_size(class_name: str, c: dict, before: tuple | None) -> tuple | None:
    """``(h, w)`` of a layer's output map from its input's ``before`` (None where unknown)."""
    if before is None or None in before:
        return None
    if class_name == "ZeroPadding2D":
        pad = c["padding"]
        pad = [[pad, pad]] * 2 if isinstance(pad, int) else [[q, q] if isinstance(q, int) else q for q in pad]
        return tuple(n + a + b for n, (a, b) in zip(before, pad))
    if class_name == "Cropping2D":
        crop = [p if isinstance(p, list) else [p, p] for p in _pair(c["cropping"])]
        return tuple(n - a - b for n, (a, b) in zip(before, crop))
    if class_name in ("Conv2D", "DepthwiseConv2D", "SeparableConv2D", "MaxPooling2D", "AveragePooling2D"):
        kernel = c.get("kernel_size") or c.get("pool_size")
        strides = c.get("strides") or kernel
        kernel, strides = (_pair(kernel), _pair(strides))
        same = c.get("padding", "valid") == "same"
        return tuple(-(-n // s) if same else (n - k) // s + 1 for n, k, s in zip(before, kernel, strides))
    if class_name.startswith("Global"):
        return None
    return before


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def _head_layer_config(layer, output: str | None = None) -> dict:
    if layer.kind == "dense":
        return {"units": int(layer.units), "activation": output or layer.activation, "use_bias": True}
    if layer.kind == "dropout":
        return {"rate": float(layer.rate)}
    if layer.kind == "activation":
        return {"activation": layer.activation}
    config = {"axis": -1, "epsilon": float(layer.epsilon), "center": layer.center, "scale": layer.scale}
    if layer.kind == "batchnorm":
        config["momentum"] = float(layer.momentum)
    return config


def model_config(arch: str, input_shape, *, pooling, head=(), head_names=None, keras_output="softmax",
                 rescaling=None, reorder=None, nested=True, legacy=False,
                 final_norm: str = "map") -> tuple[dict, dict[str, str]]:  # fmt: skip
    """The Keras config of ``arch``'s base with ``pooling`` and ``head`` (head layers; empty:
    features), and ``{Keras layer name: the head's layer name here}``.

    ``head_names``: Keras names of the pooling and head layers (Keras's own top), default
    Keras's automatic ones; ``keras_output``: the output's activation (on the last Dense, or an
    ``Activation`` after it when layers follow it); ``rescaling``: an optional ``(scale, offset)``
    input layer (numbers or per-channel lists), after ``reorder``: the input's channels in this
    order first (Keras 3 operation layers, as ``preprocess_input`` records RGB -> BGR).
    ``final_norm``: for a family whose base ends with a LayerNormalization of the map
    (:func:`~imgcls_jax.weights.keras_families.final_norm`, ConvNeXt): ``"map"`` keeps it there (the
    pooling follows it), ``"pooled"`` moves it after the pooling (Keras's ``pooling="avg"`` base,
    written as the base without it, the pooling layer and it), ``"top"`` leaves it out (Keras's
    own top follows the base)."""
    from imgcls_jax.models.head import layer_names

    builder = _Builder("model", legacy)
    shape = list(input_shape) if input_shape is not None else [None, None, 3]
    x = builder.input("input_layer", shape)
    if reorder is not None:  # x[..., reorder] as Keras 3 records preprocess_input's RGB -> BGR
        if legacy:
            raise ValueError("a legacy .h5 file cannot reorder the input's channels: export a .keras file")
        ellipsis = {"class_name": "__ellipsis__", "config": {}}
        channels = [builder.op("GetItem", {}, [x, [ellipsis, int(c)]]) for c in reorder]
        x = builder.op("Stack", {"axis": -1}, [channels])
    if rescaling is not None:
        x = builder.add("Rescaling", "input_rescaling", {"scale": rescaling[0], "offset": rescaling[1]}, [x])
    base = _base_config(arch, shape)
    norm = None
    if final_norm != "map" and keras_final_norm(arch) is not None:
        base, norm = _without_final_norm(base)
    if nested and not legacy:
        entry = {**base, "name": arch}
        entry["config"] = {**base["config"], "name": arch}
        x = builder.add_model(entry, [x])
    else:
        x = _inline(builder, base, x)
    mapping: dict[str, str] = {}
    if not head and pooling is None:
        return builder.config("input_layer", x), mapping
    names = iter(head_names or [])
    pool_class, pool_name = _POOL_LAYERS[pooling]
    x = builder.add(
        pool_class, next(names, None) or builder.unique(pool_name), {"data_format": "channels_last"}, [x]
    )
    if norm is not None and final_norm == "pooled":
        x = builder.add_entry(norm, {_refs(norm)[0]: x})
        builder.ranks[x] = 2
        builder.unique(x)  # a head's LayerNormalization gets another name
    last = max((i for i, h in enumerate(head) if h.kind == "dense"), default=-1)
    ours = layer_names(head) if head else []
    for i, layer in enumerate(head):
        cls, auto = _HEAD_CLASSES[layer.kind]
        name = next(names, None) or builder.unique(auto)
        output = keras_output if i == last and last == len(head) - 1 else None
        x = builder.add(cls, name, _head_layer_config(layer, output), [x])
        if ours[i] is not None:
            mapping[name] = ours[i]
    if head and last != len(head) - 1 and keras_output != "linear":
        x = builder.add("Activation", builder.unique("activation"), {"activation": keras_output}, [x])
    return builder.config("input_layer", x), mapping


def _without_final_norm(base: dict) -> tuple[dict, dict]:
    """``(base config without its last layer, that layer's entry)``: the base's output becomes the
    final norm's input."""
    layers = base["config"]["layers"]
    norm = layers[-1]
    name = base["config"]["output_layers"]
    name = name[0] if isinstance(name[0], str) else name[0][0]
    if norm["name"] != name:
        raise ValueError(f"the base's last layer {norm['name']!r} is not its output {name!r}")
    (source,) = _refs(norm)
    config = {**base["config"], "layers": layers[:-1], "output_layers": [source, 0, 0]}
    return {**base, "config": config}, norm


def _inline(builder: _Builder, base: dict, x: str) -> str:
    """The base's layers added flat, its input being ``x``; returns its output layer."""
    layers = base["config"]["layers"]
    entry_input = layers[0]["name"]
    for entry in layers[1:]:
        builder.add_entry(entry, {entry_input: x})
    output = base["config"]["output_layers"]
    return output[0] if isinstance(output[0], str) else output[0][0]


def keras_config_for(*, arch: str = "vgg16", input_shape=None, include_top: bool = False,
                     pooling: str | None = "avg", head_units=(), head_activation: str = "relu",
                     dropout: float = 0.0, num_classes: int | None = None, keras_output: str = "softmax",
                     rescaling: tuple | None = None, nested: bool = True, legacy: bool = False,
                     head=None) -> dict:  # fmt: skip
    """The Keras model config (Keras 3 form, or Keras 2 form with ``legacy``) of a transfer model:
    ``arch``'s base, ``pooling``, a head (``head`` layers, or the classic options) whose output
    ``Dense`` has ``num_classes`` units and the activation ``keras_output``, ``rescaling`` an
    optional ``(scale, offset)`` input layer."""
    from imgcls_jax.models.head import classic_head, parse_head, with_classes

    layers, names = (), None
    if include_top:
        top_pooling, layers, names = _keras_top(arch, num_classes or 1000)
        pooling = top_pooling
    elif num_classes is not None:
        if head is not None:
            layers = with_classes(parse_head(head), num_classes)
        else:
            layers = classic_head(head_units, head_activation, dropout, num_classes)
        layers = tuple(h for h in layers if not (h.kind == "dropout" and h.rate == 0.0))
    config, _ = model_config(
        arch, input_shape, pooling=pooling, head=layers, head_names=names, keras_output=keras_output,
        rescaling=rescaling, nested=nested, legacy=legacy,
    )  # fmt: skip
    return config


def _keras_top(arch: str, num_classes: int):
    from flax import nnx

    from imgcls_jax.models.registry import create_model

    model = nnx.eval_shape(lambda: create_model(arch, include_top=True, num_classes=num_classes,
                                                input_shape=(224, 224, 3)))  # fmt: skip
    return model.keras_top(num_classes)


# ---------------------------------------------------------------------------- the weights
def input_bridge(
    mode: str, input_preprocessing: str, arch: str | None = None
) -> tuple[tuple | None, tuple | None]:
    """``(reorder, (scale, offset))``: the channel order and the ``Rescaling`` layer that turn
    pixels preprocessed with ``input_preprocessing`` into what ``mode`` computes (None: nothing
    to do); for a family ``arch`` whose Keras base applies its mode itself (:func:`lead_is_mode`),
    into what that base's own first layers turn into what ``mode`` computes."""
    bridge = mode_affine(mode).after(mode_affine(input_preprocessing).inverse())
    if arch is not None and lead_is_mode(arch):
        bridge = lead(arch).before.inverse().after(bridge)
    reorder = None if bridge.perm == (0, 1, 2) else bridge.perm
    scale, offset = bridge.scale, bridge.offset
    if np.allclose(scale, 1.0, rtol=1e-7) and np.allclose(offset, 0.0, atol=1e-7):
        return reorder, None

    def compact(values):
        return float(values[0]) if np.allclose(values, values[0], rtol=1e-7) else [float(v) for v in values]

    return reorder, (compact(scale), compact(offset))


def _export_plan(model, input_preprocessing, keras_output, nested: bool, legacy: bool):
    """``(config, arrays by Keras layer name, weight names by Keras layer name)``."""
    if model.num_classes is None:
        raise ValueError(
            "the model has no classifier head (num_classes=None): nothing to export as a classifier"
        )
    lead(model.arch)  # a family without a Keras graph: its clear error, before anything is written
    if input_preprocessing is None:
        input_preprocessing = "none" if model.preprocessing == "unit" else model.preprocessing
    output_activation = getattr(model, "output_activation", "softmax")
    keras_output = keras_output or output_activation
    binary = keras_output == "sigmoid" and output_activation == "softmax"
    if binary and (model.num_classes != 2 or model.include_top or model.head_spec[-1].kind != "dense"):
        raise ValueError(
            "keras_output='sigmoid' for a softmax model needs 2 classes and a head ending in its Dense layer "
            f"(written as Dense(1, sigmoid)); the model has {model.num_classes} classes"
        )
    if output_activation == "sigmoid" and keras_output != "sigmoid":
        raise ValueError(f"the model's outputs are sigmoids; keras_output={keras_output!r} would change them")
    reorder, rescaling = input_bridge(model.preprocessing, input_preprocessing, model.arch)
    if reorder is not None and legacy:
        raise ValueError(
            f"a legacy .h5 model for inputs preprocessed with {input_preprocessing!r} cannot apply the "
            f"model's {model.preprocessing!r} preprocessing (it reverses the channels): export a .keras "
            f"file, or with input_preprocessing={model.preprocessing!r} and apply keras.applications' "
            "preprocess_input"
        )
    if model.include_top:
        pooling, head, names = model.keras_top(model.num_classes)
    else:  # a dropout of rate 0 (the classic head's, without dropout) is no Keras layer
        pooling, names = model.pooling, None
        head = tuple(h for h in model.head_spec if not (h.kind == "dropout" and h.rate == 0.0))
    if binary:
        head = (*head[:-1], type(head[-1])("dense", units=1))
    config, mapping = model_config(
        model.arch, model.input_shape, pooling=pooling, head=head, head_names=names,
        keras_output=keras_output, rescaling=rescaling, reorder=reorder, nested=nested, legacy=legacy,
        final_norm=_final_norm(model, pooling),
    )  # fmt: skip
    if model.include_top:
        mapping = {n: n for n in model.head_layers}
    return config, _arrays(model, config, mapping, binary)


def _final_norm(model, pooling) -> str:
    """Where ``model``'s Keras base ends (see :func:`model_config`): ``"top"`` under Keras's own
    top, ``"pooled"`` for a ConvNeXt pooled as Keras's ``pooling=`` base, else ``"map"``."""
    if model.include_top:
        return "top"
    return "pooled" if pooling is not None and getattr(model, "final_norm", "map") == "pooled" else "map"


def _arrays(model, config: dict, mapping: dict[str, str], binary: bool) -> dict[str, tuple[list, tuple]]:
    """``{Keras layer name: (arrays, weight names)}`` of every weighted layer of ``config``."""
    specs = {s.name: s for s in model.layer_specs()}
    specs.update({s.name: s for s in model.head_layer_specs()})
    graph = read_graph(config, "export")
    names = {n.name for n in graph.nodes}
    missing = [s for s in specs if s not in names and s not in mapping.values()]
    if missing:
        raise ValueError(f"{model.arch}: layers {missing[:5]} are not in its Keras graph: cannot be exported")
    out = {}
    for node in graph.nodes:
        ours = mapping.get(node.name, node.name if node.name in specs else None)
        if ours is None:
            continue
        arrays = [np.asarray(v.get_value(), np.float32) for v in model.keras_variables(ours)]
        if binary and ours == "head_logits":  # softmax([z0, z1])[1] = sigmoid(z1 - z0)
            kernel, bias = arrays
            arrays = [kernel[:, 1:] - kernel[:, :1], bias[1:] - bias[:1]]
        out[node.name] = (arrays, specs[ours].weight_names)
    return out


def _write_keras3_weights(path: Path, config: dict, arrays) -> None:
    import h5py

    graph = read_graph(config, "export")
    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "model"
        for node in graph.nodes[1:]:
            group = f.require_group(node.layer.keras3_path)
            group.attrs["name"] = node.name
            for i, array in enumerate(arrays.get(node.name, ((), ()))[0]):
                group.create_dataset(str(i), data=array)


def _write_legacy(path: Path, config: dict, arrays) -> None:
    import h5py

    graph = read_graph(config, "export")
    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for node in graph.nodes:
        values, weight_names = arrays.get(node.name, ((), ()))
        for kind, array in zip(weight_names, values):
            groups.setdefault(node.layer.legacy_group, []).append((f"{node.name}/{kind}:0", array))
    with h5py.File(path, "w") as f:
        f.attrs.update(
            {"backend": "tensorflow", "keras_version": LEGACY_FORMAT_VERSION, "written_by": "imgcls_jax"}
        )
        f.attrs["model_config"] = json.dumps(config)
        weights = f.create_group("model_weights")
        names = [entry["name"] for entry in config["config"]["layers"]]
        weights.attrs.update({"backend": "tensorflow", "keras_version": LEGACY_FORMAT_VERSION})
        weights.attrs["layer_names"] = np.array([n.encode() for n in names])
        for name in names:
            group = weights.create_group(name)
            items = groups.get(name, [])
            group.attrs["weight_names"] = np.array([w.encode() for w, _ in items])
            for wname, array in items:
                group.create_dataset(wname, data=array)


def to_keras(
    model,
    path,
    *,
    input_preprocessing: str | None = None,
    keras_output: str | None = None,
    nested: bool | None = None,
) -> Path:
    """Write ``model`` (an imgcls_jax model of any family with a Keras graph, with a head) as a
    Keras model file; returns the path.

    Args:
      model: a model with ``num_classes`` set (Keras's top or a transfer head).
      path: ``*.keras`` (Keras 3 archive) or ``*.h5`` (legacy whole-model HDF5).
      input_preprocessing: what the Keras model's users will apply to raw RGB pixels before
        calling it (a mode of :data:`imgcls_jax.models.MODES`). Default: the model's own mode
        (``"caffe"``: ``keras.applications.vgg16.preprocess_input``), except ``"unit"``, written
        as raw-pixel input and a ``Rescaling(1/255)`` layer. When it differs from the model's
        mode, layers in front bridge them: ``Rescaling`` (``"none"`` for a ``"tf"`` model adds
        ``Rescaling(1/127.5, offset=-1)``), after the RGB -> BGR reversal as Keras 3 records
        ``preprocess_input`` (``GetItem`` and ``Stack``) for a ``"caffe"`` model (``.keras`` only).
      keras_output: the output activation: default the model's (``softmax``/``sigmoid``);
        ``"linear"`` writes logits; ``"sigmoid"`` for a 2-class softmax model writes a binary
        ``Dense(1, sigmoid)`` giving the probability of class 1.
      nested: the base as one nested layer (as ``keras.applications.ResNet50(...)`` called on
        an input; the default for ``.keras``) or as flat layers (the default for ``.h5``: Keras 3
        cannot read a nested model from a legacy file).

    Raises:
      ValueError: a model without a head, an unknown suffix, a family without a Keras graph, or
        options that would change the model's predictions.
    """
    path = Path(path)
    if path.suffix not in (".keras", ".h5") or path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: the suffix must be .keras (Keras 3 archive) or .h5 (legacy whole model)")
    legacy = path.suffix == ".h5"
    nested = not legacy if nested is None else nested
    if nested and legacy:
        raise ValueError(
            f"{path}: a legacy .h5 file holds the base's layers flat (Keras 3 cannot read nested ones)"
        )
    config, arrays = _export_plan(model, input_preprocessing, keras_output, nested, legacy)
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        _write_legacy(path, config, arrays)
        return path
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        _write_keras3_weights(weights, config, arrays)
        saved = datetime.now(UTC).strftime("%Y-%m-%d@%H:%M:%S")
        meta = {"keras_version": KERAS3_FORMAT_VERSION, "date_saved": saved, "written_by": "imgcls_jax"}
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", json.dumps(meta))
            archive.writestr("config.json", json.dumps(config))
            archive.write(weights, "model.weights.h5")
    return path
