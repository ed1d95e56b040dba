"""Every registered family as Keras builds it: what whole-model import and export go by.

One table row per family (:data:`KERAS_APPLICATIONS`, keyed by the registry name) says which
``keras.applications`` builder makes it and whose ``preprocess_input`` goes with it; beside it,
``keras_graphs/<name>.json.gz`` holds the Keras config of that builder's base,
``<builder>(include_top=False, weights=None, input_shape=(None, None, 3), **kwargs)``, written
by Keras itself: ``python -m tests.keras_graphs <name>`` (Keras is needed there only; the test
``tests/test_keras_models.py::test_stored_keras_graphs_are_keras_own`` checks every file against
Keras). Adding a family to whole-model import and export is that row and that file.

With them, and nothing else of the family's, :func:`match_base` finds the base in a user's Keras
graph (nested as one layer or inline, whatever its layers are named): it walks the user's graph
and the family's backwards from the base's output, layer by layer (class, the configuration that
changes the computation, which inputs), so the imported model computes what the Keras base does.
The family's weighted layers carry Keras's names (its ``layer_specs``), the same as the stored
graph's, so each of them is paired with the user's layer holding its weights.

The base's first layers that only map pixels affinely (EfficientNet's ``Rescaling`` and
``Normalization``) are not matched layer for layer but read as one affine map with whatever
preprocessing precedes them (:func:`lead`, :mod:`imgcls_jax.weights.keras_inputs`): Keras's
ImageNet EfficientNet adds a ``Rescaling`` there that the published weights need, and users put
``Rescaling`` layers or ``preprocess_input`` in front.

Two families need more than one graph's worth of care. ConvNeXt's base ends with a
LayerNormalization of the map (:func:`final_norm`); Keras's ``pooling="avg"`` base and its top
apply that normalization after the pooling instead, so the import also matches the base without
it, followed by the pooling and it. NASNet's graph depends on the input size (its ``adjust``
layers), so Keras needs a fixed size to build it: its graph is stored for its default size, and
any fixed size a user builds gives the same layers (``correct_pad`` paddings aside, which match
for either parity).
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import numpy as np

from imgcls_jax.weights.keras import WeightFileError
from imgcls_jax.weights.keras_inputs import Affine, apply_node, input_affine
from imgcls_jax.weights.keras_layers import KerasGraph, Node, read_graph

GRAPHS = Path(__file__).parent / "keras_graphs"


@dataclass(frozen=True)
class KerasApplication:
    """How Keras builds a family: ``keras.applications.<builder>(**kwargs)`` (the options of it
    the family implements), and ``keras.applications.<module>.preprocess_input``, the
    preprocessing its published weights expect."""

    builder: str
    module: str
    kwargs: dict = field(default_factory=dict)
    #: Whether its ``ZeroPadding2D`` layers before strided VALID layers are Keras's
    #: ``correct_pad`` (depending on the size of the map: export recomputes them); MobileNet (V1)
    #: pads ``((0, 1), (0, 1))`` whatever the size.
    correct_pad: bool = True


#: Registry name -> how Keras builds that family. A new family adds its row here and its graph
#: file (see the module docstring).
KERAS_APPLICATIONS: dict[str, KerasApplication] = {
    "vgg16": KerasApplication("VGG16", "vgg16"),
    "vgg19": KerasApplication("VGG19", "vgg19"),
    "resnet50": KerasApplication("ResNet50", "resnet50"),
    "mobilenetv2": KerasApplication("MobileNetV2", "mobilenet_v2", {"alpha": 1.0}),
    **{f"efficientnetb{i}": KerasApplication(f"EfficientNetB{i}", "efficientnet") for i in range(8)},
    **{f"convnext{v.lower()}": KerasApplication(f"ConvNeXt{v}", "convnext")
       for v in ("Tiny", "Small", "Base", "Large", "XLarge")},
    **{f"efficientnetv2{v.lower()}": KerasApplication(f"EfficientNetV2{v}", "efficientnet_v2")
       for v in ("B0", "B1", "B2", "B3", "S", "M", "L")},
    "mobilenetv3small": KerasApplication("MobileNetV3Small", "mobilenet_v3"),
    "mobilenetv3large": KerasApplication("MobileNetV3Large", "mobilenet_v3"),
    "resnet101": KerasApplication("ResNet101", "resnet"),
    "resnet152": KerasApplication("ResNet152", "resnet"),
    **{f"resnet{d}v2": KerasApplication(f"ResNet{d}V2", "resnet_v2") for d in (50, 101, 152)},
    **{f"densenet{d}": KerasApplication(f"DenseNet{d}", "densenet") for d in (121, 169, 201)},
    "xception": KerasApplication("Xception", "xception"),
    "inceptionv3": KerasApplication("InceptionV3", "inception_v3"),
    "inceptionresnetv2": KerasApplication("InceptionResNetV2", "inception_resnet_v2"),
    "mobilenet": KerasApplication("MobileNet", "mobilenet", correct_pad=False),
    # NASNet: built for a fixed size (its default), as Keras needs one to choose its 'adjust' layers
    "nasnetmobile": KerasApplication("NASNetMobile", "nasnet", {"input_shape": (224, 224, 3)}),
    "nasnetlarge": KerasApplication("NASNetLarge", "nasnet", {"input_shape": (331, 331, 3)}),
}  # fmt: skip


def application(name: str) -> KerasApplication:
    """The row of ``name``; ``WeightFileError`` saying how to add one."""
    if name not in KERAS_APPLICATIONS:
        raise WeightFileError(
            f"{name}: no Keras application is known for this family, so whole Keras models of it cannot be "
            "imported or exported: add its row to imgcls_jax.weights.keras_families.KERAS_APPLICATIONS and "
            f"write its graph with `python -m tests.keras_graphs {name}`"
        )
    return KERAS_APPLICATIONS[name]


def graph_path(name: str) -> Path:
    return GRAPHS / f"{name}.json.gz"


@cache
def _stored(name: str) -> str:
    application(name)
    path = graph_path(name)
    if not path.is_file():
        raise WeightFileError(
            f"{path}: no Keras graph stored for {name}: write it with `python -m tests.keras_graphs {name}`"
        )
    return gzip.decompress(path.read_bytes()).decode()


def family_config(name: str) -> dict:
    """The Keras config of ``name``'s base (a fresh copy: callers may edit it)."""
    return json.loads(_stored(name))


