"""And back out: ``to_keras(model, path)`` writes an imgcls_jax VGG as a Keras model file.

Written without Keras, in Keras's own layouts:

* ``.keras``: a Keras 3 archive (``metadata.json``, ``config.json``, ``model.weights.h5``), read
  by ``keras.saving.load_model``;
* ``.h5``: a whole-model legacy HDF5 file (``model_config`` in Keras 2 / tf.keras form, and
  ``model_weights``), read by ``keras.saving.load_model`` and by tf.keras' ``load_model``.

The Keras model is what a Keras user builds for transfer learning: an input, an optional
``Rescaling`` layer, the VGG base as one nested layer named ``vgg16``/``vgg19`` (Keras's own
layer names; ``nested=False`` writes its layers flat), the pooling (``GlobalAveragePooling2D``,
``GlobalMaxPooling2D`` or ``Flatten``), ``Dense`` + ``Dropout`` layers and the output ``Dense``.
A model with Keras's ImageNet top is written as ``keras.applications.VGG16(include_top=True)``.
"""

from __future__ import annotations

import json
import tempfile
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from imgcls_jax.models.vgg import BLOCKS, FILTERS
from imgcls_jax.weights.keras_inputs import mode_affine
from imgcls_jax.weights.keras_layers import flatten_model

#: Keras version whose file formats are written (read by Keras 3.x and tf.keras 2.x alike).
KERAS3_FORMAT_VERSION = "3.15.1"
LEGACY_FORMAT_VERSION = "2.21.0"
_POOL_LAYERS = {"avg": "GlobalAveragePooling2D", "max": "GlobalMaxPooling2D", None: "Flatten"}


class _Chain:
    """Builds a Functional model config layer by layer (each layer consumes the previous)."""

    def __init__(self, name: str, input_shape, legacy: bool):
        self.name, self.legacy, self.layers, self.shape = name, legacy, [], [None, *input_shape]
        self.previous: tuple[str, int] | None = None
        shape_key = "batch_input_shape" if legacy else "batch_shape"
        config = {shape_key: self.shape, "dtype": "float32", "sparse": False, "ragged": False}
        self.add("InputLayer", f"{name}_input" if name != "model" else "input_layer", config, self.shape)

    def add(self, class_name: str, name: str, config: dict, shape, entry: dict | None = None, node: int = 0):
        """Append a layer (``entry``: a whole nested model entry) whose output has ``shape``."""
        if entry is None:
            trainable = {} if class_name == "InputLayer" else {"trainable": True}
            entry = {"class_name": class_name, "config": {"name": name, **trainable, **config}}
        if (
            class_name != "InputLayer"
            and "dtype" not in entry["config"]
            and entry["class_name"] not in ("Functional",)
        ):
            entry["config"]["dtype"] = "float32"
        entry["name"] = name
        if not self.legacy:
            entry.setdefault("module", "keras.layers")
            entry.setdefault("registered_name", None)
        entry["inbound_nodes"] = self._inbound() if self.previous else []
        self.layers.append(entry)
        self.previous, self.shape = (name, node), list(shape)

    def _inbound(self):
        name, node = self.previous
        if self.legacy:
            return [[[name, node, 0, {}]]]
        history = {"shape": self.shape, "dtype": "float32", "keras_history": [name, 0, 0]}
        return [{"args": [{"class_name": "__keras_tensor__", "config": history}], "kwargs": {}}]

    def config(self) -> dict:
        first, last = [self.layers[0]["name"], 0, 0], [self.previous[0], 0, 0]
        io = {"input_layers": [first], "output_layers": [last]} if self.legacy else {
            "input_layers": first, "output_layers": last}  # fmt: skip
        out = {
            "class_name": "Functional",
            "config": {"name": self.name, "trainable": True, "layers": self.layers, **io},
        }
        if not self.legacy:
            out.update({"module": "keras.src.models.functional", "registered_name": "Functional"})
        return out


def _conv(filters: int) -> dict:
    return {"filters": filters, "kernel_size": [3, 3], "strides": [1, 1], "padding": "same",
            "data_format": "channels_last", "dilation_rate": [1, 1], "groups": 1, "activation": "relu",
            "use_bias": True}  # fmt: skip


def _dense(units: int, activation: str) -> dict:
    return {"units": int(units), "activation": activation, "use_bias": True}


