"""Training against Keras: 30 steps of each optimizer, and one step's gradients against float64.

Keras 3 (TensorFlow backend, oneDNN on CPU) and imgcls_jax start from the same weights and see the
same batches (no augmentation, no dropout). Measured with Keras 3.15.1 / TF 2.21 / jax 0.10.2 on
the 2-core AMD EPYC CPU; ``pytest tests/test_keras_training.py -s`` prints every number, and
``IMGCLS_JAX_FLOAT32_SPREAD=1`` adds the two measurements the tolerances rest on (minutes).

**What a float32 difference between the two is made of** (:func:`test_gradients_against_float64`;
reference: ``tests/reference_vgg.py``, an independent float64 VGG). A float32 VGG's gradient
equals float64's to ~2e-6 of each tensor's largest entry *given the same discrete choices*:
which ReLUs pass and which element of each 2x2 max-pool window receives the window's gradient.
Where a window's two largest inputs are closer than float32's rounding of the forward pass (~2e-6
of the block's largest activation), float32 can order them the other way, and the whole window's
gradient goes to the other pixel. At 32 px in tests/test_train_steps.py's setup, one window of
block3_pool (of 10,776 with a positive maximum) has its two largest inputs 4.2e-8 apart: Keras
orders them the other way, imgcls_jax as float64 does. Against float64, imgcls_jax's gradient is
within 1.2e-6 everywhere and Keras's is off by up to 2.8e-2 in blocks 1-3 (below that window);
with Keras's own choice imposed on the float64 reference, Keras is within 2.7e-6 too. Neither is
a defect of either library: each computes the exact gradient of what its float32 forward pass
produced. Which one lands on float64's side of a near-tie is chance: imgcls_jax flips them too
(:func:`test_gradients_along_a_run_against_float64`: 1 window in a 30-step run, 4.4e-2 off that
step, 1.0e-6 to 1.7e-6 every other step).

**30 steps** (:func:`test_thirty_steps_track_keras`). After such a flip two runs follow slightly
different weights, more windows fall on different sides, and the gap grows with the learning rate.
Two float32 runs of *imgcls_jax itself* with ``conv_impl`` "im2col" and "auto" (the same maths,
summed in another order) drift apart as much as imgcls_jax and Keras do
(:func:`test_float32_spread_of_imgcls_jax_itself`), so the tolerances are set from that spread;
changes in the maths (another momentum or learning rate, Nesterov off, AdamW's decay off by 10% or
coupled into the gradient) exceed them (numbers beside LOSS_TOL and WEIGHT_TOL). A well-conditioned
setup, and why:

* inputs preprocessed with ``"tf"`` (pixels to [-1, 1]): with He-normal kernels the first loss is
  1.3 at 32 px and 8.3 at 64 px; with ``"caffe"`` (pixels minus the mean, +-128) the same weights
  give 78 and 1004 (logits up to 750) and gradients ~200x larger, so float32's absolute gradient
  noise is no longer small against Adam's epsilon 1e-7, and Adam's per-element normalisation turns
  it into whole-step differences for weights whose gradient is near zero (as tests/
  test_train_steps.py found with epsilon 1e-7);
* learning rates at which the loss moves visibly in 30 steps but a flip is not amplified much:
  SGD 1e-5 with momentum 0.9, Adam/AdamW 1e-6 (32 px: loss 1.34 to 0.97 and 0.96). Ten times
  larger, a flip grows to 0.46 (SGD 1e-3) and 9.4e-2 (Adam 1e-4) of a tensor's update against
  Keras, and to 0.10 between imgcls_jax's two conv implementations (Adam 1e-4);
* weights compared as norms per tensor, ``|ours - keras| / |keras - start|``: after a flip a few
  elements differ much more than the rest, and Adam moves every element by ~lr whatever its
  gradient, so a max-norm is decided by single elements.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import imgcls_jax
from imgcls_jax.models.conv import max_pool_2x2
from imgcls_jax.models.preprocessing import preprocess_input
from imgcls_jax.train import (
    cross_entropy,
    init_state,
    make_optimizer,
    make_train_step,
    split_model,
    trainable_layers,
)
from imgcls_jax.weights import write_legacy_h5
from tests import reference_vgg as ref

keras = pytest.importorskip("keras")
from keras.applications import imagenet_utils  # noqa: E402

K, BATCH, STEPS, N_BATCHES, MODE = 3, 2, 30, 5, "tf"


def he_weights(keras_model, rng, bias=0.0):
    """He-normal kernels (std sqrt(2 / fan_in)), constant biases: Keras's order and shapes."""
    out = []
    for w in keras_model.get_weights():
        std = np.sqrt(2.0 / np.prod(w.shape[:-1])) if w.ndim > 1 else 0.0
        out.append((rng.normal(0, std, w.shape) if w.ndim > 1 else np.full(w.shape, bias)).astype(np.float32))
    return out


