"""How much fine detail each framework's training augmentation leaves in an image.

Opt-in measurement (not part of ``pytest benchmarks/``; about a minute on a 2-core CPU). From the
repository root::

    .venv/bin/python -m benchmarks.augment_sharpness --data ../shared/data/flowers5 --size 64

The reference protocol (:mod:`benchmarks.reference_keras`) augments with flip, rotation, zoom and
translation. Keras's ``Random*`` layers resample the image once per layer (three bilinear
interpolations); imgcls_jax composes the three transformations into one resampling. Both use
exactly the functions the protocol trains with (:func:`benchmarks.reference_keras.keras_augmentation`,
``"layers"`` and ``"imgcls_jax"``). Measure: the mean absolute Laplacian (4-neighbour, grey, interior
pixels) of every augmented image, averaged over ``--images`` photos (every n-th of the folder,
resized to ``--size`` as the protocol decodes them) and ``--rounds`` draws, beside the originals'
and that of each Keras layer alone. Each draw differs, so the spread over rounds is printed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def laplacian_energy(images: np.ndarray) -> float:
    """Mean |4-neighbour Laplacian| of the grey images (mean of the channels), interior pixels."""
    x = np.asarray(images, np.float64).mean(-1)
    lap = 4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    return float(np.abs(lap).mean())


def load_images(data: str, size: int, count: int) -> np.ndarray:
    """``count`` photos spread over the folder (sorted paths, every n-th), decoded and resized
    (bilinear) as the protocol's Keras side decodes them: float32 ``[count, size, size, 3]``."""
    import tensorflow as tf

    paths = sorted(p for p in Path(data).rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if len(paths) < count:
        raise SystemExit(f"{data}: {len(paths)} images, fewer than --images {count}")
    chosen = paths[:: len(paths) // count][:count]

    def decode(path):
        image = tf.io.decode_image(tf.io.read_file(str(path)), channels=3, expand_animations=False)
        return tf.image.resize(image, (size, size), method="bilinear").numpy()

    return np.stack([decode(p) for p in chosen]).astype(np.float32)


def measure(images: np.ndarray, config, rounds: int) -> dict[str, list[float]]:
    """``{name: [energy per round]}`` for the originals, Keras's layers, imgcls_jax's op and
    Keras's rotation, zoom and translation layers alone (``config``: the protocol's TrainConfig,
    whose ``seed`` is set per round)."""
    from dataclasses import replace

    import keras
    import tensorflow as tf

    from benchmarks.reference_keras import keras_augmentation

    a, out = config.augment, {"original": [laplacian_energy(images)] * rounds}
    for r in range(rounds):
        round_config = replace(config, seed=r)
        seeds = tf.constant(np.stack([np.full(len(images), r), np.arange(len(images))], 1), tf.int64)
        for kind in ("layers", "imgcls_jax"):
            augmented = keras_augmentation(round_config, kind)(tf.constant(images), seeds)
            out.setdefault(f"{kind}: flip, rotation, zoom, translation", []).append(
                laplacian_energy(augmented.numpy())
            )
        alone = {
            "Keras RandomRotation alone": keras.layers.RandomRotation(
                a.rotation, fill_mode=a.fill_mode, seed=r
            ),
            "Keras RandomZoom alone": keras.layers.RandomZoom(a.zoom, fill_mode=a.fill_mode, seed=r),
            "Keras RandomTranslation alone": keras.layers.RandomTranslation(
                a.translation, a.translation, fill_mode=a.fill_mode, seed=r
            ),
        }
        for name, layer in alone.items():
            out.setdefault(name, []).append(laplacian_energy(np.asarray(layer(images, training=True))))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "flowers5"))
    parser.add_argument("--size", default=64, type=int)
    parser.add_argument("--images", default=200, type=int)
    parser.add_argument("--rounds", default=5, type=int)
    args = parser.parse_args(argv)
    from benchmarks.reference_keras import protocol

    config = protocol(Path(args.data), Path("runs/augment_sharpness"), 12, "mobilenetv2", 0, args.size)
    results = measure(load_images(args.data, args.size, args.images), config, args.rounds)
    a = config.augment
    print(
        f"flip {a.flip}, rotation {a.rotation}, zoom {a.zoom}, translation {a.translation} "
        f"({a.fill_mode} fill); {args.images} images at {args.size}x{args.size}, {args.rounds} rounds"
    )
    print("| augmentation | mean abs Laplacian (sd over rounds) | of the originals' |\n|---|---|---|")
    base = results["original"][0]
    for name, values in results.items():
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.3f} ({sd:.3f}) | {statistics.mean(values) / base:.1%} |")
    return results


if __name__ == "__main__":
    main()
