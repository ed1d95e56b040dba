"""Is a trained run's inference-mode accuracy held back by its BatchNorm moving statistics?

A diagnostic for runs of ``benchmarks/reference_keras.py`` (and any run folder with BatchNorm):
the run's test accuracy in inference mode as it is, then with every BatchNorm layer's moving
mean and variance re-estimated from its training images (the average of the batch statistics of
batches of ``--batch-size`` training images, no augmentation, the weights unchanged) and the
same test images predicted again. A large gain says the moving statistics, not the weights, are
what fails (MobileNetV2's momentum 0.999 over ~1,300 steps from scratch: benchmarks/RESULTS.md).
From the repository root::

    .venv/bin/python -m benchmarks.bn_restats runs/reference_keras/mobilenetv2_s0/imgcls_jax \\
        --data runs/reference_keras/mobilenetv2_s0/split

``--data``: the folder the run's manifest paths are relative to (its ``TrainConfig.data``
unless given). Prints both accuracies and the predicted-class counts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def _accuracy(model, class_names, files, labels) -> tuple[float, list[int]]:
    """Top-1 accuracy of ``imgcls_jax.predict`` (inference mode) and the count per predicted class."""
    import imgcls_jax

    predictions = imgcls_jax.predict(model, files, class_names=class_names)
    predicted = [class_names.index(p.label) for p in predictions]
    counts = np.bincount(predicted, minlength=len(class_names)).tolist()
    return float(np.mean(np.asarray(predicted) == labels)), counts


def reestimate(model, images: np.ndarray, batch_size: int) -> int:
    """Replace every BatchNorm's moving statistics of ``model`` by the mean over batches of
    ``images`` of its batch statistics (cumulative averaging: momentum ``k / (k + 1)`` at batch
    ``k``); return the number of batches. The weights and the layers' momenta are unchanged."""
    import jax.numpy as jnp
    from flax import nnx

    norms = [m for _, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    momenta = [m.momentum for m in norms]
    model.eval()  # dropout off
    for m in norms:
        m.use_running_average = False  # batch statistics, and they update the moving ones
    batches = 0
    for start in range(0, len(images) - batch_size + 1, batch_size):
        for m in norms:
            m.momentum = batches / (batches + 1)
        model(jnp.asarray(images[start : start + batch_size]))
        batches += 1
    for m, momentum in zip(norms, momenta, strict=True):
        m.momentum, m.use_running_average = momentum, True
    return batches


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a run folder")
    parser.add_argument("--data", type=Path, help="root of the manifest's paths (default: the run's data)")
    parser.add_argument("--which", default="latest", help="checkpoint: latest (default) or best")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="order of the training images")
    args = parser.parse_args(argv)

    import imgcls_jax
    from imgcls_jax.data import load_image
    from imgcls_jax.data.folders import read_manifest

    run = imgcls_jax.load_run(args.run, args.which)
    root = args.data or Path(run.config.data)
    records, class_names = read_manifest(args.run / "manifest.csv", root)
    test = [r for r in records if r.split == "test"] or [r for r in records if r.split == "val"]
    files, labels = [r.path for r in test], np.asarray([r.label for r in test])
    before = _accuracy(run.model, class_names, files, labels)
    train = [r.path for r in records if r.split == "train"]
    order = np.random.default_rng(args.seed).permutation(len(train))
    images = np.stack([load_image(train[i], run.image_size) for i in order])
    batches = reestimate(run.model, images, args.batch_size)
    after = _accuracy(run.model, class_names, files, labels)
    print(f"{args.run} ({run.which} checkpoint, epoch {run.epoch}), {len(files)} {test[0].split} images:")
    print(
        f"  moving statistics as trained:  accuracy {100 * before[0]:.2f}%, predicted per class {before[1]}"
    )
    print(
        f"  re-estimated ({batches} batches of {args.batch_size} training images): "
        f"accuracy {100 * after[0]:.2f}%, predicted per class {after[1]}"
    )
    return {"before": before, "after": after, "batches": batches}


if __name__ == "__main__":
    main()