def keras_base(size):
    return keras.applications.VGG16(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
    )


@pytest.fixture(scope="module", params=[pytest.param(32, marks=pytest.mark.slow), 64], ids=lambda s: f"{s}px")
def start(request, tmp_path_factory):
    return make_start(request.param, tmp_path_factory.mktemp(f"start{request.param}"))


def make_start(size, folder):
    """Same start for both frameworks: a Keras VGG16 base + Dense(K) head with random weights,
    the base's legacy weight file (in ``folder``), and a sequence of batches (random pixels,
    random labels)."""
    base = keras_base(size)
    rng = np.random.default_rng(size)
    base.set_weights(he_weights(base, rng))
    head = [rng.normal(0, 0.05, (512, K)).astype(np.float32), np.zeros(K, np.float32)]
    path = folder / "base.h5"
    write_legacy_h5(path, {layer.name: layer.get_weights() for layer in base.layers if layer.weights})
    weights = {layer.name: layer.get_weights() for layer in base.layers if layer.weights}
    weights["head_logits"] = head
    data = np.random.default_rng(size + 1)
    batches = [
        {
            "image": data.integers(0, 256, (BATCH, size, size, 3), dtype=np.uint8),
            "label": data.integers(0, K, BATCH).astype(np.int32),
        }
        for _ in range(N_BATCHES)
    ]
    return dict(size=size, base=base, weights=weights, path=path, batches=batches)


def keras_run(start, optimizer):
    """Keras ``train_on_batch`` for STEPS steps: per-step losses and the final weights."""
    size = start["size"]
    base = keras_base(size)
    base.set_weights(start["base"].get_weights())
    dense = keras.layers.Dense(K, name="head_logits")
    model = keras.Sequential([base, dense])
    model.build((None, size, size, 3))
    dense.set_weights(start["weights"]["head_logits"])
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=False,
    )
    losses = []
    for step in range(STEPS):
        b = start["batches"][step % N_BATCHES]
        x = imagenet_utils.preprocess_input(b["image"].astype(np.float32), mode=MODE)
        losses.append(float(model.train_on_batch(x, b["label"])))
    weights = {layer.name: layer.get_weights() for layer in base.layers if layer.weights}
    weights["head_logits"] = dense.get_weights()
    return np.asarray(losses), weights


def ours_run(start, optimizer, conv_impl="auto"):
    """imgcls_jax's train step for STEPS steps: per-step losses and the final weights."""
    size = start["size"]
    model = imgcls_jax.create_model(
        "vgg16",
        num_classes=K,
        pooling="avg",
        input_shape=(size, size, 3),
        weights=str(start["path"]),
        preprocessing=MODE,
        conv_impl=conv_impl,
    )
    kernel, bias = start["weights"]["head_logits"]
    model.head_logits.kernel.set_value(kernel)
    model.head_logits.bias.set_value(bias)
    split = split_model(model, trainable_layers(model, "all"))
    state = init_state(split, optimizer)
    step = make_train_step(split, optimizer)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, split.frozen, start["batches"][i % N_BATCHES])
        losses.append(float(metrics["loss"]))
    weights = {
        name: [np.asarray(p["kernel"][...]), np.asarray(p["bias"][...])] for name, p in state.params.items()
    }
    return np.asarray(losses), weights


