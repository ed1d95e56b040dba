"""EfficientNet B0-B7: the architecture against Keras's (layer names, weight shapes, drop connect
rates, parameter counts), options and Keras's size rules, training-mode semantics, and bad weight
files (analytic FLOPs: tests/test_bn_flops.py). Outputs against Keras: test_efficientnet_parity.py;
a training step against Keras: test_efficientnet_train.py."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.models.efficientnet import EfficientNet
from imgcls_jax.models.efficientnet_arch import VARIANTS, base_layer_specs
from imgcls_jax.models.layers import DepthwiseConv2D
from imgcls_jax.train import split_model
from imgcls_jax.weights import WeightFileError, load_weights, save_ported, store, write_legacy_h5
from tests.helpers import write_random_legacy

ARCHS = [f"efficientnetb{i}" for i in range(8)]
#: ``keras.applications.EfficientNetB<i>(weights=None, include_top=False).count_params()``
#: (keras 3.15.1; the Normalization layer's three variables included).
KERAS_NOTOP_PARAMS = {
    "efficientnetb0": 4_049_571, "efficientnetb1": 6_575_239, "efficientnetb2": 7_768_569,
    "efficientnetb3": 10_783_535, "efficientnetb4": 17_673_823, "efficientnetb5": 28_513_527,
    "efficientnetb6": 40_960_143, "efficientnetb7": 64_097_687,
}  # fmt: skip


def b0(**options):
    options.setdefault("input_shape", (32, 32, 3))
    return imgcls_jax.create_model("efficientnetb0", **options)


def spec_list(specs):
    return [(s.name, tuple(s.shapes)) for s in specs]


# ------------------------------------------------------------------------- architecture
def test_registered_with_their_stages():
    assert set(ARCHS) <= set(imgcls_jax.list_models())
    for arch in ARCHS:
        info = imgcls_jax.models.model_info(arch)
        assert info.preprocessing == "none"
        assert info.stages == ("stem", *(f"block{i}" for i in range(1, 8)), "top")


@pytest.mark.parametrize("arch", ARCHS)
def test_parameter_count_equals_keras(arch):
    count = sum(int(np.prod(shape)) for spec in base_layer_specs(arch) for shape in spec.shapes)
    assert count == KERAS_NOTOP_PARAMS[arch]


@pytest.fixture(scope="module")
def keras_models():
    keras = pytest.importorskip("keras")
    return {
        arch: getattr(keras.applications, f"EfficientNetB{arch[-1]}")(weights=None, input_shape=(32, 32, 3))
        for arch in ("efficientnetb0", "efficientnetb2")  # B2: width 1.1 and depth 1.2 rounding
    }


@pytest.mark.parametrize("arch", ["efficientnetb0", "efficientnetb2"])
def test_layers_equal_keras(keras_models, arch):
    """Every weighted Keras layer, in Keras's order, with Keras's weight shapes; drop connect
    (``<block>drop``: Dropout with noise shape (N, 1, 1, 1)) where Keras has it, at its rate."""
    keras_model = keras_models[arch]
    theirs = [(la.name, tuple(tuple(w.shape) for w in la.weights)) for la in keras_model.layers if la.weights]
    theirs[0] = ("normalization", theirs[0][1])  # Keras numbers it in a session: normalization_<n>
    ours = EfficientNet(arch, input_shape=(32, 32, 3), rngs=nnx.Rngs(0))
    assert spec_list(ours.layer_specs()) == theirs
    for spec in ours.layer_specs():  # the variables the loader fills have the specs' shapes
        assert [tuple(v.shape) for v in ours.keras_variables(spec.name)] == list(spec.shapes)
    drops = {la.name: la.rate for la in keras_model.layers if la.name.endswith("_drop")}
    assert drops == {f"{b.prefix}drop": pytest.approx(b.drop_rate) for b in ours.blocks if b.residual}
    for name in drops:
        assert getattr(ours, name).broadcast_dims == (1, 2, 3)
        assert keras_model.get_layer(name).noise_shape == (None, 1, 1, 1)
    assert ours.top_dropout.rate == keras_model.get_layer("top_dropout").rate == VARIANTS[arch].dropout_rate


def test_stages_and_trainable_layers():
    model = b0(num_classes=3, pooling="avg", head_units=(8,))
    assert model.stage_names == ("stem", *(f"block{i}" for i in range(1, 8)), "top")
    assert model.stages[0][1] == ("normalization", "stem_conv", "stem_bn")
    assert model.trainable_layers("top:1") == ("top_conv", "top_bn", "head_fc1", "head_logits")
    assert model.trainable_layers("top:2")[:2] == ("block7a_expand_conv", "block7a_expand_bn")
    assert set(model.trainable_layers("top:9")) == {s.name for s in model.layer_specs()} | {
        "head_fc1",
        "head_logits",
    }
    with pytest.raises(ValueError, match="top:10 asks for more stages than efficientnetb0 has"):
        model.trainable_layers("top:10")


# ------------------------------------------------------------------------ options, shapes
@pytest.mark.parametrize(
    "options, shape",
    [
        (dict(), (2, 1000)),  # the Keras top, any size
        (dict(include_top=False), (2, 2, 2, 1280)),  # ceil(33 / 32), ceil(47 / 32)
        (dict(include_top=False, pooling="max"), (2, 1280)),
        (dict(num_classes=7), (2, 7)),  # transfer head over the flattened map
        (dict(num_classes=7, pooling="avg", head_units=(16,), dropout=0.5), (2, 7)),
    ],
)
def test_output_shapes(options, shape):
    model = b0(input_shape=(33, 47, 3), **options)
    graph, state = nnx.split(model)
    out = jax.eval_shape(lambda s, x: nnx.merge(graph, s)(x), state, jnp.zeros((2, 33, 47, 3), jnp.uint8))
    assert out.shape == shape and out.dtype == jnp.float32


@pytest.mark.parametrize(
    "options, match",
    [
        (
            dict(input_shape=(31, 64, 3)),
            r"Input size must be at least 32x32; Received: input_shape=\(31, 64, 3\)",
        ),
        (dict(input_shape=(64, 64, 1)), "The input must have 3 channels"),
        (dict(input_shape=(64, 64)), "must be a tuple of three integers"),
        (dict(include_top=False, pooling="sum"), "pooling must be one of"),
        (dict(include_top=True, head_units=(8,)), "configure the transfer head"),
        (dict(drop_connect_rate=1.0), r"drop_connect_rate must be in \[0, 1\)"),
        (dict(top_dropout=-0.1), r"top_dropout must be in \[0, 1\)"),
        (dict(depthwise_impl="im2col"), "depthwise_impl must be one of"),
        (dict(preprocessing="caffe"), "does not take the option preprocessing='caffe'"),
        (dict(conv_impl="cudnn"), "conv_impl must be one of"),
        (dict(dtype="int8"), "dtype must be"),
    ],
)
def test_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        b0(**options)


def test_bad_images_at_call():
    model = b0(num_classes=3)  # flattens: built for 32x32
    with pytest.raises(ValueError, match="built for input_shape"):
        model(np.zeros((1, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="at least 32x32"):
        b0(include_top=False)(np.zeros((1, 16, 40, 3), np.uint8))
    with pytest.raises(ValueError, match=r"images \[N, H, W, 3\]"):
        b0(include_top=False)(np.zeros((1, 32, 32), np.uint8))


def test_depthwise_implementations_agree():
    """The shifted multiply-add form (CPU default) equals XLA's grouped convolution."""
    model = b0(include_top=False, pooling="avg")
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.uint8)
    graph, state = nnx.split(model)
    outs = {}
    for impl in ("shift", "xla"):
        for _, layer in nnx.iter_graph(model):
            if isinstance(layer, DepthwiseConv2D):
                layer.impl = impl
        graph, state = nnx.split(model)
        outs[impl] = np.asarray(jax.jit(lambda s, x, g=graph: nnx.merge(g, s)(x))(state, x))
    np.testing.assert_allclose(outs["shift"], outs["xla"], rtol=0, atol=1e-5 * np.abs(outs["xla"]).max())


