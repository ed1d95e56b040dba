"""The ``imgcls-jax`` command: train, evaluate, predict, audit, port-weights, tune.

Every subcommand has ``--help``. Runs are folders written by ``train`` (see
:mod:`imgcls_jax.train.loop`); ``evaluate`` and ``predict`` read them back.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from imgcls_jax.hpo import add_tune_parser

log = logging.getLogger("imgcls_jax.cli")


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


def cmd_train(args) -> int:
    from imgcls_jax import parallel
    from imgcls_jax.config import TrainConfig
    from imgcls_jax.runs import evaluate_run
    from imgcls_jax.train.loop import fit

    # Several hosts: IMGCLS_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, or a cluster manager
    # JAX detects (SLURM, ...); a plain single-process run otherwise.
    parallel.initialize_distributed()
    config = TrainConfig.from_json(args.config) if args.config else TrainConfig()
    overrides = {
        "data": args.data, "run_dir": args.run_dir, "model": args.model, "image_size": args.image_size,
        "batch_size": args.batch_size, "seed": args.seed, "dtype": args.dtype,
    }  # fmt: skip
    for name, value in overrides.items():
        if value is not None:
            setattr(config, name, value)
    if args.weights is not None:
        config.weights = None if args.weights == "none" else args.weights
    if not config.data:
        raise SystemExit("no data: pass --data DIR or a --config whose 'data' names an image folder")
    result = fit(config, resume=not args.restart)
    if args.no_eval:
        return 0
    import jax

    if jax.process_index() != 0:  # several processes trained together: process 0 reports
        log.info("process %d: training done; process 0 evaluates %s", jax.process_index(), result.run_dir)
        return 0
    split = _default_split(result.run_dir)
    has_best = (result.run_dir / "best").is_dir() and any((result.run_dir / "best").iterdir())
    report = evaluate_run(result.run_dir, split=split, which="best" if has_best else "latest")
    print((report.out_dir / "report.txt").read_text())
    print(f"run dir: {result.run_dir}\nreport:  {report.out_dir}")
    return 0


def cmd_evaluate(args) -> int:
    from imgcls_jax.runs import evaluate_run

    run_dir = Path(args.run_dir)
    report = evaluate_run(run_dir, split=args.split or _default_split(run_dir), which=args.checkpoint)
    print((report.out_dir / "report.txt").read_text())
    print(f"written to {report.out_dir}")
    return 0


def cmd_predict(args) -> int:
    from imgcls_jax.predict import load_run, predict

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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imgcls-jax", description="Image classification by transfer learning in JAX/Flax (VGG16/VGG19)."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model (then evaluate it and print the report)")
    p.add_argument(
        "--config", help="a TrainConfig JSON file (e.g. a run's config.json or a tuned best config)"
    )
    p.add_argument("--data", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    p.add_argument("--run-dir", help="output folder for checkpoints, metrics, report (default from config)")
    p.add_argument("--model", choices=["vgg16", "vgg19"], help="architecture (default from config: vgg16)")
    p.add_argument(
        "--weights", help="'imagenet', 'none' or a Keras .h5 / ported folder (default from config)"
    )
    p.add_argument(
        "--image-size", type=int,
        help="square input size in pixels, a multiple of 32 (phases with their own image_size keep it)",
    )  # fmt: skip
    p.add_argument("--batch-size", type=int, help="training batch size (global, over all devices)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype; parameters stay float32")
    p.add_argument("--seed", type=int, help="seed for the split, init, shuffling, augmentation, dropout")
    p.add_argument("--restart", action="store_true", help="ignore existing checkpoints in the run dir")
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and report")
    p.set_defaults(func=cmd_train)

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
    p.add_argument("--model", choices=["vgg16", "vgg19"], default="vgg16", help="architecture of the file")
    p.add_argument(
        "--include-top", action=argparse.BooleanOptionalAction, default=False,
        help="the file has the ImageNet top (fc1, fc2, predictions); default: no top ('_notop' file)",
    )  # fmt: skip
    p.set_defaults(func=cmd_port_weights)

    add_tune_parser(sub)  # "tune": imgcls_jax.hpo (Optuna is imported only when it runs)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