def weight_gap(weights, reference, start_weights):
    """Per tensor ``|weights - reference| / |reference - start|`` (Frobenius norms), worst first."""
    gaps = []
    for name, tensors in reference.items():
        for what, want, got, w0 in zip(("kernel", "bias"), tensors, weights[name], start_weights[name]):
            update = np.linalg.norm(want - w0)
            assert update > 0, f"{name} {what} did not move"
            gaps.append((float(np.linalg.norm(got - want) / update), f"{name}.{what}"))
    return sorted(gaps, reverse=True)


OPTIMIZERS = {
    "sgd-momentum": (
        lambda: make_optimizer("sgd", 1e-5, momentum=0.9),
        lambda: keras.optimizers.SGD(1e-5, momentum=0.9),
    ),
    "sgd-nesterov": (
        lambda: make_optimizer("sgd", 1e-5, momentum=0.9, nesterov=True),
        lambda: keras.optimizers.SGD(1e-5, momentum=0.9, nesterov=True),
    ),
    "adam": (
        lambda: make_optimizer("adam", 1e-6, eps=1e-7),
        lambda: keras.optimizers.Adam(1e-6, epsilon=1e-7),
    ),
    # weight decay 10: the decoupled decay (lr * 10 * w per step) is ~10-50% of Adam's step for
    # these weights (|w| ~ 0.01-0.05), so it is a visible part of the update
    "adamw": (
        lambda: make_optimizer("adamw", 1e-6, weight_decay=10.0, eps=1e-7),
        lambda: keras.optimizers.AdamW(1e-6, weight_decay=10.0, epsilon=1e-7),
    ),
}

#: Per-step loss: |ours - keras| <= LOSS_TOL * |keras|. Measured: <= 7.0e-4 against Keras; the
#: float32 spread of imgcls_jax itself (conv_impl "im2col" against "auto") <= 1.9e-3; changed
#: maths: momentum 0.85 >= 0.28, learning rate +10% >= 6.8e-2, Nesterov off >= 3.7e-2.
LOSS_TOL = 5e-3
#: Final weights, per tensor: |ours - keras| <= WEIGHT_TOL * |keras - start| (Frobenius norms).
#: Measured: <= 2.0e-2 against Keras; float32 spread of imgcls_jax itself <= 2.6e-2; changed
#: maths: momentum 0.85 >= 0.24, learning rate +10% >= 0.11, Nesterov off >= 0.12, AdamW decay
#: 9 instead of 10 >= 9.2e-2, decay as L2 in the gradient >= 1.7. Adam's epsilon placement (optax's
#: adam) or 1e-8 instead of 1e-7 changes these weights by only 2.0e-2 to 2.4e-2, inside the spread:
#: test_thirty_updates_equal_keras_on_given_gradients checks those exactly.
WEIGHT_TOL = 5e-2


def compare_runs(losses, weights, ref_losses, ref_weights, start):
    """(per-step relative loss gaps, per-tensor weight gaps worst first) of a run against another."""
    loss_gap = np.abs(losses - ref_losses) / np.abs(ref_losses)
    return loss_gap, weight_gap(weights, ref_weights, start["weights"])


