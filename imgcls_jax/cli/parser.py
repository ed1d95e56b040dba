"""The ``imgcls-jax`` command line: every command, its flags and their help."""

from __future__ import annotations

import argparse

from imgcls_jax.cli.commands import cmd_audit, cmd_evaluate, cmd_port_weights, cmd_predict, cmd_train
from imgcls_jax.cli.errors import _fraction, _image_size, _Parser, _positive_int
from imgcls_jax.cli.keras import _add_keras
from imgcls_jax.hpo import add_tune_parser


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
    p.add_argument("--epochs", type=_positive_int, help="recipe: epochs over all phases (default 12)")
    p.add_argument("--lr", type=float, help="recipe: peak learning rate (default 1e-3, 1e-4 from scratch)")
    p.add_argument(
        "--image-size", type=_image_size,
        help="input size in pixels, S or HxW (default 224; phases with their own image_size keep it)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=_positive_int, help="training batch size (global, over all devices; default 32)"
    )
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="compute dtype; parameters stay float32")
    p.add_argument("--seed", type=int, help="seed for the split, init, shuffling, augmentation, dropout")
    p.add_argument(
        "--restart",
        action="store_true",
        help="start from scratch: an existing run folder is renamed to RUN_DIR.replaced-<time> "
        "(nothing is deleted); without it a run folder with checkpoints is resumed",
    )
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
    _add_keras(sub)
    add_tune_parser(sub)  # "tune": imgcls_jax.hpo (Optuna is imported only when it runs)
    for command in sub.choices.values():  # `imgcls-jax train -v` as well as `imgcls-jax -v train`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    return parser
