"""Whole Keras models in: ``from_keras(path)`` -> an imgcls_jax model with the same predictions.

Reads, without Keras (zipfile + json + h5py):

* a Keras 3 ``.keras`` archive (``config.json`` + ``model.weights.h5``);
* a whole-model legacy ``.h5`` (Keras 2 / tf.keras ``model.save("x.h5")``, or Keras 3's legacy
  writer): the ``model_config`` attribute and the ``model_weights`` group;
* weights only (Keras 3 ``.weights.h5``, Keras 2 ``save_weights("x.h5")``) with the
  architecture given separately: ``architecture=`` a ``.keras`` archive, a JSON file holding a
  Keras model config (``model.to_json()``, an archive's ``config.json``) or that config as a
  dict; or as keywords (``arch``, ``pooling``, ``head_units``, ``num_classes``, ...), in which case
  the base's layers are found in the file by their Keras names and the head's by their order.

The architecture is matched as :mod:`imgcls_jax.weights.keras_arch` describes: a base of any
registered family with a Keras graph, a head of Dense / Dropout / BatchNormalization /
LayerNormalization / activation layers. The family's layers get their weights through the same
mapping Keras weight files use (``layer_specs`` / ``keras_variables``, validated by
:func:`imgcls_jax.weights.keras.validate`); every weight is read and checked (shape, dtype,
finite) before the model is returned, so a file that does not fit raises
:class:`~imgcls_jax.weights.WeightFileError` and nothing is half loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from imgcls_jax.weights.keras import FileLayers, WeightFileError, _open, read_arrays, validate
from imgcls_jax.weights.keras_arch import ArchPlan, KerasModelInfo, match_architecture
from imgcls_jax.weights.keras_layers import KerasGraph, Node, read_graph

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Keywords describing the architecture of a weights-only file (see :func:`from_keras`).
HEAD_KEYWORDS = (
    "pooling", "head_units", "head_activation", "dropout", "num_classes", "keras_output", "nested", "head",
)  # fmt: skip
#: Keras's weight names in each layer's order (a legacy group lists trainable weights first).
_WEIGHT_ORDER = {"kernel": 0, "depthwise_kernel": 0, "gamma": 0, "mean": 0, "pointwise_kernel": 1, "beta": 1,
                 "variance": 1, "bias": 2, "moving_mean": 2, "count": 2, "moving_variance": 3}  # fmt: skip


def from_keras(
    path,
    *,
    architecture=None,
    preprocessing: str | None = None,
    arch: str | None = None,
    input_shape: tuple[int, int, int] | None = None,
    class_names=None,
    dtype="float32",
    seed: int = 0,
    **head,
):
    """Import a Keras transfer model (a base of any registered family and its head): ``(model,
    info)``.

    Args:
      path: ``.keras`` archive, whole-model ``.h5``, or a weights-only ``.weights.h5`` / ``.h5``.
      architecture: for a weights-only file: a ``.keras`` archive, a JSON file or dict holding
        the Keras model config. Alternatively describe it with keywords (``head``).
      preprocessing: what you apply to raw RGB pixels (``[0, 255]``) before calling the Keras
        model: ``"caffe"`` (``keras.applications.vgg16.preprocess_input``), ``"tf"``,
        ``"torch"``, ``"unit"`` (``/255``) or ``"none"`` (raw pixels). Default: ``"none"`` when
        the model holds preprocessing of its own in front of the base (``Rescaling``,
        ``Normalization``, ``preprocess_input`` applied to its input), else the base's own
        (``info.preprocessing_source`` says which). The imported model takes raw pixels and applies
        the equivalent itself (``info.preprocessing``).
      arch: a registry name to insist on (default: whichever family the base is).
      input_shape: ``(H, W, 3)``; needed when the Keras model's input size is not fixed and
        its head flattens the feature map (default for a pooled head: 224x224).
      class_names: the class names, in the model's output order (Keras keeps none).
      dtype: compute dtype of the imported model; parameters are float32.
      seed: seeds the model's dropout stream (every weight comes from the file).
      head: for a weights-only file without ``architecture``: ``pooling`` ("avg", "max" or
        None), ``head_units``, ``head_activation``, ``dropout`` (or ``head``, the layers of
        :mod:`imgcls_jax.models.head`), ``num_classes`` (the Keras output's width: 1 for a binary
        sigmoid), ``keras_output`` ("softmax", "sigmoid", "linear") and ``arch`` (default "vgg16").

    Returns:
      The model (inference mode; it takes raw RGB pixels ``[N, H, W, 3]`` and returns logits
      ``float32[N, K]``; ``model.probabilities(logits)`` gives what the Keras model outputs,
      except that a linear Keras output becomes a softmax) and a :class:`KerasModelInfo`.
      ``model.keras_trainable`` holds the layers the Keras model's ``trainable`` flags train.

    Raises:
      WeightFileError: unreadable file, an architecture that cannot be mapped (the message
        names the layer), or weights that do not fit it.
    """
    path = Path(path).expanduser()
    where = str(path)
    unknown = sorted(set(head) - set(HEAD_KEYWORDS))
    if unknown:
        raise TypeError(f"from_keras() got unexpected keyword arguments {unknown}")
    fmt, config, keras_version = _architecture_of(path, architecture, arch, input_shape, head)
    graph = read_graph(config, where)
    by_name = architecture is None and config.get("_imgcls_jax_from_keywords", False)
    with _weights_file(path, fmt) as h5file:
        weights = Locator(h5file, fmt, where, by_name)
        plan = match_architecture(graph, where, weights.arrays, preprocessing=preprocessing, arch=arch,
                                  input_shape=input_shape)  # fmt: skip
        names = None if class_names is None else tuple(str(c) for c in class_names)
        if names is not None and len(names) != plan.info.num_classes:
            raise ValueError(
                f"{where}: {len(names)} class names for a model with {plan.info.num_classes} classes"
            )
        info = replace(plan.info, class_names=names, source=where, format=fmt, keras_version=keras_version)
        model = build_model(info, dtype=dtype, seed=seed)
        weighted = {*model.base_layers, *model.head_layers}  # the matched layers without weights left out
        info = replace(info, trainable_layers=tuple(n for n in info.trainable_layers if n in weighted))
        arrays = _read_layers(model, replace(plan, info=info), weights, graph)
    _assign(model, arrays)
    model.keras_trainable = info.trainable_layers
    for note in info.notes:
        log.info("%s: %s", where, note)
    log.info("imported %s (%s, %s) from %s", info.arch, fmt, _summary(info), where)
    return model, info


def _summary(info: KerasModelInfo) -> str:
    if info.include_top:
        return f"Keras top, {info.num_classes} classes"
    options = "".join(f", {k}={v!r}" for k, v in info.family_options.items())
    return f"pooling {info.pooling}, head {list(info.head)}, {info.num_classes} classes{options}"


# --------------------------------------------------------------------------------- the file
def _is_hdf5(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == HDF5_SIGNATURE


def _archive_config(path: Path) -> tuple[dict, str | None]:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if "config.json" not in names or "model.weights.h5" not in names:
                raise WeightFileError(
                    f"{path}: a zip archive without config.json and model.weights.h5 ({names[:6]}): "
                    "not a Keras 3 .keras model (sharded or npz weights are not supported)"
                )
            config = json.loads(archive.read("config.json"))
            meta = json.loads(archive.read("metadata.json")) if "metadata.json" in names else {}
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, json.JSONDecodeError) as exc:
        raise WeightFileError(
            f"{path}: not a readable .keras archive ({path.stat().st_size} bytes): {exc}. It may be "
            "truncated or corrupt: save or copy it again"
        ) from exc
    return config, meta.get("keras_version")


def _config_from(source, where: str) -> dict:
    """A Keras model config from ``architecture=`` (dict, .keras archive, JSON or .h5 file)."""
    if isinstance(source, dict):
        return source
    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightFileError(f"{where}: architecture file {source} does not exist")
    if zipfile.is_zipfile(source):
        return _archive_config(source)[0]
    if _is_hdf5(source):
        with _open(source) as h5file:
            if "model_config" not in h5file.attrs:
                raise WeightFileError(f"{source}: an HDF5 file without a model_config: not an architecture")
            return json.loads(h5file.attrs["model_config"])
    try:
        return json.loads(source.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WeightFileError(
            f"{source}: architecture is not a .keras archive or a JSON model config: {exc}"
        ) from exc


def _architecture_of(path: Path, architecture, arch, input_shape, head) -> tuple[str, dict, str | None]:
    """``(format, model config, Keras version)`` of ``path``; see :func:`from_keras`."""
    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    if path.suffix == ".keras" or zipfile.is_zipfile(path):
        config, version = _archive_config(path)
        return "keras3-archive", config, version
    if not _is_hdf5(path):
        raise WeightFileError(
            f"{path}: neither a .keras (zip) archive nor an HDF5 file ({path.stat().st_size} bytes): "
            "expected a Keras model or weight file"
        )
    with _open(path) as h5file:
        version = h5file.attrs.get("keras_version")
        version = version.decode() if isinstance(version, bytes) else version
        saved = h5file.attrs.get("model_config")
        root = h5file["model_weights"] if "model_weights" in h5file else h5file
        fmt = "legacy-h5" if "layer_names" in root.attrs else "keras3-weights" if "layers" in h5file else None
    if fmt is None:
        raise WeightFileError(
            f"{path}: HDF5 file but not a Keras model or weight file (no layer_names, no layers)"
        )
    if architecture is not None:
        return fmt, _config_from(architecture, str(path)), version
    if saved is not None:
        return fmt, json.loads(saved.decode() if isinstance(saved, bytes) else saved), version
    if not head and arch is None:
        raise WeightFileError(
            f"{path}: holds weights only, not the architecture. Pass architecture= (the .keras archive "
            "or model.to_json() of the model), or describe it: arch=, pooling=, head_units=, "
            "num_classes=, keras_output=, ..."
        )
    from imgcls_jax.weights.keras_export import keras_config_for

    try:
        config = keras_config_for(arch=arch or "vgg16", input_shape=input_shape, **head)
    except ValueError as exc:
        raise WeightFileError(f"{path}: {exc}") from exc
    config["_imgcls_jax_from_keywords"] = True
    return fmt, config, version


@contextlib.contextmanager
def _weights_file(path: Path, fmt: str):
    """The open HDF5 file holding the weights (extracted from a ``.keras`` archive)."""
    with tempfile.TemporaryDirectory() as tmp:
        h5_path = path
        if fmt == "keras3-archive":
            with zipfile.ZipFile(path) as archive:
                try:
                    h5_path = Path(archive.extract("model.weights.h5", tmp))
                except (zipfile.BadZipFile, EOFError, OSError) as exc:
                    raise WeightFileError(
                        f"{path}: model.weights.h5 cannot be read from the archive: {exc}"
                    ) from exc
        with _open(h5_path) as h5file:
            yield h5file


def _key(path: str):
    return [
        (re.sub(r"_\d+$", "", p), int(m.group(1)) if (m := re.search(r"_(\d+)$", p)) else 0)
        for p in path.split("/")
    ]


class Locator:
    """Where a graph node's weights are in an open Keras weights file (see
    :mod:`imgcls_jax.weights.keras_layers`): by the node's position (its Keras 3 key path, checked
    against the group's ``name``, or its legacy group and weight names) or, for a file whose
    architecture was described by keywords, by the layer's name alone."""

    def __init__(self, h5file, fmt: str, where: str, by_name: bool):
        self.h5, self.fmt, self.where, self.by_name = h5file, fmt, where, by_name
        self.root = h5file["model_weights"] if "model_weights" in h5file else h5file
        self._named: dict[str, list] | None = None

    def named(self) -> dict[str, list]:
        """Every weighted layer of the file by its name, in the file's order."""
        if self._named is None:
            found: dict[str, list] = {}
            if self.fmt == "legacy-h5":
                for group in _decode(self.root.attrs["layer_names"]):
                    for layer, datasets in self._legacy_layers(self.root[group]).items():
                        found.setdefault(layer, datasets)
            else:
                groups = []
                self.h5["layers"].visititems(
                    lambda n, o: groups.append(f"layers/{n}") if n.endswith("vars") and len(o) else None
                )
                for g in sorted(groups, key=_key):
                    name = self.h5[g].attrs.get("name", g.split("/")[-2])
                    found.setdefault(name.decode() if isinstance(name, bytes) else str(name), self._vars(g))
            self._named = found
        return self._named

    def _vars(self, path: str) -> list:
        group = self.h5[path]
        return [group[k] for k in sorted(group, key=int)]

    def _legacy_layers(self, group) -> dict[str, list]:
        """``{layer name: datasets in Keras's order}`` of a legacy group (``layer/weight[:0]``)."""
        layers: dict[str, list] = {}
        for wname in _decode(group.attrs.get("weight_names", [])):
            parts = wname.split("/")
            layer = parts[-2] if len(parts) > 1 else group.name.split("/")[-1]
            layers.setdefault(layer, []).append((parts[-1].split(":")[0], group[wname]))
        return {
            k: [d for _, d in sorted(v, key=lambda item: _WEIGHT_ORDER.get(item[0], 9))]
            for k, v in layers.items()
        }

    def datasets(self, node: Node) -> list:
        """The weights of ``node`` in Keras's order (h5py datasets; ``[]`` when it has none)."""
        if self.by_name:
            return self.named().get(node.name, [])
        layer = node.layer
        if self.fmt == "legacy-h5":
            if layer.legacy_group not in self.root:
                raise WeightFileError(
                    f"{self.where}: no weights group {layer.legacy_group!r} for layer {node.name!r}"
                )
            return self._legacy_layers(self.root[layer.legacy_group]).get(node.name, [])
        if layer.keras3_path not in self.h5:
            return self.named().get(node.name, [])
        saved = self.h5[layer.keras3_path].attrs.get("name")
        saved = saved.decode() if isinstance(saved, bytes) else saved
        if saved is not None and saved != node.name:
            raise WeightFileError(
                f"{self.where}: weights at {layer.keras3_path} belong to layer {saved!r}, the architecture "
                f"puts {node.name!r} there: the weights are not of this model"
            )
        return self._vars(layer.keras3_path)

    def arrays(self, node: Node) -> list[np.ndarray]:
        """``datasets(node)`` read as float64 arrays (the input's Normalization statistics)."""
        return [np.asarray(d[()], np.float64) for d in self.datasets(node)]


