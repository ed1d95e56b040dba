"""The commands ``train``, ``evaluate``, ``predict``, ``audit`` and ``port-weights``: each checks
its arguments and input files first (a mistake is one line, :mod:`imgcls_jax.cli.errors`), then
works."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from imgcls_jax.cli.errors import UsageError, _make_folder, _message, reading_input
from imgcls_jax.config import WEIGHTS_AND_INIT_FROM, ConfigError, TrainConfig

log = logging.getLogger("imgcls_jax.cli")

#: ``imgcls-jax train``'s defaults for what its flags leave unset (``TrainConfig.recipe``'s own);
#: ``examples/train.py`` passes its own (smaller, for a CPU) to the parser.
TRAIN_DEFAULTS = {
    "data": None, "run_dir": None, "model": "vgg16", "weights": "auto", "epochs": 12, "lr": None,
    "image_size": 224, "batch_size": 32, "seed": 0, "dtype": "float32", "steps_per_execution": 1,
}  # fmt: skip
#: The flags that override a ``--config`` file's fields (the run's config.json shows them).
CONFIG_OVERRIDES = (
    "data",
    "run_dir",
    "model",
    "weights",
    "init_from",
    "image_size",
    "batch_size",
    "dtype",
    "seed",
    "steps_per_execution",
)


def _run_folder(run_dir, which: str | None):
    """``(RunDir, checkpoint)`` of a finished run whose ``which`` checkpoint (default: as
    :func:`~imgcls_jax.evaluate.runs.resolve_checkpoint`) exists, else ``UsageError``."""
    from imgcls_jax.evaluate.runs import resolve_checkpoint
    from imgcls_jax.train.rundir import RunDir

    run = RunDir(run_dir).require("manifest.csv")
    which = resolve_checkpoint(run, which)
    directory = run.checkpoint_dir(which)
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        hint = "; a run without a validation split has no best checkpoint: use --checkpoint latest"
        raise UsageError(
            f"{run.root}: no finished {which} checkpoint in {directory} (did training end its first "
            f"epoch?){hint if which == 'best' else ''}"
        )
    return run, which


def describe_start(config: TrainConfig, asked: str | None) -> str:
    """How ``config``'s model starts, in words: its whole model from ``init_from``, ImageNet,
    a weight file, or from scratch (``asked``: the ``--weights`` value, or the recipe's default)."""
    if config.init_from is not None:
        return f"the whole model of {config.init_from}"
    if config.weights == "imagenet":
        return f"ImageNet (Keras's {config.model} file)"
    if config.weights in (None, "random"):
        if asked == "auto":
            return "NONE: ImageNet weights unavailable, trained FROM SCRATCH (see log)"
        return "none: trained from scratch" + (" (asked for)" if asked == "none" else "")
    return f"Keras weight file {config.weights}"


def train_config(args) -> tuple[TrainConfig, str]:
    """The run ``imgcls-jax train`` asks for, and how its model starts (in words): a
    ``--config`` file with the flags given on top (``CONFIG_OVERRIDES``), or
    :meth:`TrainConfig.recipe` for ``--data`` with the command's defaults for unset flags."""
    from imgcls_jax.weights.store import resolve_weights_choice

    defaults = getattr(args, "train_defaults", TRAIN_DEFAULTS)
    if args.weights is not None and args.init_from is not None:
        raise ConfigError(WEIGHTS_AND_INIT_FROM)
    if args.config:
        if args.epochs is not None or args.lr is not None:
            raise UsageError("--epochs and --lr shape the recipe's phases; with --config, edit its 'phases'")
        config = TrainConfig.from_json(args.config)
        overrides = {f: getattr(args, f) for f in CONFIG_OVERRIDES if f != "weights"}
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if args.weights is not None:
            overrides["weights"] = resolve_weights_choice(args.weights, args.model or config.model)
        if args.init_from is not None:
            overrides["weights"] = None  # the whole model replaces the file's base weights
        config = replace(config, **overrides)
        if not config.data:
            raise UsageError(f"no data: {args.config} has no 'data'; pass --data DIR")
        return config, describe_start(config, args.weights)
    data = args.data or defaults["data"]
    if not data:
        raise UsageError("no data: pass --data DIR (an image folder) or --config FILE")
    if not Path(data).expanduser().is_dir():  # before looking for weights (and warning)
        raise UsageError(f"--data {data}: no such folder (the image folder to train on)")
    weights = args.weights or (None if args.init_from else defaults["weights"])
    config = TrainConfig.recipe(
        data, model=args.model or defaults["model"], weights=weights,
        epochs=args.epochs or defaults["epochs"],
        learning_rate=args.lr or defaults["lr"], image_size=args.image_size or defaults["image_size"],
        batch_size=args.batch_size or defaults["batch_size"], run_dir=args.run_dir or defaults["run_dir"],
        seed=defaults["seed"] if args.seed is None else args.seed, dtype=args.dtype or defaults["dtype"],
        init_from=args.init_from,
        steps_per_execution=args.steps_per_execution or defaults["steps_per_execution"],
    )  # fmt: skip
    return config, describe_start(config, weights)


def check_train_files(config: TrainConfig) -> None:
    """What ``fit`` would find wrong with ``config``'s files only after a while (scanning the
    images): a missing data folder or weight file, a run or cache folder that cannot be made
    (both are made here). ``UsageError``."""
    if not Path(config.data).expanduser().is_dir():
        raise UsageError(f"{config.data}: no such folder (the image folder to train on)")
    if config.weights not in (None, "imagenet", "random"):
        weights = Path(config.weights).expanduser()
        if not weights.exists():
            raise UsageError(f"weights {config.weights}: no such file or folder")
        if weights.is_file():
            _check_hdf5(weights)
    _make_folder(config.run_dir, "run dir")
    if config.cache not in (None, "memory"):
        _make_folder(Path(config.cache).expanduser().absolute().parent, "cache folder")


def _check_hdf5(path) -> None:
    """``UsageError`` unless ``path`` is an HDF5 file (what a Keras weight file is), checked
    before a model is built to load it into."""
    import h5py

    if not h5py.is_hdf5(path):
        size = Path(path).stat().st_size
        raise UsageError(
            f"{path}: not an HDF5 file ({size} bytes); expected a Keras weight file (.h5 or .weights.h5) "
            "or a folder written by 'imgcls-jax port-weights'"
        )


def check_train_model(config: TrainConfig) -> None:
    """Batches that do not divide over the devices, an image size or option the model cannot
    take: ``ConfigError`` / ``UsageError``. Builds the model only abstractly (shapes, no
    parameters)."""
    import jax
    from flax import nnx

    from imgcls_jax.config import check_devices
    from imgcls_jax.models.registry import model_from_config

    check_devices(config, jax.device_count(), jax.process_count())
    for size in sorted({config.phase_size(i) for i in range(len(config.phases))}):
        try:
            nnx.eval_shape(lambda size=size: model_from_config(config, 2, weights=None, input_size=size))
        except ValueError as e:
            raise UsageError(f"{config.model} at image size {size}: {_message(e)}") from e


def move_run_aside(run_dir: Path) -> Path | None:
    """``--restart``: rename an existing, non-empty ``run_dir`` to ``RUN_DIR.replaced-<UTC time>``
    (nothing is deleted) so the run starts from scratch; returns the new name (None: nothing
    moved). Process 0 renames; the others wait for it."""
    import datetime

    import jax

    target = None
    if jax.process_index() == 0 and run_dir.is_dir() and any(run_dir.iterdir()):
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
        target = run_dir.with_name(f"{run_dir.name}.replaced-{stamp}")
        run_dir.rename(target)
        log.warning("--restart: moved the earlier run %s aside to %s", run_dir, target)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("imgcls-jax train --restart")
    return target


def cmd_train(args) -> int:
    import jax

    from imgcls_jax import parallel

    with reading_input():
        config, described = train_config(args)
        check_train_files(config)
        # Several hosts: IMGCLS_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, or a cluster
        # manager JAX detects (SLURM, ...); a plain single-process run otherwise.
        parallel.initialize_distributed()
        check_train_model(config)
    from imgcls_jax.evaluate import evaluate_run
    from imgcls_jax.train import RunDir, fit

    if args.restart:
        move_run_aside(Path(config.run_dir))
    result = fit(config)
    if args.no_eval:
        return 0
    if jax.process_index() != 0:  # several processes trained together: process 0 reports
        log.info("process %d: training done; process 0 evaluates %s", jax.process_index(), result.run_dir)
        return 0
    from imgcls_jax.data import DatasetError
    from imgcls_jax.evaluate.runs import resolve_split

    report = None
    try:
        resolve_split(RunDir(result.run_dir), None)
    except DatasetError as e:  # the run is fine: there is just nothing held out to report on
        log.warning("trained %s; no evaluation: %s", result.run_dir, e)
    else:
        report = evaluate_run(result.run_dir)  # the defaults: test (else val) split, best checkpoint
        print((report.out_dir / "report.txt").read_text())
    print(f"weights:   {described}")
    print(f"run dir:   {result.run_dir}")
    if report is not None:
        print(f"report:    {report.out_dir / 'report.txt'}")
        plots = (report.out_dir / name for name in ("confusion_matrix.png", "learning_curves.png"))
        print(f"plots:     {', '.join(map(str, plots))}")
    return 0


def cmd_evaluate(args) -> int:
    from imgcls_jax.data.folders import DatasetError, read_manifest
    from imgcls_jax.evaluate.runs import resolve_split

    with reading_input():
        run, which = _run_folder(args.run_dir, args.checkpoint)
        try:
            split = resolve_split(run, args.split)
        except DatasetError as e:
            raise UsageError(f"--split {args.split}: {e}" if args.split else str(e)) from e
        data = TrainConfig.from_json(run.config).data
        read_manifest(run.manifest, root=data, check_splits=[split])  # its images are all there
    from imgcls_jax.evaluate import evaluate_run

    report = evaluate_run(run.root, split=split, which=which)
    print((report.out_dir / "report.txt").read_text())
    print(f"written to {report.out_dir}")
    return 0


def cmd_predict(args) -> int:
    from imgcls_jax.evaluate.prediction import check_inputs, image_files

    with reading_input():
        run, which = _run_folder(args.run_dir, args.checkpoint)
        files = image_files(args.inputs)
        check_inputs(files)  # an unreadable file stops us before the model is loaded
    from imgcls_jax.evaluate import load_run, predict

    loaded = load_run(run.root, which)
    predictions = predict(loaded, files, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"source": p.source, "top_k": p.top_k} for p in predictions], indent=2))
    else:
        for p in predictions:
            print(p.source + "\t" + "  ".join(f"{name} {prob:.4f}" for name, prob in p.top_k))
    return 0


