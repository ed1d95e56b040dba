"""The ``imgcls-jax`` command line: every command, its flags and their help."""

from __future__ import annotations

import argparse

from imgcls_jax.cli.commands import (
    CONFIG_OVERRIDES,
    TRAIN_DEFAULTS,
    cmd_audit,
    cmd_evaluate,
    cmd_port_weights,
    cmd_predict,
    cmd_train,
)
from imgcls_jax.cli.errors import CHECKPOINT_HELP, _fraction, _image_size, _Parser, _positive_int
from imgcls_jax.cli.keras import _add_keras
from imgcls_jax.hpo import add_tune_parser


def _size_text(size) -> str:
    return "x".join(str(s) for s in size) if isinstance(size, tuple) else str(size)


def _add_recipe_flags(p, d: dict) -> None:
    """``train``'s flags that shape the recipe (their defaults: ``d``)."""
    from imgcls_jax.config import SCRATCH_LR, TRANSFER_LR

    p.add_argument(
        "--epochs", type=_positive_int, help=f"recipe: epochs over all phases (default {d['epochs']})"
    )
    lr = f"{d['lr']:g}" if d["lr"] else f"{TRANSFER_LR:g} with weights, {SCRATCH_LR:g} from scratch"
    p.add_argument("--lr", type=float, help=f"recipe: peak learning rate (default {lr})")
    p.add_argument(
        "--image-size", type=_image_size,
        help=f"input size in pixels, S or HxW (default {_size_text(d['image_size'])}; phases with their own "
        "image_size keep it)",
    )  # fmt: skip
    p.add_argument(
        "--batch-size", type=_positive_int,
        help=f"training batch size, global over all devices (default {d['batch_size']})",
    )  # fmt: skip
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16"],
        help=f"compute dtype; parameters stay float32 (default {d['dtype']})",
    )  # fmt: skip
    p.add_argument(
        "--seed",
        type=int,
        help=f"seed for the split, init, shuffling, augmentation, dropout (default {d['seed']})",
    )
    p.add_argument(
        "--steps-per-execution", type=_positive_int,
        help="train steps per XLA execution, as Keras's compile(steps_per_execution=): fewer dispatches and "
        f"memory allocations; rounding may differ from 1 (default {d['steps_per_execution']})",
    )  # fmt: skip


def add_train_parser(sub, models: list[str], defaults: dict | None = None, prog: str | None = None):
    """Add ``train`` (its recipe defaults: ``defaults``, default :data:`TRAIN_DEFAULTS`) to an
    ``argparse`` subparsers object; every default its help names is the one the command uses
    (tests/test_cli_help.py checks each)."""
    d = {**TRAIN_DEFAULTS, **(defaults or {})}
    p = sub.add_parser(
        "train",
        prog=prog,
        help="train a model (then evaluate it and print the report)",
        description=(
            "Train on an image folder with the transfer-learning recipe (TrainConfig.recipe: Keras's "
            "ImageNet weights when they can be found or downloaded: the head on the frozen base, then the "
            "top two stages fine-tuned; otherwise, loudly, every layer from scratch), or run a TrainConfig "
            "file. Then evaluate the best checkpoint on the test split (else val) and print the report. "
            f"Models: {', '.join(models)}."
        ),
    )
    overrides = ", ".join("--" + f.replace("_", "-") for f in CONFIG_OVERRIDES)
    p.add_argument(
        "--config",
        help=f"a TrainConfig JSON file (e.g. a run's config.json); {overrides} override its fields (the "
        "run's config.json records them); --epochs and --lr shape the recipe's phases: refused with it",
    )
    data = f"(default {d['data']})" if d["data"] else "(required without --config)"
    p.add_argument("--data", help=f"image folder: root/<class>/* or root/{{train,val,test}}/<class>/* {data}")
    run_dir = f"default {d['run_dir']}" if d["run_dir"] else "default runs/<data folder name>"
    p.add_argument("--run-dir", help=f"output folder for checkpoints, metrics, report ({run_dir})")
    p.add_argument(
        "--model", choices=models, metavar="MODEL", help=f"one of: {', '.join(models)} (default {d['model']})"
    )
    p.add_argument(
        "--weights",
        help=f"auto (ImageNet if available, else from scratch), imagenet, none, or a Keras .h5 / ported "
        f"folder (default {d['weights']}); not with --init-from",
    )
    p.add_argument(
        "--init-from",
        help="a run folder or Keras model file whose whole model (head included) starts training; not "
        "with --weights",
    )
    _add_recipe_flags(p, d)
    p.add_argument(
        "--restart",
        action="store_true",
        help="start from scratch: an existing run folder is renamed to RUN_DIR.replaced-<time> "
        "(nothing is deleted); without it a run folder with checkpoints is resumed",
    )
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation and report")
    p.set_defaults(func=cmd_train, train_defaults=d)
    return p


