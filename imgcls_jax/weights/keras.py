"""Read (and write) Keras weight files: legacy HDF5 and Keras 3 ``.weights.h5``.

Two layouts are read:

* **legacy HDF5** (Keras 1/2, and the keras-applications ImageNet files): the root (or a
  ``model_weights`` group, for whole-model saves) has a ``layer_names`` attribute; each layer
  group has a ``weight_names`` attribute, and the weights are the datasets at those paths,
  in Keras's order (kernel, bias; BatchNorm: gamma, beta, moving mean, moving variance). Names
  are whatever the writer chose: the published VGG16 files use Keras-1 names such as
  ``block1_conv1_W_1:0``, Keras 2 writes ``block1_conv1/kernel:0``.
* **Keras 3** ``.weights.h5``: ``layers/<key>/vars/<i>``, where ``<key>`` is a class-based
  path (``conv2d``, ``conv2d_1``, ..., ``dense_2``) and ``vars`` carries the layer's real name
  in its ``name`` attribute when the writer recorded it.

Layers Keras named after their class (``normalization``) may carry a session number in a file
(``normalization_2``): they are matched by that prefix. A layer the published files name
otherwise (a spec's ``aliases``: keras-applications' ``probs`` and ``Logits`` tops) is matched by
that name; Keras itself loads those files by layer order.

Everything is validated against the model's layer specs (names, count, shapes) from the file's
structure alone, before any array is read, so a wrong file never half-loads a model.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from imgcls_jax.models.base import LayerSpec

#: Layers of a Keras classification top: VGG's three, the other families' ``predictions``.
TOP_LAYERS = ("fc1", "fc2", "predictions")
#: Every name a Keras top layer has in the published files: those, the top dense layer as
#: keras-applications named it for ResNet (``probs``) and MobileNetV2 (``Logits``), and
#: MobileNetV3's and MobileNet's top convolutions (``conv_2``, ``logits``; ``conv_preds``).
TOP_NAMES = frozenset(TOP_LAYERS) | {"probs", "Logits", "conv_2", "logits", "conv_preds"}
#: ConvNeXt's top: ``<model name>_head_layernorm`` and ``<model name>_head_dense``.
_TOP_PATTERN = re.compile(r".+_head_(layernorm|dense)")


def is_top_layer(name: str) -> bool:
    """Whether ``name`` is a layer of a Keras application's classification top (:data:`TOP_NAMES`,
    ConvNeXt's ``*_head_layernorm`` / ``*_head_dense``)."""
    return name in TOP_NAMES or bool(_TOP_PATTERN.fullmatch(name))


#: A layer name only one family's files have -> that family, for "it looks like" hints.
FAMILY_MARKERS = {  # the more specific first: Xception has VGG's block1_conv1, DenseNet ResNet's conv1_conv
    "block1_conv1_bn": "Xception",
    "pool2_conv": "DenseNet",
    "block35_1_conv": "InceptionResNetV2",
    "conv_dw_1": "MobileNet",
    "normal_conv_1_0": "NASNet",
    "block1_conv1": "VGG",
    "conv1_conv": "ResNet",
    "bn_Conv1": "MobileNetV2",
    "stem_conv": "EfficientNet",
}


class WeightFileError(ValueError):
    """A weight file that cannot be loaded into the requested model; the message says why."""


@dataclass
class FileLayers:
    """Structure of a weight file: Keras layer name -> its datasets, in Keras's weight order."""

    path: Path
    layout: str  # "legacy" or "keras3"
    layers: dict[str, list]  # name -> list of h5py.Dataset (not read yet)
    backend: str | None = None


def _decode(values: Iterable) -> list[str]:
    return [v.decode("utf8") if isinstance(v, bytes) else str(v) for v in values]


def _open(path: Path):
    import h5py

    if not path.is_file():
        raise WeightFileError(f"{path}: no such file")
    try:
        return h5py.File(path, "r")
    except OSError as exc:  # not HDF5, truncated, unreadable
        size = path.stat().st_size
        raise WeightFileError(
            f"{path}: not a readable HDF5 file ({size} bytes): {exc}. "
            "Expected a Keras weight file (.h5 or .weights.h5); it may be truncated or corrupt: "
            "download it again."
        ) from exc


def _nested_layers(name: str, wnames: Sequence[str], datasets: list) -> dict[str, list]:
    """A legacy group's weights by layer: a nested model (ConvNeXt's ``Sequential`` stem and
    downsampling blocks) is one group whose weights name their own layers
    (``convnext_tiny_stem/convnext_tiny_stem_conv/kernel``, or ``convnext_tiny_stem_conv/kernel:0``
    in Keras 2's files): it is split by those names. A plain layer keeps its group's name."""
    owners = [w.split("/")[-2] if w.count("/") >= 1 else None for w in wnames]
    if None in owners or len(set(owners)) < 2:
        return {name: datasets}
    split: dict[str, list] = {}
    for owner, dataset in zip(owners, datasets):
        split.setdefault(owner, []).append(dataset)
    return split


