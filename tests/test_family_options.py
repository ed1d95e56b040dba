"""ConvNeXt, EfficientNetV2 and MobileNetV3 through the registry, without Keras (their parity
with Keras: tests/test_applications.py; FLOPs: tests/test_bn_flops.py): parameter counts,
options and their errors (``include_preprocessing``, ``alpha``, ``minimalistic``, stochastic
depth), stages and ``trainable`` specs, feature-map sizes, stochastic depth in training mode,
the ImageNet file each width resolves to, and top / no-top files."""

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.models import model_info
from imgcls_jax.train import split_model
from imgcls_jax.weights import WeightFileError, load_weights, store, write_legacy_h5
from tests.bn_helpers import forward

#: ``keras.applications.<App>(weights=None, include_top=False).count_params()`` (Keras 3.15.1).
#: ConvNeXt's count includes the final LayerNormalization Keras adds without the top.
KERAS_NOTOP_PARAMS = {
    "convnexttiny": 27_820_128,
    "efficientnetv2b0": 5_919_312,
    "efficientnetv2b3": 12_930_622,
    "efficientnetv2s": 20_331_360,
    "mobilenetv3small": 939_120,
    "mobilenetv3large": 2_996_352,
}
FAMILIES = ("convnexttiny", "efficientnetv2b0", "mobilenetv3small")
#: ``(first stage, last stage, number of stages, channels of the map)``
STAGES = {
    "convnexttiny": ("stem", "stage_3", 5, 768),
    "efficientnetv2b0": ("stem", "top", 8, 1280),
    "mobilenetv3small": ("conv", "conv_1", 13, 576),
}


def model(name, size=32, **options):
    return imgcls_jax.create_model(name, input_shape=(size, size, 3), **options)


def images(n=2, size=32, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", sorted(KERAS_NOTOP_PARAMS))
def test_parameter_count_equals_keras(name):
    specs = nnx.eval_shape(lambda: model(name, include_top=False)).layer_specs()
    assert sum(int(np.prod(s)) for spec in specs for s in spec.shapes) == KERAS_NOTOP_PARAMS[name]


@pytest.mark.parametrize("name", FAMILIES)
def test_stages_and_trainable_specs(name):
    first, last, n, _ = STAGES[name]
    m = model(name, num_classes=4, pooling="avg")
    assert model_info(name).stages == m.stage_names and len(m.stages) == n
    assert m.stages[0][0] == first and m.stages[-1][0] == last
    names = m.base_layers
    assert len(names) == len(set(names)) and all(hasattr(m, x) for x in names)
    assert m.trainable_layers("head") == ("head_logits",)
    assert m.trainable_layers("top:1") == (*m.stages[-1][1], "head_logits")
    assert set(m.trainable_layers(f"top:{n}")) == set(m.trainable_layers("all"))
    with pytest.raises(ValueError, match=f"top:N takes N in 0..{n}"):
        m.trainable_layers(f"top:{n + 1}")


def test_convnext_top_and_final_norm():
    """Keras's top is two layers (both the head); without it Keras's final LayerNormalization
    is the last stage's last layer."""
    top = model("convnexttiny")
    assert top.head_layers == ("convnext_tiny_head_layernorm", "convnext_tiny_head_dense")
    assert top.trainable_layers("head") == top.head_layers
    notop = model("convnexttiny", include_top=False)
    assert notop.stages[-1][1][-1] == "layer_normalization" and not notop.head_layers


def test_mobilenetv3_top_is_two_convolutions():
    top = model("mobilenetv3large")
    assert top.head_layers == ("conv_2", "logits")
    assert top.conv_2.kernel.shape == (1, 1, 960, 1280) and top.logits.kernel.shape == (1, 1, 1280, 1000)
    wide = model("mobilenetv3large", alpha=1.25)  # Keras widens the top only for alpha > 1
    assert wide.conv_2.kernel.shape[-1] == 1600


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("height, width", [(32, 32), (33, 47), (57, 41), (100, 64)])
def test_feature_map_size(name, height, width):
    """ConvNeXt's VALID 4x4/4 stem and 2x2/2 steps floor; the others' SAME / correct_pad steps
    ceil (the parity test checks Keras's shapes at two sizes)."""
    m = model(name, include_top=False)
    out = jax.eval_shape(m.features, jax.ShapeDtypeStruct((1, height, width, 3), jnp.uint8))
    rule = (lambda n: n // 32) if name.startswith("convnext") else (lambda n: -(-n // 32))
    assert out.shape == (1, rule(height), rule(width), STAGES[name][3])
    assert m.feature_size((height, width)) == (rule(height), rule(width))


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("convnexttiny", dict(input_shape=(31, 64, 3)), "Input size must be at least 32x32"),
        ("convnexttiny", dict(drop_path_rate=1.0), r"drop_path_rate must be in \[0, 1\)"),
        ("convnexttiny", dict(include_preprocessing=False, preprocessing="tf"), "include_preprocessing"),
        ("convnexttiny", dict(depthwise_impl="shift"), "does not take the option depthwise_impl"),
        ("efficientnetv2b0", dict(drop_connect_rate=-0.1), r"drop_connect_rate must be in \[0, 1\)"),
        ("efficientnetv2b0", dict(top_dropout=1.0), r"top_dropout must be in \[0, 1\)"),
        ("efficientnetv2b0", dict(depthwise_impl="im2col"), "depthwise_impl must be one of"),
        ("mobilenetv3small", dict(alpha=0.0), "alpha must be > 0"),
        ("mobilenetv3small", dict(top_dropout=1.5), r"top_dropout must be in \[0, 1\)"),
        ("mobilenetv3small", dict(pooling="sum", include_top=False), "pooling must be one of"),
        ("mobilenetv3small", dict(drop_path_rate=0.1), "does not take the option drop_path_rate"),
    ],
)  # fmt: skip
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        imgcls_jax.create_model(name, **options)