@pytest.mark.parametrize(
    "name",  # the quick tier: Adam (15-18 s each at 64 px); the other three with `pytest -m slow`
    [n if n == "adam" else pytest.param(n, marks=pytest.mark.slow) for n in OPTIMIZERS],
)
def test_thirty_steps_track_keras(start, name):
    """30 steps from the same weights on the same batches: every step's loss within LOSS_TOL = 5e-3
    of Keras's (relative) and every final weight tensor within WEIGHT_TOL = 5e-2 of its total
    update (measured worst over both sizes and the four optimizers: 7.0e-4 and 2.0e-2; the
    numbers behind the tolerances are beside them)."""
    ours, theirs = OPTIMIZERS[name]
    k_losses, k_weights = keras_run(start, theirs())
    o_losses, o_weights = ours_run(start, ours())
    loss_gap, gaps = compare_runs(o_losses, o_weights, k_losses, k_weights, start)
    print(
        f"\n{start['size']}px {name}: loss {k_losses[0]:.4f} -> {k_losses[-1]:.4f}; per-step loss gap "
        f"max {loss_gap.max():.1e} (first 5 steps {loss_gap[:5].max():.1e}); weights: worst "
        + ", ".join(f"{n} {g:.1e}" for g, n in gaps[:3])
        + f", median {np.median([g for g, _ in gaps]):.1e}"
    )
    assert loss_gap.max() <= LOSS_TOL, f"per-step loss gap {loss_gap.max():.2e} > {LOSS_TOL}"
    assert gaps[0][0] <= WEIGHT_TOL, f"{gaps[0][1]}: |ours - keras| = {gaps[0][0]:.2e} of the update"


@pytest.mark.skipif(
    not os.environ.get("IMGCLS_JAX_FLOAT32_SPREAD"),
    reason="measures the basis of the tolerances above (8 more runs); set IMGCLS_JAX_FLOAT32_SPREAD=1",
)
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float32_spread_of_imgcls_jax_itself(start, name):
    """imgcls_jax against itself: the same 30 steps with ``conv_impl="im2col"`` and ``"auto"`` (the
    same maths summed in another order) drift apart as much as imgcls_jax and Keras do (measured
    worst: loss 1.9e-3, weights 2.6e-2), and stay within the same tolerances."""
    ours, _ = OPTIMIZERS[name]
    a_losses, a_weights = ours_run(start, ours())
    b_losses, b_weights = ours_run(start, ours(), conv_impl="im2col")
    loss_gap, gaps = compare_runs(b_losses, b_weights, a_losses, a_weights, start)
    print(
        f"\n{start['size']}px {name}: im2col vs auto: loss gap {loss_gap.max():.1e}, weights {gaps[0][0]:.1e}"
    )
    assert loss_gap.max() <= LOSS_TOL and gaps[0][0] <= WEIGHT_TOL


# ----------------------------------------------------------------------------- float64 reference
#: A choice within this fraction of the largest value of its layer (a pre-activation's |z|, or the
#: gap between a pooling window's two largest inputs) may go either way in float32, whose forward
#: pass is off float64 by ~2e-6 of that value (measured); a choice further from flipping may not.
NEAR = 1e-5
#: Gradient per tensor against float64 with the same choices: max |diff| <= GRAD_TOL * max |ref|.
GRAD_TOL = 1e-5


@pytest.fixture(scope="module")
def one_step():
    """tests/test_train_steps.py's setup at 32 px (where one step differed from Keras by ~3%):
    "caffe" inputs, He-normal kernels, biases and head N(0, 0.05), 4 random images."""
    size = 32
    base = keras_base(size)
    rng = np.random.default_rng(0)
    base.set_weights(
        [
            rng.normal(0, np.sqrt(2 / np.prod(w.shape[:-1])) if w.ndim > 1 else 0.05, w.shape).astype(
                np.float32
            )
            for w in base.get_weights()
        ]
    )
    params = {layer.name: tuple(layer.get_weights()) for layer in base.layers if layer.weights}
    params["head_logits"] = (
        rng.normal(0, 0.05, (512, K)).astype(np.float32),
        rng.normal(0, 0.05, (K,)).astype(np.float32),
    )
    images = np.random.default_rng(0).integers(0, 256, (4, size, size, 3), dtype=np.uint8)
    labels = (np.arange(4) % K).astype(np.int32)
    x64 = imagenet_utils.preprocess_input(images.astype(np.float64), mode="caffe")
    return dict(base=base, params=params, images=images, labels=labels, x64=x64)


