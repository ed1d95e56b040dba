"""The ``imgcls-jax`` command: train, evaluate, predict, audit, port-weights, tune.

Every subcommand has ``--help``. Runs are folders written by ``train`` (see
:mod:`imgcls_jax.train.loop`); ``evaluate`` and ``predict`` read them back.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from imgcls_jax.config import TrainConfig
from imgcls_jax.hpo import add_tune_parser

log = logging.getLogger("imgcls_jax.cli")


class UsageError(Exception):
    """A mistake in how a command was called: printed as one line, exit status 2."""


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("jax", "absl", "tensorflow", "orbax", "h5py"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _default_split(run_dir: Path) -> str:
    from imgcls_jax.data.folders import read_manifest

    splits = {r.split for r in read_manifest(run_dir / "manifest.csv")[0]}
    for name in ("test", "val"):
        if name in splits:
            return name
    raise SystemExit(f"{run_dir}: the manifest has no 'test' or 'val' split (splits: {sorted(splits)})")


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


def cmd_train(args) -> int:
    import jax

    from imgcls_jax import parallel
    from imgcls_jax.evaluate import evaluate_run
    from imgcls_jax.train import RunDir, fit

    # Several hosts: IMGCLS_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, or a cluster manager
    # JAX detects (SLURM, ...); a plain single-process run otherwise.
    parallel.initialize_distributed()
    config, described = train_config(args)
    result = fit(config, resume=not args.restart)
    if args.no_eval:
        return 0
    if jax.process_index() != 0:  # several processes trained together: process 0 reports
        log.info("process %d: training done; process 0 evaluates %s", jax.process_index(), result.run_dir)
        return 0
    split = _default_split(result.run_dir)
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
    from imgcls_jax.evaluate import evaluate_run

    run_dir = Path(args.run_dir)
    report = evaluate_run(run_dir, split=args.split or _default_split(run_dir), which=args.checkpoint)
    print((report.out_dir / "report.txt").read_text())
    print(f"written to {report.out_dir}")
    return 0


def cmd_predict(args) -> int:
    from imgcls_jax.evaluate import load_run, predict

    loaded = load_run(args.run_dir, args.checkpoint)
    predictions = predict(loaded, args.inputs, top_k=args.top_k, batch_size=args.batch_size)
    if args.json:
        print(json.dumps([{"source": p.source, "top_k": p.top_k} for p in predictions], indent=2))
    else:
        for p in predictions:
            print(p.source + "\t" + "  ".join(f"{name} {prob:.4f}" for name, prob in p.top_k))
    return 0


def cmd_audit(args) -> int:
    from imgcls_jax.data import audit

    report = audit(args.root, tiny=args.tiny, mask_threshold=args.mask_threshold)
    print(report.to_text())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2, default=str) + "\n")
    return 1 if (args.strict and report.warnings) else 0


def cmd_port_weights(args) -> int:
    from imgcls_jax.models import create_model
    from imgcls_jax.weights import save_ported

    model = create_model(
        args.model, weights=args.weights_file, include_top=args.include_top,
        num_classes=1000 if args.include_top else None,
    )  # fmt: skip
    out = save_ported(model, args.out_dir, source=args.weights_file, preprocessing=model.preprocessing)
    print(f"ported {args.weights_file} -> {out} (load with weights={str(out)!r})")
    return 0


def cmd_import_keras(args) -> int:
    from imgcls_jax.train import write_run_folder
    from imgcls_jax.weights import from_keras

    class_names = args.class_names.split(",") if args.class_names else None
    model, info = from_keras(
        args.model_file, architecture=args.architecture, preprocessing=args.preprocessing
    )
    out = write_run_folder(model, info, args.run_dir, class_names=class_names, data=args.data)
    print(
        f"imported {args.model_file} ({info.arch}, {info.num_classes} classes, {info.preprocessing} inputs)"
    )
    for note in info.notes:
        print(f"note: {note}")
    print(f"run dir: {out}  (imgcls-jax predict {out} IMAGES; with --data: imgcls-jax evaluate {out})")
    return 0


def cmd_export_keras(args) -> int:
    from imgcls_jax.evaluate import load_run
    from imgcls_jax.weights import to_keras

    loaded = load_run(args.run_dir, args.checkpoint)
    out = to_keras(loaded.model, args.out_file, input_preprocessing=args.input_preprocessing)
    print(f"wrote {out} ({loaded.which} checkpoint, epoch {loaded.epoch}); classes: {loaded.class_names}")
    return 0


def _add_keras(sub) -> None:
    from imgcls_jax.models import MODES

    p = sub.add_parser("import-keras", help="a Keras transfer model (.keras / .h5) as a run folder")
    p.add_argument(
        "model_file", help="a .keras archive, a whole-model .h5, or a weights file with --architecture"
    )
    p.add_argument(
        "run_dir", help="new folder for the run (then: imgcls-jax predict / evaluate / train --init-from)"
    )
    p.add_argument(
        "--architecture", help="for a weights-only file: the .keras file or JSON config it belongs to"
    )
    p.add_argument(
        "--preprocessing", choices=MODES,
        help="what you apply to raw pixels before the Keras model (default: caffe, or none when the model "
        "starts with preprocessing layers)",
    )  # fmt: skip
    p.add_argument(
        "--class-names", help="the classes in output order, comma-separated (default class_0, ...)"
    )
    p.add_argument("--data", help="an image folder whose images become the run's test split (for evaluate)")
    p.set_defaults(func=cmd_import_keras)
    p = sub.add_parser("export-keras", help="a trained run as a Keras file (.keras or .h5) Keras loads")
    p.add_argument("run_dir", help="a run folder written by 'train' or 'import-keras'")
    p.add_argument("out_file", help="the Keras file to write: .keras (Keras 3) or .h5 (legacy)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="default: best")
    p.add_argument(
        "--input-preprocessing", choices=MODES,
        help="what the Keras model's users will feed it (default: the run's own normalisation; 'none' adds "
        "a Rescaling layer for raw pixels where possible)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export_keras)


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
    p.add_argument(
        "--init-from",
        help="a run folder or Keras model file whose whole model (head included) starts training",
    )
    p.add_argument("--epochs", type=int, help="recipe: epochs over all phases (default 12)")
    p.add_argument("--lr", type=float, help="recipe: peak learning rate (default 1e-3, 1e-4 from scratch)")
    p.add_argument(
        "--image-size", type=int,
        help="square input size in pixels (default 224; phases with their own image_size keep it)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=int, help="training batch size (global, over all devices; default 32)"
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
    p.add_argument("--top-k", type=int, default=5, help="how many classes per image (default 5)")
    p.add_argument("--checkpoint", choices=["best", "latest"], default="best", help="default: best")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.set_defaults(func=cmd_predict)


def _add_audit_and_port(sub, models: list[str]) -> None:
    p = sub.add_parser("audit", help="check an image folder before training (counts, bad files, masks)")
    p.add_argument("root", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    p.add_argument("--tiny", type=int, default=32, help="flag images smaller than this many pixels a side")
    p.add_argument(
        "--mask-threshold", type=float, default=0.95,
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

    parser = argparse.ArgumentParser(
        prog="imgcls-jax", description="Image classification by transfer learning in JAX/Flax."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_train(sub, list_models())
    _add_evaluate_and_predict(sub)
    _add_audit_and_port(sub, list_models())
    _add_keras(sub)
    add_tune_parser(sub)  # "tune": imgcls_jax.hpo (Optuna is imported only when it runs)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"imgcls-jax: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