@pytest.mark.parametrize("name", FAMILIES)
def test_include_preprocessing(name, tmp_path):
    """Keras's ``include_preprocessing=False``: the model applies none (it takes inputs
    normalised as its weights expect); the same network on normalised inputs."""
    on = model(name, include_top=False, pooling="avg", seed=1)
    off = model(name, include_top=False, pooling="avg", seed=1, include_preprocessing=False)
    assert on.preprocessing == model_info(name).preprocessing and off.preprocessing == "none"
    x = images()
    want = forward(on, x)
    got = forward(off, np.asarray(imgcls_jax.preprocess_input(x, on.preprocessing)))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * np.abs(want).max())
    path = _file(on, tmp_path / "w.h5")  # a file of weights trained with the preprocessing
    with pytest.raises(ValueError, match=f"trained with '{on.preprocessing}' preprocessing"):
        load_weights(off, path, preprocessing=on.preprocessing)


# ------------------------------------------------------------------------ stochastic depth
@functools.cache
def _train_forward(graph):
    def run(params, stats, frozen, rest, x, key):
        return nnx.merge(graph, params, stats, frozen, rest, copy=True)(x, dropout_key=key)

    return jax.jit(run)


def train_forward(split, x, key):
    return np.asarray(
        _train_forward(split.train_graph)(split.trainable, split.stats, split.frozen, split.rest, x, key)
    )


