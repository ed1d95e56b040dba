"""Whole Keras models in: ``from_keras(path)`` -> an imgcls_jax VGG with the same predictions.

Reads, without Keras (zipfile + json + h5py):

* a Keras 3 ``.keras`` archive (``config.json`` + ``model.weights.h5``);
* a whole-model legacy ``.h5`` (Keras 2 / tf.keras ``model.save("x.h5")``, or Keras 3's legacy
  writer): the ``model_config`` attribute and the ``model_weights`` group;
* weights only (Keras 3 ``.weights.h5``, Keras 2 ``save_weights("x.h5")``) with the
  architecture given separately: ``architecture=`` a ``.keras`` archive, a JSON file holding a
  Keras model config (``model.to_json()``, an archive's ``config.json``) or that config as a
  dict; or as keywords (``arch``, ``pooling``, ``head_units``, ``num_classes``, ...), in which case
  the file's weighted layers are taken in order (convolutions, then Dense layers).

The architecture is matched as :mod:`imgcls_jax.weights.keras_arch` describes; every weight is
read and checked (shape, dtype, finite) before a model is built, so a file that does not fit
raises :class:`~imgcls_jax.weights.WeightFileError` and nothing is half loaded.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax.models.vgg import VGG
from imgcls_jax.weights.keras import WeightFileError, _open
from imgcls_jax.weights.keras_arch import ArchPlan, KerasModelInfo, match_architecture
from imgcls_jax.weights.keras_layers import flatten_model

log = logging.getLogger(__name__)

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
#: Keywords describing the architecture of a weights-only file (see :func:`from_keras`).
HEAD_KEYWORDS = (
    "pooling",
    "head_units",
    "head_activation",
    "dropout",
    "num_classes",
    "keras_output",
    "nested",
)


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
) -> tuple[VGG, KerasModelInfo]:
    """Import a Keras VGG16/VGG19 transfer model: ``(model, info)``.

    Args:
      path: ``.keras`` archive, whole-model ``.h5``, or a weights-only ``.weights.h5`` / ``.h5``.
      architecture: for a weights-only file: a ``.keras`` archive, a JSON file or dict holding
        the Keras model config. Alternatively describe it with keywords (``head``).
      preprocessing: what you apply to raw RGB pixels (``[0, 255]``) before calling the Keras
        model: ``"caffe"`` (``keras.applications.vgg16.preprocess_input``), ``"tf"``,
        ``"torch"``, ``"unit"`` (``/255``) or ``"none"`` (raw pixels). Default: ``"none"`` when
        the model starts with ``Rescaling`` (or similar) layers, else ``"caffe"``. The imported
        model takes raw pixels and applies the equivalent itself (``info.preprocessing``).
      arch: ``"vgg16"`` or ``"vgg19"`` to insist on one (default: whichever the file holds).
      input_shape: ``(H, W, 3)``; needed when the Keras model's input size is not fixed and
        its head flattens the feature map (default for a pooled head: 224x224).
      class_names: the class names, in the model's output order (Keras keeps none).
      dtype: compute dtype of the imported model; parameters are float32.
      seed: seeds the model's dropout stream (every weight comes from the file).
      head: for a weights-only file without ``architecture``: ``pooling`` ("avg", "max" or
        None), ``head_units``, ``head_activation``, ``dropout``, ``num_classes`` (the Keras
        output's width: 1 for a binary sigmoid), ``keras_output`` ("softmax", "sigmoid",
        "linear") and ``arch`` (default "vgg16").

    Returns:
      The model (inference mode; it takes raw RGB pixels ``[N, H, W, 3]`` and returns logits
      ``float32[N, K]``; ``model.probabilities(logits)`` gives what the Keras model outputs,
      except that a linear Keras output becomes a softmax) and a :class:`KerasModelInfo`.

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
    flat = flatten_model(config, where)
    plan = match_architecture(flat, where, preprocessing=preprocessing, arch=arch, input_shape=input_shape)
    by_order = architecture is None and config.get("_imgcls_jax_from_keywords", False)
    arrays = _read_weights(path, fmt, plan, by_order)
    names = None if class_names is None else tuple(str(c) for c in class_names)
    if names is not None and len(names) != plan.info.num_classes:
        raise ValueError(
            f"{where}: {len(names)} class names for a model with {plan.info.num_classes} classes"
        )
    info = replace(plan.info, class_names=names, source=where, format=fmt, keras_version=keras_version)
    model = build_model(info, arrays, dtype=dtype, seed=seed)
    for note in info.notes:
        log.info("%s: %s", where, note)
    log.info("imported %s (%s, %s) from %s", info.arch, fmt, _summary(info), where)
    return model, info


