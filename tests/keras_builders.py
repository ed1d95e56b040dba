"""Real Keras 3 transfer models for the import/export tests (32x32 inputs: cheap to build).

Weights are He-scaled random values with non-zero biases, and the output layer is scaled so the
logits spread (std 2): probabilities neither uniform nor one-hot, so a wrong weight shows.
"""

import functools

import numpy as np

SIZE = 32


def keras():
    import keras

    return keras


def randomize(model, seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = []
    for w in model.get_weights():
        fan_in = int(np.prod(w.shape[:-1])) if w.ndim > 1 else 0
        std = np.sqrt(2.0 / fan_in) if fan_in else 0.1
        weights.append(rng.normal(0, std, w.shape).astype(np.float32))
    model.set_weights(weights)


def spread_output(model, x: np.ndarray, std: float = 2.0) -> None:
    """Scale the last Dense layer so its pre-activation outputs on ``x`` have std ``std``."""
    k = keras()
    dense = [layer for layer in model.layers if isinstance(layer, k.layers.Dense)][-1]
    features = np.asarray(k.Model(model.inputs, dense.input)(x, training=False))
    kernel, bias = dense.get_weights()
    logits = features @ kernel + bias
    scale = std / max(float(logits.std()), 1e-6)
    dense.set_weights([kernel * scale, (bias - logits.mean(0)) * scale])


def keras_out(model, x) -> np.ndarray:
    """Keras's inference outputs (``training=False``: a bare ``model(x)`` would run
    augmentation layers such as RandomFlip, as Keras 3 does)."""
    return np.asarray(model(x, training=False))


def caffe(raw: np.ndarray) -> np.ndarray:
    from keras.applications import imagenet_utils

    return imagenet_utils.preprocess_input(raw.astype(np.float32), mode="caffe")


def vgg_base(arch: str = "vgg16", size: int = SIZE):
    k = keras()
    app = {"vgg16": k.applications.VGG16, "vgg19": k.applications.VGG19}[arch]
    return app(weights=None, include_top=False, input_shape=(size, size, 3))


def typical(base=None):
    """The original experiment's model: VGG16 base nested, GAP, Dense(256, relu), Dropout(0.5),
    Dense(5, softmax); expects caffe-preprocessed inputs."""
    k = keras()
    base = base or vgg_base()
    inputs = k.Input((SIZE, SIZE, 3))
    x = k.layers.GlobalAveragePooling2D()(base(inputs, training=False))
    x = k.layers.Dropout(0.5)(k.layers.Dense(256, activation="relu")(x))
    return k.Model(inputs, k.layers.Dense(5, activation="softmax")(x))


def sequential_rescaling(base=None, size: int = SIZE):
    """Sequential: Rescaling(1/127.5, -1) (raw pixels in), VGG16 base, Flatten, Dense(3, sigmoid)."""
    k = keras()
    return k.Sequential(
        [
            k.Input((size, size, 3)),
            k.layers.Rescaling(1 / 127.5, offset=-1),
            base or vgg_base(size=size),
            k.layers.Flatten(),
            k.layers.Dense(3, activation="sigmoid"),
        ]
    )


def flat_vgg19_binary():
    """Flat VGG19 layers behind RandomFlip and Rescaling(1/255), GlobalMaxPooling2D, Dense(32)
    + Activation(gelu), Dropout(0.3), Dense(1, sigmoid): a binary classifier on raw pixels."""
    k = keras()
    inputs = k.Input((SIZE, SIZE, 3))
    x = k.layers.Rescaling(1 / 255.0)(k.layers.RandomFlip("horizontal")(inputs))
    base = vgg_base("vgg19")
    for layer in base.layers[1:]:
        x = layer(x)
    x = k.layers.GlobalMaxPooling2D()(x)
    x = k.layers.Activation("gelu")(k.layers.Dense(32)(x))
    x = k.layers.Dropout(0.3)(x)
    return k.Model(inputs, k.layers.Dense(1, activation="sigmoid")(x))


def prepared(model, raw: np.ndarray, seed: int, preprocess=caffe):
    """Randomize ``model`` and spread its outputs on ``preprocess(raw)``; returns ``model``."""
    randomize(model, seed)
    spread_output(model, preprocess(raw))
    return model


def images(n: int = 6, seed: int = 0, size: int = SIZE) -> np.ndarray:
    """``uint8[n, size, size, 3]``: blocky random images plus noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (n, 4, 4, 3)).astype(np.float32)
    smooth = coarse.repeat(size // 4, 1).repeat(size // 4, 2)
    return np.clip(smooth + rng.normal(0, 25, smooth.shape), 0, 255).astype(np.uint8)


def assert_probabilities_equal(ours, theirs, tol: float = 1e-5) -> float:
    """Max |ours - theirs| <= tol, on probabilities that are not degenerate."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    assert theirs.std() > 0.01 and (theirs.max(-1) < 0.999).any(), f"degenerate reference {theirs}"
    err = float(np.abs(ours - theirs).max())
    print(f"max |imgcls_jax - keras| = {err:.2e} (tolerance {tol})")
    assert err <= tol, f"max abs diff {err:.3g} > {tol}"
    return err


# ------------------------------------------------------------------ every family, any head
#: Registry name -> (``keras.applications`` builder, module of its ``preprocess_input``).
def _apps() -> dict:
    from imgcls_jax.weights.keras_families import KERAS_APPLICATIONS

    return {name: (row.builder, row.module) for name, row in KERAS_APPLICATIONS.items()}


APPS = _apps()


def leaves(model) -> list:
    """Every leaf layer of a Keras model, nested models' included."""
    return [layer for layer in model._flatten_layers(include_self=False) if not layer._layers]


def randomize_all(
    model,
    seed: int,
    preprocess=None,
    size: int | None = None,
    jitter: float = 0.1,
    batch: np.ndarray | None = None,
    gamma=(0.2, 0.6),
) -> None:
    """Random weights for every leaf layer (He-scaled kernels, BatchNorm gamma uniform in
    ``gamma``, beta and biases ~N(0, 0.1-0.2), Normalization statistics of pixels in [0, 1]) and
    every BatchNormalization's moving statistics set to the statistics of ``batch`` (raw images;
    default 8 random ones of ``size``; ``preprocess``: what the model is fed of them) and then
    perturbed (mean +- ``0.2 jitter`` std, variance x ``exp(+-0.7 jitter)``): every layer stays
    input-dependent and the statistics are random and positive (see tests/bn_helpers.py).

    Float32's rounding grows through a deep network's layers (measured on ResNet50 at 64 px with
    gamma in [0.5, 1.5]: Keras's own float32 probabilities 6e-5 off its float64 ones, imgcls_jax's
    3e-5); the defaults (small gammas: residual branches small beside their shortcuts; statistics
    near the images' own) keep both within 1e-5 of each other, which comparing probabilities at
    1e-5 needs."""
    rng = np.random.default_rng(seed)
    draw = {"bias": lambda s: rng.normal(0, 0.1, s), "gamma": lambda s: rng.uniform(*gamma, s),
            "beta": lambda s: rng.normal(0, 0.2, s), "moving_mean": lambda s: rng.normal(0, 0.2, s),
            "moving_variance": lambda s: rng.uniform(0.5, 2.0, s), "mean": lambda s: rng.uniform(0.3, 0.6, s),
            "variance": lambda s: rng.uniform(0.03, 0.1, s), "count": lambda s: np.full(s, 1234)}  # fmt: skip
    for layer in leaves(model):
        values = []
        for w in layer.weights:
            kind, shape = w.path.split("/")[-1], tuple(w.shape)
            if kind in ("kernel", "depthwise_kernel", "pointwise_kernel"):
                fan_in = int(np.prod(shape[:-1] if kind != "depthwise_kernel" else shape[:2]))
                values.append(rng.normal(0, np.sqrt(2.0 / fan_in), shape).astype(w.dtype))
            elif kind not in draw:  # ConvNeXt's LayerScale gamma (Keras names it "variable")
                values.append(rng.uniform(*gamma, shape).astype(w.dtype))
            else:
                values.append(np.asarray(draw[kind](shape)).astype(w.dtype))
        if values:
            layer.set_weights(values)
        if hasattr(layer, "finalize_state"):  # Normalization reads its variables only then
            layer.finalize_state()
    k = keras()
    bns = [layer for layer in leaves(model) if isinstance(layer, k.layers.BatchNormalization)]
    flags = [(layer, layer.trainable) for layer in leaves(model)]
    for layer, _ in flags:
        layer.trainable = True  # frozen BatchNorm layers run in inference mode even when training
    momentum = [bn.momentum for bn in bns]
    for bn in bns:
        bn.momentum = 0.0
    if batch is None:
        batch = images(8, seed=seed + 1000, size=size or model.input_shape[1])
    batch = np.asarray(batch, np.float32)
    model((preprocess or (lambda x: x))(batch), training=True)  # moving statistics := the batch's
    for bn, m in zip(bns, momentum, strict=True):
        bn.momentum = m
        *affine, mean, var = bn.get_weights()  # gamma (unless scale=False, as Inception's), beta
        var = np.maximum(var, 0.1 * np.median(var))  # nearly constant channels would amplify rounding
        mean = mean + rng.normal(0, 0.2 * jitter, mean.shape) * np.sqrt(var)
        bn.set_weights(
            [
                *affine,
                mean.astype(np.float32),
                (var * np.exp(rng.uniform(-0.7, 0.7, var.shape) * jitter)).astype(np.float32),
            ]
        )
    for layer, trainable in flags:
        layer.trainable = trainable


def transfer(arch: str, size, *, nested: bool = True, preprocessing: str = "graph",
             head=("gap", 16, "relu", 0.2), classes: int = 3, output: str = "softmax",
             base_trainable: bool = True):  # fmt: skip
    """A Keras transfer model on ``keras.applications.<arch>`` (no weights) at ``size`` (an int, or
    None for any size): the base nested (``base(x)``) or inline (``Model(base.input, ...)``);
    ``preprocessing``: ``"graph"`` (the family's ``preprocess_input`` applied to the symbolic
    input), ``"rescaling"`` (``Rescaling(1/255)``), ``"normalization"`` (a ``Normalization`` layer
    with statistics of pixels in [0, 255]) or ``"none"`` (fed what its users preprocess);
    ``head``: a pooling (``"gap"``, ``"gmp"``, ``"flatten"``) then layers: an int (Dense units),
    an activation name, a float (Dropout rate), ``"bn"``, ``"ln"``; the output ``Dense(classes,
    output)``. Returns ``(model, what its users feed it: a function of raw float32 pixels)``."""
    k = keras()
    builder, module = APPS[arch]
    shape = (size, size, 3)
    app = getattr(k.applications, builder)
    preprocess = getattr(k.applications, module).preprocess_input
    inputs = k.Input(shape)
    x = inputs
    if preprocessing == "graph":
        x = preprocess(x)
    elif preprocessing == "rescaling":
        x = k.layers.Rescaling(1 / 255.0)(x)
    elif preprocessing == "normalization":
        x = k.layers.Normalization(mean=[120.0, 110.0, 100.0], variance=[3600.0, 3000.0, 2500.0])(x)
    if nested:
        base = app(include_top=False, weights=None, input_shape=shape)
        base.trainable = base_trainable
        x = base(x)
    else:
        base = app(include_top=False, weights=None, input_tensor=x)
        base.trainable = base_trainable
        x = base.output
    pooling, *layers = head
    x = {"gap": k.layers.GlobalAveragePooling2D, "gmp": k.layers.GlobalMaxPooling2D,
         "flatten": k.layers.Flatten}[pooling]()(x)  # fmt: skip
    for layer in layers:
        if isinstance(layer, bool):
            raise TypeError(layer)
        if isinstance(layer, int):
            x = k.layers.Dense(layer)(x)
        elif isinstance(layer, float):
            x = k.layers.Dropout(layer)(x)
        elif layer == "bn":
            x = k.layers.BatchNormalization()(x)
        elif layer == "ln":
            x = k.layers.LayerNormalization()(x)
        else:
            x = k.layers.Activation(layer)(x)
    model = k.Model(inputs, k.layers.Dense(classes, activation=output)(x))
    fed = (lambda raw: np.asarray(preprocess(np.array(raw, np.float32)))) if preprocessing == "none" else (
        lambda raw: np.asarray(raw, np.float32))  # fmt: skip
    return model, fed


def probabilities(model, raw: np.ndarray) -> np.ndarray:
    """``model.probabilities(model(raw))``, jitted (one compile per model graph and shape: op by op,
    a deep model's first call compiles every layer separately, far slower)."""
    from flax import nnx

    graph, state = nnx.split(model)
    return np.asarray(_jitted_probabilities(graph)(state, raw))


@functools.cache
def _jitted_probabilities(graph):
    import jax
    from flax import nnx

    def run(state, x):
        model = nnx.merge(graph, state)
        return model.probabilities(model(x))

    return jax.jit(run)
