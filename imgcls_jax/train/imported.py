"""Models that come from elsewhere: a Keras model as a run folder (:func:`write_run_folder`), and
a whole model (head included) to start training from (:func:`initialize_from`,
``TrainConfig.init_from``).

The run folder has the layout ``fit`` writes (:mod:`imgcls_jax.train.rundir`): ``config.json`` (a
:class:`~imgcls_jax.config.TrainConfig` describing the model), ``manifest.csv`` (the class
names, and the images of ``data`` as the ``test`` split when given), and one checkpoint (epoch 0,
item ``params``) in both ``checkpoints/`` and ``best/``; plus ``keras_import.json``, the import's
:class:`~imgcls_jax.weights.KerasModelInfo`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from flax import nnx

from imgcls_jax.config import TrainConfig
from imgcls_jax.train.checkpoints import Checkpoints, model_items, restore_model
from imgcls_jax.train.rundir import RunDir

log = logging.getLogger(__name__)

#: What ``keras_import.json`` is called in a run folder written by :func:`write_run_folder`.
IMPORT_RECORD = "keras_import.json"


def _train_config(info, run_dir: Path, data, seed: int, batch_size: int) -> TrainConfig:
    """The config describing the imported model: its family, pooling, head (the classic options
    when they express it, else ``head``), preprocessing, output; one phase training what the Keras
    model's ``trainable`` flags train (``trainable="keras"``)."""
    from imgcls_jax.config import PhaseConfig

    height, width, _ = info.input_shape
    if height != width:
        raise ValueError(f"{info.source}: input shape {info.input_shape}: a run's image_size is square")
    implied_top = (
        info.num_classes in (None, 1000) and info.classic and not info.head_units and not info.dropout
    )
    if info.include_top and not implied_top:
        raise ValueError(
            f"{info.source}: a run folder cannot record Keras's own top with {info.num_classes} classes "
            "(a config builds it for 1000 classes only)"
        )
    if info.include_top:
        head = {"head_units": (), "dropout": 0.0}
    elif info.classic and not implied_top:
        head = {"head_units": tuple(info.head_units), "dropout": info.dropout}
        head["head_activation"] = info.head_activation
    else:
        head = {"head": tuple(info.head), "head_units": (), "dropout": 0.0}
    # init_from: the model starts from the Keras file (training from this config fine-tunes it)
    return TrainConfig(
        data=str(Path(data).absolute()) if data is not None else "", run_dir=str(run_dir),
        init_from=str(Path(info.source).absolute()),
        image_size=int(height), batch_size=batch_size, model=info.arch, weights=None, pooling=info.pooling,
        seed=seed, preprocessing=info.preprocessing, output_activation=info.output_activation,
        phases=[PhaseConfig(trainable="keras")], **head, **info.family_options,
    )  # fmt: skip