def _summary(info: KerasModelInfo) -> str:
    if info.include_top:
        return f"Keras top, {info.num_classes} classes"
    return f"pooling {info.pooling}, head {list(info.head_units)}, {info.num_classes} classes"


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

    config = keras_config_for(arch=arch or "vgg16", input_shape=input_shape, **head)
    config["_imgcls_jax_from_keywords"] = True
    return fmt, config, version


def _split_legacy(arrays: list) -> list[list]:
    """A legacy group's weights (kernel, bias, kernel, ...) split per layer by their ranks."""
    layers: list[list] = []
    for array in arrays:
        if len(array.shape) >= 2 or not layers or len(layers[-1]) != 1:
            layers.append([array])
        else:
            layers[-1].append(array)
    return layers


def _key(path: str):
    return [
        (re.sub(r"_\d+$", "", p), int(m.group(1)) if (m := re.search(r"_(\d+)$", p)) else 0)
        for p in path.split("/")
    ]


def _datasets_in_order(h5file, fmt: str) -> list[list]:
    """Every weighted layer's datasets in model order (convolutions, then Dense layers)."""
    if fmt == "legacy-h5":
        root = h5file["model_weights"] if "model_weights" in h5file else h5file
        found = []
        for name in root.attrs["layer_names"]:
            group = root[name.decode() if isinstance(name, bytes) else name]
            found += _split_legacy(
                [group[w.decode() if isinstance(w, bytes) else w] for w in group.attrs["weight_names"]]
            )
    else:
        groups = []
        h5file["layers"].visititems(  # the model's layers (not an optimizer's variables)
            lambda name, obj: groups.append(f"layers/{name}") if name.endswith("vars") and len(obj) else None
        )
        found = [[h5file[g][k] for k in sorted(h5file[g], key=int)] for g in sorted(groups, key=_key)]
    return sorted(found, key=lambda ds: -len(ds[0].shape))  # stable: 4-D kernels first


def _datasets_exact(h5file, fmt: str, plan: ArchPlan, where: str) -> list[list]:
    out = []
    root = h5file["model_weights"] if "model_weights" in h5file else h5file
    for ours, layer in plan.layers:
        if fmt == "legacy-h5":
            if layer.legacy_group not in root:
                raise WeightFileError(
                    f"{where}: no weights group {layer.legacy_group!r} for layer {layer.name!r}"
                )
            group = root[layer.legacy_group]
            names = [w.decode() if isinstance(w, bytes) else w for w in group.attrs["weight_names"]]
            wanted = names[layer.legacy_index : layer.legacy_index + layer.num_weights]
            datasets = [group[w] for w in wanted if w in group]
        else:
            if layer.keras3_path not in h5file:
                raise WeightFileError(f"{where}: no weights at {layer.keras3_path} for layer {layer.name!r}")
            group = h5file[layer.keras3_path]
            saved = group.attrs.get("name")
            saved = saved.decode() if isinstance(saved, bytes) else saved
            if saved is not None and saved != layer.name:
                raise WeightFileError(
                    f"{where}: weights at {layer.keras3_path} belong to layer {saved!r}, the architecture "
                    f"puts {layer.name!r} there: the weights are not of this model"
                )
            datasets = [group[k] for k in sorted(group, key=int)]
        if len(datasets) != layer.num_weights:
            raise WeightFileError(
                f"{where}: layer {layer.name!r} ({ours}) has {len(datasets)} weights, "
                f"expected {layer.num_weights}"
            )
        out.append(datasets)
    return out