def _legacy_layers(path: Path, root) -> FileLayers:
    layers = {}
    for name in _decode(root.attrs["layer_names"]):
        if name not in root:
            raise WeightFileError(f"{path}: layer_names lists {name!r} but the file has no such group")
        group = root[name]
        if "weight_names" not in group.attrs:
            raise WeightFileError(f"{path}: layer {name!r} has no 'weight_names' attribute")
        datasets, wnames = [], _decode(group.attrs["weight_names"])
        for wname in wnames:
            if wname not in group:
                raise WeightFileError(f"{path}: layer {name!r} lists weight {wname!r}, which is missing")
            datasets.append(group[wname])
        if datasets:
            layers.update(_nested_layers(name, wnames, datasets))
    backend = root.attrs.get("backend")
    backend = backend.decode() if isinstance(backend, bytes) else backend
    return FileLayers(path, "legacy", layers, backend)


def _suffix_number(key: str) -> int:
    match = re.search(r"_(\d+)$", key)
    return int(match.group(1)) if match else 0


def _keras3_layers(path: Path, root) -> FileLayers:
    """Collect ``layers/**/vars`` groups with datasets, recursing into nested models."""
    found: list[tuple[str, list]] = []

    def walk(group, prefix: str):
        keys = sorted(group.keys(), key=lambda k: (re.sub(r"_\d+$", "", k), _suffix_number(k)))
        for key in keys:
            sub = group[key]
            if "vars" in sub and len(sub["vars"]):
                vars_group = sub["vars"]
                name = vars_group.attrs.get("name", key)
                name = name.decode() if isinstance(name, bytes) else str(name)
                datasets = [vars_group[k] for k in sorted(vars_group.keys(), key=int)]
                found.append((name, datasets))
            if "layers" in sub:
                walk(sub["layers"], f"{prefix}{key}/")

    walk(root["layers"], "")
    return FileLayers(path, "keras3", dict(found))


def read_structure(h5file, path: Path) -> FileLayers:
    """Identify the layout of an open HDF5 file and list its weighted layers (no data read)."""
    root = h5file["model_weights"] if "model_weights" in h5file else h5file
    if "layer_names" in root.attrs:
        return _legacy_layers(path, root)
    if "layers" in h5file:
        return _keras3_layers(path, h5file)
    raise WeightFileError(
        f"{path}: HDF5 file is not a Keras weight file (no 'layer_names' attribute, "
        f"no 'layers' group; top-level keys: {sorted(h5file.keys())[:10]})"
    )


def _rename_keras3_by_order(file: FileLayers, specs: Sequence[LayerSpec]) -> None:
    """Keras 3 files without layer names: map conv2d*, dense* keys to specs in order."""
    if all(spec.name in file.layers for spec in specs):
        return
    convs = [k for k in file.layers if re.fullmatch(r"conv2d(_\d+)?", k)]
    denses = [k for k in file.layers if re.fullmatch(r"dense(_\d+)?", k)]
    if len(convs) + len(denses) != len(file.layers):
        return  # names are something else: validation reports it
    want_convs = [s.name for s in specs if "conv" in s.name]
    want_dense = [s.name for s in specs if "conv" not in s.name]
    if len(denses) == len(TOP_LAYERS):  # name a file's top as such even for a no-top model
        want_dense = list(TOP_LAYERS)
    renamed = dict(zip(want_convs, (file.layers[k] for k in convs)))
    renamed.update(zip(want_dense, (file.layers[k] for k in denses)))
    extra = convs[len(want_convs) :] + denses[len(want_dense) :]
    renamed.update({k: file.layers[k] for k in extra})
    file.layers = renamed


#: Keras's names for layers it was given no name for: the class's name, numbered after the first.
AUTO_NAMED = (
    "conv2d", "batch_normalization", "normalization", "layer_normalization", "separable_conv2d",
    "depthwise_conv2d",
)  # fmt: skip


def _numbered(prefix: str, names: Iterable[str]) -> list[str]:
    """``names`` that are ``prefix`` or ``prefix_<n>``, in the order of ``n`` (none first)."""
    pattern = re.compile(rf"{re.escape(prefix)}(?:_(\d+))?")
    found = [(m, n) for n in names if (m := pattern.fullmatch(n))]
    return [n for m, n in sorted(found, key=lambda mn: int(mn[0].group(1) or -1))]


