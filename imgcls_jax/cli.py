"""The ``imgcls-jax`` command: train, evaluate, predict, audit, port-weights, tune.

Every subcommand has ``--help``. Runs are folders written by ``train`` (see
:mod:`imgcls_jax.train.loop`); ``evaluate`` and ``predict`` read them back.

A user's mistake is one line on stderr, ``imgcls-jax: error: ...``, and exit status 2 (with
``--verbose``, its traceback first); anything else is a failure of the program and keeps its
traceback (exit status 1). A mistake is (see :func:`is_user_error`):

* a bad flag or argument (argparse);
* an exception of a class that only input can cause, wherever it is raised: :data:`USER_ERRORS`
  (an invalid config or tune file, a dataset or manifest that cannot be used, a folder that is not
  a run, a weight file that cannot be read or found, an image that cannot be decoded, a bad
  search space);
* a ``ValueError`` or ``OSError`` (a missing or unreadable file, ...) raised while a command
  reads its arguments and input files, before it trains, evaluates or predicts
  (:func:`reading_input`). The same exception raised later, inside a run, is a failure.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import math
import os
import sys
import traceback
from dataclasses import replace
from pathlib import Path

from imgcls_jax.config import TrainConfig
from imgcls_jax.hpo import add_tune_parser

log = logging.getLogger("imgcls_jax.cli")


class UsageError(Exception):
    """A mistake in how a command was called: printed as one line, exit status 2."""


#: Exception classes that only a user's input can cause, as ``module:class``: a user's mistake
#: wherever they are raised. Looked up only in modules already imported (a class whose module
#: was never imported cannot have been raised), so telling a mistake imports nothing more
#: (TensorFlow, h5py, Optuna) than the command did.
USER_ERRORS = (
    "imgcls_jax.config:ConfigError",
    "imgcls_jax.data.folders:DatasetError",
    "imgcls_jax.train.rundir:NotARunError",
    "imgcls_jax.evaluate.runs:RunMismatchError",
    "imgcls_jax.evaluate.predict:UnreadableImageError",
    "imgcls_jax.weights.keras:WeightFileError",
    "imgcls_jax.weights.store:WeightsUnavailableError",
    "imgcls_jax.weights.store:ChecksumError",
    "imgcls_jax.hpo.space:SearchSpaceError",
)


def user_error_classes(*, load: bool = False) -> tuple[type[BaseException], ...]:
    """The classes of :data:`USER_ERRORS` whose module is imported (all of them with ``load``)."""
    found = [UsageError]
    for spec in USER_ERRORS:
        module, name = spec.split(":")
        if load:
            importlib.import_module(module)
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def is_user_error(exc: BaseException) -> bool:
    """Whether ``exc`` is a user's mistake (see the module docstring)."""
    return isinstance(exc, user_error_classes())


