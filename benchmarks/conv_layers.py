"""Every convolution of the benchmarked families, timed alone by each implementation: the
measurements behind ``conv_impl="auto"``'s oneDNN rule (:func:`imgcls_jax.models.conv.onednn_wins`).

The convolutions are collected from the models themselves (:func:`model_convs`: a traced forward
pass under :func:`imgcls_jax.models.conv.record_convs`), not listed by hand. Each distinct one is
timed as a training step needs it: forward, input gradient and weight gradient in one jitted
function (the input gradient of a model's first convolution is not needed by training, but is
timed all the same), medians of warm rounds, by oneDNN and by what ``"auto"`` would run without
it (XLA's convolution, im2col or shifted multiply-adds). Run from the repository root::

    .venv/bin/python -m benchmarks.conv_layers --out layers.md

On a shared machine, run it twice and compare.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

#: (model, image size, batch): the cases of ``benchmarks/test_cpu_speed.py``'s family steps.
CASES = (("vgg16", 64, 16), ("resnet50", 64, 16), ("mobilenetv2", 64, 16), ("efficientnetb0", 64, 16),
         ("vgg16", 224, 8))  # fmt: skip


def model_convs(arch: str, size: int, batch: int, dtype: str = "float32") -> list:
    """The :class:`~imgcls_jax.models.conv.ConvCall` of each convolution of ``arch``'s forward pass
    (transfer head, average pooling) on ``batch`` images of ``size`` pixels, in forward order."""
    from flax import nnx

    from imgcls_jax.models import create_model
    from imgcls_jax.models.conv import record_convs

    model = create_model(arch, num_classes=5, pooling="avg", input_shape=(size, size, 3), dtype=dtype,
                         conv_impl="xla")  # fmt: skip
    graph, state = nnx.split(model)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    with record_convs() as calls:
        jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, images)
    return list(calls)


@partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _step(impl, strides, pads, groups, x, k, g):
    from imgcls_jax.models.conv import conv_nhwc

    y, vjp = jax.vjp(lambda x, k: conv_nhwc(x, k, strides, pads, groups=groups, impl=impl), x, k)
    dx, dk = vjp(g)
    return y, dx, dk


def time_call(call, impl: str, rounds: int = 5) -> float:
    """Median ms of forward + both gradients of ``call`` by ``impl`` (after one warm-up)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=call.x_shape), call.dtype)
    k = jnp.asarray(rng.normal(size=call.kernel_shape), call.dtype)
    from imgcls_jax.models.conv import conv_nhwc

    y = jax.eval_shape(
        lambda x, k: conv_nhwc(x, k, call.strides, call.pads, groups=call.groups, impl="xla"), x, k
    )
    g = jnp.asarray(rng.normal(size=y.shape), call.dtype)
    jax.block_until_ready(_step(impl, call.strides, call.pads, call.groups, x, k, g))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(_step(impl, call.strides, call.pads, call.groups, x, k, g))
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def fallback_impl(call) -> str:
    """What ``"auto"`` runs for ``call`` when oneDNN is out of the picture."""
    from imgcls_jax.models import conv

    depthwise = conv._is_depthwise(call.x_shape, call.kernel_shape, call.groups)
    if depthwise and not any(v for p in call.pads for v in p):
        return "shift"
    plain = conv._is_3x3_same_s1(call.kernel_shape, call.strides, call.pads, call.groups)
    small = call.x_shape[1] * call.x_shape[2] <= conv.CPU_IM2COL_MAX_PIXELS
    return "im2col" if plain and small else "xla"


def describe(call) -> str:
    n, h, w, c = call.x_shape
    kh, kw, _, o = call.kernel_shape
    kind = "dw" if call.groups > 1 else "conv"
    return f"{kind} {kh}x{kw}/{call.strides[0]} {n}x{h}x{w}x{c}->{o}"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the markdown table here")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cases", default=",".join(f"{a}:{s}:{b}" for a, s, b in CASES))
    args = parser.parse_args(argv)
    lines = [
        "| model | conv | count | oneDNN ms | other | other ms | other / oneDNN |",
        "|---|---|---|---|---|---|---|",
    ]
    for case in args.cases.split(","):
        arch, size, batch = case.split(":")
        calls = model_convs(arch, int(size), int(batch))
        counts = collections.Counter(c.key() for c in calls)
        seen = set()
        for call in calls:
            if call.key() in seen:
                continue
            seen.add(call.key())
            other = fallback_impl(call)
            ours, theirs = time_call(call, "onednn", args.rounds), time_call(call, other, args.rounds)
            cells = (f"{arch} {size}px b{batch}", describe(call), counts[call.key()], f"{ours:.2f}", other,
                     f"{theirs:.2f}", f"{theirs / ours:.2f}")  # fmt: skip
            line = "| " + " | ".join(map(str, cells)) + " |"
            print(line, flush=True)
            lines.append(line)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