def _match_numbered_names(file: FileLayers, specs: Sequence[LayerSpec]) -> None:
    """Keras names a layer it was given no name for after its class (``normalization``,
    ``conv2d``, ``batch_normalization``) and numbers them in the order a session creates them
    (``conv2d``, ``conv2d_1``, ...; Keras 2 starts at ``conv2d_1``, and a session that built
    other models first goes on from their count). A model names such layers as a fresh Keras 3
    session would; where the file's layers of such a class differ from the model's in names but
    not in number, they are matched by their numbers' order (Keras itself loads by order)."""
    for prefix in AUTO_NAMED:
        ours = _numbered(prefix, (s.name for s in specs))
        theirs = _numbered(prefix, file.layers)
        if not ours or set(ours) == set(theirs) or len(ours) != len(theirs):
            continue
        renamed = dict(zip(theirs, ours))
        file.layers = {renamed.get(k, k): v for k, v in file.layers.items()}


def _apply_aliases(file: FileLayers, specs: Sequence[LayerSpec]) -> None:
    """Rename a file's layer that carries one of a spec's ``aliases`` to the spec's name."""
    for spec in specs:
        alias = next((a for a in spec.aliases if a in file.layers), None)
        if spec.name not in file.layers and alias is not None:
            file.layers = {spec.name if k == alias else k: v for k, v in file.layers.items()}


def _is_classifier(name: str) -> bool:
    """The layer whose outputs are the classes (Keras's top, or our transfer head's)."""
    return name in ("predictions", "logits", "conv_preds", "head_logits") or name.endswith("_head_dense")


def _family_hint(arch: str, missing: Sequence[str], extra: Sequence[str]) -> str:
    """`` (it looks like a <family> file)`` when the unexpected layers say whose file it is."""
    if any(re.fullmatch(r"block[34]_conv4", n) for n in extra):
        return " (it looks like a VGG19 file)"
    if any(re.fullmatch(r"block[34]_conv4", n) for n in missing):
        return " (it looks like a VGG16 file)"
    for marker, family in FAMILY_MARKERS.items():
        if marker in extra and not arch.lower().startswith(family.lower()):
            return f" (it looks like a {family} file)"
    return ""


def _check_names(file: FileLayers, specs: Sequence[LayerSpec], arch: str) -> None:
    """``WeightFileError`` unless ``file`` has exactly the layers ``specs`` name; a top file for
    a top-less model (and the reverse) is said as such."""
    path = file.path
    expected = [s.name for s in specs]
    found = list(file.layers)
    missing = [n for n in expected if n not in file.layers]
    extra = [n for n in found if n not in expected]
    model_top = any(is_top_layer(n) for n in expected)
    # (ConvNeXt's models without the top end with a layer the top has not: it may be missing)
    if not model_top and extra and all(is_top_layer(n) for n in extra) and len(missing) <= 1:
        raise WeightFileError(
            f"{path}: file has the classification top ({', '.join(extra)}) but the model was built "
            f"with include_top=False: use the '_notop' file, or include_top=True"
        )
    if model_top and missing and all(is_top_layer(n) for n in missing) and len(extra) <= 1:
        raise WeightFileError(
            f"{path}: file has no classification top ({', '.join(missing)} missing: a '_notop' "
            f"file) but the model was built with include_top=True: use the top file, or "
            f"include_top=False"
        )
    if missing or extra:
        raise WeightFileError(
            f"{path}: layers do not match {arch}{_family_hint(arch, missing, extra)}: expected "
            f"{len(expected)} weighted layers, found {len(found)}; missing {missing[:6]}"
            f"{'...' if len(missing) > 6 else ''}, unexpected {extra[:6]}{'...' if len(extra) > 6 else ''}"
        )


def validate(file: FileLayers, specs: Sequence[LayerSpec], arch: str) -> None:
    """Raise :class:`WeightFileError` unless ``file`` provides exactly ``specs`` (names, number
    of weights, shapes, float dtypes); see the module docstring for the names matched."""
    _match_numbered_names(file, specs)
    if file.layout == "keras3":
        _rename_keras3_by_order(file, specs)
    _apply_aliases(file, specs)
    _check_names(file, specs, arch)
    for spec in specs:
        _check_layer(file, spec)