@contextlib.contextmanager
def reading_input():
    """Mark the code that reads a command's arguments and input files: a ``ValueError`` or
    ``OSError`` it raises is the user's mistake (a :class:`UsageError` with the same message)."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, OSError) as e:
        raise UsageError(_message(e)) from e


def _message(exc: BaseException) -> str:
    """``exc``'s message on one line (its class name when it has none), printable in UTF-8: a
    path from undecodable command-line bytes (``\udcff``) is shown escaped."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = "; ".join(lines) or type(exc).__name__
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _Parser(argparse.ArgumentParser):
    """``argparse`` whose errors raise :class:`UsageError` (one line, exit status 2, from
    :func:`main`) instead of printing the usage and exiting."""

    def error(self, message: str):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= 1:  # also NaN
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _make_folder(path, what: str) -> Path:
    """Create the folder ``path`` (and its parents) where it is missing; ``UsageError`` when it
    cannot be (a file in the way, no permission, a read-only file system)."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} {path}: exists and is not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot create it: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path}: not writable")
    return path


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("jax", "absl", "tensorflow", "orbax", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
        config = replace(config, **overrides)
        if not config.data:
            raise UsageError(f"no data: {args.config} has no 'data'; pass --data DIR")
        return config, described
    if not args.data:
        raise UsageError("no data: pass --data DIR (an image folder) or --config FILE")
    if not Path(args.data).expanduser().is_dir():  # before looking for weights (and warning)
        raise UsageError(f"--data {args.data}: no such folder (the image folder to train on)")
    model = args.model or "vgg16"
    weights, described = resolve_weights(args.weights or "auto", model)
    config = recipe_config(
        args.data, weights=weights, run_dir=args.run_dir, model=model, epochs=args.epochs or 12,
        learning_rate=args.lr, image_size=args.image_size or 224, batch_size=args.batch_size or 32,
        seed=args.seed or 0, dtype=args.dtype or "float32",
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
    for size in sorted({config.phase_image_size(i) for i in range(len(config.phases))}):
        try:
            nnx.eval_shape(lambda size=size: model_from_config(config, 2, weights=None, input_size=size))
        except ValueError as e:
            raise UsageError(f"{config.model} at image size {size}: {_message(e)}") from e


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

    result = fit(config, resume=not args.restart)
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
    from imgcls_jax.evaluate.predict import check_inputs, image_files

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


def _add_train(sub, models: list[str]) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (then evaluate it and print the report)",
        description=(
            "Train on an image folder with the transfer-learning recipe (Keras's ImageNet weights when "
            "they can be found or downloaded: the head on the frozen base, then the top two stages "
            "fine-tuned; otherwise, loudly, every layer from scratch), or run a TrainConfig file. "
            "Then evaluate the best checkpoint on the test split (else val) and print the report."
        ),
    )
    p.add_argument("--config", help="a TrainConfig JSON file (e.g. a run's config.json); flags override it")
    p.add_argument("--data", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    p.add_argument(
        "--run-dir", help="output folder for checkpoints, metrics, report (default runs/<data name>)"
    )
    p.add_argument("--model", choices=models, help="architecture (default vgg16)")
    p.add_argument(
        "--weights",
        help="auto (default: ImageNet if available, else from scratch), imagenet, none, or a Keras .h5 / "
        "ported folder",
    )
    p.add_argument("--epochs", type=_positive_int, help="recipe: epochs over all phases (default 12)")
    p.add_argument("--lr", type=float, help="recipe: peak learning rate (default 1e-3, 1e-4 from scratch)")
    p.add_argument(
        "--image-size", type=_positive_int,
        help="square input size in pixels (default 224; phases with their own image_size keep it)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=_positive_int, help="training batch size (global, over all devices; default 32)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype; parameters stay float32")
    p.add_argument("--seed", type=int, help="seed for the split, init, shuffling, augmentation, dropout")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run dir")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and report")
    p.set_defaults(func=cmd_train)


def _add_evaluate_and_predict(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run: accuracy, confusion matrix, report, plots")
    p.add_argument("run_dir", help="a run folder written by 'train'")
    p.add_argument("--split", help="which split of the run's manifest (default: test, else val)")
    p.add_argument(
        "--checkpoint", choices=["best", "latest"], default="best",
        help="best (by the monitored validation metric) or latest epoch (default: best)",
    )  # fmt: skip
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes for image files or folders")
    p.add_argument("run_dir", help="a run folder written by 'train'")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--top-k", type=_positive_int, default=5, help="how many classes per image (default 5)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="default: best")
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, help="images per forward pass (default 32)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.set_defaults(func=cmd_predict)


def _add_audit_and_port(sub, models: list[str]) -> None:
    p = sub.add_parser("audit", help="check an image folder before training (counts, bad files, masks)")
    p.add_argument("root", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    p.add_argument(
        "--tiny", type=_positive_int, default=32, help="flag images smaller than this many pixels a side"
    )
    p.add_argument(
        "--mask-threshold", type=_fraction, default=0.95,
        help="flag a class as segmentation masks when this fraction of pixels is on two grey levels",
    )  # fmt: skip
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when there are warnings")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("port-weights", help="convert a Keras VGG weight file into a ported folder")
    p.add_argument("weights_file", help="Keras legacy .h5 or Keras 3 .weights.h5 file")
    p.add_argument("out_dir", help="new folder for the converted parameters (orbax) and their description")
    p.add_argument("--model", choices=models, default="vgg16", help="architecture of the file")
    p.add_argument(
        "--include-top", action=argparse.BooleanOptionalAction, default=False,
        help="the file has the ImageNet top (fc1, fc2, predictions); default: no top ('_notop' file)",
    )  # fmt: skip
    p.set_defaults(func=cmd_port_weights)


def build_parser() -> argparse.ArgumentParser:
    from imgcls_jax.models import list_models

    parser = _Parser(prog="imgcls-jax", description="Image classification by transfer learning in JAX/Flax.")
    verbose = "debug logging, and the traceback of a user's mistake too"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub, list_models())
    _add_evaluate_and_predict(sub)
    _add_audit_and_port(sub, list_models())
    add_tune_parser(sub)  # "tune": imgcls_jax.hpo (Optuna is imported only when it runs)
    for command in sub.choices.values():  # `imgcls-jax train -v` as well as `imgcls-jax -v train`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    return parser


def main(argv=None) -> int:
    """Run the command ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0, 1 (a
    command's own "failed", e.g. ``audit --strict`` with warnings), or 2 (a user's mistake,
    printed as one line). A failure of the program itself raises (a traceback)."""
    verbose = False
    try:
        args = build_parser().parse_args(argv)
        verbose = args.verbose
        _setup_logging(verbose)
        return args.func(args)
    except Exception as e:
        if not is_user_error(e):
            raise
        if verbose:
            traceback.print_exception(e, file=sys.stderr)
        print(f"imgcls-jax: error: {_message(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # `python -m imgcls_jax.cli`: the package's module, so that its
    from imgcls_jax.cli import main as package_main  # classes are the ones the library raises

    sys.exit(package_main())
