"""Real Keras 3 transfer models for the import/export tests (32x32 inputs: cheap to build).

Weights are He-scaled random values with non-zero biases, and the output layer is scaled so the
logits spread (std 2): probabilities neither uniform nor one-hot, so a wrong weight shows.
"""

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


def spread_output(model, x: np.ndarray) -> None:
    """Scale the last Dense layer so its pre-activation outputs on ``x`` have std 2."""
    k = keras()
    dense = [layer for layer in model.layers if isinstance(layer, k.layers.Dense)][-1]
    features = np.asarray(k.Model(model.inputs, dense.input)(x, training=False))
    kernel, bias = dense.get_weights()
    logits = features @ kernel + bias
    scale = 2.0 / max(float(logits.std()), 1e-6)
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