def keras_grads_and_choices(case):
    """Keras's float32 gradient (its layers' own ops under ``tf.GradientTape``) and the choices
    its forward pass made: ReLU masks per conv layer, pooling argmax per block."""
    import tensorflow as tf

    base = case["base"]
    head_k, head_b = (tf.Variable(a) for a in case["params"]["head_logits"])
    x = imagenet_utils.preprocess_input(case["images"].astype(np.float32), mode="caffe")
    masks, routes = [], []
    with tf.GradientTape() as tape:
        h = tf.constant(x)
        for layer in base.layers[1:]:
            if isinstance(layer, keras.layers.Conv2D):  # what Conv2D.call does, keeping z
                z = keras.ops.add(
                    layer.convolution_op(h, layer.kernel), keras.ops.reshape(layer.bias, (1, 1, 1, -1))
                )
                masks.append(np.asarray(z) > 0)
                h = layer.activation(z)
            else:
                if isinstance(layer, keras.layers.MaxPooling2D):
                    routes.append(np.asarray(ref.windows(np.asarray(h))).argmax(-1))
                h = layer(h)
        logits = tf.matmul(h, head_k) + head_b
        loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(case["labels"], logits))
    named = [(layer.name, layer.kernel, layer.bias) for layer in base.layers if layer.weights]
    named.append(("head_logits", head_k, head_b))
    grads = tape.gradient(loss, [v for _, kernel, bias in named for v in (kernel, bias)])
    out = {
        name: (np.asarray(grads[2 * i]), np.asarray(grads[2 * i + 1])) for i, (name, _, _) in enumerate(named)
    }
    return out, masks, routes


def ours_probe(split):
    """A jitted ``(params, images, labels) -> (grads, masks, routes)`` for imgcls_jax: the gradient
    of the train step's loss and the choices its forward pass makes (the model's own layers)."""

    @jax.jit
    def probe(params, images, labels):
        grads = jax.grad(lambda p: cross_entropy(split.merge(p, train=True)(images), labels).mean())(params)
        net, masks, routes = split.merge(params), [], []
        h = preprocess_input(images, net.preprocessing)
        for block in ref.conv_names("vgg16"):
            for name in block:
                z = getattr(net, name)(h)
                masks.append(z > 0)
                h = jax.nn.relu(z)
            routes.append(jnp.argmax(ref.windows(h), axis=-1))
            h = max_pool_2x2(h)
        return grads, masks, routes

    def run(params, images, labels):
        g, masks, routes = probe(params, jnp.asarray(images), jnp.asarray(labels))
        out = {name: (np.asarray(v["kernel"][...]), np.asarray(v["bias"][...])) for name, v in g.items()}
        return out, [np.asarray(m) for m in masks], [np.asarray(r) for r in routes]

    return run


def ours_model(path, size, head, preprocessing):
    model = imgcls_jax.create_model(
        "vgg16",
        num_classes=K,
        pooling="avg",
        input_shape=(size, size, 3),
        weights=str(path),
        preprocessing=preprocessing,
    )
    model.head_logits.kernel.set_value(head[0])
    model.head_logits.bias.set_value(head[1])
    return split_model(model, trainable_layers(model, "all"))


def grad_error(grads, reference):
    """Per tensor max |grads - reference| / max |reference|, worst first."""
    errors = []
    for name, tensors in reference.items():
        for what, want, got in zip(("kernel", "bias"), tensors, grads[name]):
            scale = np.abs(want).max()
            if scale > 0:
                errors.append((float(np.abs(got - want).max() / scale), f"{name}.{what}"))
    return sorted(errors, reverse=True)


def float64_side(params, x64, labels):
    """Float64's own choices, their margins, and its gradient with them."""
    f64 = ref.decisions_float64(params, x64)
    _, grads = ref.loss_and_grads(params, x64, labels, masks=f64[0], routes=f64[1])
    return (*f64, grads)