def cmd_audit(args) -> int:
    if not Path(args.root).expanduser().is_dir():
        raise UsageError(f"{args.root}: no such folder (the image folder to audit)")
    if args.json:
        _make_folder(Path(args.json).expanduser().absolute().parent, "--json folder")
    from imgcls_jax.data import audit

    report = audit(args.root, tiny=args.tiny, mask_threshold=args.mask_threshold)
    print(report.to_text())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 1 if (args.strict and report.warnings) else 0


def cmd_port_weights(args) -> int:
    if not Path(args.weights_file).is_file():
        raise UsageError(f"{args.weights_file}: no such weight file")
    out = Path(args.out_dir)
    if out.is_dir() and any(out.iterdir()):
        raise UsageError(f"{out}: exists and is not empty; choose a new folder")
    _check_hdf5(args.weights_file)
    _make_folder(out, "output folder")
    from imgcls_jax.models import create_model
    from imgcls_jax.weights import save_ported

    model = create_model(
        args.model, weights=args.weights_file, include_top=args.include_top,
        num_classes=1000 if args.include_top else None,
    )  # fmt: skip
    out = save_ported(model, args.out_dir, source=args.weights_file, preprocessing=model.preprocessing)
    print(f"ported {args.weights_file} -> {out} (load with weights={str(out)!r})")
    return 0