def _records(data, class_names):
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
      ValueError: a model a run folder cannot describe (no head, non-square input).
      FileExistsError: ``run_dir`` exists and is not empty.
    """
    from imgcls_jax.data.folders import write_manifest

    if info.num_classes is None:
        raise ValueError(f"{info.source}: the model has no classifier head: it cannot be a run")
    run = RunDir(run_dir)
    if run.root.exists() and any(run.root.iterdir()):
        raise FileExistsError(f"{run.root}: exists and is not empty; choose a new folder")
    names = list(class_names or info.class_names or [])
    if not names:
        names = [f"class_{i}" for i in range(info.num_classes)]
        log.warning("%s: no class names given; using %s", info.source, names)
    if len(names) != info.num_classes:
        raise ValueError(f"{len(names)} class names for a model with {info.num_classes} classes")
    config = _train_config(info, run.root, data, seed, batch_size)
    records = _records(data, names) if data is not None else []
    run.root.mkdir(parents=True, exist_ok=True)
    config.to_json(run.config)
    write_manifest(run.manifest, records, names, root=config.data or None)
    (run.root / IMPORT_RECORD).write_text(json.dumps(info.to_dict(), indent=2) + "\n")
    run.write_history([])
    with Checkpoints(run, keep=1, monitor="val_accuracy", mode_max=True) as checkpoints:
        checkpoints.save(0, model_items(model), {"val_loss": 0.0, "val_accuracy": 0.0})
    log.info("wrote run folder %s (%d classes, %d images)", run.root, len(names), len(records))
    return run.root


def initialize_from(model, source, class_names: list[str]) -> str:
    """Put the whole model of ``source`` (head included, BatchNorm statistics too) into ``model``,
    which must have its architecture; returns what was loaded, for the log. The Keras model's
    ``trainable`` flags come along (``model.keras_trainable``, what ``trainable="keras"`` trains)
    from a Keras file or an ``import-keras`` run folder.

    ``source``: a run folder (its ``best`` checkpoint, else ``latest``; its classes must be
    ``class_names``, in order) or a Keras model file (``.keras``, or ``.h5`` saved with
    ``model.save``; see :func:`imgcls_jax.weights.from_keras`) with ``len(class_names)`` outputs.
    ``ValueError`` for another architecture or other classes, before anything is changed.
    """
    path = Path(source).expanduser()
    if path.is_dir():
        from imgcls_jax.data.folders import read_manifest

        run = RunDir(path).require("manifest.csv")
        theirs = read_manifest(run.manifest)[1]
        if theirs != list(class_names):
            raise ValueError(f"init_from {path}: its classes {theirs} are not this run's {list(class_names)}")
        _check_same_model(model, TrainConfig.from_json(run.config), path, len(class_names))
        which = "best" if run.has_best() else "latest"
        epoch = restore_model(run, which, model)
        record = run.root / IMPORT_RECORD
        if record.is_file():
            model.keras_trainable = tuple(json.loads(record.read_text()).get("trainable_layers", ()))
        return f"{which} checkpoint (epoch {epoch}) of {path}"
    from imgcls_jax.weights import from_keras

    imported, info = from_keras(path)
    for name in ("preprocessing", "output_activation"):
        if getattr(info, name) != getattr(model, name, None):
            raise ValueError(
                f"init_from {path}: its {name} is {getattr(info, name)!r}, the config's "
                f"{getattr(model, name, None)!r}; set TrainConfig.{name} to match"
            )
    if info.num_classes != len(class_names):
        raise ValueError(
            f"init_from {path}: {info.num_classes} outputs, but the data has {len(class_names)} classes"
        )
    if [str(h) for h in model.head_spec] != [str(h) for h in imported.head_spec]:
        raise ValueError(
            f"init_from {path}: its head {[str(h) for h in imported.head_spec]} is not this config's "
            f"{[str(h) for h in model.head_spec]} (set TrainConfig.head to it)"
        )
    kinds = nnx.Any(nnx.Param, nnx.BatchStat)
    ours, theirs = nnx.state(model, kinds), nnx.state(imported, kinds)
    mine = {k: v.shape for k, v in nnx.to_flat_state(ours)}
    found = {k: v.shape for k, v in nnx.to_flat_state(theirs)}
    if mine != found:
        differ = sorted(set(mine.items()) ^ set(found.items()))[:4]
        raise ValueError(f"init_from {path}: its model is not this config's (first differences: {differ})")
    theirs_norm, mine_norm = getattr(imported, "final_norm", None), getattr(model, "final_norm", None)
    if theirs_norm != mine_norm:  # ConvNeXt's: the same weights, another function
        raise ValueError(
            f"init_from {path}: its final LayerNormalization stands {theirs_norm!r} ('map': before the "
            f"pooling), the config's {mine_norm!r}; set TrainConfig.final_norm to {theirs_norm!r}"
        )
    nnx.update(model, theirs)
    model.keras_trainable = imported.keras_trainable
    return f"Keras model {path}"


#: What a run folder's config says about its model, and the model attribute it must match.
_MODEL_FIELDS = {"model": "arch", "pooling": "pooling", "head_units": "head_units", "dropout": "dropout_rate",
                 "head_activation": "head_activation", "output_activation": "output_activation"}  # fmt: skip


def _check_same_model(model, config: TrainConfig, path: Path, num_classes: int) -> None:
    """``ValueError`` naming each difference between ``model`` and the model of ``config``."""
    from imgcls_jax.models.head import classic_head, parse_head, with_classes

    differ = []
    head = getattr(config, "head", None)
    if not getattr(model, "include_top", False):
        if head is not None:
            want = with_classes(parse_head(head), num_classes)
        else:
            want = classic_head(config.head_units, config.head_activation, config.dropout, num_classes)
        want, have = [str(h) for h in want], [str(h) for h in model.head_spec]
        if want != have:
            differ.append(f"head {want} there, {have} here")
    for field, attribute in _MODEL_FIELDS.items():
        mine, theirs = getattr(model, attribute, None), getattr(config, field)
        if mine is not None and (tuple(mine) if isinstance(mine, list | tuple) else mine) != (
            tuple(theirs) if isinstance(theirs, list | tuple) else theirs
        ):
            differ.append(f"{field} {theirs!r} there, {mine!r} here")
    for field in ("preprocessing", "final_norm"):  # None there: the family's own
        theirs, mine = getattr(config, field, None), getattr(model, field, None)
        if field == "final_norm" and theirs is None and mine is not None:
            from imgcls_jax.models.convnext import FINAL_NORMS

            theirs = FINAL_NORMS[0]  # ConvNeXt's own
        if theirs is not None and theirs != mine:
            differ.append(f"{field} {theirs!r} there, {mine!r} here")
    if differ:
        raise ValueError(f"init_from {path}: its model is not this config's: {'; '.join(differ)}")
