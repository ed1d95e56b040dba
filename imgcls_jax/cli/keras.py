"""The commands ``import-keras`` and ``export-keras``: a Keras transfer model as a run folder, and
a run as a Keras file."""

from __future__ import annotations

from pathlib import Path

from imgcls_jax.cli.errors import CHECKPOINT_HELP, UsageError, _make_folder, reading_input


def cmd_import_keras(args) -> int:
    from imgcls_jax.train import write_run_folder
    from imgcls_jax.weights import from_keras

    class_names = args.class_names.split(",") if args.class_names else None
    run_dir = Path(args.run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()):
        raise UsageError(f"{run_dir}: exists and is not empty; choose a new folder")
    if args.data is not None and not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder")
    with reading_input():  # the file, its layers, the class names: all before anything is written
        model, info = from_keras(
            args.model_file, architecture=args.architecture, preprocessing=args.preprocessing
        )
        if class_names is not None and len(class_names) != info.num_classes:
            raise UsageError(
                f"--class-names: {len(class_names)} names for a model of {info.num_classes} classes"
            )
        _make_folder(run_dir, "run folder")
    out = write_run_folder(model, info, run_dir, class_names=class_names, data=args.data)
    print(
        f"imported {args.model_file} ({info.arch}, {info.num_classes} classes, {info.preprocessing} inputs)"
    )
    print(f"preprocessing: {describe_preprocessing(info)}")
    for note in info.notes:
        print(f"note: {note}")
    print(f"run dir: {out}  (imgcls-jax predict {out} IMAGES; with --data: imgcls-jax evaluate {out})")
    return 0


def describe_preprocessing(info) -> str:
    """Which preprocessing an import chose, and why (``info``: a ``KerasModelInfo``)."""
    why = {
        "given": "as --preprocessing says",
        "graph": "the model holds its own preprocessing",
        "assumed": f"no preprocessing in the model: {info.arch}'s own preprocess_input assumed; pass "
        "--preprocessing if its users apply another",
    }[info.preprocessing_source]
    return (
        f"the Keras model's users feed it {info.input_preprocessing!r} pixels ({why}); the imported model "
        f"takes raw RGB pixels and applies {info.preprocessing!r} itself"
    )


def cmd_export_keras(args) -> int:
    from imgcls_jax.evaluate import load_run
    from imgcls_jax.weights import to_keras

    out_file = Path(args.out_file)
    if out_file.suffix not in (".keras", ".h5"):
        raise UsageError(f"{out_file}: the Keras file must end in .keras (Keras 3) or .h5 (legacy)")
    with reading_input():  # a run folder, its checkpoint, options Keras's file cannot express
        _make_folder(out_file.absolute().parent, "output folder")
        loaded = load_run(args.run_dir, args.checkpoint)
        out = to_keras(loaded.model, out_file, input_preprocessing=args.input_preprocessing)
    print(f"wrote {out} ({loaded.which} checkpoint, epoch {loaded.epoch}); classes: {loaded.class_names}")
    return 0


def _add_keras(sub) -> None:
    from imgcls_jax.models import MODES

    p = sub.add_parser(
        "import-keras", help="a Keras transfer model (.keras / .h5) of any registered family as a run folder"
    )
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
        help="what you apply to raw pixels before the Keras model (default: none when the model holds "
        "preprocessing layers of its own, else its base's own preprocess_input)",
    )  # fmt: skip
    p.add_argument(
        "--class-names", help="the classes in output order, comma-separated (default class_0, ...)"
    )
    p.add_argument("--data", help="an image folder whose images become the run's test split (for evaluate)")
    p.set_defaults(func=cmd_import_keras)
    p = sub.add_parser("export-keras", help="a trained run as a Keras file (.keras or .h5) Keras loads")
    p.add_argument("run_dir", help="a run folder written by 'train' or 'import-keras'")
    p.add_argument("out_file", help="the Keras file to write: .keras (Keras 3) or .h5 (legacy)")
    p.add_argument("--checkpoint", choices=["best", "latest"], help=CHECKPOINT_HELP)
    p.add_argument(
        "--input-preprocessing", choices=MODES,
        help="what the Keras model's users will feed it (default: the run's own normalisation; 'none' adds "
        "a Rescaling layer for raw pixels where possible)",
    )  # fmt: skip
    p.set_defaults(func=cmd_export_keras)