# ------------------------------------------------------------------------ training mode
@pytest.fixture(scope="module")
def stochastic():
    """B0 with a transfer head, drop connect 0.5 (dropout 0) and the images."""
    model = b0(num_classes=3, pooling="avg", drop_connect_rate=0.5)
    return model, np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3)).astype(np.uint8)


@functools.cache
def _train_forward(graph):
    def run(params, stats, frozen, rest, x, key):
        return nnx.merge(graph, params, stats, frozen, rest, copy=True)(x, dropout_key=key)

    return jax.jit(run)


def train_forward(split, images, key):
    """Logits of ``split``'s training-mode model (one compile per graph and shape)."""
    run = _train_forward(split.train_graph)
    return np.asarray(run(split.trainable, split.stats, split.frozen, split.rest, images, key))


def test_frozen_blocks_run_in_inference_mode(stochastic):
    """With every backbone layer frozen, a train-mode forward pass equals inference (no drop
    connect, BatchNorm on its moving statistics), so the frozen-base fast path is exact."""
    model, x = stochastic
    split = split_model(model, model.trainable_layers("head"))
    train = train_forward(split, x, jax.random.key(0))
    inference = np.asarray(jax.jit(lambda p, f, x: split.merge(p, f)(x))(split.trainable, split.frozen, x))
    np.testing.assert_allclose(train, inference, rtol=0, atol=1e-5 * np.abs(inference).max())