def _decode(values) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


# --------------------------------------------------------------------------------- the model
def build_model(info: KerasModelInfo, *, dtype="float32", seed: int = 0):
    """The model ``info`` describes (random weights, dropout seeded by ``seed``)."""
    from imgcls_jax.models.registry import create_model

    options = dict(include_top=info.include_top, pooling=info.pooling, num_classes=info.num_classes,
                   input_shape=tuple(info.input_shape), dtype=jnp.dtype(dtype), seed=seed,
                   preprocessing=info.preprocessing, **info.family_options)  # fmt: skip
    if info.head and not info.include_top:
        if info.classic:
            options.update(head_units=info.head_units, dropout=info.dropout)
            if info.head_activation != "relu":
                options["head_activation"] = info.head_activation
        else:
            options["head"] = info.head
    try:
        model = create_model(info.arch, **options)
    except ValueError as exc:
        raise WeightFileError(f"{info.source}: cannot be built as an imgcls_jax {info.arch}: {exc}") from exc
    model.output_activation = info.output_activation
    model.eval()
    return model


def _read_layers(model, plan: ArchPlan, weights: Locator, graph: KerasGraph) -> dict[str, list[np.ndarray]]:
    """``{layer: arrays in Keras's order}`` for every weighted layer of ``model``, read from the
    file (validated: count, shapes, dtypes, finite) or computed by the plan."""
    where, info = weights.where, plan.info
    specs = [s for s in model.layer_specs() if s.name not in plan.computed]
    head = [] if info.include_top else model.head_layer_specs()
    if plan.binary:  # the file's Dense(1): checked as such, converted after
        head = [
            replace(s, shapes=((s.shapes[0][0], 1), (1,))) if s.name == "head_logits" else s for s in head
        ]
    file = FileLayers(Path(where), "keras3" if weights.fmt != "legacy-h5" else "legacy", {})
    by_model = {**plan.base.weights, **plan.head_nodes}
    if weights.by_name:
        by_model.update(_head_by_order(head, weights, {n.name for n in plan.base.weights.values()}))
    for spec in [*specs, *head]:
        node = by_model.get(spec.name)
        if node is None:
            raise WeightFileError(
                f"{where}: the model's layer {spec.name!r} has no counterpart in the Keras model"
            )
        datasets = weights.datasets(node)
        if node.class_name == "Dense" and not node.config.get("use_bias", True) and len(datasets) == 1:
            datasets = [*datasets, np.zeros(spec.shapes[1], np.float32)]  # Dense(use_bias=False)
        file.layers[spec.name] = datasets
    validate(file, [*specs, *head], info.arch)
    arrays = read_arrays(file, [*specs, *head])
    arrays.update(plan.computed)
    if plan.binary:  # sigmoid(z) = softmax([0, z])[1]
        kernel, bias = arrays["head_logits"]
        arrays["head_logits"] = [np.concatenate([np.zeros_like(kernel), kernel], 1),
                                 np.concatenate([np.zeros_like(bias), bias])]  # fmt: skip
    return arrays


def _head_by_order(head, weights: Locator, base_names: set[str]) -> dict[str, Node]:
    """For a weights-only file described by keywords: the head's layers are the file's weighted
    layers that are not the base's, in order."""
    from imgcls_jax.weights.keras_layers import KerasLayer

    rest = [name for name in weights.named() if name not in base_names]
    if len(rest) != len(head):
        raise WeightFileError(
            f"{weights.where}: {len(rest)} weighted layers besides the base in the file ({rest[:6]}), the "
            f"described head has {len(head)}: not this architecture"
        )
    return {spec.name: Node(-1, KerasLayer("Dense", name, {}, "", ""), ()) for spec, name in zip(head, rest)}


def _assign(model, layers: dict[str, list[np.ndarray]]) -> None:
    for name, arrays in layers.items():
        for variable, array in zip(model.keras_variables(name), arrays, strict=True):
            variable.set_value(jnp.asarray(array, dtype=jnp.float32))