def _read_weights(path: Path, fmt: str, plan: ArchPlan, by_order: bool) -> dict[str, list[np.ndarray]]:
    """``{VGG layer name: [kernel, bias]}`` float32, validated against the planned shapes."""
    where = str(path)
    with tempfile.TemporaryDirectory() as tmp:
        h5_path = path
        if fmt == "keras3-archive":
            with zipfile.ZipFile(path) as archive:
                try:
                    h5_path = Path(archive.extract("model.weights.h5", tmp))
                except (zipfile.BadZipFile, EOFError, OSError) as exc:
                    raise WeightFileError(
                        f"{where}: model.weights.h5 cannot be read from the archive: {exc}"
                    ) from exc
        with _open(h5_path) as h5file:
            if by_order:
                datasets = _datasets_in_order(h5file, fmt)
                if len(datasets) != len(plan.layers):
                    raise WeightFileError(
                        f"{where}: {len(datasets)} weighted layers in the file, the described model has "
                        f"{len(plan.layers)} (... {', '.join(n for n, _ in plan.layers[-3:])}): "
                        "not this architecture"
                    )
            else:
                datasets = _datasets_exact(h5file, fmt, plan, where)
            expected = expected_shapes(plan.info)
            return {
                ours: _checked(where, ours, layer.name, ds, expected[ours], plan.info)
                for (ours, layer), ds in zip(plan.layers, datasets)
            }


def _checked(where, ours, keras_name, datasets, want, info) -> list[np.ndarray]:
    kernel_shape, bias_shape = want
    binary = ours == "head_logits" and info.keras_output == "sigmoid" and info.keras_output_units == 1
    if binary:
        kernel_shape, bias_shape = (kernel_shape[0], 1), (1,)
    got = [tuple(d.shape) for d in datasets]
    if got[0] != kernel_shape or (len(got) > 1 and got[1] != bias_shape):
        raise WeightFileError(
            f"{where}: layer {keras_name!r} ({ours}): weight shapes {got}, "
            f"expected {[kernel_shape, bias_shape]}"
        )
    arrays = []
    for d in datasets:
        if not np.issubdtype(d.dtype, np.floating):
            raise WeightFileError(f"{where}: layer {keras_name!r} has {d.dtype} weights, expected float")
        array = np.asarray(d[()], np.float32)
        if not np.isfinite(array).all():
            raise WeightFileError(f"{where}: layer {keras_name!r} has NaN or infinite weights")
        arrays.append(array)
    if len(arrays) == 1:  # Dense(use_bias=False)
        arrays.append(np.zeros(bias_shape, np.float32))
    if binary:  # sigmoid(z) = softmax([0, z])[1]
        kernel, bias = arrays
        arrays = [
            np.concatenate([np.zeros_like(kernel), kernel], 1),
            np.concatenate([np.zeros_like(bias), bias]),
        ]
    return arrays


def _vgg_kwargs(info: KerasModelInfo) -> dict:
    return {
        "include_top": info.include_top,
        "pooling": info.pooling,
        "num_classes": info.num_classes,
        "head_units": info.head_units,
        "dropout": info.dropout,
        "input_shape": tuple(info.input_shape),
        "preprocessing": info.preprocessing,
        "head_activation": info.head_activation,
        "output_activation": info.output_activation,
    }


def expected_shapes(info: KerasModelInfo) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """``{layer: (kernel shape, bias shape)}`` of the VGG ``info`` describes (nothing allocated)."""
    try:
        abstract = nnx.eval_shape(lambda: VGG(info.arch, **_vgg_kwargs(info), rngs=nnx.Rngs(0)))
    except ValueError as exc:
        raise WeightFileError(
            f"{info.source or 'Keras model'}: cannot be built as an imgcls_jax VGG: {exc}"
        ) from exc
    names = [n for n in (*abstract.base_layers, *abstract.head_layers)]
    return {n: (getattr(abstract, n).kernel.shape, getattr(abstract, n).bias.shape) for n in names}


def build_model(
    info: KerasModelInfo, arrays: dict[str, list[np.ndarray]], *, dtype="float32", seed: int = 0
) -> VGG:
    """The VGG ``info`` describes, with ``arrays`` ({layer: [kernel, bias]}) as its parameters."""
    try:
        model = VGG(
            info.arch,
            **_vgg_kwargs(info),
            dtype=jnp.dtype(dtype),
            rngs=nnx.Rngs(params=seed, dropout=seed + 1),
        )
    except ValueError as exc:
        raise WeightFileError(f"{info.source}: cannot be built as an imgcls_jax VGG: {exc}") from exc
    for name, (kernel, bias) in arrays.items():
        layer = getattr(model, name)
        layer.kernel.set_value(jax.device_put(jnp.asarray(kernel, jnp.float32)))
        layer.bias.set_value(jnp.asarray(bias, jnp.float32))
    model.eval()
    return model
