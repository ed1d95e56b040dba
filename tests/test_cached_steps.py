"""The cached steps (hyperparameters as inputs, one executable per shape) compute what the
plain steps with constant hyperparameters compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax import create_model
from imgcls_jax.train import init_state, make_train_step, split_model, trainable_layers
from imgcls_jax.train.optim import OptimizerSpec, make_optimizer, make_schedule
from imgcls_jax.train.steps import cached_train_step


def _tree(seed):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"head": {"w": jax.random.normal(k1, (4, 3))}, "base": {"w": jax.random.normal(k2, (5,))}}


def _run(opt, params, steps=4):
    state, out = opt.init(params), []
    for i in range(steps):
        updates, state = opt.update(_tree(100 + i), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        out.append(params)
    return out


@pytest.mark.parametrize(
    "name, nesterov, weight_decay",
    [
        ("sgd", False, 0.0),
        ("sgd", True, 1e-2),
        ("adam", False, 0.0),
        ("adam", False, 1e-2),
        ("adamw", False, 1e-2),
    ],
)
def test_spec_with_traced_numbers_equals_make_optimizer(name, nesterov, weight_decay):
    lr, momentum, total, warmup = 0.05, 0.8, 10, 2
    spec = OptimizerSpec(
        name=name, schedule="cosine", total_steps=total, warmup_steps=warmup, nesterov=nesterov,
        momentum=name == "sgd", weight_decay=bool(weight_decay),
    )  # fmt: skip
    hyper = {
        k: jnp.float32(v)
        for k, v in dict(
            learning_rate=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            base_lr_multiplier=1.0,
            grad_clip=0.0,
        ).items()
    }
    schedule = make_schedule("cosine", lr, total, warmup_steps=warmup)
    ref = make_optimizer(name, schedule, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    ours = jax.jit(lambda p: _run(spec.build(hyper), p))(_tree(0))
    theirs = _run(ref, _tree(0))
    for a, b in zip(ours, theirs):
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, y, rtol=2e-6, atol=1e-6)  # jit vs eager rounding


def test_base_multiplier_scales_only_the_base():
    spec = OptimizerSpec(name="sgd", schedule="constant", total_steps=5, momentum=False, base_multiplier=True,
                         head_layers=("head",))  # fmt: skip
    hyper = dict(learning_rate=0.1, momentum=0.0, weight_decay=0.0, base_lr_multiplier=0.25, grad_clip=0.0)
    params = _tree(0)
    updates, _ = spec.build(hyper).update(_tree(1), spec.build(hyper).init(params), params)
    grads = _tree(1)
    np.testing.assert_allclose(updates["head"]["w"], -0.1 * grads["head"]["w"], rtol=1e-6)
    np.testing.assert_allclose(updates["base"]["w"], -0.025 * grads["base"]["w"], rtol=1e-6)


@pytest.mark.parametrize("ema_decay", [None, 0.5])
def test_cached_train_step_equals_make_train_step(ema_decay):
    model = create_model(
        "vgg16", num_classes=3, head_units=(8,), dropout=0.5, input_shape=(32, 32, 3), seed=2
    )
    split = split_model(model, trainable_layers(model, "top:1"))
    spec = OptimizerSpec(name="sgd", schedule="cosine", total_steps=4, nesterov=True)
    numbers = dict(learning_rate=0.02, momentum=0.9, weight_decay=0.0, base_lr_multiplier=1.0, grad_clip=0.0)
    key = jax.random.key(7)
    hyper = {**numbers, "label_smoothing": 0.1, "ema_decay": ema_decay or 0.0}
    cached = cached_train_step(split, spec, hyper, dropout_key=key)
    plain_opt = make_optimizer("sgd", make_schedule("cosine", 0.02, 4), momentum=0.9, nesterov=True)
    plain = make_train_step(split, plain_opt, label_smoothing=0.1, dropout_key=key, ema_decay=ema_decay)
    rng = np.random.default_rng(0)
    batches = [
        {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 3, 4)}
        for _ in range(3)
    ]
    ema = ema_decay is not None
    a, b = init_state(split, spec.build(numbers), ema=ema), init_state(split, plain_opt, ema=ema)
    for batch in batches:
        a, ma = cached(a, split.frozen, batch)
        b, mb = plain(b, split.frozen, batch)
        np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
    assert (a.ema is None) == (b.ema is None) == (not ema)
    for x, y in zip(jax.tree.leaves(a.ema), jax.tree.leaves(b.ema)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
