"""Ported weights as an orbax checkpoint: ``imgcls-jax port-weights file.h5 out_dir``.

``out_dir/params/`` holds the Keras-named layers' weights (``{layer: {weight name: array}}``,
float32, named as :attr:`~imgcls_jax.models.LayerSpec.weight_names`: kernel, bias; BatchNorm's
gamma, beta, moving_mean, moving_variance) as an orbax checkpoint and
``out_dir/imgcls_jax_weights.json`` says what they are (architecture, top or not,
preprocessing, source file). ``load_weights(model, out_dir)`` and
``create_model(..., weights=out_dir)`` read it back with the same validation as a Keras file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from imgcls_jax.weights.keras import FileLayers, WeightFileError, validate

META = "imgcls_jax_weights.json"


def is_ported_dir(path) -> bool:
    return Path(path).is_dir() and (Path(path) / META).is_file()


def save_ported(model, out_dir, *, source: str, preprocessing: str) -> Path:
    """Write ``model``'s Keras-named layers (the ones its weight files provide) to ``out_dir``."""
    import orbax.checkpoint as ocp

    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty; choose a new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    layers = {
        spec.name: {
            what: np.asarray(variable.get_value())
            for what, variable in zip(spec.weight_names, model.keras_variables(spec.name), strict=True)
        }
        for spec in model.layer_specs()
    }
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out_dir / "params", layers)
    meta = {
        "arch": model.arch,
        "include_top": model.include_top,
        "num_classes": model.num_classes if model.include_top else None,
        "preprocessing": preprocessing,
        "source": str(source),
        "layers": [spec.name for spec in model.layer_specs()],
    }
    (out_dir / META).write_text(json.dumps(meta, indent=2) + "\n")
    return out_dir


def read_ported(path, specs, arch: str) -> tuple[dict, dict]:
    """``(layers {name: [weights in Keras's order]}, meta)`` from a ported folder, validated
    against ``specs`` (a weight missing from a layer is reported by the validation)."""
    import orbax.checkpoint as ocp

    path = Path(path).absolute()
    meta = json.loads((path / META).read_text())
    if meta.get("arch") != arch:
        raise WeightFileError(f"{path}: ported weights of {meta.get('arch')!r}, but the model is {arch!r}")
    with ocp.StandardCheckpointer() as checkpointer:
        raw = checkpointer.restore(path / "params")
    order = {spec.name: spec.weight_names for spec in specs}
    layers = {
        name: [np.asarray(v[w]) for w in order.get(name, sorted(v)) if w in v] for name, v in raw.items()
    }
    validate(FileLayers(path, "ported", layers), specs, arch)
    return layers, meta
