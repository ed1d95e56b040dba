"""The main job: train an image classifier, evaluate it, write the report and plots.

This is ``imgcls-jax train`` (the same recipe: :meth:`imgcls_jax.TrainConfig.recipe`) with
defaults sized for a CPU and the embedded sample. With no arguments it trains on
``examples/data/flowers_sample`` (200 flower photos, 5 classes, CC-BY; see its LICENSE.md) at
64x64 for 12 epochs and writes everything to ``runs/flowers_sample``:

    python examples/train.py
    python examples/train.py --data path/to/images --image-size 224 --batch-size 32
    python examples/train.py --config my_config.json          # a saved TrainConfig
    python examples/train.py --help                           # every flag, with this example's defaults

``--weights auto`` (the default) uses Keras's ImageNet weights when they can be found or
downloaded and then does transfer learning (frozen base, then fine-tuning the top blocks);
otherwise it trains every layer from scratch and says so loudly, in the log and in the
summary. ``--weights imagenet`` insists (an error if unavailable); ``--weights none`` always
trains from scratch; a path loads that Keras weight file.
"""

from __future__ import annotations

import sys
from pathlib import Path

from imgcls_jax import cli

SAMPLE = Path(__file__).resolve().parent / "data" / "flowers_sample"
#: This example's defaults, where they differ from ``imgcls-jax train``'s (its ``--help`` shows them).
DEFAULTS = {
    "data": str(SAMPLE),
    "image_size": 64,
    "batch_size": 16,
    "epochs": 12,
    "run_dir": "runs/flowers_sample",
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return cli.main(["train", *argv], train_defaults=DEFAULTS, train_prog="python examples/train.py")


if __name__ == "__main__":
    sys.exit(main())
