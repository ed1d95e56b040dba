"""The main job: train a VGG16 image classifier, evaluate it, write the report and plots.

With no arguments it trains on the embedded sample (``examples/data/flowers_sample``: 200
flower photos, 5 classes, CC-BY; see its LICENSE.md) and writes everything to
``runs/flowers_sample``:

    python examples/train.py
    python examples/train.py --data path/to/images --image-size 224 --batch-size 32
    python examples/train.py --config my_config.json          # a saved TrainConfig

``--weights auto`` (the default) uses Keras's ImageNet weights when they can be found or
downloaded and then does transfer learning (frozen base, then fine-tuning the top blocks);
otherwise it trains every layer from scratch and says so loudly, in the log and in the
summary. ``--weights imagenet`` insists (an error if unavailable); ``--weights none`` always
trains from scratch; a path loads that Keras weight file.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SAMPLE = HERE / "data" / "flowers_sample"
log = logging.getLogger("examples.train")


def resolve_weights(choice: str, model: str) -> tuple[str | None, str]:
    """``(weights argument, human-readable description)`` for ``--weights``."""
    from imgcls_jax.weights import ChecksumError, WeightsUnavailableError, resolve_imagenet

    if choice == "none":
        return None, "none: trained from scratch (asked for)"
    if choice not in ("auto", "imagenet"):
        return choice, f"Keras weight file {choice}"
    try:
        path, _ = resolve_imagenet(model, include_top=False)
        return "imagenet", f"ImageNet (Keras file {path})"
    except (WeightsUnavailableError, ChecksumError) as exc:
        if choice == "imagenet":
            raise
        banner = "=" * 78
        log.warning(
            "\n%s\nImageNet weights are NOT available, so this run trains VGG16 FROM SCRATCH.\n"
            "Expect far lower accuracy than transfer learning. Why:\n%s\n%s",
            banner, exc, banner,
        )  # fmt: skip
        return None, "NONE: ImageNet weights unavailable, trained FROM SCRATCH (see log)"


def build_config(args, weights):
    from imgcls_jax.config import PhaseConfig, TrainConfig

    if args.config:
        config = TrainConfig.from_json(args.config)
        config.data, config.run_dir = args.data or config.data, args.run_dir or config.run_dir
        return config
    if weights is None:  # from scratch: every layer, one phase
        phases = [PhaseConfig(epochs=args.epochs, trainable="all", optimizer="adam", learning_rate=1e-4)]
    else:  # transfer learning: head on the frozen base, then the top two blocks at a lower rate
        first = max(args.epochs // 2, 1)
        phases = [
            PhaseConfig(epochs=first, trainable="head", optimizer="adam", learning_rate=1e-3),
            PhaseConfig(
                epochs=max(args.epochs - first, 1), trainable="top:2", optimizer="sgd", learning_rate=1e-3,
                base_lr_multiplier=0.1, schedule="cosine",
            ),
        ]  # fmt: skip
    return TrainConfig(
        data=str(args.data or SAMPLE), run_dir=str(args.run_dir or "runs/flowers_sample"),
        image_size=args.image_size, batch_size=args.batch_size, weights=weights, seed=args.seed,
        head_units=(256,), dropout=0.5, pooling="avg",
        augment={"flip": "horizontal", "rotation": 0.05, "zoom": 0.1, "translation": 0.1},
        phases=phases, monitor="val_accuracy",
    )  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", help="image folder: root/<class>/* or root/{train,val,test}/<class>/*")
    parser.add_argument("--config", help="a TrainConfig JSON file (e.g. a previous run's config.json)")
    parser.add_argument("--run-dir", help="where checkpoints, metrics and reports go")
    parser.add_argument(
        "--weights", default="auto", help="auto (default), imagenet, none, or a Keras .h5 path"
    )
    parser.add_argument("--model", default="vgg16", choices=["vgg16", "vgg19"])
    parser.add_argument("--epochs", type=int, default=12, help="total epochs over all phases")
    parser.add_argument("--image-size", type=int, default=64, help="square input size (multiple of 32)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("jax", "absl", "tensorflow", "orbax"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from imgcls_jax.runs import evaluate_run
    from imgcls_jax.train.loop import fit

    weights, described = resolve_weights(args.weights, args.model)
    config = build_config(args, weights)
    config.model = args.model
    result = fit(config)
    report = evaluate_run(result.run_dir, split="val", which="best")
    print()
    print((report.out_dir / "report.txt").read_text())
    print(f"weights:   {described}")
    print(f"run dir:   {result.run_dir}")
    print(f"report:    {report.out_dir / 'report.txt'}")
    print(f"plots:     {report.out_dir / 'confusion_matrix.png'}, {report.out_dir / 'learning_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
