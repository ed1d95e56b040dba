"""The one optimizer path (OptimizerSpec, behind fit's phases and make_optimizer) against the
update rules written out in NumPy float64, and its numbers as inputs of one compiled step."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax import create_model
from imgcls_jax.train import (
    OptimizerSpec,
    init_state,
    lr_scale,
    make_optimizer,
    make_train_step,
    set_lr_scale,
    split_model,
)
from imgcls_jax.train.steps import _JIT_CACHE

STEPS, TOTAL, WARMUP = 6, 10, 2


def grads(i):
    rng = np.random.default_rng(100 + i)
    return {"head": {"w": rng.normal(0, 1, (4, 3))}, "base": {"w": rng.normal(0, 1e-2, (5,))}}


def start():
    rng = np.random.default_rng(0)
    return {"head": {"w": rng.normal(0, 1, (4, 3))}, "base": {"w": rng.normal(0, 1, (5,))}}


def unit_lr(step):
    """Linear warmup over WARMUP steps to 1, then cosine decay to 0 at TOTAL (optax's forms)."""
    if step < WARMUP:
        return step / WARMUP
    t = min(step - WARMUP, TOTAL - WARMUP) / (TOTAL - WARMUP)
    return 0.5 * (1 + np.cos(np.pi * t))


def reference(name, hyper, *, nesterov=False, base_multiplier=False, clip=False, eps=1e-7):
    """``STEPS`` updates by the documented rules, float64: global-norm clipping; L2 weight decay
    added to the gradient (sgd/adam) or decoupled (adamw: w -= lr * wd * w); SGD momentum
    (trace = g + m * trace; update = -lr * trace, Nesterov -lr * (g + m * trace)); Adam as Keras
    computes it (eps added to the uncorrected root); the base at ``base_lr_multiplier`` x lr."""
    params = {k: {"w": v["w"].copy()} for k, v in start().items()}
    mu = {k: np.zeros_like(v["w"]) for k, v in params.items()}
    nu = {k: np.zeros_like(v["w"]) for k, v in params.items()}
    for i in range(STEPS):
        g = {k: v["w"] for k, v in grads(i).items()}
        if clip:
            norm = np.sqrt(sum((x**2).sum() for x in g.values()))
            g = {k: x * min(1.0, hyper["grad_clip"] / norm) for k, x in g.items()}
        for k, p in params.items():
            lr = hyper["learning_rate"] * unit_lr(i)
            if base_multiplier and k == "base":
                lr *= hyper["base_lr_multiplier"]
            x, w = g[k], p["w"]
            if hyper["weight_decay"] and name != "adamw":
                x = x + hyper["weight_decay"] * w
            if name == "sgd":
                mu[k] = x + hyper["momentum"] * mu[k]
                step = x + hyper["momentum"] * mu[k] if nesterov else mu[k]
                p["w"] = w - lr * step
                continue
            mu[k] = 0.9 * mu[k] + 0.1 * x
            nu[k] = 0.999 * nu[k] + 0.001 * x * x
            t = i + 1
            update = np.sqrt(1 - 0.999**t) / (1 - 0.9**t) * mu[k] / (np.sqrt(nu[k]) + eps)
            if name == "adamw":
                update = update + hyper["weight_decay"] * w
            p["w"] = w - lr * update
    return params


CASES = {
    "sgd-momentum": dict(name="sgd"),
    "sgd-nesterov-l2": dict(name="sgd", nesterov=True, weight_decay=1e-2),
    "sgd-base-multiplier-clip": dict(name="sgd", base_multiplier=True, clip=True),
    "adam": dict(name="adam"),
    "adam-l2-eps": dict(name="adam", weight_decay=1e-2, eps=1e-3),
    "adamw-base-multiplier": dict(name="adamw", weight_decay=5e-2, base_multiplier=True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_optimizer_follows_the_update_rules(case):
    c = dict(CASES[case])
    name, nesterov, clip = c.pop("name"), c.pop("nesterov", False), c.pop("clip", False)
    base_multiplier, eps, wd = c.pop("base_multiplier", False), c.pop("eps", 1e-7), c.pop("weight_decay", 0.0)
    hyper = dict(learning_rate=0.05, momentum=0.8, weight_decay=wd, base_lr_multiplier=0.25, grad_clip=0.5)
    spec = OptimizerSpec(
        name, schedule="cosine", total_steps=TOTAL, warmup_steps=WARMUP, nesterov=nesterov,
        momentum=name == "sgd", weight_decay=bool(wd), base_multiplier=base_multiplier,
        head_layers=("head",), grad_clip=clip, eps=eps,
    )  # fmt: skip

    @jax.jit
    def run(params, hyper):  # the numbers traced, as in fit's compiled step
        tx = spec.build(hyper)
        state = tx.init(params)
        for i in range(STEPS):
            g = jax.tree.map(jnp.asarray, grads(i))
            updates, state = tx.update(jax.tree.map(lambda x: x.astype(jnp.float32), g), state, params)
            params = jax.tree.map(lambda p, u: p + u, params, updates)
        return params

    ours = run(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start()), hyper)
    want = reference(name, hyper, nesterov=nesterov, base_multiplier=base_multiplier, clip=clip, eps=eps)
    moved = False
    for key in ("head", "base"):
        got, expected, before = np.asarray(ours[key]["w"]), want[key]["w"], start()[key]["w"]
        change = np.abs(expected - before).max()
        moved |= change > 1e-3
        # float32 arithmetic against float64: within 1e-5 of the total change plus 4 float32 ulps
        # of the weights (the rounding of storing them)
        ulps = 4 * np.finfo(np.float32).eps * np.abs(expected).max()
        assert np.abs(got - expected).max() <= 1e-5 * change + ulps, (
            key,
            np.abs(got - expected).max(),
            change,
        )
    assert moved


def test_make_optimizer_is_the_spec_with_constant_numbers():
    """make_optimizer (what the README and the Keras-equality tests use) against the rule."""
    hyper = dict(learning_rate=0.05, momentum=0.8, weight_decay=0.0, base_lr_multiplier=1.0, grad_clip=0.0)
    tx = make_optimizer("sgd", lambda step: 0.05 * unit_lr(step), momentum=0.8, nesterov=True)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start())
    state = tx.init(params)
    for i in range(STEPS):
        updates, state = tx.update(
            jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads(i)), state, params
        )
        params = jax.tree.map(lambda p, u: p + u, params, updates)
    want = reference("sgd", hyper, nesterov=True)
    for key in ("head", "base"):
        np.testing.assert_allclose(params[key]["w"], want[key]["w"], rtol=1e-5, atol=1e-6)
    assert lr_scale(state) == 1.0