@cache
def family_graph(name: str) -> KerasGraph:
    """The graph of ``name``'s base (see :func:`family_config`)."""
    return read_graph(json.loads(_stored(name)), str(graph_path(name)))


@dataclass(frozen=True)
class Lead:
    """The affine layers a family's base starts with: ``boundary`` (the node after them in its
    graph), their node ids, and the map they compute: ``after . N . before`` where ``N`` is the
    Keras ``Normalization`` named ``free`` whose statistics are the family's own variables (None:
    the map is ``before`` alone)."""

    boundary: int
    nodes: tuple[int, ...]
    before: Affine
    free: str | None = None
    after: Affine = field(default_factory=Affine.identity)


@cache
def lead(name: str) -> Lead:
    """The affine start of ``name``'s base (see :class:`Lead`)."""
    graph = family_graph(name)
    free = [n for n in graph.nodes if n.class_name == "Normalization" and n.config.get("mean") is None]
    ones = [np.zeros(3), np.ones(3), np.zeros(())]
    boundary, _, nodes = input_affine(graph, lambda node: ones, f"{name}'s Keras graph")
    value, before, free_name = Affine.identity(), None, None
    for node_id in nodes:
        node = graph.nodes[node_id]
        if node in free and free_name is None:
            before, value, free_name = value, Affine.identity(), node.name
            continue
        value = apply_node(node, [value], lambda n: ones, f"{name}'s Keras graph")
    if free_name is None:
        return Lead(boundary, tuple(nodes), value)
    return Lead(boundary, tuple(nodes), before, free_name, value)


@cache
def lead_is_mode(name: str) -> bool:
    """Whether ``name``'s affine start is its preprocessing mode itself (ConvNeXt, EfficientNetV2,
    MobileNetV3: Keras's base rescales and normalizes raw pixels; imgcls_jax's model applies that
    as its ``preprocessing``, not as layers), rather than layers of the model that follow the mode
    (EfficientNet B0-B7: mode ``"none"``, then its own ``Rescaling`` and ``Normalization``)."""
    from imgcls_jax.models.registry import model_info
    from imgcls_jax.weights.keras_inputs import mode_affine

    start = lead(name)
    own = mode_affine(model_info(name).preprocessing)
    return bool(start.nodes) and start.free is None and start.before.equals(own)


# ------------------------------------------------------------------------- matching a base
_VOLATILE = ("name", "trainable", "dtype", "momentum", "rate", "seed", "noise_shape", "synchronized",
             "build_config")  # fmt: skip


def activation_name(value) -> str:
    """A Keras activation as a lower-case name (``None`` -> ``"linear"``)."""
    if isinstance(value, dict):  # Keras 3 serialized function: {"class_name": "function", "config": "relu"}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name")
    return "linear" if value is None else str(value).lower()


def _normalized(key: str, value, class_name: str):
    if key == "activation":
        return activation_name(value)
    if key == "data_format":
        return value or "channels_last"
    if key == "axis" and class_name in ("BatchNormalization", "LayerNormalization", "Concatenate"):
        values = value if isinstance(value, list | tuple) else [value]
        return [v - 4 if isinstance(v, int) and v > 0 else v for v in values]  # NHWC maps: 3 == -1
    if isinstance(value, list | tuple):
        return [_normalized(key, v, class_name) for v in value]
    return value


