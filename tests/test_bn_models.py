"""ResNet50 and MobileNetV2 through the registry (no Keras here: tests/test_parity_bn.py compares
with Keras): options and their errors, stages and ``trainable`` specs, heads, dtypes, output and
feature-map sizes, the convolution implementations, BatchNorm and dropout in training and
inference mode."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.models import model_info
from tests.bn_helpers import BN_MODELS, forward

PREPROCESSING = {"resnet50": "caffe", "mobilenetv2": "tf"}
FEATURES = {"resnet50": 2048, "mobilenetv2": 1280}


def images(n=2, size=32, seed=0, width=None):
    return np.random.default_rng(seed).integers(0, 256, (n, size, width or size, 3), dtype=np.uint8)


def small(arch, size=32, **kw):
    return imgcls_jax.create_model(arch, input_shape=(size, size, 3), **kw)


@pytest.fixture(scope="module", params=BN_MODELS)
def arch(request):
    return request.param


def test_registered_with_their_preprocessing_and_stages(arch):
    info = model_info(arch)
    model = small(arch, include_top=False)
    assert info.preprocessing == model.preprocessing == PREPROCESSING[arch]
    assert info.stages == model.stage_names
    names = model.base_layers
    assert len(names) == len(set(names)) and all(hasattr(model, n) for n in names)
    assert (
        sum(1 for n in names if isinstance(getattr(model, n), nnx.BatchNorm))
        == {"resnet50": 53, "mobilenetv2": 52}[arch]
    )


def test_stages_and_trainable_specs(arch):
    model = small(arch, num_classes=4, pooling="avg")
    stages = model.stages
    first, last = {"resnet50": ("conv1", "conv5"), "mobilenetv2": ("Conv1", "Conv_1")}[arch]
    assert stages[0][0] == first and stages[-1][0] == last
    assert model.trainable_layers("head") == ("head_logits",)
    assert model.trainable_layers("top:1") == (*stages[-1][1], "head_logits")
    assert model.trainable_layers("top:2") == (*stages[-2][1], *stages[-1][1], "head_logits")
    assert set(model.trainable_layers(f"top:{len(stages)}")) == set(model.trainable_layers("all"))
    with pytest.raises(ValueError, match=f"top:N takes N in 0..{len(stages)}"):
        model.trainable_layers(f"top:{len(stages) + 1}")
    if arch == "resnet50":  # the example: top:2 = conv5 + conv4 + head
        assert [s for s, _ in stages] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
        assert "conv4_block6_3_bn" in model.trainable_layers("top:2")
        assert "conv3_block4_3_bn" not in model.trainable_layers("top:2")


@pytest.mark.parametrize(
    "kwargs, shape",
    [
        (dict(), (2, 1000)),  # the Keras top
        (dict(include_top=True, num_classes=10), (2, 10)),
        (dict(include_top=False), (2, 2, 2, "C")),
        (dict(include_top=False, pooling="avg"), (2, "C")),
        (dict(include_top=False, pooling="max"), (2, "C")),
        (dict(num_classes=7), (2, 7)),  # transfer head on the flattened map
        (dict(num_classes=7, pooling="avg", head_units=(16, 8), dropout=0.5), (2, 7)),
    ],
)
def test_output_shapes(arch, kwargs, shape):
    model = small(arch, size=64, **kwargs)
    out = model(images(size=64))
    assert out.shape == tuple(FEATURES[arch] if d == "C" else d for d in shape)
    assert out.dtype == jnp.float32


def test_heads(arch):
    top = imgcls_jax.create_model(arch, input_shape=(32, 32, 3))
    assert top.include_top and top.head_layers == ("predictions",)
    assert top.predictions.kernel.shape == (FEATURES[arch], 1000)
    assert [s.name for s in top.layer_specs()][-1] == "predictions"
    head = small(arch, num_classes=3, head_units=(32,), dropout=0.2)
    assert not head.include_top and head.head_layers == ("head_fc1", "head_logits")
    assert head.head_fc1.kernel.shape == (FEATURES[arch] * 1 * 1, 32)  # flattened 1x1 map at 32 px
    assert "head_logits" not in [s.name for s in head.layer_specs()]  # not in Keras files
    with pytest.raises(ValueError, match="built for input_shape"):
        head(images(size=64))  # the flattening head takes only its size


@pytest.mark.parametrize("height, width", [(32, 32), (33, 33), (57, 40), (64, 96), (100, 100)])
def test_feature_map_size(arch, height, width):
    """Every stride-2 step maps n -> ceil(n / 2) (SAME, or Keras's correct_pad / VALID choices):
    the map is ceil(H / 32) x ceil(W / 32), as Keras's output shapes (tests/test_parity_bn.py)."""
    model = small(arch, include_top=False)
    out = jax.eval_shape(model.features, jax.ShapeDtypeStruct((1, height, width, 3), jnp.uint8))
    expected = (-(-height // 32), -(-width // 32))
    assert out.shape == (1, *expected, FEATURES[arch])
    assert model.feature_size((height, width)) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(31, 32, 3)), "Input size must be at least 32x32"),
        (dict(input_shape=(32, 32, 1)), "The input must have 3 channels"),
        (dict(input_shape=(32, 32)), "must be a tuple of three integers"),
        (dict(pooling="mean"), "pooling must be"),
        (dict(include_top=True, head_units=(8,)), "include_top=False"),
        (dict(include_top=False, head_units=(8,)), "set num_classes"),
        (dict(num_classes=0, include_top=False), "num_classes must be >= 1"),
        (dict(num_classes=3, dropout=1.0), "dropout"),
        (dict(dtype="int8"), "dtype"),
        (dict(preprocessing="imagenet"), "unknown preprocessing mode"),
        (dict(conv_impl="cudnn"), "conv_impl"),  # resnet50: not one of them; mobilenetv2: no such option
        (dict(depthwise_impl="im2col"), "depthwise_impl"),  # the reverse
        (dict(kernel_init="he_normal"), "does not take the option kernel_init"),
        (dict(weights="imagenet", include_top=True, num_classes=18), "1000 classes"),
    ],
)
def test_bad_options(arch, kwargs, match):
    with pytest.raises(ValueError, match=match):
        imgcls_jax.create_model(arch, **kwargs)