def _check_layer(file: FileLayers, spec: LayerSpec) -> None:
    """Raise :class:`WeightFileError` unless ``file``'s layer ``spec.name`` has ``spec``'s number of
    weights, their shapes, and float dtypes (a ``count``, as Keras's Normalization keeps, may be
    an integer)."""
    datasets = file.layers[spec.name]
    shapes = [tuple(d.shape) for d in datasets]
    if len(shapes) != len(spec.shapes):
        msg = (
            f"{file.path}: layer {spec.name!r}: expected {len(spec.shapes)} weights "
            f"({', '.join(spec.weight_names)}), found {len(shapes)}"
        )
        if "moving_variance" in spec.weight_names and len(shapes) < len(spec.shapes):
            found = ", ".join(str(getattr(d, "name", "?")).rsplit("/", 1)[-1] for d in datasets)
            msg += (
                f" (in the file: {found}): its BatchNorm moving statistics are missing. A Keras file "
                "of this model holds all four BatchNorm weights (gamma, beta, moving_mean, "
                "moving_variance); save it with model.save_weights()"
            )
        raise WeightFileError(msg)
    for what, want, got in zip(spec.weight_names, spec.shapes, shapes):
        if want == got:
            continue
        msg = f"{file.path}: layer {spec.name!r} {what}: expected shape {want}, found {got}"
        if len(want) == 4 and got == (want[3], want[2], want[0], want[1]):
            msg += (
                "; this is a Theano/channels-first (OIHW) kernel "
                f"(file backend: {file.backend or 'unknown'}): use the "
                "'tf_dim_ordering' (HWIO) file"
            )
        elif _is_classifier(spec.name) and got[:-1] == want[:-1]:
            msg += (
                f"; the file has {got[-1]} classes, the model {want[-1]}: for a different "
                "number of classes use include_top=False with num_classes"
            )
        raise WeightFileError(msg)
    for what, dataset in zip(spec.weight_names, datasets):
        counter = what == "count" and np.issubdtype(dataset.dtype, np.integer)  # Normalization's
        if not (np.issubdtype(dataset.dtype, np.floating) or counter):
            raise WeightFileError(
                f"{file.path}: layer {spec.name!r} {what} has dtype {dataset.dtype}, expected float"
            )


def read_arrays(file: FileLayers, specs: Sequence[LayerSpec]) -> dict[str, list[np.ndarray]]:
    """Read the validated datasets as float32 numpy arrays; reject non-finite values and
    negative BatchNorm moving variances."""
    out = {}
    for spec in specs:
        arrays = []
        for what, dataset in zip(spec.weight_names, file.layers[spec.name], strict=True):
            array = np.asarray(dataset[()], dtype=np.float32)
            if not np.isfinite(array).all():
                raise WeightFileError(
                    f"{file.path}: layer {spec.name!r} {what} contains NaN or infinite values"
                )
            if what == "moving_variance" and (array < 0).any():
                raise WeightFileError(
                    f"{file.path}: layer {spec.name!r} moving_variance has negative values "
                    f"(min {array.min():.3g}); a variance is >= 0: the file is corrupt"
                )
            arrays.append(array)
        out[spec.name] = arrays
    return out


def read_keras_weights(
    path, specs: Sequence[LayerSpec], arch: str
) -> tuple[dict[str, list[np.ndarray]], str]:
    """Read a Keras weight file for a model with ``specs``: ``({name: [arrays in Keras's order]},
    layout)``.

    Raises :class:`WeightFileError` naming the file, the layer and expected vs found for every
    mismatch, before reading any array.
    """
    path = Path(path)
    with _open(path) as h5file:
        file = read_structure(h5file, path)
        validate(file, specs, arch)
        return read_arrays(file, specs), file.layout


def write_legacy_h5(
    path,
    layers: Mapping[str, Sequence[np.ndarray]],
    layer_names: Sequence[str] | None = None,
    weight_names: str = "applications",
) -> None:
    """Write weights in the legacy Keras HDF5 layout (readable by ``keras.Model.load_weights``).

    Args:
      path: output ``.h5`` file.
      layers: Keras layer name -> ``[kernel, bias]`` arrays (HWIO kernels), or a mapping weight
        name -> array in Keras's order (``{"gamma": ..., "beta": ..., "moving_mean": ...}``),
        written with Keras 2 names (``stem_bn/gamma:0``) whatever ``weight_names`` says.
      layer_names: all layer names in model order, weightless ones (pools, input) included;
        defaults to the keys of ``layers``.
      weight_names: ``"applications"`` for the keras-applications style (``block1_conv1_W_1:0``,
        ``block1_conv1_b_1:0``) or ``"keras2"`` (``block1_conv1/kernel:0``).
    """
    import h5py

    layer_names = list(layer_names if layer_names is not None else layers)
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in layer_names])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for name in layer_names:
            group = f.create_group(name)
            arrays = layers.get(name, ())
            if isinstance(arrays, Mapping):
                names, arrays = [f"{name}/{k}:0" for k in arrays], list(arrays.values())
            elif weight_names == "applications":
                names = [f"{name}_{k}_1:0" for k in ("W", "b")][: len(arrays)]
            elif weight_names == "keras2":
                names = [f"{name}/{k}:0" for k in ("kernel", "bias")][: len(arrays)]
            else:
                raise ValueError(f"weight_names must be 'applications' or 'keras2', got {weight_names!r}")
            if len(names) < len(arrays):
                raise ValueError(
                    f"layer {name!r} has {len(arrays)} weights: pass them as a mapping weight name -> array"
                )
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for wname, array in zip(names, arrays):
                group.create_dataset(wname, data=np.asarray(array))