def against_float64(who, params, x64, labels, grads, masks, routes, f64):
    """Check one float32 gradient against the float64 reference (``f64``: :func:`float64_side`).

    Asserts that its choices differ from float64's only at margins below NEAR and that, with its
    choices imposed, it equals the reference to GRAD_TOL. Returns (error against float64's own
    choices, error with its choices, number of pooling windows routed otherwise, their margins).
    """
    f64_masks, f64_routes, relu_margin, pool_margin, pure = f64
    relu_flips = [m != m64 for m, m64 in zip(masks, f64_masks)]
    pool_flips = [(r != r64) & np.isfinite(g) for r, r64, g in zip(routes, f64_routes, pool_margin)]
    for kind, flips, margins in (("ReLU", relu_flips, relu_margin), ("pool", pool_flips, pool_margin)):
        for i, (flip, margin) in enumerate(zip(flips, margins)):
            worst = margin[flip].max() if flip.any() else 0.0
            assert worst < NEAR, (
                f"{who}: a {kind} choice of layer {i} differs from float64's at margin {worst:.1e}"
            )
    if any(f.any() for f in relu_flips + pool_flips):
        _, own = ref.loss_and_grads(params, x64, labels, masks=masks, routes=routes)
    else:
        own = pure
    same, plain = grad_error(grads, own), grad_error(grads, pure)
    assert same[0][0] <= GRAD_TOL, f"{who}: {same[0][1]} off float64 (same choices) by {same[0][0]:.2e}"
    margins = [float(m[f].max()) for f, m in zip(pool_flips, pool_margin) if f.any()]
    return plain[0], same[0], sum(int(f.sum()) for f in pool_flips), margins


def test_gradients_against_float64(one_step, tmp_path):
    """One step's gradients of Keras and imgcls_jax against an independent float64 VGG.

    For each: (1) its ReLU and max-pool choices differ from float64's only where float64's margin
    is below NEAR = 1e-5 of the layer's largest value (near-ties that float32 cannot resolve);
    (2) with its own choices imposed on the float64 reference, its gradient agrees to GRAD_TOL =
    1e-5 of each tensor's largest entry (measured: imgcls_jax 1.2e-6, Keras 2.7e-6).
    Against float64's own choices (printed; who is closer): imgcls_jax 1.2e-6 (no window routed
    otherwise), Keras 2.8e-2 in blocks 1-3 (one block3_pool window, margin 4.2e-8).
    """
    case = one_step
    path = tmp_path / "one_step.h5"
    base = case["base"]
    write_legacy_h5(path, {layer.name: layer.get_weights() for layer in base.layers if layer.weights})
    split = ours_model(path, 32, case["params"]["head_logits"], "caffe")
    results = {
        "imgcls_jax": ours_probe(split)(split.trainable, case["images"], case["labels"]),
        "keras": keras_grads_and_choices(case),
    }
    errors, f64 = {}, float64_side(case["params"], case["x64"], case["labels"])
    for who, (grads, masks, routes) in results.items():
        plain, same, n_pool, margins = against_float64(
            who, case["params"], case["x64"], case["labels"], grads, masks, routes, f64
        )
        errors[who] = plain[0]
        print(
            f"\n{who}: {n_pool} pooling windows routed otherwise than float64 (margins {margins}); "
            f"gradient vs float64 with its choices {same[0]:.1e} ({same[1]}), with float64's "
            f"{plain[0]:.1e} ({plain[1]})"
        )
    print(f"closer to float64 here: {min(errors, key=errors.get)} {errors}")