def test_bad_inputs_at_call(arch):
    model = small(arch, include_top=False)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        model(np.zeros((1, 32, 32, 4), np.uint8))
    with pytest.raises(ValueError, match="at least 32x32"):
        model(np.zeros((1, 32, 20, 3), np.uint8))


#: Each family's implementation option and its two choices: ResNet50's 3x3 convolutions as XLA's
#: convolution or im2col + matmul, MobileNetV2's depthwise ones as XLA's grouped convolution or
#: shifted multiply-adds.
IMPLS = {"resnet50": ("conv_impl", "xla", "im2col"), "mobilenetv2": ("depthwise_impl", "xla", "shift")}


def test_implementations_agree(arch):
    option, *choices = IMPLS[arch]
    x = images(size=40)
    out = [forward(small(arch, size=40, include_top=False, **{option: c}), x) for c in choices]
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-5 * np.abs(out[0]).max())


def test_bfloat16_compute_keeps_float32_params_and_statistics(arch):
    model = small(arch, num_classes=4, pooling="avg", dtype="bfloat16")
    first_conv = getattr(model, model.base_layers[0])
    first_bn = getattr(model, model.base_layers[1])
    assert first_conv.kernel.dtype == jnp.float32 and model.head_logits.kernel.dtype == jnp.float32
    assert first_bn.mean.dtype == jnp.float32 and first_bn.var.dtype == jnp.float32
    assert model.features(images()).dtype == jnp.bfloat16
    assert model(images()).dtype == jnp.float32


def _stats(model):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]


def test_batchnorm_and_dropout_follow_train_and_eval(arch):
    """Inference mode after construction: moving statistics, no dropout, nothing written. Training
    mode: batch statistics (the output changes with the batch's other images), every moving
    statistic updated, dropout on and drawn from ``dropout_key`` (folded per layer)."""
    model = small(arch, num_classes=4, pooling="avg", head_units=(16,), dropout=0.5, size=64)
    x = images(n=4, size=64)
    before = _stats(model)
    np.testing.assert_array_equal(model(x), model(x))
    np.testing.assert_allclose(model(x[:2]), model(x)[:2], rtol=1e-5, atol=1e-5)  # per image
    assert all(np.array_equal(a, b) for a, b in zip(_stats(model), before, strict=True))

    model.train()
    key = jax.random.key(3)
    a, b = model(x, dropout_key=key), model(x, dropout_key=key)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # same key, same masks (stats moved a bit)
    assert not np.allclose(model(x, dropout_key=key), model(x, dropout_key=jax.random.key(4)))
    moved = [not np.array_equal(s, t) for s, t in zip(_stats(model), before, strict=True)]
    assert all(moved), f"{moved.count(False)} statistics did not move"

    model.eval()
    assert not np.allclose(
        model(x[:2]), small(arch, num_classes=4, pooling="avg", head_units=(16,), size=64)(x[:2])
    )
    after = _stats(model)
    model(x)
    assert all(np.array_equal(a, b) for a, b in zip(_stats(model), after, strict=True))


def test_seeded_init_is_reproducible(arch):
    a, b = small(arch, num_classes=3, seed=3), small(arch, num_classes=3, seed=3)
    np.testing.assert_array_equal(a(images()), b(images()))
    c = small(arch, num_classes=3, seed=4)
    name = a.base_layers[0]
    assert not np.allclose(getattr(a, name).kernel[...], getattr(c, name).kernel[...])


