"""Build a VGG model, optionally with Keras weights, print its layers and time a forward pass.

What runs today (training lands with the training issue):

    python examples/inspect_model.py                          # VGG16 transfer model, random init
    python examples/inspect_model.py --weights imagenet       # Keras's ImageNet file (cache/download)
    python examples/inspect_model.py --weights my_vgg16.h5 --include-top
"""

from __future__ import annotations

import argparse
import logging
import time

import jax
import numpy as np
from flax import nnx

import imgcls_jax


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", default="vgg16", choices=imgcls_jax.list_models())
    parser.add_argument(
        "--weights", default=None, help="'imagenet', a Keras .h5 path, or omit for random init"
    )
    parser.add_argument(
        "--include-top", action="store_true", help="the 1000-class ImageNet top (224x224 input)"
    )
    parser.add_argument("--num-classes", type=int, default=18, help="classes of the transfer head")
    parser.add_argument("--size", type=int, default=64, help="input height and width (at least 32)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("imgcls_jax").setLevel(logging.INFO)

    if args.include_top:
        kwargs = dict(include_top=True)
        args.size = 224
    else:
        kwargs = dict(num_classes=args.num_classes, head_units=(256,), dropout=0.5, pooling="avg")
    try:
        model = imgcls_jax.create_model(
            args.arch, weights=args.weights, input_shape=(args.size, args.size, 3), dtype=args.dtype, **kwargs
        )
    except (imgcls_jax.WeightsUnavailableError, imgcls_jax.WeightFileError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(imgcls_jax.summary(model))
    print(f"weights: {args.weights or 'random init (no pretrained weights requested)'}")
    print(f"preprocessing applied by the model: {model.preprocessing!r}")

    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, images):
        return nnx.merge(graphdef, state)(images)

    images = np.random.default_rng(0).integers(0, 256, (args.batch, args.size, args.size, 3), dtype=np.uint8)
    t0 = time.perf_counter()
    logits = forward(state, images).block_until_ready()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        forward(state, images).block_until_ready()
        times.append(time.perf_counter() - t0)
    step = float(np.median(times))
    print(f"output {tuple(logits.shape)} {logits.dtype} on {jax.devices()[0].platform}")
    print(
        f"forward: first call (compile) {compile_s:.2f} s, then {step * 1e3:.1f} ms/batch "
        f"= {args.batch / step:.1f} images/s at {args.size}x{args.size}, batch {args.batch}, {args.dtype}"
    )


if __name__ == "__main__":
    main()