def _add_base(chain: _Chain, arch: str) -> None:
    height, width = chain.shape[1:3]
    for b, (n_conv, filters) in enumerate(zip(BLOCKS[arch], FILTERS), start=1):
        for c in range(1, n_conv + 1):
            chain.add("Conv2D", f"block{b}_conv{c}", _conv(filters), [None, height, width, filters])
        height, width = (None if height is None else height // 2), (None if width is None else width // 2)
        pool = {"pool_size": [2, 2], "padding": "valid", "strides": [2, 2], "data_format": "channels_last"}
        chain.add("MaxPooling2D", f"block{b}_pool", pool, [None, height, width, filters])


def keras_config_for(
    *,
    arch: str = "vgg16",
    input_shape=None,
    include_top: bool = False,
    pooling: str | None = "avg",
    head_units=(),
    head_activation: str = "relu",
    dropout: float = 0.0,
    num_classes: int | None = None,
    keras_output: str = "softmax",
    rescaling: tuple | None = None,
    nested: bool = True,
    legacy: bool = False,
) -> dict:
    """The Keras model config (Keras 3 form, or Keras 2 form with ``legacy``) of a VGG transfer
    model: ``num_classes`` is the output ``Dense``'s width, ``keras_output`` its activation,
    ``rescaling`` an optional ``(scale, offset)`` input layer (numbers or per-channel lists)."""
    if arch not in BLOCKS:
        raise ValueError(f"unknown VGG architecture {arch!r}; expected one of {sorted(BLOCKS)}")
    shape = list(input_shape) if input_shape is not None else [None, None, 3]
    if include_top:
        top = _Chain(arch, shape, legacy)
        _add_base(top, arch)
        top.add("Flatten", "flatten", {"data_format": "channels_last"}, [None, int(np.prod(top.shape[1:]))])
        top.add("Dense", "fc1", _dense(4096, "relu"), [None, 4096])
        top.add("Dense", "fc2", _dense(4096, "relu"), [None, 4096])
        top.add(
            "Dense", "predictions", _dense(num_classes or 1000, keras_output), [None, num_classes or 1000]
        )
        return top.config()
    chain = _Chain("model", shape, legacy)
    if rescaling is not None:
        chain.add("Rescaling", "rescaling", {"scale": rescaling[0], "offset": rescaling[1]}, chain.shape)
    if nested:
        base = _Chain(arch, chain.shape[1:], legacy)
        _add_base(base, arch)
        chain.add("Functional", arch, {}, base.shape, entry=base.config(), node=1 if legacy else 0)
    else:
        _add_base(chain, arch)
    if num_classes is None and pooling is None:
        return chain.config()
    features = 512 if pooling else int(np.prod(chain.shape[1:])) if None not in chain.shape[1:] else None
    chain.add(_POOL_LAYERS[pooling], {"avg": "global_average_pooling2d", "max": "global_max_pooling2d"}.get(
        pooling, "flatten"), {"data_format": "channels_last"}, [None, features])  # fmt: skip
    if num_classes is None:
        return chain.config()
    if dropout and not head_units:
        chain.add("Dropout", "dropout", {"rate": float(dropout)}, chain.shape)
    for i, units in enumerate(head_units):
        chain.add("Dense", "dense" if i == 0 else f"dense_{i}", _dense(units, head_activation), [None, units])
        if dropout:
            chain.add(
                "Dropout", "dropout" if i == 0 else f"dropout_{i}", {"rate": float(dropout)}, chain.shape
            )
    name = "dense" if not head_units else f"dense_{len(head_units)}"
    chain.add("Dense", name, _dense(num_classes, keras_output), [None, num_classes])
    return chain.config()


def input_rescaling(mode: str, input_preprocessing: str) -> tuple | None:
    """``(scale, offset)`` of the ``Rescaling`` layer that turns pixels preprocessed with
    ``input_preprocessing`` into what ``mode`` computes (None: nothing to do)."""
    have, want = mode_affine(input_preprocessing), mode_affine(mode)
    if have.flip != want.flip:
        raise ValueError(
            f"a Keras model for inputs preprocessed with {input_preprocessing!r} cannot apply the model's "
            f"{mode!r} preprocessing with a Rescaling layer (it reverses the channels): export with "
            f"input_preprocessing={mode!r} and apply keras.applications' preprocess_input(mode={mode!r})"
        )
    scale = want.scale / have.scale
    offset = want.offset - have.offset * scale
    if np.allclose(scale, 1.0, rtol=1e-7) and np.allclose(offset, 0.0, atol=1e-7):
        return None

    def compact(values):
        return float(values[0]) if np.allclose(values, values[0], rtol=1e-7) else [float(v) for v in values]

    return compact(scale), compact(offset)


def _export_plan(
    model, input_preprocessing: str | None, keras_output: str | None, nested: bool, legacy: bool
):
    """``(config, plan, binary)``: the Keras config and which Keras layer gets each VGG layer."""
    from imgcls_jax.weights.keras_arch import match_architecture

    if model.num_classes is None:
        raise ValueError(
            "the model has no classifier head (num_classes=None): nothing to export as a classifier"
        )
    if input_preprocessing is None:
        input_preprocessing = "none" if model.preprocessing == "unit" else model.preprocessing
    if keras_output is None:
        keras_output = model.output_activation
    binary = keras_output == "sigmoid" and model.output_activation == "softmax"
    if binary and model.num_classes != 2:
        raise ValueError(
            f"keras_output='sigmoid' for a softmax model needs 2 classes (written as Dense(1, sigmoid)), "
            f"the model has {model.num_classes}"
        )
    if model.output_activation == "sigmoid" and keras_output != "sigmoid":
        raise ValueError(f"the model's outputs are sigmoids; keras_output={keras_output!r} would change them")
    rescaling = input_rescaling(model.preprocessing, input_preprocessing)
    config = keras_config_for(
        arch=model.arch, input_shape=model.input_shape, include_top=model.include_top, pooling=model.pooling,
        head_units=model.head_units, head_activation=model.head_activation, dropout=model.dropout_rate,
        num_classes=1 if binary else model.num_classes, keras_output=keras_output, rescaling=rescaling,
        nested=nested, legacy=legacy,
    )  # fmt: skip
    flat = flatten_model(config, "export")
    plan = match_architecture(flat, "export", preprocessing=input_preprocessing, arch=model.arch)
    if plan.info.preprocessing != model.preprocessing:  # a bug here, not a user error
        raise AssertionError(f"exported preprocessing {plan.info.preprocessing} != {model.preprocessing}")
    return config, flat, plan, binary


def _arrays(model, plan, binary: bool) -> dict[str, list[np.ndarray]]:
    out = {}
    for ours, layer in plan.layers:
        kernel = np.asarray(getattr(model, ours).kernel.get_value(), np.float32)
        bias = np.asarray(getattr(model, ours).bias.get_value(), np.float32)
        if binary and ours == "head_logits":  # softmax([z0, z1])[1] = sigmoid(z1 - z0)
            kernel, bias = kernel[:, 1:] - kernel[:, :1], bias[1:] - bias[:1]
        out[layer.name] = [kernel, bias]
    return out


def _write_keras3_weights(path: Path, flat, arrays) -> None:
    import h5py

    with h5py.File(path, "w") as f:
        f.create_group("vars").attrs["name"] = "model"
        for layer in flat.layers:
            group = f.require_group(layer.keras3_path)
            group.attrs["name"] = layer.name
            for i, array in enumerate(arrays.get(layer.name, ())):
                group.create_dataset(str(i), data=array)


def _write_legacy(path: Path, config: dict, flat, arrays) -> None:
    import h5py

    groups: dict[str, list[tuple[str, np.ndarray]]] = {}
    for layer in flat.layers:
        for kind, array in zip(("kernel", "bias"), arrays.get(layer.name, ())):
            groups.setdefault(layer.legacy_group, []).append((f"{layer.name}/{kind}:0", array))
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
    """Write ``model`` (an imgcls_jax VGG with a head) as a Keras model file; returns the path.

    Args:
      model: a :class:`~imgcls_jax.models.VGG` with ``num_classes`` set.
      path: ``*.keras`` (Keras 3 archive) or ``*.h5`` (legacy whole-model HDF5).
      input_preprocessing: what the Keras model's users will apply to raw RGB pixels before
        calling it (a mode of :data:`imgcls_jax.models.MODES`). Default: the model's own mode
        (``"caffe"``: ``keras.applications.vgg16.preprocess_input``), except ``"unit"``, written
        as raw-pixel input and a ``Rescaling(1/255)`` layer. When it differs from the model's
        mode, a ``Rescaling`` layer in front bridges them (e.g. ``"none"`` for a ``"tf"``
        model adds ``Rescaling(1/127.5, offset=-1)``); ``"caffe"`` cannot be bridged that way.
      keras_output: the output activation: default the model's (``softmax``/``sigmoid``);
        ``"linear"`` writes logits; ``"sigmoid"`` for a 2-class softmax model writes a binary
        ``Dense(1, sigmoid)`` giving the probability of class 1.
      nested: the VGG base as one nested layer (as ``keras.applications.VGG16(...)`` called on
        an input; the default for ``.keras``) or as flat layers (the default for ``.h5``: Keras 3
        cannot read a nested model from a legacy file, Keras 2's own or this one; tf.keras can).

    Raises:
      ValueError: a model without a head, an unknown suffix, or options that would change the
        model's predictions.
    """
    path = Path(path)
    if path.suffix not in (".keras", ".h5") or path.name.endswith(".weights.h5"):
        raise ValueError(f"{path}: the suffix must be .keras (Keras 3 archive) or .h5 (legacy whole model)")
    legacy = path.suffix == ".h5"
    nested = not legacy if nested is None else nested
    config, flat, plan, binary = _export_plan(model, input_preprocessing, keras_output, nested, legacy)
    arrays = _arrays(model, plan, binary)
    path.parent.mkdir(parents=True, exist_ok=True)
    if legacy:
        _write_legacy(path, config, flat, arrays)
        return path
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "model.weights.h5"
        _write_keras3_weights(weights, flat, arrays)
        saved = datetime.now(UTC).strftime("%Y-%m-%d@%H:%M:%S")
        meta = {"keras_version": KERAS3_FORMAT_VERSION, "date_saved": saved, "written_by": "imgcls_jax"}
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("metadata.json", json.dumps(meta))
            archive.writestr("config.json", json.dumps(config))
            archive.write(weights, "model.weights.h5")
    return path
