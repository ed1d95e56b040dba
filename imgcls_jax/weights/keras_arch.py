"""Match a Keras model's chain of layers onto :class:`imgcls_jax.models.VGG`.

Understood, in this order (anything else is an error naming the layer):

1. input layers: ``Rescaling`` and constant arithmetic (see :mod:`imgcls_jax.weights.keras_inputs`);
2. the VGG16 or VGG19 convolutional base, nested as one layer (``keras.applications.VGG16``
   called on an input) or as flat layers; its layer names do not matter, its shapes do;
3. ``GlobalAveragePooling2D``, ``GlobalMaxPooling2D`` or ``Flatten`` (or nothing: a feature
   extractor), or Keras VGG's own top (``flatten``, ``fc1``, ``fc2``, ``predictions``);
4. ``Dense`` layers (with ``Activation`` / ``ReLU`` / ``Softmax`` layers after them) and
   ``Dropout``; the last Dense is the output: softmax, sigmoid or linear (logits).

Layers that are the identity at inference (augmentation layers, ``GaussianNoise``, ...) are
skipped and listed in the description's ``notes``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from imgcls_jax.models.vgg import BLOCKS, FILTERS, HEAD_ACTIVATIONS
from imgcls_jax.weights.keras import WeightFileError
from imgcls_jax.weights.keras_inputs import INPUT_LAYERS, resolve_preprocessing
from imgcls_jax.weights.keras_layers import FlatModel, KerasLayer

IDENTITY_AT_INFERENCE = (
    "RandomFlip",
    "RandomRotation",
    "RandomZoom",
    "RandomTranslation",
    "RandomContrast",
    "RandomBrightness",
    "RandomCrop",
    "RandomHeight",
    "RandomWidth",
    "GaussianNoise",
    "GaussianDropout",
    "AlphaDropout",
    "ActivityRegularization",
)
POOLING_LAYERS = {"GlobalAveragePooling2D": "avg", "GlobalMaxPooling2D": "max", "Flatten": None}
KERAS_TOP = ("fc1", "fc2", "predictions")
OUTPUTS = ("softmax", "sigmoid", "linear")


@dataclass(frozen=True)
class KerasModelInfo:
    """What :func:`imgcls_jax.weights.from_keras` imported, as plain data.

    ``arch``, ``include_top``, ``pooling``, ``head_units``, ``head_activation``, ``dropout``,
    ``num_classes``, ``output_activation``, ``preprocessing``, ``input_shape`` are the
    :class:`~imgcls_jax.models.VGG` arguments of the imported model. ``keras_output`` is the
    Keras model's last activation (``softmax``, ``sigmoid`` or ``linear`` logits) and
    ``keras_output_units`` its width: a binary ``Dense(1, sigmoid)`` is imported as two softmax
    classes ``[1 - p, p]``. ``input_preprocessing`` is what the user applies to raw RGB pixels
    before calling the Keras model; the imported model applies ``preprocessing`` to raw pixels
    itself. ``notes``: whatever was mapped approximately or skipped.
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
    class_names: tuple[str, ...] | None = None
    source: str = ""
    format: str = ""
    keras_version: str | None = None
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples become lists)."""
        out = asdict(self)
        for key, value in out.items():
            if isinstance(value, tuple):
                out[key] = list(value)
        return out


@dataclass
class ArchPlan:
    """A matched architecture: the description and which Keras layer feeds each VGG layer."""

    info: KerasModelInfo
    layers: list[tuple[str, KerasLayer]]  # (VGG attribute name, Keras layer holding its weights)
    notes: list[str] = field(default_factory=list)


def activation_name(value) -> str:
    """A Keras activation as a lower-case name (``None`` -> ``"linear"``)."""
    if isinstance(value, dict):  # Keras 3 serialized function: {"class_name": "function", "config": "relu"}
        value = value.get("config") if isinstance(value.get("config"), str) else value.get("class_name")
    return "linear" if value is None else str(value).lower()


def _error(where: str, layer: KerasLayer, why: str) -> WeightFileError:
    return WeightFileError(f"{where}: layer {layer.name!r} ({layer.class_name}) {why}")


def _check_conv(layer: KerasLayer, filters: int, where: str) -> None:
    c = layer.config
    got = {
        "filters": c.get("filters"),
        "kernel_size": list(c.get("kernel_size", [])),
        "strides": list(c.get("strides", [1, 1])),
        "padding": c.get("padding"),
        "dilation_rate": list(c.get("dilation_rate", [1, 1])),
        "groups": c.get("groups", 1),
        "activation": activation_name(c.get("activation")),
        "data_format": c.get("data_format") or "channels_last",
    }
    want = {
        "filters": filters,
        "kernel_size": [3, 3],
        "strides": [1, 1],
        "padding": "same",
        "dilation_rate": [1, 1],
        "groups": 1,
        "activation": "relu",
        "data_format": "channels_last",
    }
    bad = {k: got[k] for k in want if got[k] != want[k]}
    if bad:
        raise _error(where, layer, f"differs from the VGG convolution it stands for: {bad}, expected {want}")


def _check_pool(layer: KerasLayer, where: str) -> None:
    c = layer.config
    pool = list(c.get("pool_size", [2, 2]))
    strides = list(c.get("strides") or pool)
    if pool != [2, 2] or strides != [2, 2] or c.get("padding", "valid") != "valid":
        raise _error(where, layer, f"is not a 2x2/2 'valid' max pooling (pool {pool}, strides {strides})")


def match_base(layers: list[KerasLayer], start: int, where: str, arch: str | None) -> tuple[str, int]:
    """``(arch, index after the base)`` for the VGG base starting at ``layers[start]``."""
    blocks, convs, i = [], [], start
    while i < len(layers) and layers[i].class_name in ("Conv2D", "MaxPooling2D") and len(blocks) < 5:
        if layers[i].class_name == "Conv2D":
            convs.append(layers[i])
        else:
            blocks.append(convs)
            convs = []
        i += 1
    counts = tuple(len(b) for b in blocks)
    found = next((name for name, want in BLOCKS.items() if counts == want and not convs), None)
    if found is None:
        at = layers[i] if i < len(layers) else layers[-1]
        raise WeightFileError(
            f"{where}: the convolutional base is not VGG16 or VGG19: found convolutions per pooled block "
            f"{counts}{f' and {len(convs)} more' if convs else ''} (VGG16: {BLOCKS['vgg16']}, VGG19: "
            f"{BLOCKS['vgg19']}), up to layer {at.name!r} ({at.class_name})"
        )
    if arch is not None and arch != found:
        raise WeightFileError(f"{where}: this is a {found.upper()} model, but arch={arch!r} was asked for")
    for b, block in enumerate(blocks):
        for layer in block:
            _check_conv(layer, FILTERS[b], where)
    for layer in layers[start:i]:
        if layer.class_name == "MaxPooling2D":
            _check_pool(layer, where)
    return found, i


def _base_names(arch: str) -> list[str]:
    return [f"block{b}_conv{c}" for b, n in enumerate(BLOCKS[arch], start=1) for c in range(1, n + 1)]


def _head(layers: list[KerasLayer], where: str) -> tuple[list[list], dict[int, list[float]]]:
    """Dense layers as ``[layer, activation]`` and dropout rates by position (Dense layers before)."""
    denses: list[list] = []
    dropouts: dict[int, list[float]] = {}
    for layer in layers:
        c = layer.config
        if layer.class_name == "Dense":
            denses.append([layer, activation_name(c.get("activation"))])
        elif layer.class_name == "Dropout":
            dropouts.setdefault(len(denses), []).append(float(c.get("rate", 0.0)))
        elif layer.class_name in ("Activation", "ReLU", "Softmax"):
            if layer.class_name == "Activation":
                name = activation_name(c.get("activation"))
            elif layer.class_name == "Softmax":
                name = "softmax" if c.get("axis", -1) in (-1, [-1]) else "?"
            else:
                relu = (c.get("max_value"), c.get("negative_slope", 0) or 0, c.get("threshold", 0) or 0)
                name = {(None, 0, 0): "relu", (6, 0, 0): "relu6"}.get(relu, "?")
            if not denses or denses[-1][1] != "linear" or name == "?":
                raise _error(where, layer, "must directly follow a Dense layer without activation")
            denses[-1][1] = name
        elif layer.class_name in POOLING_LAYERS or layer.class_name in INPUT_LAYERS:
            raise _error(where, layer, "cannot be mapped: it comes after the head's first layers")
        else:
            raise _error(
                where,
                layer,
                "cannot be mapped onto a VGG transfer head (only Dense, Dropout and Activation layers "
                "can follow the pooling)",
            )
    return denses, dropouts


def _keras_top(layers: list[KerasLayer]) -> bool:
    names = [layer.name for layer in layers]
    return len(layers) == 4 and layers[0].class_name == "Flatten" and tuple(names[1:]) == KERAS_TOP


def match_architecture(
    flat: FlatModel,
    where: str,
    *,
    preprocessing: str | None = None,
    arch: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
) -> ArchPlan:
    """Map ``flat`` onto a VGG; raise :class:`WeightFileError` naming any layer it cannot map."""
    notes: list[str] = []
    layers = []
    for layer in flat.layers:
        if layer.class_name in IDENTITY_AT_INFERENCE:
            notes.append(
                f"skipped {layer.name!r} ({layer.class_name}): the identity at inference "
                "(Keras's predict, or training=False)"
            )
        else:
            layers.append(layer)
    start = 0
    while start < len(layers) and layers[start].class_name in INPUT_LAYERS:
        start += 1
    if start == len(layers) or layers[start].class_name != "Conv2D":
        at = layers[start] if start < len(layers) else None
        raise WeightFileError(
            f"{where}: "
            + (f"layer {at.name!r} ({at.class_name}) cannot be mapped: " if at else "")
            + "expected the VGG16/VGG19 convolutional base after the input (and Rescaling) layers; "
            "this does not look like a VGG model"
        )
    mode, applied = resolve_preprocessing(layers[:start], preprocessing, where)
    found, i = match_base(layers, start, where, arch)
    plan_layers = list(zip(_base_names(found), [la for la in layers[start:i] if la.class_name == "Conv2D"]))
    rest = layers[i:]
    kwargs = {"include_top": False, "pooling": None, "head_units": (), "head_activation": "relu"}
    if _keras_top(rest):
        kwargs["include_top"] = True
        denses, dropouts = _head(rest[1:], where)
    elif rest and rest[0].class_name in POOLING_LAYERS:
        kwargs["pooling"] = POOLING_LAYERS[rest[0].class_name]
        rest = rest[1:]
        if kwargs["pooling"] and rest and rest[0].class_name == "Flatten":  # after keepdims=True
            rest = rest[1:]
        denses, dropouts = _head(rest, where)
    elif rest:
        raise _error(
            where, rest[0], "cannot be mapped: expected global pooling, Flatten or Dense after the base"
        )
    else:
        denses, dropouts = [], {}
    info = _describe(found, kwargs, denses, dropouts, flat, where, notes, input_shape)
    info = KerasModelInfo(**{**info, "preprocessing": mode, "input_preprocessing": applied})
    if info.include_top:
        names = list(KERAS_TOP)
    else:
        names = [f"head_fc{k}" for k in range(1, len(denses))] + ["head_logits"]
    plan_layers += list(zip(names, [dense for dense, _ in denses]))
    return ArchPlan(info, plan_layers, notes)


def _describe(arch, kwargs, denses, dropouts, flat, where, notes, input_shape) -> dict:
    """The :class:`KerasModelInfo` fields other than the preprocessing ones."""
    hidden, output = denses[:-1], denses[-1] if denses else None
    activations = {act for _, act in hidden}
    if len(activations) > 1:
        raise WeightFileError(
            f"{where}: the hidden Dense layers use different activations {sorted(activations)}: "
            "imgcls_jax's head uses one activation for all of them"
        )
    act = activations.pop() if activations else "relu"
    if act not in HEAD_ACTIVATIONS:
        layer = next(la for la, a in hidden if a == act)
        raise _error(
            where, layer, f"has activation {act!r}, which cannot be mapped; known: {sorted(HEAD_ACTIVATIONS)}"
        )
    if output is not None and output[1] not in OUTPUTS:
        raise _error(
            where, output[0], f"(the output) has activation {output[1]!r}; expected one of {OUTPUTS}"
        )
    if kwargs["include_top"] and (
        act != "relu" or dropouts or [int(la.config["units"]) for la, _ in hidden] != [4096, 4096]
    ):
        raise WeightFileError(f"{where}: layers named fc1/fc2/predictions differ from Keras VGG's top")
    units = tuple(int(la.config["units"]) for la, _ in hidden)
    rates = [r for rs in dropouts.values() for r in rs]
    dropout = max(rates, default=0.0)
    vgg_layout = {p: [dropout] for p in (range(1, len(hidden) + 1) if hidden else [0])} if dropout else {}
    if dropouts != vgg_layout and not kwargs["include_top"]:
        notes.append(
            f"Keras's dropout {dict(dropouts)} (rates by number of Dense layers before them) is not "
            f"imgcls_jax's layout ({dropout} after each hidden layer, or after the pooling without "
            "one): identical at inference; training this model uses imgcls_jax's layout"
        )
    keras_output = output[1] if output else None
    out_units = int(output[0].config["units"]) if output else None
    binary = keras_output == "sigmoid" and out_units == 1
    if binary:
        notes.append("a binary Dense(1, sigmoid) output p is imported as two softmax classes [1 - p, p]")
    shape = _input_shape(flat.input_shape, input_shape, kwargs, where, notes)
    if flat.dtype_policy not in ("float32", None):
        notes.append(f"the Keras model computes in {flat.dtype_policy!r}; the imported one in float32")
    return {
        "arch": arch,
        **kwargs,
        "head_units": () if kwargs["include_top"] else units,
        "head_activation": act,
        "dropout": dropout if not kwargs["include_top"] else 0.0,
        "num_classes": (2 if binary else out_units) if output else None,
        "output_activation": "sigmoid" if keras_output == "sigmoid" and not binary else "softmax",
        "keras_output": keras_output,
        "keras_output_units": out_units,
        "input_shape": shape,
        "notes": tuple(notes),
    }


def _input_shape(saved, given, kwargs, where, notes) -> tuple[int, int, int]:
    flattens = kwargs["include_top"] or kwargs["pooling"] is None
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