@pytest.mark.skipif(
    not os.environ.get("IMGCLS_JAX_FLOAT32_SPREAD"),
    reason="30 float64 gradients (minutes); set IMGCLS_JAX_FLOAT32_SPREAD=1",
)
def test_gradients_along_a_run_against_float64(tmp_path):
    """Every step of test_thirty_steps_track_keras's 32-px SGD run: imgcls_jax's gradient equals
    float64's with its own choices to GRAD_TOL, and differs from float64's own choices only where
    a near-tie was resolved the other way (measured: 1 window in 30 steps, block1_pool at step 12,
    margin 1.4e-8, 4.4e-2 off that step; every other step 1.0e-6 to 1.7e-6)."""
    start = make_start(32, tmp_path)
    split = ours_model(start["path"], 32, start["weights"]["head_logits"], MODE)
    optimizer = OPTIMIZERS["sgd-momentum"][0]()
    state, probe = init_state(split, optimizer), ours_probe(split)
    step = make_train_step(split, optimizer)
    flips = 0
    for i in range(STEPS):
        batch = start["batches"][i % N_BATCHES]
        params = {
            n: (np.asarray(v["kernel"][...]), np.asarray(v["bias"][...])) for n, v in state.params.items()
        }
        x64 = imagenet_utils.preprocess_input(batch["image"].astype(np.float64), mode=MODE)
        grads, masks, routes = probe(state.params, batch["image"], batch["label"])
        f64 = float64_side(params, x64, batch["label"])
        plain, same, n_pool, margins = against_float64(
            "imgcls_jax", params, x64, batch["label"], grads, masks, routes, f64
        )
        flips += n_pool
        print(
            f"step {i + 1}: {n_pool} windows otherwise {margins}; vs float64 {plain[0]:.1e}, "
            f"same choices {same[0]:.1e}"
        )
        state, _ = step(state, split.frozen, batch)
    print(f"{flips} pooling windows routed otherwise in {STEPS} steps")


# ------------------------------------------------------------------- optimizer arithmetic alone
ARITHMETIC = {
    "sgd-momentum": (
        lambda: make_optimizer("sgd", 0.05, momentum=0.9),
        lambda: keras.optimizers.SGD(0.05, 0.9),
    ),
    "sgd-nesterov": (
        lambda: make_optimizer("sgd", 0.05, momentum=0.9, nesterov=True),
        lambda: keras.optimizers.SGD(0.05, 0.9, nesterov=True),
    ),
    "adam": (
        lambda: make_optimizer("adam", 1e-2, eps=1e-7),
        lambda: keras.optimizers.Adam(1e-2, epsilon=1e-7),
    ),
    "adamw": (
        lambda: make_optimizer("adamw", 1e-2, weight_decay=0.5, eps=1e-7),
        lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.5, epsilon=1e-7),
    ),
}


@pytest.mark.parametrize("name", list(ARITHMETIC))
def test_thirty_updates_equal_keras_on_given_gradients(name):
    """The same 30 gradients (magnitudes 1e-8 to 1, signs changing) into both optimizers: the
    weights agree to 16 ulp of the largest weight at every step (measured: SGD 1.2, Nesterov 1.5,
    Adam 0.5, AdamW 8.0 ulp: Keras applies the decay to the variable in a separate assignment, so
    its rounding drifts by ~0.3 ulp a step), the rounding of the same arithmetic in another order;
    so the 30-step tests above measure the gradients, not the update rules."""
    ours_fn, theirs_fn = ARITHMETIC[name]
    rng = np.random.default_rng(3)
    w0 = rng.normal(0, 1, (256,)).astype(np.float32)
    variable, theirs = keras.Variable(w0), theirs_fn()
    optimizer = ours_fn()
    params = jnp.asarray(w0)
    state, worst = optimizer.init(params), 0.0
    for _ in range(30):
        g = (rng.normal(0, 1, (256,)) * 10.0 ** rng.uniform(-8, 0, (256,))).astype(np.float32)
        theirs.apply_gradients([(keras.ops.convert_to_tensor(g), variable)])
        updates, state = optimizer.update(jnp.asarray(g), state, params)
        params = params + updates
        worst = max(worst, float(np.abs(np.asarray(params) - np.asarray(variable)).max()))
    ulp = np.spacing(np.float32(np.abs(w0).max()))
    print(f"{name}: max |ours - keras| over 30 steps {worst:.1e} = {worst / ulp:.1f} ulp of max |w|")
    assert worst <= 16 * ulp
    assert np.abs(np.asarray(params) - w0).max() > 1e-2  # the weights did move
