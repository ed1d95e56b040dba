"""Map a Keras model's graph onto a registered family with a head: what a whole model imports as.

A Keras transfer model is read as (anything else is an error naming the layer, its class and
what is understood):

1. one image input, then whatever maps its pixels affinely (``Rescaling``, ``Normalization``,
   ``preprocess_input`` applied to the symbolic input, augmentation layers, which are the
   identity at inference): :mod:`imgcls_jax.weights.keras_inputs`;
2. the base: any registered family with a Keras graph (:mod:`imgcls_jax.weights.keras_families`),
   nested as one layer or inline, found by walking the graphs (its layer names do not matter);
3. ``GlobalAveragePooling2D``, ``GlobalMaxPooling2D`` or ``Flatten`` (or nothing: features),
   or the family's Keras top (VGG's ``flatten``/``fc1``/``fc2``/``predictions``, the others'
   ``avg_pool``/``predictions``);
4. the head: ``Dense`` layers (any activation of :data:`imgcls_jax.models.head.ACTIVATIONS`),
   ``Dropout``, ``BatchNormalization``, ``LayerNormalization``, ``Activation`` / ``ReLU`` /
   ``Softmax`` layers, in any order; the last ``Dense`` gives the logits, whose final activation
   (softmax, sigmoid or linear) is the output's.

What the user feeds the Keras model: ``preprocessing`` when given; else raw pixels when the graph
holds preprocessing of its own (affine layers beyond the base's own), else the base's own
``preprocess_input`` (the family's published preprocessing). :attr:`KerasModelInfo.notes` says
which, and everything mapped approximately or skipped.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from imgcls_jax.models.head import ACTIVATIONS, HeadLayer, as_classic, layer_names
from imgcls_jax.weights.keras import WeightFileError
from imgcls_jax.weights.keras_families import (
    BaseMatch,
    activation_name,
    application,
    candidates,
    final_norm,
    layer_differences,
    lead,
    lead_is_mode,
    match_base,
)
from imgcls_jax.weights.keras_inputs import IDENTITY_AT_INFERENCE, Affine, input_affine, mode_affine
from imgcls_jax.weights.keras_layers import KerasGraph, Node

POOLING_LAYERS = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max", "Flatten": None}
OUTPUTS = ("softmax", "sigmoid", "linear")


@dataclass(frozen=True)
class KerasModelInfo:
    """What :func:`imgcls_jax.weights.from_keras` imported, as plain data.

    ``arch`` (the registry name of the base's family), ``include_top``, ``pooling``,
    ``num_classes``, ``output_activation``, ``preprocessing``, ``input_shape`` describe the
    imported model; ``head`` its transfer head as layers (:mod:`imgcls_jax.models.head`), and
    ``head_units`` / ``head_activation`` / ``dropout`` the same head in the classic options when it
    is one (``classic``). ``keras_output`` is the Keras model's last activation (``softmax``,
    ``sigmoid`` or ``linear`` logits) and ``keras_output_units`` its width: a binary
    ``Dense(1, sigmoid)`` is imported as two softmax classes ``[1 - p, p]``.
    ``input_preprocessing`` is what the user applies to raw RGB pixels before calling the Keras
    model (``preprocessing_source``: ``"given"``, ``"graph"``: the graph holds its own and takes
    raw pixels, or ``"assumed"``: the base's own ``preprocess_input``); the imported model applies
    ``preprocessing`` to raw pixels itself. ``trainable_layers``: the imported model's layers that
    the Keras model's ``trainable`` flags train. ``family_options``: options of the family's
    model the import sets (ConvNeXt's ``final_norm="map"`` for a ``pooling=None`` base the user
    pools). ``notes``: whatever was mapped approximately or skipped.
    """

    arch: str
    include_top: bool
    pooling: str | None
    head_units: tuple[int, ...]
    head_activation: str
    dropout: float
    num_classes: int | None
    output_activation: str
    keras_output: str | None
    keras_output_units: int | None
    preprocessing: str
    input_preprocessing: str
    input_shape: tuple[int, int, int]
    head: tuple[str, ...] = ()
    classic: bool = True
    preprocessing_source: str = "assumed"
    trainable_layers: tuple[str, ...] = ()
    class_names: tuple[str, ...] | None = None
    source: str = ""
    format: str = ""
    keras_version: str | None = None
    notes: tuple[str, ...] = ()
    family_options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out

    @property
    def head_layers(self) -> tuple[HeadLayer, ...]:
        from imgcls_jax.models.head import parse_head

        return parse_head(self.head) if self.head else ()


@dataclass
class ArchPlan:
    """A matched architecture: the description, which user node holds the weights of each
    layer of the imported model (by its name there), the arrays computed instead of read (the
    family's free ``Normalization``), and the output conversion (a binary sigmoid)."""

    info: KerasModelInfo
    base: BaseMatch
    head_nodes: dict[str, Node]
    computed: dict[str, list[np.ndarray]] = field(default_factory=dict)
    binary: bool = False


def _error(where: str, node: Node, why: str) -> WeightFileError:
    return WeightFileError(f"{where}: layer {node.name!r} ({node.class_name}) {why}")


# ------------------------------------------------------------------------------------ the head
def _head_chain(graph: KerasGraph, where: str) -> tuple[int, list[Node]]:
    """``(base output, head nodes)``: walking back from the output along single-input layers to
    the first pooling layer (its input is the base's output); no pooling: the whole model is the
    base (a feature extractor)."""
    chain, current = [], graph.output
    if len(graph.nodes[current].inputs) > 1:
        why = "joins branches at the model's output: only a single chain of layers can follow the base"
        raise _error(where, graph.nodes[current], why)
    while True:
        node = graph.nodes[current]
        if len(node.inputs) != 1:  # the input, or a merge inside the base: no pooling found
            return graph.output, []
        chain.append(node)
        if node.class_name in POOLING_LAYERS:
            prev = graph.nodes[node.inputs[0]]
            if node.class_name == "Flatten" and prev.class_name in POOLING_LAYERS:
                chain.append(prev)  # GlobalAveragePooling2D(keepdims=True) + Flatten
                node = prev
            chain.reverse()
            for a, b in zip(chain, chain[1:]):
                if graph.consumers.get(a.id) != [b.id]:
                    raise _error(where, a, "feeds more than the next layer of the head: only a single chain "
                                           "of layers can follow the base")  # fmt: skip
            return node.inputs[0], chain
        current = node.inputs[0]


def _head_layer(node: Node, where: str, notes: list[str]) -> HeadLayer | None:
    """The head layer a Keras layer after the pooling is (None: skipped at inference)."""
    c, name = node.config, node.class_name
    if name == "Dense":
        activation = activation_name(c.get("activation"))
        if activation not in ACTIVATIONS:
            raise _error(where, node, f"has activation {activation!r}, which cannot be mapped; known: "
                                      f"{sorted(ACTIVATIONS)}")  # fmt: skip
        return HeadLayer("dense", units=int(c["units"]), activation=activation)
    if name == "Dropout":
        return HeadLayer("dropout", rate=float(c.get("rate", 0.0)))
    if name in ("BatchNormalization", "LayerNormalization"):
        axis = c.get("axis", -1)
        if axis not in (-1, 1, [-1], [1]) or c.get("rms_scaling") or c.get("renorm"):
            raise _error(where, node, f"normalizes over axis {axis} (or with rms_scaling/renorm): only plain "
                                      "normalization of the features (axis -1) is supported")  # fmt: skip
        kind = "batchnorm" if name == "BatchNormalization" else "layernorm"
        options = {"momentum": float(c.get("momentum", 0.99))} if kind == "batchnorm" else {}
        return HeadLayer(kind, epsilon=float(c.get("epsilon", 1e-3)), center=bool(c.get("center", True)),
                         scale=bool(c.get("scale", True)), **options)  # fmt: skip
    if name in ("Activation", "ReLU", "Softmax"):
        return HeadLayer("activation", activation=_activation_of(node, where))
    if name in IDENTITY_AT_INFERENCE:
        notes.append(f"skipped {node.name!r} ({name}): the identity at inference (Keras's predict)")
        return None
    if name in POOLING_LAYERS:
        raise _error(where, node, "cannot be mapped: a second pooling after the head's first layers")
    raise _error(where, node, "cannot be mapped onto a transfer head: after the pooling only Dense, Dropout, "
                              "BatchNormalization, LayerNormalization and Activation/ReLU/Softmax layers are "
                              "understood")  # fmt: skip


def _activation_of(node: Node, where: str) -> str:
    c = node.config
    if node.class_name == "Activation":
        name = activation_name(c.get("activation"))
    elif node.class_name == "Softmax":
        name = "softmax" if c.get("axis", -1) in (-1, [-1]) else "?"
    else:
        relu = (c.get("max_value"), c.get("negative_slope", 0) or 0, c.get("threshold", 0) or 0)
        name = {(None, 0, 0): "relu", (6, 0, 0): "relu6"}.get(relu, "?")
    if name not in ACTIVATIONS:
        raise _error(where, node, f"applies {name!r}, which cannot be mapped; known: {sorted(ACTIVATIONS)}")
    return name


def parse_head(chain: list[Node], where: str, notes: list[str]) -> tuple:
    """``(pooling, head layers, their nodes, output activation, the output's Keras node)`` of
    the chain after the base (see the module docstring). The output activation is taken off
    the head (the head gives logits)."""
    if not chain:
        return None, (), [], None, None
    first = chain[0]
    if first.class_name not in POOLING_LAYERS:
        raise _error(
            where, first, "cannot be mapped: expected global pooling, Flatten or Dense after the base"
        )
    pooling, rest = POOLING_LAYERS[first.class_name], chain[1:]
    if rest and rest[0].class_name == "Flatten" and pooling:
        rest = rest[1:]  # after keepdims=True
    layers, nodes = [], []
    for node in rest:
        layer = _head_layer(node, where, notes)
        if layer is None:
            continue
        if (
            layer.kind == "activation"
            and layers
            and layers[-1].kind == "dense"
            and layers[-1].activation == "linear"
        ):
            layers[-1] = HeadLayer(
                "dense", units=layers[-1].units, activation=layer.activation
            )  # Dense + Activation
            continue
        layers.append(layer)
        nodes.append(node)
    dense = [i for i, h in enumerate(layers) if h.kind == "dense"]
    if not dense:
        if layers:
            raise _error(
                where, nodes[0], "comes after the pooling, but no Dense layer gives the class scores"
            )
        return pooling, (), [], None, None
    last, output = dense[-1], "linear"
    tail = [h for h in layers[last + 1 :] if h.kind == "activation"]
    if tail and layers[-1].kind == "activation":
        output, layers, nodes = layers[-1].activation, layers[:-1], nodes[:-1]
    elif not tail and last == len(layers) - 1:
        output = layers[last].activation
        layers[last] = HeadLayer("dense", units=layers[last].units)
    if output not in OUTPUTS or any(h.kind == "activation" for h in layers[last + 1 :]):
        raise _error(where, nodes[last], f"(the output) has activation {output!r}; expected one of {OUTPUTS}")
    if layers[last].activation != "linear":
        raise _error(where, nodes[last], "(the output) has an activation before the model's final one")
    return pooling, tuple(layers), nodes, output, nodes[last]


# ------------------------------------------------------------------------- the preprocessing
def _family_modes(arch: str) -> tuple[str, ...]:
    from imgcls_jax.models.preprocessing import MODES
    from imgcls_jax.models.registry import model_info

    info = model_info(arch)
    rest = tuple(m for m in MODES if m != info.preprocessing) if info.takes("preprocessing") else ()
    return (info.preprocessing, *rest)


def realize(arch: str, seen: Affine) -> tuple[str, dict[str, list[np.ndarray]]] | None:
    """``(mode, computed arrays)``: the family's preprocessing mode and the statistics of its
    free ``Normalization`` (if it has one) with which it maps raw pixels to ``seen``, the affine
    map of raw pixels the user's base receives; None when it cannot."""
    start, own = lead(arch), lead_is_mode(arch)
    modes = list(_family_modes(arch))
    if len(modes) > 1 and start.free is None:  # the family takes any mode: the exact one
        exact = (seen if own else start.before.inverse().after(seen)).as_mode()
        modes += [] if exact is None else [exact]
    for mode in modes:
        pixels = mode_affine(mode)
        if start.free is None:  # the mode computes the base's affine start itself, or precedes it
            if (pixels if own else start.before.after(pixels)).equals(seen):
                return mode, {}
            continue
        norm = start.after.inverse().after(seen).after(start.before.after(pixels).inverse())
        if norm.perm == (0, 1, 2) and (norm.scale > 0).all() and np.isfinite(norm.scale).all():
            variance, mean = 1.0 / norm.scale**2, -norm.offset / norm.scale  # (y - m) / sqrt(v)
            arrays = [mean.astype(np.float32), variance.astype(np.float32), np.zeros((), np.float32)]
            return mode, {start.free: arrays}
    return None


def resolve_preprocessing(graph, arch, prefix, graph_affine, preprocessing, where, notes):
    """``(mode, input preprocessing, source, computed arrays)``; see the module docstring."""
    from imgcls_jax.models.registry import model_info

    own = len([i for i in prefix if graph.nodes[i].class_name not in IDENTITY_AT_INFERENCE])
    base_own = len(lead(arch).nodes)
    if preprocessing is not None:
        applied, source = preprocessing, "given"
    elif own > base_own:
        applied, source = "none", "graph"
    else:  # the family's Keras preprocess_input: the identity where its base normalizes raw pixels
        applied, source = ("none" if lead_is_mode(arch) else model_info(arch).preprocessing), "assumed"
    seen = graph_affine.after(mode_affine(applied))
    found = realize(arch, seen)
    names = ", ".join(f"{graph.nodes[i].name!r} ({graph.nodes[i].class_name})" for i in prefix) or "none"
    if found is None:
        raise WeightFileError(
            f"{where}: with preprocessing={applied!r} applied outside the model and the model's own input "
            f"layers ({names}), the {arch} base sees {seen.describe()}, which {arch} cannot compute from "
            f"raw pixels (its preprocessing modes: {_family_modes(arch)}). Pass the preprocessing you apply "
            "to raw RGB pixels before calling the Keras model (preprocessing='none' when you feed raw pixels)"
        )
    if source == "graph":
        notes.append(f"preprocessing found in the model ({names}): it takes raw RGB pixels in [0, 255]")
    elif source == "assumed":
        notes.append(
            f"no preprocessing in the model: its users are assumed to apply {arch}'s own preprocess_input "
            f"({applied!r}) to raw pixels; pass preprocessing=... (--preprocessing) if they apply another"
        )
    return found[0], applied, source, found[1]


# ------------------------------------------------------------------------------------ the plan
def _pooled_norm(graph: KerasGraph, out: int, boundary: int, name: str, chain: list[Node]):
    """``(base, the user's node of its final norm)`` where the user's graph is ``name``'s base up
    to its :func:`final_norm`, then global pooling and that LayerNormalization (Keras's
    ``pooling="avg"`` / ``"max"`` base, or Keras's top), else None."""
    norm = final_norm(name)
    if norm is None or len(chain) < 2 or POOLING_LAYERS.get(chain[0].class_name) is None:
        return None
    if chain[1].class_name != norm.class_name or layer_differences(norm, chain[1]):
        return None
    found = match_base(graph, out, boundary, name, without_final_norm=True)
    return (found, chain[1]) if isinstance(found, BaseMatch) else None


def _find_base(graph: KerasGraph, out: int, boundary: int, arch: str | None, where: str,
               chain: list[Node]) -> tuple[BaseMatch, Node | None]:  # fmt: skip
    """The base, and the user's node of the family's :func:`final_norm` when the graph applies it
    after the pooling (see :func:`_pooled_norm`)."""
    from imgcls_jax.models.registry import list_models

    if arch is not None:
        application(arch)  # a family without a Keras application: how to add one, before anything else
    names = [arch] if arch is not None else candidates(graph, list_models())
    reasons = {}
    for name in names:
        found = match_base(graph, out, boundary, name)
        if isinstance(found, BaseMatch):
            return found, None
        pooled = _pooled_norm(graph, out, boundary, name, chain)
        if pooled is not None:
            return pooled
        reasons[name] = found
    if arch is not None:
        other = next((n for n in candidates(graph, list_models()) if n != arch
                      and isinstance(match_base(graph, out, boundary, n), BaseMatch)), None)  # fmt: skip
        if other is not None:
            raise WeightFileError(f"{where}: this is a {other} model, but arch={arch!r} was asked for")
    if not reasons:
        raise WeightFileError(f"{where}: no registered family has a Keras graph to compare the base with")
    best, why = next(iter(reasons.items()))
    raise WeightFileError(
        f"{where}: the base (up to {graph.describe(out) if out else 'the input'}) is none of the families "
        f"imgcls_jax imports ({', '.join(names)}); closest, {best}: {why}"
    )


def _keras_top(arch, pooling, head, nodes) -> bool:
    """Whether the head is the family's Keras top (its layers and their Keras names)."""
    from flax import nnx

    from imgcls_jax.models.registry import create_model

    dense = [h for h in head if h.kind == "dense"]
    if not dense:
        return False
    model = nnx.eval_shape(lambda: create_model(arch, include_top=True, num_classes=dense[-1].units,
                                                input_shape=(224, 224, 3)))  # fmt: skip
    top_pooling, top, names = model.keras_top(dense[-1].units)
    return (top_pooling, tuple(top)) == (pooling, tuple(head)) and [n.name for n in nodes] == list(names[1:])


def match_architecture(graph: KerasGraph, where: str, weights_of, *, preprocessing: str | None = None,
                       arch: str | None = None, input_shape=None) -> ArchPlan:  # fmt: skip
    """Map ``graph`` onto a family and a head; ``WeightFileError`` naming any layer it cannot map.
    ``weights_of(node)``: the arrays of a node (for the ``Normalization`` layers of the input)."""
    notes: list[str] = []
    _check_input(graph, where)
    boundary, graph_affine, prefix = input_affine(graph, weights_of, where)
    for i in prefix:
        if graph.nodes[i].class_name in IDENTITY_AT_INFERENCE:
            notes.append(f"skipped {graph.nodes[i].name!r} ({graph.nodes[i].class_name}): the identity at "
                         "inference (Keras's predict)")  # fmt: skip
    out, chain = _head_chain(graph, where)
    base, pooled_norm = _find_base(graph, out, boundary, arch, where, chain)
    skipped: list[str] = []
    pooling, head, nodes, output, output_node = parse_head(chain, where, skipped)
    norm = final_norm(base.family)
    # a family with a final norm has Keras's top only after its base without that norm
    include_top = bool(head) and (norm is None or pooled_norm is not None)
    include_top = include_top and _keras_top(base.family, pooling, head, nodes)
    family_options = {}
    if norm is not None and not include_top:
        if pooled_norm is not None:  # Keras's pooling="avg"/"max" base: its final norm after the pooling
            base.weights[norm.name] = pooled_norm
            skipped, chain = [], [node for node in chain if node is not pooled_norm]
            pooling, head, nodes, output, output_node = parse_head(chain, where, skipped)
        elif pooling is not None:  # Keras's pooling=None base (its final norm on the map), then a pooling
            family_options["final_norm"] = "map"
            notes.append(f"the {pooling!r} pooling follows {base.family}'s final LayerNormalization of the "
                         "map (final_norm='map')")  # fmt: skip
    notes += skipped
    mode, applied, source, computed = resolve_preprocessing(
        graph, base.family, prefix, graph_affine, preprocessing, where, notes
    )
    units = [h for h in head if h.kind == "dense"][-1].units if head else None
    binary = output == "sigmoid" and units == 1
    if binary:
        if head[-1].kind != "dense":
            raise _error(where, output_node, "is a binary Dense(1, sigmoid) output followed by other layers: "
                                             "only a final Dense(1, sigmoid) can be imported")  # fmt: skip
        notes.append("a binary Dense(1, sigmoid) output p is imported as two softmax classes [1 - p, p]")
        head = (*head[:-1], HeadLayer("dense", units=2))
    if output == "linear":
        notes.append("the Keras model outputs logits (a linear last layer): the imported model's "
                     "probabilities are their softmax")  # fmt: skip
    classic = None if include_top or not head else as_classic(head)
    head_nodes = _head_nodes(head, nodes, include_top)
    trainable = _trainable(base, head_nodes, computed)
    shape = _input_shape(graph.input_shape, input_shape, pooling is None and bool(head), where, notes)
    if graph.dtype_policy not in ("float32", None):
        notes.append(f"the Keras model computes in {graph.dtype_policy!r}; the imported one in float32")
    info = KerasModelInfo(
        arch=base.family, include_top=include_top, pooling=pooling if not include_top else None,
        head_units=classic[0] if classic else (), head_activation=classic[1] if classic else "relu",
        dropout=classic[2] if classic else 0.0, num_classes=(2 if binary else units) if head else None,
        output_activation="sigmoid" if output == "sigmoid" and not binary else "softmax",
        keras_output=output, keras_output_units=units, preprocessing=mode, input_preprocessing=applied,
        input_shape=shape, head=() if include_top else tuple(str(h) for h in head),
        classic=classic is not None, preprocessing_source=source, trainable_layers=trainable,
        notes=tuple(notes), family_options=family_options,
    )  # fmt: skip
    return ArchPlan(info, base, head_nodes, computed, binary)


def _head_nodes(head, nodes, include_top: bool) -> dict[str, Node]:
    """Our head layer name -> the user's node with its weights (Keras's own top keeps its names)."""
    if include_top:
        return {n.name: n for n in nodes if n.class_name in ("Dense", "LayerNormalization")}
    return {name: node for name, node in zip(layer_names(head), nodes) if name is not None}


def _trainable(base: BaseMatch, head_nodes: dict[str, Node], computed) -> tuple[str, ...]:
    """The imported model's weighted layers whose Keras layers are trainable (by their flags and
    their enclosing models')."""
    names = [name for name, node in base.weights.items() if node.layer.trainable and name not in computed]
    return (*names, *(name for name, node in head_nodes.items() if node.layer.trainable))


def _check_input(graph: KerasGraph, where: str) -> None:
    shape = graph.input_shape
    if shape is None:
        return
    if len(shape) != 3 or shape[-1] != 3:
        raise WeightFileError(
            f"{where}: layer {graph.nodes[0].name!r} (InputLayer) takes inputs of shape {tuple(shape)}: only "
            "images (height, width, 3 RGB channels) can be imported"
        )


def _input_shape(saved, given, flattens: bool, where, notes) -> tuple[int, int, int]:
    if given is not None:
        given = tuple(int(v) for v in given)
        if saved and None not in saved and tuple(saved) != given and flattens:
            raise WeightFileError(
                f"{where}: the model flattens the feature map of {tuple(saved)} inputs; "
                f"input_shape={given} cannot be used"
            )
        shape = given
    elif saved and None not in saved:
        shape = tuple(int(v) for v in saved)
    elif flattens:
        raise WeightFileError(
            f"{where}: the model's input size is not fixed ({saved}) and its head flattens the feature "
            "map: pass input_shape=(H, W, 3)"
        )
    else:
        shape = (224, 224, 3)
        notes.append(f"the model takes any input size ({saved}); imported for 224x224 (pass input_shape=...)")
    if len(shape) != 3 or shape[2] != 3:
        raise WeightFileError(f"{where}: input shape {shape}: expected (H, W, 3) RGB images")
    return shape
