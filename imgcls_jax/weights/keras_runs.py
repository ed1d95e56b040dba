"""An imported Keras model as a run folder that ``imgcls-jax predict`` / ``evaluate`` read.

The folder has the layout ``fit`` writes (see :mod:`imgcls_jax.train.loop`): ``config.json`` (a
:class:`~imgcls_jax.config.TrainConfig` describing the model), ``manifest.csv`` (the class
names, and the images of ``data`` as the ``test`` split when given), and one orbax checkpoint
(step 0, item ``params``) in both ``checkpoints/`` and ``best/``; plus ``keras_import.json``,
the import's :class:`~imgcls_jax.weights.KerasModelInfo`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import fields
from pathlib import Path

log = logging.getLogger(__name__)

#: Model settings that TrainConfig must carry when they differ from these defaults.
_NEEDS_FIELD = {"preprocessing": "caffe", "head_activation": "relu", "output_activation": "softmax"}


def _train_config(info, run_dir: Path, data, seed: int, batch_size: int):
    from imgcls_jax.config import TrainConfig

    height, width, _ = info.input_shape
    if height != width:
        raise ValueError(f"{info.source}: input shape {info.input_shape}: a run's image_size is square")
    known = {f.name for f in fields(TrainConfig)}
    extra = {}
    for key, default in _NEEDS_FIELD.items():
        value = getattr(info, key)
        if key in known:
            extra[key] = value
        elif value != default:
            raise ValueError(
                f"{info.source}: the model's {key} is {value!r}, which a run folder cannot record yet "
                f"(TrainConfig has no {key!r} field; load_run would rebuild it with {default!r})"
            )
    implied_top = info.num_classes in (None, 1000) and not info.head_units and not info.dropout
    if "include_top" in known:
        extra["include_top"] = info.include_top
    elif implied_top != info.include_top:
        raise ValueError(
            f"{info.source}: a run folder cannot record include_top={info.include_top} for this head "
            "(TrainConfig has no 'include_top' field)"
        )
    return TrainConfig(
        data=str(Path(data).absolute()) if data is not None else "",
        run_dir=str(run_dir),
        image_size=int(height),
        batch_size=batch_size,
        model=info.arch,
        weights=None,
        pooling=info.pooling,
        head_units=tuple(info.head_units),
        dropout=info.dropout,
        seed=seed,
        **extra,
    )


def _records(data, class_names):
    from dataclasses import replace

    from imgcls_jax.data import scan_folder

    folder = scan_folder(data, class_names=class_names)
    return [r if r.split else replace(r, split="test") for r in folder.records]


def write_run_folder(
    model, info, run_dir, *, class_names=None, data=None, seed: int = 0, batch_size: int = 32
) -> Path:
    """Write ``model`` (from :func:`~imgcls_jax.weights.from_keras`) as a run folder.

    Args:
      model, info: what ``from_keras`` returned.
      run_dir: a new (or empty) folder.
      class_names: the classes in output order; default ``info.class_names``, else
        ``class_0`` ... (with a warning).
      data: optional image folder (``root/<class>/...``, class folders named as the classes):
        its images become the manifest's ``test`` split (a pre-split folder keeps its splits),
        for ``imgcls-jax evaluate``.
      seed, batch_size: recorded in ``config.json`` (the dropout seed; evaluation batch size).

    Raises:
      ValueError: a model a run folder cannot describe (no head, non-square input, or a setting
        that :class:`~imgcls_jax.config.TrainConfig` has no field for).
      FileExistsError: ``run_dir`` exists and is not empty.
    """
    import orbax.checkpoint as ocp
    from flax import nnx

    from imgcls_jax.data.folders import write_manifest

    if info.num_classes is None:
        raise ValueError(f"{info.source}: the model has no classifier head: it cannot be a run")
    run_dir = Path(run_dir).absolute()
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"{run_dir}: exists and is not empty; choose a new folder")
    names = list(class_names or info.class_names or [])
    if not names:
        names = [f"class_{i}" for i in range(info.num_classes)]
        log.warning("%s: no class names given; using %s", info.source, names)
    if len(names) != info.num_classes:
        raise ValueError(f"{len(names)} class names for a model with {info.num_classes} classes")
    config = _train_config(info, run_dir, data, seed, batch_size)
    records = _records(data, names) if data is not None else []
    run_dir.mkdir(parents=True, exist_ok=True)
    config.to_json(run_dir / "config.json")
    write_manifest(run_dir / "manifest.csv", records, names, root=config.data or None)
    (run_dir / "keras_import.json").write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for sub in ("checkpoints", "best"):
        with ocp.CheckpointManager(run_dir / sub) as manager:
            manager.save(0, args=ocp.args.Composite(params=ocp.args.StandardSave(params)))
            manager.wait_until_finished()
    log.info("wrote run folder %s (%d classes, %d images)", run_dir, len(names), len(records))
    return run_dir
