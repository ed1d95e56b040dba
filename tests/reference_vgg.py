"""An independent float64 VGG for checking gradients (used by tests/test_keras_training.py).

Plain ``lax.conv_general_dilated`` + bias + ReLU, 2x2/2 VALID max pooling by reshape, global
average pooling and a dense head, in float64 (``jax.enable_x64``), written without
anything from ``imgcls_jax.models``. Its two discrete choices can be imposed from outside: which
ReLUs pass (``z > 0``) and which element of each pooling window receives the gradient. A float32
network makes those choices from its own rounded values, so where a pre-activation is within
rounding of 0, or a window's two largest values are within rounding of each other, float32 and
float64 can choose differently, and then the float32 gradient is the exact gradient of *its*
choices, not of float64's. :func:`decisions_float64` gives float64's own choices and their margins;
:func:`loss_and_grads` takes any choices.
"""

from __future__ import annotations

import numpy as np

BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}


def conv_names(arch: str) -> list[list[str]]:
    """Keras's conv layer names, per block."""
    return [[f"block{b}_conv{c}" for c in range(1, n + 1)] for b, n in enumerate(BLOCKS[arch], start=1)]


def windows(x):
    """``[N, H, W, C]`` -> ``[N, H//2, W//2, C, 4]``: the 2x2 windows, row-major inside (VALID)."""
    n, h, w, c = x.shape
    x = x[:, : h // 2 * 2, : w // 2 * 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, h // 2, w // 2, c, 4)


def _forward(params, images, arch, masks, routes):
    """Logits of float64 ``images`` (already preprocessed) with the given choices, and the
    pre-activations and pooling inputs met on the way."""
    import jax.numpy as jnp
    from jax import lax

    h, seen_z, seen_pool, i = images, [], [], 0
    for block in conv_names(arch):
        for name in block:
            kernel, bias = params[name]
            z = lax.conv_general_dilated(
                h, kernel, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"), precision="highest"
            )
            z = z + bias
            seen_z.append(z)
            mask = (z > 0) if masks is None else masks[i]
            h = jnp.where(mask, z, 0.0)
            i += 1
        seen_pool.append(h)
        route = jnp.argmax(windows(h), axis=-1) if routes is None else routes[len(seen_pool) - 1]
        h = jnp.take_along_axis(windows(h), route[..., None], axis=-1)[..., 0]
    kernel, bias = params["head_logits"]
    logits = jnp.mean(h, axis=(1, 2)) @ kernel + bias
    return logits, seen_z, seen_pool


def loss_and_grads(params, images, labels, arch="vgg16", masks=None, routes=None):
    """Mean softmax cross-entropy and its gradient, float64, with the ReLU ``masks`` (bool, one per
    conv layer, shaped like its output) and pooling ``routes`` (int index 0-3 into each window, one
    per block) given, or float64's own (from :func:`decisions_float64`) when None.

    ``params``: ``{name: (kernel HWIO, bias)}`` for every conv layer and ``"head_logits"``
    (``[C, K]``, ``[K]``); ``images``: preprocessed ``[N, H, W, 3]``; ``labels``: int ``[N]``.
    Returns ``(loss, grads)`` as float64 numpy (``grads`` shaped like ``params``).
    """
    import jax

    if masks is None or routes is None:
        own_masks, own_routes, _, _ = decisions_float64(params, images, arch)
        masks = own_masks if masks is None else masks
        routes = own_routes if routes is None else routes
    with jax.enable_x64(True):
        loss, grads = _value_and_grad(arch)(
            _as64(params), np.asarray(images, np.float64), np.asarray(labels), list(masks), list(routes)
        )
        return float(loss), {k: tuple(np.asarray(a) for a in v) for k, v in grads.items()}


def _as64(params):
    return {k: tuple(np.asarray(a, np.float64) for a in v) for k, v in params.items()}


#: Jitted float64 functions, one per (kind, architecture): the choices are inputs, not constants.
_COMPILED = {}


def _value_and_grad(arch):
    """The jitted float64 loss-and-gradient of ``arch``."""
    import jax
    import jax.numpy as jnp

    if ("grad", arch) not in _COMPILED:

        def loss_fn(params, images, labels, masks, routes):
            logits, _, _ = _forward(params, images, arch, masks, routes)
            logp = logits - jax.scipy.special.logsumexp(logits, axis=1, keepdims=True)
            return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=1))

        _COMPILED["grad", arch] = jax.jit(jax.value_and_grad(loss_fn))
    return _COMPILED["grad", arch]


def decisions_float64(params, images, arch="vgg16"):
    """Float64's own choices and how close each is to flipping.

    Returns ``(masks, routes, relu_margin, pool_margin)``: per conv layer, ``z > 0`` and
    ``|z| / max|z|``; per block, the argmax of each window and (top value - second value) /
    max over the block's pooling input, with +inf for windows whose maximum is 0 (dead: a
    different choice there cannot change the gradient, which the ReLU stops).
    """
    import jax
    import jax.numpy as jnp

    with jax.enable_x64(True):
        if ("forward", arch) not in _COMPILED:
            _COMPILED["forward", arch] = jax.jit(lambda p, x: _forward(p, x, arch, None, None)[1:])
        zs, pools = _COMPILED["forward", arch](_as64(params), jnp.asarray(np.asarray(images, np.float64)))
        zs, pools = [np.asarray(z) for z in zs], [np.asarray(p) for p in pools]
    masks = [z > 0 for z in zs]
    relu_margin = [np.abs(z) / np.abs(z).max() for z in zs]
    routes, pool_margin = [], []
    for h in pools:
        win = np.asarray(windows(h))
        top2 = np.sort(win, axis=-1)[..., -2:]
        margin = (top2[..., 1] - top2[..., 0]) / np.abs(h).max()
        routes.append(win.argmax(-1))
        pool_margin.append(np.where(top2[..., 1] > 0, margin, np.inf))
    return masks, routes, relu_margin, pool_margin