@pytest.mark.parametrize(
    "name, option",
    [("convnexttiny", "drop_path_rate"),
     pytest.param("efficientnetv2b0", "drop_connect_rate", marks=pytest.mark.slow)],  # EfficientNet's way
)  # fmt: skip
def test_stochastic_depth_in_training(name, option):
    """Stochastic depth draws from the dropout key while its block trains, and is off in frozen
    blocks (a train-mode pass with the whole base frozen equals inference: the frozen-base path is
    exact)."""
    m = model(name, num_classes=3, pooling="avg", **{option: 0.5})
    x = images(4)
    frozen = split_model(m, m.trainable_layers("head"))
    inference = np.asarray(jax.jit(lambda p, f, x: frozen.merge(p, f)(x))(frozen.trainable, frozen.frozen, x))
    train = train_forward(frozen, x, jax.random.key(0))
    np.testing.assert_allclose(train, inference, rtol=0, atol=1e-5 * np.abs(inference).max())
    split = split_model(m, m.trainable_layers("all"))
    a, b = train_forward(split, x, jax.random.key(0)), train_forward(split, x, jax.random.key(0))
    c = train_forward(split, x, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max()


def test_stochastic_depth_rates_are_keras():
    """ConvNeXt: ``linspace(0, rate, blocks)``; EfficientNetV2: ``rate * b / blocks`` on the
    residual blocks, none where the rate is 0 (the first block)."""
    c = model("convnexttiny", drop_path_rate=0.4)
    names = [f"convnext_tiny_stage_{i}_block_{j}" for i, d in enumerate(c.depths) for j in range(d)]
    rates = [getattr(c, f"{n}_stochastic_depth", None) for n in names]
    assert rates[0] is None  # rate 0
    np.testing.assert_allclose([r.rate for r in rates[1:]], np.linspace(0, 0.4, 18)[1:])
    e = model("efficientnetv2b0")
    drops = {b.prefix: b.drop_rate for b in e.blocks if b.residual and b.drop_rate > 0}
    assert {n[: -len("drop")]: getattr(e, n).rate for n in (f"{p}drop" for p in drops)} == pytest.approx(
        drops
    )
    assert e.blocks[3].drop_rate == pytest.approx(0.2 * 3 / 21)  # 21 blocks in B0


# ------------------------------------------------------------------------ weights
@pytest.mark.parametrize(
    "options, key",
    [({}, "mobilenetv3small"), ({"alpha": 0.75}, "mobilenetv3small_0.75"),
     ({"minimalistic": True}, "mobilenetv3small_minimalistic")],
)  # fmt: skip
def test_mobilenetv3_file_per_width(options, key):
    m = model("mobilenetv3small", **options)
    assert m.imagenet_key == key and (key, True) in store.IMAGENET


@pytest.mark.parametrize("options", [{"alpha": 0.5}, {"alpha": 0.75, "minimalistic": True}])
def test_mobilenetv3_width_without_published_weights(options):
    with pytest.raises(ValueError, match="alpha can be one of `0.75`, `1.0` for non minimalistic"):
        model("mobilenetv3small", **options, weights="imagenet")


def test_mobilenetv3_top_takes_any_size(caplog):
    """Keras loads MobileNetV3's 224 files at any size, the top's too, with a warning; the other
    families' tops take only their default size."""
    with caplog.at_level(logging.WARNING, logger="imgcls_jax.weights.store"):
        published = store.IMAGENET[("mobilenetv3large", True)].for_size((160, 160, 3))
    assert published.filename == "weights_mobilenet_v3_large_224_1.0_float.h5"
    assert "weights for input shape (224, 224) are loaded" in caplog.text
    with pytest.raises(ValueError, match=r"should be \(224, 224, 3\)"):
        store.IMAGENET[("convnexttiny", True)].for_size((160, 160, 3))
    with pytest.raises(ValueError, match=r"should be \(384, 384, 3\)"):
        store.IMAGENET[("efficientnetv2s", True)].for_size((224, 224, 3))


def _file(m, path):
    """``m``'s weights as a legacy file with Keras 2's names."""
    layers = {s.name: dict(zip(s.weight_names, (np.asarray(v[...]) for v in m.keras_variables(s.name))))
              for s in m.layer_specs()}  # fmt: skip
    write_legacy_h5(path, layers)
    return path


@pytest.mark.parametrize("name", ["convnexttiny", "mobilenetv3small"])
def test_top_and_notop_files_are_told_apart(name, tmp_path):
    """Their tops are not a ``predictions`` layer (ConvNeXt's ``*_head_layernorm`` and
    ``*_head_dense``, MobileNetV3's ``conv_2`` and ``logits``), and ConvNeXt's no-top file has a
    layer the top file has not: the wrong file is still named as a top / no-top file."""
    top, notop = model(name, seed=1), model(name, include_top=False, seed=2)
    with pytest.raises(WeightFileError, match="file has the classification top"):
        load_weights(model(name, include_top=False), _file(top, tmp_path / "top.h5"), use_cache=False)
    with pytest.raises(WeightFileError, match="file has no classification top"):
        load_weights(model(name), _file(notop, tmp_path / "notop.h5"), use_cache=False)
    other = model(name, num_classes=10, include_top=True)
    with pytest.raises(WeightFileError, match="file has 1000 classes, the model 10"):
        load_weights(other, tmp_path / "top.h5", use_cache=False)
    fresh = model(name, seed=3)
    load_weights(fresh, tmp_path / "top.h5", use_cache=False)
    for spec in top.layer_specs():
        for a, b in zip(fresh.keras_variables(spec.name), top.keras_variables(spec.name), strict=True):
            np.testing.assert_array_equal(a[...], b[...])