def test_drop_connect_follows_the_dropout_key(stochastic):
    model, x = stochastic
    split = split_model(model, model.trainable_layers("all"))
    a, b = train_forward(split, x, jax.random.key(0)), train_forward(split, x, jax.random.key(0))
    c = train_forward(split, x, jax.random.key(1))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3 * np.abs(a).max()


# ------------------------------------------------------------------------------- FLOPs
# FLOPs: tests/test_bn_flops.py (against Keras's layers, the paper's 0.39 B multiply-adds and XLA's
# count, with ResNet50 and MobileNetV2)


# -------------------------------------------------------------------- bad weight files
def keras_style_file(model, path, rename=None, drop=None, count_dtype=np.int64):
    """``model``'s weights in the legacy layout with Keras 2 names, as the published files
    (Normalization's count an int64, as tf.keras 2 wrote it). ``rename``: {layer: file name};
    ``drop``: {layer: weight names to leave out}."""
    layers = {}
    for spec in model.layer_specs():
        arrays = {w: np.asarray(v[...]) for w, v in zip(spec.weight_names, model.keras_variables(spec.name))}
        if spec.name == "normalization":
            arrays["count"] = arrays["count"].astype(count_dtype)
        for w in (drop or {}).get(spec.name, ()):
            del arrays[w]
        layers[(rename or {}).get(spec.name, spec.name)] = arrays
    write_legacy_h5(path, layers)
    return path