def test_bn_momentum_sets_every_base_batchnorm_and_the_update_follows_it(arch):
    """``TrainConfig.bn_momentum`` (``set_batchnorm_momentum``): every BatchNorm of the base, not
    a BatchNorm of the transfer head; one training-mode call moves each moving statistic to
    ``m * initial + (1 - m) * batch``: with momentum 0 it is the batch statistic itself, so a
    model at 0.3 must hold 0.3 * (0, 1) + 0.7 * that (an independent form of Keras's update)."""
    from imgcls_jax import ConfigError, TrainConfig
    from imgcls_jax.models.registry import model_from_config

    head = ["dense 8", "batchnorm momentum=0.5", "dense 3"]
    x = images(n=4, size=32)
    models = {m: small(arch, num_classes=3, head=head) for m in (0.0, 0.3)}
    for m, model in models.items():
        count = model.set_batchnorm_momentum(m)
        assert count == len(model.base_batchnorms()) > 0
        norms = [layer for _, layer in nnx.iter_modules(model) if isinstance(layer, nnx.BatchNorm)]
        assert sorted(layer.momentum for layer in norms) == sorted([m] * count + [0.5])
        model.train()
        model(x, dropout_key=jax.random.key(0))
    for a, b in zip(models[0.0].base_batchnorms(), models[0.3].base_batchnorms(), strict=True):
        np.testing.assert_allclose(b.mean[...], 0.7 * a.mean[...], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b.var[...], 0.3 + 0.7 * a.var[...], rtol=1e-5, atol=1e-6)

    config = TrainConfig(data="photos", model=arch, image_size=32, weights="random", bn_momentum=0.9)
    built = model_from_config(config, 3)
    assert {layer.momentum for layer in built.base_batchnorms()} == {0.9}
    default = model_from_config(TrainConfig(data="photos", model=arch, image_size=32, weights="random"), 3)
    own = 0.999 if arch == "mobilenetv2" else 0.99  # as Keras builds them
    assert {layer.momentum for layer in default.base_batchnorms()} == {own}
    with pytest.raises(ConfigError, match=r"bn_momentum must be a number in \[0, 1\)"):
        TrainConfig(data="photos", model=arch, weights="random", bn_momentum=1.0)
    with pytest.raises(ConfigError, match="bn_momentum must be None for vgg16"):
        TrainConfig(data="photos", model="vgg16", weights="random", bn_momentum=0.9)
    with pytest.raises(ValueError, match="vgg16 has no BatchNorm layer in its base"):
        imgcls_jax.create_model("vgg16", input_shape=(32, 32, 3), num_classes=2).set_batchnorm_momentum(0.9)


def test_bn_restats_averages_the_batch_statistics_and_restores_the_layers(arch):
    """benchmarks/bn_restats.py's re-estimation: each moving statistic becomes the mean over the
    batches of that layer's batch statistic (each found alone, a fresh model at momentum 0), the
    weights and momenta are untouched and the model is back in inference mode."""
    from benchmarks.bn_restats import reestimate

    x = images(n=6, size=32, seed=5)
    model = small(arch, num_classes=3)
    weights = [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.Param))]
    assert reestimate(model, x, batch_size=3) == 2
    alone = []
    for batch in (x[:3], x[3:]):
        fresh = small(arch, num_classes=3)
        fresh.set_batchnorm_momentum(0.0)
        fresh.train()
        fresh(batch, dropout_key=jax.random.key(0))
        alone.append(fresh.base_batchnorms())
    own = 0.999 if arch == "mobilenetv2" else 0.99
    for layer, a, b in zip(model.base_batchnorms(), *alone, strict=True):
        np.testing.assert_allclose(layer.mean[...], (a.mean[...] + b.mean[...]) / 2, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(layer.var[...], (a.var[...] + b.var[...]) / 2, rtol=1e-4, atol=1e-5)
        assert layer.momentum == own and layer.use_running_average
    after = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(weights, after, strict=True))


def test_initial_weights_are_drawn_as_keras_draws_them(arch):
    """Training from scratch starts where Keras starts: every base array of a fresh model against
    the same array of ``keras.applications``' model built with ``weights=None`` (a seeded draw of
    Keras's own initializers): the same shape; mean and standard deviation within 5 standard errors
    of a sample of that size; the same largest magnitude within 10% (Keras's kernels here are
    glorot-uniform, whose largest draw sits at the limit: another scale or a normal draw is off by
    more). benchmarks/RESULTS.md cites this for the from-scratch comparison with Keras."""
    import keras

    from tests.bn_helpers import keras_app

    ours = small(arch, include_top=False, pooling="avg", size=64)
    keras.utils.set_random_seed(0)
    theirs = keras_app(arch, False, (64, 64), pooling="avg")
    compared = 0
    for layer in theirs.layers:
        if not layer.weights:
            continue
        for a, b in zip(layer.get_weights(), ours.keras_variables(layer.name), strict=True):
            b = np.asarray(b[...])
            assert a.shape == b.shape, layer.name
            sigma, n = float(a.std()), a.size
            assert abs(float(a.mean()) - float(b.mean())) <= 5 * sigma * np.sqrt(2 / n) + 1e-7, layer.name
            assert abs(float(a.std()) - float(b.std())) <= 5 * sigma / np.sqrt(n) + 1e-7, layer.name
            largest = float(np.abs(a).max())
            assert abs(largest - float(np.abs(b).max())) <= 0.1 * largest + 1e-7, layer.name
            compared += 1
    assert compared > 100