def semantic_config(node: Node) -> dict:
    """A layer's configuration that changes what it computes at inference: its Keras config
    without names, flags, dtypes, initializers, regularizers, constraints, and training-only
    settings (BatchNorm's momentum, dropout rates), normalized across Keras 2 and 3."""
    out = {}
    for key, value in node.config.items():
        if key in _VOLATILE or any(w in key for w in ("initializer", "regularizer", "constraint")):
            continue
        out[key] = _normalized(key, value, node.class_name)
    if node.class_name in ("MaxPooling2D", "AveragePooling2D") and out.get("strides") is None:
        out["strides"] = out.get("pool_size")
    return out


def layer_differences(ours: Node, theirs: Node) -> dict:
    """``{key: (family's, user's)}`` of the semantic configs' shared keys that differ."""
    a, b = semantic_config(ours), semantic_config(theirs)
    differ = {k: (a[k], b[k]) for k in a.keys() & b.keys() if a[k] != b[k] and a[k] is not None}
    if ours.class_name == "ZeroPadding2D" and "padding" in differ and _odd_size_pad(*differ["padding"]):
        differ.pop("padding")  # imgcls_jax computes correct_pad from the size it is given
    return differ


def _odd_size_pad(family, user) -> bool:
    """Both paddings Keras's ``correct_pad`` for one kernel, each for an even (or unknown) size
    ``((k//2 - 1, k//2), ...)`` or an odd one ``((k//2, k//2), ...)`` (per side): the family's
    graph is stored for unknown sizes (NASNet's for a fixed one), the user's for theirs."""
    try:
        pairs = zip(family, user, strict=True)
        return all(f[1] == u[1] and f[0] in (f[1], f[1] - 1) and u[0] in (u[1], u[1] - 1) for f, u in pairs)
    except TypeError:
        return False


@dataclass
class BaseMatch:
    """A family's base found in a user's graph: ``pairs`` maps the family graph's nodes to the
    user's; ``weights``: family layer name -> the user's node holding its weights."""

    family: str
    pairs: dict[int, int]
    weights: dict[str, Node]


def final_norm(name: str) -> Node | None:
    """The LayerNormalization ``name``'s Keras base (no top, ``pooling=None``) ends with, on the
    map (ConvNeXt's); None for the others. Keras's ``pooling="avg"`` / ``"max"`` base applies it
    after the pooling instead."""
    graph = family_graph(name)
    node = graph.nodes[graph.output]
    return node if node.class_name == "LayerNormalization" else None


def match_base(user: KerasGraph, out: int, boundary: int, name: str, *, without_final_norm: bool = False
               ) -> BaseMatch | str:  # fmt: skip
    """Match ``name``'s base (after its affine :func:`lead`) onto the user's nodes from ``out``
    (the base's output) back to ``boundary`` (the tensor its first layers take): a
    :class:`BaseMatch`, or why not (a sentence naming the first layer that differs).
    ``without_final_norm``: the base up to its :func:`final_norm`'s input."""
    family, start = family_graph(name), lead(name).boundary
    top = family.output
    if without_final_norm:
        (top,) = family.nodes[top].inputs
    pairs, taken, stack = {top: out}, {out}, [(top, out)]
    while stack:
        ours, theirs = stack.pop()
        if ours == start or theirs == boundary:
            if ours != start or theirs != boundary:
                where = user.describe(theirs) if theirs else "the input"
                return f"the base reaches {where} where {name}'s starts at {family.describe(ours)}"
            continue
        a, b = family.nodes[ours], user.nodes[theirs]
        if a.class_name != b.class_name or len(a.inputs) != len(b.inputs):
            return f"{user.describe(theirs)} stands where {name} has {family.describe(ours)}"
        differ = layer_differences(a, b)
        if differ:
            shown = {k: f"{v[1]!r} (Keras's {v[0]!r})" for k, v in sorted(differ.items())}
            return f"{user.describe(theirs)} differs from {name}'s {a.name!r}: {shown}"
        for x, y in zip(a.inputs, b.inputs):
            if x in pairs:
                if pairs[x] != y:
                    return f"{user.describe(theirs)} takes other inputs than {name}'s {a.name!r}"
            elif y in taken and y != boundary:
                return f"{user.describe(theirs)} takes other inputs than {name}'s {a.name!r}"
            else:
                pairs[x] = y
                taken.add(y)
                stack.append((x, y))
    weighted = {family.nodes[x].name: user.nodes[y] for x, y in pairs.items() if x not in (start, 0)}
    return BaseMatch(name, pairs, weighted)


def candidates(user: KerasGraph, names) -> list[str]:
    """``names`` with Keras graphs, those sharing more layer names with ``user`` first."""
    mine = {n.name for n in user.nodes}
    usable = [n for n in names if n in KERAS_APPLICATIONS and graph_path(n).is_file()]
    scores = {n: len(mine & {x.name for x in family_graph(n).nodes}) for n in usable}
    return sorted(usable, key=lambda n: -scores[n] / max(1, len(family_graph(n).nodes)))