def snapshot(model):
    """The model's weights and statistics as numpy arrays."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param, nnx.BatchStat))]


def load_fails(model, path, match, error=WeightFileError, weights=None):
    before = snapshot(model)
    with pytest.raises(error, match=match) as err:
        load_weights(model, weights or path, preprocessing="none")
    assert weights or str(path) in str(err.value)
    for a, b in zip(snapshot(model), before, strict=True):
        np.testing.assert_array_equal(a, b)
    return str(err.value)


@pytest.fixture(scope="module")
def b0_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("b0files")
    top = b0(seed=3)
    notop = b0(include_top=False, seed=4)
    no_stats = {"block3b_bn": ("moving_mean", "moving_variance")}
    return dict(
        top=keras_style_file(top, tmp / "efficientnetb0.h5"),
        notop=keras_style_file(notop, tmp / "efficientnetb0_notop.h5"),
        numbered=keras_style_file(notop, tmp / "numbered.h5", rename={"normalization": "normalization_7"}),
        no_stats=keras_style_file(notop, tmp / "no_stats.h5", drop=no_stats),
        notop_model=notop,
    )  # fmt: skip


def test_keras_style_file_loads(b0_files):
    """Keras 2 weight names, an int64 count, a session-numbered ``normalization_7``: all load."""
    model = b0(include_top=False)
    for key in ("notop", "numbered"):
        load_weights(model, b0_files[key], preprocessing="none", use_cache=False)
        for a, b in zip(snapshot(model), snapshot(b0_files["notop_model"]), strict=True):
            np.testing.assert_array_equal(a, b)


def test_top_file_into_notop_model(b0_files):
    load_fails(b0(include_top=False), b0_files["top"], r"has the classification top \(predictions\).*_notop")


def test_notop_file_into_top_model(b0_files):
    load_fails(b0(), b0_files["notop"], r"no classification top \(predictions missing.*include_top=True")


def test_batchnorm_statistics_missing(b0_files):
    msg = load_fails(b0(include_top=False), b0_files["no_stats"], "'block3b_bn': expected 4 weights")
    assert "gamma, beta, moving_mean, moving_variance" in msg and "found 2" in msg


def test_other_variant_file(b0_files):
    b1 = imgcls_jax.create_model("efficientnetb1", include_top=False, input_shape=(32, 32, 3))
    msg = load_fails(b1, b0_files["notop"], "do not match efficientnetb1")
    assert "block1b_dwconv" in msg  # B1 repeats the first stage


def test_vgg_file_into_efficientnet(tmp_path):
    write_random_legacy(tmp_path / "vgg16_notop.h5")
    load_fails(b0(include_top=False), tmp_path / "vgg16_notop.h5", "do not match efficientnetb0")


def test_efficientnet_file_into_vgg(b0_files):
    vgg = imgcls_jax.create_model("vgg16", include_top=False, input_shape=(32, 32, 3))
    before = snapshot(vgg)
    with pytest.raises(WeightFileError, match="do not match vgg16"):
        load_weights(vgg, b0_files["notop"])
    assert all(np.array_equal(a, b) for a, b in zip(snapshot(vgg), before))


def test_imagenet_top_needs_the_default_size(b0_files, monkeypatch):
    """Keras's rule (and message) for its ImageNet top; nothing is loaded."""
    key = ("efficientnetb0", True)
    published = store.IMAGENET[key]
    monkeypatch.setitem(
        store.IMAGENET, key, dataclasses.replace(published, file_hash=store.md5sum(b0_files["top"]))
    )
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(b0_files["top"].parent))
    load_fails(
        b0(),
        None,
        r"`input_shape` should be \(224, 224, 3\) for efficientnetb0",
        ValueError,
        weights="imagenet",
    )


def test_imagenet_normalization_is_folded(b0_files, monkeypatch):
    """The published file's Normalization variance times Keras's ImageNet stddev: Keras's extra
    ``Rescaling(1 / sqrt(stddev))`` (its effect on outputs: test_efficientnet_parity.py)."""
    key = ("efficientnetb0", False)
    published = store.IMAGENET[key]
    monkeypatch.setitem(
        store.IMAGENET, key, dataclasses.replace(published, file_hash=store.md5sum(b0_files["notop"]))
    )
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(b0_files["notop"].parent))
    model = b0(include_top=False, weights="imagenet")
    expected = np.asarray(b0_files["notop_model"].normalization.variance[...]) * np.float32(
        [0.229, 0.224, 0.225]
    )
    np.testing.assert_array_equal(np.asarray(model.normalization.variance[...]), expected)


def test_published_table_matches_keras():
    from keras.src.applications import efficientnet

    for arch in ARCHS:
        variant = arch[-2:]
        for top, suffix in ((True, ".h5"), (False, "_notop.h5")):
            published = store.IMAGENET[(arch, top)]
            assert published.url == efficientnet.BASE_WEIGHTS_PATH + arch + suffix
            assert published.file_hash == efficientnet.WEIGHTS_HASHES[variant][0 if top else 1]
            assert published.hash_algorithm == "md5" and published.preprocessing == "none"


def test_ported_folder_round_trip(b0_files, tmp_path):
    """``imgcls-jax port-weights``' folder holds every Keras weight (BatchNorm statistics and the
    Normalization variables included) and loads back into an equal model."""
    source = b0_files["notop_model"]
    out = save_ported(source, tmp_path / "ported", source="random", preprocessing="none")
    model = b0(include_top=False, weights=str(out))
    for a, b in zip(snapshot(model), snapshot(source), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(WeightFileError, match="ported weights of 'efficientnetb0', but the model is 'vgg16'"):
        imgcls_jax.create_model("vgg16", include_top=False, input_shape=(32, 32, 3), weights=str(out))