def _batch(seed):
    rng = np.random.default_rng(seed)
    return {"image": rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8), "label": rng.integers(0, 3, 4)}


def test_numbers_are_inputs_of_one_compiled_step():
    """Two phases whose optimizers differ only in their numbers run one executable; the numbers
    still act (learning rate 0 leaves the weights, a larger one moves them further)."""
    model = create_model("vgg16", num_classes=3, head_units=(8,), input_shape=(32, 32, 3), seed=2)
    split = split_model(model, model.trainable_layers("head"))
    spec = OptimizerSpec("sgd", schedule="constant", total_steps=4)
    moves = []
    for lr in (0.0, 0.01, 0.1):
        hyper = dict(learning_rate=lr, momentum=0.9, weight_decay=0.0, base_lr_multiplier=1.0, grad_clip=0.0)
        step = make_train_step(split, spec, hyper=hyper, label_smoothing=0.1)
        state = init_state(split, spec.build(hyper))
        state, metrics = step(state, split.frozen, _batch(0))
        assert float(metrics["learning_rate"]) == pytest.approx(lr)
        moves.append(
            max(
                float(jnp.abs(a - b).max())
                for a, b in zip(*map(jax.tree.leaves, (state.params, split.trainable)))
            )
        )
    assert moves[0] == 0.0 and 0 < moves[1] < moves[2]
    programs = [fn for key, fn in _JIT_CACHE.items() if key[0] == "train" and key[1] is split.train_graph]
    assert len(programs) == 1 and programs[0]._cache_size() == 1


@pytest.mark.parametrize("base_multiplier, clip", [(False, False), (True, True)])
def test_plateau_scale_is_found_by_name_wherever_the_chain_puts_it(base_multiplier, clip):
    spec = OptimizerSpec("adam", head_layers=("head",), base_multiplier=base_multiplier, grad_clip=clip)
    hyper = dict(learning_rate=0.1, momentum=0.9, weight_decay=0.0, base_lr_multiplier=0.5, grad_clip=10.0)
    tx = spec.build(hyper)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), start())
    state = tx.init(params)
    g = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), grads(0))
    full, _ = tx.update(g, state, params)
    scaled_state = set_lr_scale(state, 0.25)
    assert lr_scale(scaled_state) == 0.25 and lr_scale(state) == 1.0
    quarter, _ = tx.update(g, scaled_state, params)
    for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(quarter)):
        np.testing.assert_allclose(np.asarray(b), 0.25 * np.asarray(a), rtol=1e-6)
    with pytest.raises(ValueError, match="no lr scale"):
        lr_scale(make_optimizer("sgd", 0.1).init(params)[0])
