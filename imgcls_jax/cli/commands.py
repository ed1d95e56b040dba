"""The commands ``train``, ``evaluate``, ``predict``, ``audit`` and ``port-weights``: each checks
its arguments and input files first (a mistake is one line, :mod:`imgcls_jax.cli.errors`), then
works."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

from imgcls_jax.cli.errors import UsageError, _make_folder, _message, reading_input
from imgcls_jax.config import TrainConfig

log = logging.getLogger("imgcls_jax.cli")


def _split_to_evaluate(run_dir: Path, split: str | None) -> str:
    """``split`` if the run's manifest has it; by default its test split, else its val split."""
    from imgcls_jax.data.folders import read_manifest

    manifest = Path(run_dir) / "manifest.csv"
    splits = {r.split for r in read_manifest(manifest)[0]}
    if split is not None:
        if split not in splits:
            raise UsageError(f"--split {split}: {manifest} has no such split (splits: {sorted(splits)})")
        return split
    for name in ("test", "val"):
        if name in splits:
            return name
    raise UsageError(
        f"{manifest}: no 'test' or 'val' split to evaluate (splits: {sorted(splits)}); pass --split"
    )


def _run_folder(run_dir, which: str):
    """The ``RunDir`` of a finished run with a ``which`` checkpoint, else ``UsageError``."""
    from imgcls_jax.train.rundir import RunDir

    run = RunDir(run_dir).require("manifest.csv")
    directory = run.checkpoint_dir(which)
    if not directory.is_dir() or not any(p.name.isdigit() for p in directory.iterdir()):
        hint = "; a run without a validation split has no best checkpoint: use --checkpoint latest"
        raise UsageError(
            f"{run.root}: no finished {which} checkpoint in {directory} (did training end its first "
            f"epoch?){hint if which == 'best' else ''}"
        )
    return run


def train_config(args) -> tuple[TrainConfig, str]:
    """The run ``imgcls-jax train`` asks for, and what to say about its weights: a ``--config``
    file with the flags given on top, or the recipe (:mod:`imgcls_jax.train.recipe`) for
    ``--data``."""
    from imgcls_jax.train.recipe import recipe_config, resolve_weights

    if args.config:
        if args.epochs is not None or args.lr is not None:
            raise UsageError("--epochs and --lr set the recipe's phases; with --config, edit its 'phases'")
        config = TrainConfig.from_json(args.config)
        overrides = {
            "data": args.data, "run_dir": args.run_dir, "model": args.model, "image_size": args.image_size,
            "batch_size": args.batch_size, "seed": args.seed, "dtype": args.dtype,
        }  # fmt: skip
        overrides = {k: v for k, v in overrides.items() if v is not None}
        described = f"{config.weights or 'none (from scratch)'} (from {args.config})"
        if args.weights is not None:
            overrides["weights"], described = resolve_weights(args.weights, args.model or config.model)
        if args.init_from is not None:
            overrides.update(init_from=args.init_from, weights=None)
            described = f"the whole model of {args.init_from}"
        config = replace(config, **overrides)
        if not config.data:
            raise UsageError(f"no data: {args.config} has no 'data'; pass --data DIR")
        return config, described
    if not args.data:
        raise UsageError("no data: pass --data DIR (an image folder) or --config FILE")
    if not Path(args.data).expanduser().is_dir():  # before looking for weights (and warning)
        raise UsageError(f"--data {args.data}: no such folder (the image folder to train on)")
    model = args.model or "vgg16"
    if args.init_from is not None:
        weights, described = None, f"the whole model of {args.init_from}"
    else:
        weights, described = resolve_weights(args.weights or "auto", model)
    config = recipe_config(
        args.data, weights=weights, run_dir=args.run_dir, model=model, epochs=args.epochs or 12,
        learning_rate=args.lr, image_size=args.image_size or 224, batch_size=args.batch_size or 32,
        seed=args.seed or 0, dtype=args.dtype or "float32", init_from=args.init_from,
    )  # fmt: skip
    return config, described


def check_train_files(config: TrainConfig) -> None:
    """What ``fit`` would find wrong with ``config``'s files only after a while (scanning the
    images): a missing data folder or weight file, a run or cache folder that cannot be made
    (both are made here). ``UsageError``."""
    if not Path(config.data).expanduser().is_dir():
        raise UsageError(f"{config.data}: no such folder (the image folder to train on)")
    if config.weights not in (None, "imagenet"):
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
    take: ``ValueError``. Builds the model only abstractly (shapes, no parameters)."""
    from flax import nnx

    from imgcls_jax.models.registry import model_from_config
    from imgcls_jax.train.loop import check_devices

    check_devices(config)
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
    try:
        split = _split_to_evaluate(result.run_dir, None)
    except UsageError as e:  # the run is fine: there is just nothing held out to report on
        log.warning("trained %s; no evaluation: %s", result.run_dir, e)
        return 0
    report = evaluate_run(
        result.run_dir, split=split, which="best" if RunDir(result.run_dir).has_best() else "latest"
    )
    print((report.out_dir / "report.txt").read_text())
    print(f"weights:   {described}")
    print(f"run dir:   {result.run_dir}")
    print(f"report:    {report.out_dir / 'report.txt'}")
    print(f"plots:     {report.out_dir / 'confusion_matrix.png'}, {report.out_dir / 'learning_curves.png'}")
    return 0


def cmd_evaluate(args) -> int:
    from imgcls_jax.data.folders import read_manifest

    with reading_input():
        run = _run_folder(args.run_dir, args.checkpoint)
        split = _split_to_evaluate(run.root, args.split)
        data = TrainConfig.from_json(run.config).data
        read_manifest(run.manifest, root=data, check_splits=[split])  # its images are all there
    from imgcls_jax.evaluate import evaluate_run

    report = evaluate_run(run.root, split=split, which=args.checkpoint)
    print((report.out_dir / "report.txt").read_text())
    print(f"written to {report.out_dir}")
    return 0


def cmd_predict(args) -> int:
    from imgcls_jax.evaluate.prediction import check_inputs, image_files

    with reading_input():
        run = _run_folder(args.run_dir, args.checkpoint)
        files = image_files(args.inputs)
        check_inputs(files)  # an unreadable file stops us before the model is loaded
    from imgcls_jax.evaluate import load_run, predict

    loaded = load_run(run.root, args.checkpoint)
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