def _add_evaluate_and_predict(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a run: accuracy, confusion matrix, report, plots")
    p.add_argument("run_dir", help="a run folder written by 'train'")
    p.add_argument("--split", help="which split of the run's manifest (default test, else val)")
    p.add_argument("--checkpoint", choices=["best", "latest"], help=CHECKPOINT_HELP)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("predict", help="top-k classes for image files or folders")
    p.add_argument("run_dir", help="a run folder written by 'train'")
    p.add_argument("inputs", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument(
        "--top-k", type=_positive_int, default=5, help="how many classes per image (default %(default)s)"
    )
    p.add_argument("--checkpoint", choices=["best", "latest"], help=CHECKPOINT_HELP)
    p.add_argument(
        "--batch-size", type=_positive_int, default=32, help="images per forward pass (default %(default)s)"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of one line per image")
    p.set_defaults(func=cmd_predict)


def _add_audit_and_port(sub, models: list[str]) -> None:
    p = sub.add_parser("audit", help="check an image folder before training (counts, bad files, masks)")
    p.add_argument("root", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    p.add_argument(
        "--tiny", type=_positive_int, default=32,
        help="flag images smaller than this many pixels a side (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--mask-threshold", type=_fraction, default=0.95,
        help="flag a class as segmentation masks when this fraction of pixels is on two grey levels "
        "(default %(default)s)",
    )  # fmt: skip
    p.add_argument("--json", help="also write the report as JSON to this file")
    p.add_argument("--strict", action="store_true", help="exit with status 1 when there are warnings")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser(
        "port-weights",
        help="convert a Keras weight file (any model of --model) into a ported folder",
        description=f"Convert a Keras weight file of one of: {', '.join(models)} into a ported folder.",
    )
    p.add_argument("weights_file", help="Keras legacy .h5 or Keras 3 .weights.h5 file")
    p.add_argument("out_dir", help="new folder for the converted parameters (orbax) and their description")
    p.add_argument(
        "--model", choices=models, default="vgg16", metavar="MODEL",
        help=f"architecture of the file, one of: {', '.join(models)} (default %(default)s)",
    )  # fmt: skip
    p.add_argument(
        "--include-top", action=argparse.BooleanOptionalAction, default=False,
        help="the file has the ImageNet top (e.g. fc1, fc2, predictions); default: no top ('_notop' file)",
    )  # fmt: skip
    p.set_defaults(func=cmd_port_weights)


def build_parser(
    train_defaults: dict | None = None, train_prog: str | None = None
) -> argparse.ArgumentParser:
    """The ``imgcls-jax`` parser; ``train_defaults`` replace :data:`TRAIN_DEFAULTS` (in the help
    and in what ``train`` uses) and ``train_prog`` names ``train`` in its usage line (for
    ``examples/train.py``)."""
    from imgcls_jax.models import list_models

    parser = _Parser(prog="imgcls-jax", description="Image classification by transfer learning in JAX/Flax.")
    verbose = "debug logging, and the traceback of a user's mistake too"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_train_parser(sub, list_models(), train_defaults, train_prog)
    _add_evaluate_and_predict(sub)
    _add_audit_and_port(sub, list_models())
    _add_keras(sub)
    add_tune_parser(sub)  # "tune": imgcls_jax.hpo (Optuna is imported only when it runs)
    for command in sub.choices.values():  # `imgcls-jax train -v` as well as `imgcls-jax -v train`
        command.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=verbose)
    return parser
