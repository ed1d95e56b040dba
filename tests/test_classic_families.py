"""ResNet101/152, ResNet V2, DenseNet, Xception, InceptionV3, InceptionResNetV2, MobileNet and NASNet
through the registry, without Keras (their parity with Keras: tests/test_applications.py; FLOPs:
tests/test_bn_flops.py): parameter counts, stages and ``trainable`` specs, feature-map sizes, options
and their errors (MobileNet's ``alpha`` and ``depth_multiplier``, the 71 / 75 px minimums), the
ImageNet file each MobileNet width resolves to, the two implementations of each family's
convolutions, and weight files whose unnamed layers a Keras session numbered otherwise."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.models import model_info
from imgcls_jax.weights import WeightFileError, load_weights, store, write_legacy_h5
from tests.bn_helpers import forward

#: ``keras.applications.<App>(weights=None, include_top=False).count_params()`` (Keras 3.15.1;
#: every weight, BatchNorm's moving statistics included).
KERAS_NOTOP_PARAMS = {
    "resnet101": 42_658_176,
    "resnet152": 58_370_944,
    "resnet50v2": 23_564_800,
    "resnet101v2": 42_626_560,
    "resnet152v2": 58_331_648,
    "densenet121": 7_037_504,
    "densenet169": 12_642_880,
    "densenet201": 18_321_984,
    "xception": 20_861_480,
    "inceptionv3": 21_802_784,
    "inceptionresnetv2": 54_336_736,
    "mobilenet": 3_228_864,
    "nasnetmobile": 4_269_716,
    "nasnetlarge": 84_916_818,
}
#: ``(first stage, last stage, number of stages, channels of the map)`` of one model per family
STAGES = {
    "resnet50v2": ("conv1", "conv5", 5, 2048),
    "densenet121": ("conv1", "conv5", 8, 1024),
    "xception": ("block1", "block14", 14, 2048),
    "inceptionv3": ("stem", "mixed10", 12, 2048),
    "inceptionresnetv2": ("stem", "conv_7b", 45, 1536),
    "mobilenet": ("conv1", "block_13", 14, 1024),
    "nasnetmobile": ("stem", "normal_12", 17, 1056),
}
MIN_SIZE = {"xception": 71, "inceptionv3": 75, "inceptionresnetv2": 75}
#: the families whose model-building tests run in the quick tier (the others' builds take 10-20 s
#: each on a loaded 2-core CPU: slow tier)
QUICK = ("resnet50v2", "densenet121", "xception", "mobilenet")


def tiered(names):
    """``names`` as pytest params, those not in :data:`QUICK` marked slow."""
    return [pytest.param(n, marks=[] if n in QUICK else [pytest.mark.slow]) for n in names]


def model(name, size=None, **options):
    size = size or MIN_SIZE.get(name, 32)
    return imgcls_jax.create_model(name, input_shape=(size, size, 3), **options)


@functools.cache
def features_model(name):
    """``name`` without the top at its smallest size (built once: seconds each on 2 cores)."""
    return model(name, include_top=False)


def images(n=2, size=32, seed=0, width=None):
    return np.random.default_rng(seed).integers(0, 256, (n, size, width or size, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", tiered(sorted(KERAS_NOTOP_PARAMS)))
def test_parameter_count_equals_keras(name):
    m = features_model(name) if name in QUICK else nnx.eval_shape(lambda: model(name, include_top=False))
    specs = m.layer_specs()
    assert sum(int(np.prod(s)) for spec in specs for s in spec.shapes) == KERAS_NOTOP_PARAMS[name]
    assert model_info(name).stages == m.stage_names


def test_mobilenet_width_and_depth_multiplier_parameter_count():
    m = nnx.eval_shape(lambda: model("mobilenet", include_top=False, alpha=0.5, depth_multiplier=2))
    assert sum(int(np.prod(s)) for spec in m.layer_specs() for s in spec.shapes) == 1_646_672  # Keras's
    assert m.conv_dw_1.kernel.shape == (3, 3, 16, 2) and m.conv_pw_1.kernel.shape == (1, 1, 32, 32)


@pytest.mark.parametrize("name", tiered(sorted(STAGES)))
def test_stages_and_trainable_specs(name):
    first, last, n, channels = STAGES[name]
    m = features_model(name)
    stages = m.stages
    assert len(stages) == n and stages[0][0] == first and stages[-1][0] == last
    names = m.base_layers
    assert len(names) == len(set(names)) and all(hasattr(m, n) for n in names)
    assert m.trainable_layers("top:1") == stages[-1][1]
    assert set(m.trainable_layers(f"top:{n}")) == set(m.trainable_layers("all"))
    with pytest.raises(ValueError, match=f"top:N takes N in 0..{n}"):
        m.trainable_layers(f"top:{n + 1}")


def test_v2_and_densenet_close_their_last_stage_with_the_final_batchnorm():
    assert features_model("resnet50v2").stages[-1][1][-1] == "post_bn"
    densenet = features_model("densenet121")
    assert densenet.stages[-1][1][-1] == "bn"
    assert [s for s, _ in densenet.stages if s.startswith("pool")] == ["pool2", "pool3", "pool4"]


@pytest.mark.parametrize("name", tiered(sorted(STAGES)))
def test_feature_map_size(name):
    """The map the model computes has the size ``feature_size`` says (Keras's own sizes at two
    input sizes, one odd and non-square, are checked by tests/test_applications.py)."""
    m = features_model(name)
    low = MIN_SIZE.get(name, 32)
    for height, width in ((low, low), (low + 1, low + 16), (2 * low + 3, low)):
        out = jax.eval_shape(m.features, jax.ShapeDtypeStruct((1, height, width, 3), jnp.uint8))
        assert out.shape == (1, *m.feature_size((height, width)), STAGES[name][3]), (height, width)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("xception", dict(input_shape=(70, 71, 3)), "Input size must be at least 71x71"),
        ("inceptionv3", dict(input_shape=(75, 74, 3)), "Input size must be at least 75x75"),
        ("inceptionresnetv2", dict(input_shape=(74, 80, 3)), "Input size must be at least 75x75"),
        ("nasnetmobile", dict(input_shape=(31, 32, 3)), "Input size must be at least 32x32"),
        ("mobilenet", dict(alpha=0.0), "alpha must be > 0"),
        ("mobilenet", dict(depth_multiplier=1.5), "depth_multiplier must be an integer >= 1"),
        ("mobilenet", dict(top_dropout=1.0), "top_dropout"),
        ("densenet121", dict(depthwise_impl="shift"), "does not take the option depthwise_impl"),
        ("nasnetmobile", dict(conv_impl="im2col"), "does not take the option conv_impl"),
        ("resnet101", dict(alpha=0.5), "does not take the option alpha"),
    ],
)
def test_bad_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        imgcls_jax.create_model(name, **options)


def test_inputs_below_the_minimum_at_call():
    m = features_model("xception")
    with pytest.raises(ValueError, match="at least 71x71"):
        m.features(jnp.zeros((1, 70, 80, 3), jnp.uint8))


def test_v2_files_are_tf_preprocessed(tmp_path):
    """ResNet V2's weights expect "tf" preprocessing (V1's "caffe"): a V2 model asked to apply
    "caffe" refuses them before the file is read."""
    assert model_info("resnet50v2").preprocessing == "tf" and model_info("resnet101").preprocessing == "caffe"
    (tmp_path / "w.h5").write_bytes(b"")
    m = nnx.eval_shape(lambda: model("resnet50v2", include_top=False, preprocessing="caffe"))
    with pytest.raises(ValueError, match="trained with 'tf' preprocessing"):
        load_weights(m, tmp_path / "w.h5")


@pytest.mark.parametrize(
    "options, key, size, filename",
    [
        ({}, "mobilenet", 224, "mobilenet_1_0_224_tf.h5"),
        ({"alpha": 0.75}, "mobilenet_0.75", 160, "mobilenet_7_5_160_tf.h5"),
        ({"alpha": 0.5}, "mobilenet_0.5", 128, "mobilenet_5_0_128_tf.h5"),
        ({"alpha": 0.25}, "mobilenet_0.25", 192, "mobilenet_2_5_192_tf.h5"),
    ],
)
def test_mobilenet_file_per_width_and_size(options, key, size, filename):
    m = nnx.eval_shape(lambda: model("mobilenet", size, **options))
    assert m.imagenet_key == key
    assert store.IMAGENET[(key, True)].for_size(m.input_shape).filename == filename
    notop = store.IMAGENET[(key, False)].for_size(m.input_shape)
    assert notop.filename == filename.replace("_tf.h5", "_tf_no_top.h5") and notop.file_hash is None


@pytest.mark.parametrize(
    "options, match",
    [({"alpha": 0.6}, "alpha can be one of"), ({"depth_multiplier": 2}, "depth multiplier must be 1")],
)
def test_mobilenet_without_published_weights(options, match):
    with pytest.raises(ValueError, match=match):
        imgcls_jax.create_model("mobilenet", weights="imagenet", include_top=False, **options)


def test_mobilenet_top_is_conv_preds():
    m = nnx.eval_shape(lambda: model("mobilenet", 32, alpha=0.5))
    assert m.head_layers == ("conv_preds",)
    assert m.conv_preds.kernel.shape == (1, 1, 512, 1000)
    assert [s.name for s in m.layer_specs()][-1] == "conv_preds"
    top = model("mobilenet", 32, alpha=0.25)
    assert jax.eval_shape(top, jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.uint8)).shape == (2, 1000)


#: each family's implementation option and its two choices
IMPLS = {
    "resnet50v2": ("conv_impl", "xla", "im2col"),
    "mobilenet": ("depthwise_impl", "xla", "shift"),
    "densenet121": ("conv_impl", "xla", "im2col"),
    "xception": ("depthwise_impl", "xla", "shift"),
    "inceptionv3": ("conv_impl", "xla", "im2col"),
    "nasnetmobile": ("depthwise_impl", "xla", "shift"),
}
QUICK_IMPLS = ("resnet50v2", "mobilenet")


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[] if n in QUICK_IMPLS else [pytest.mark.slow]) for n in IMPLS]
)
def test_implementations_agree(name):
    option, *choices = IMPLS[name]
    extra = {"depth_multiplier": 2, "alpha": 0.5} if name == "mobilenet" else {}
    size = MIN_SIZE.get(name, 40)
    x = images(size=size)
    out = [forward(model(name, size, include_top=False, **{option: c}, **extra), x) for c in choices]
    np.testing.assert_allclose(out[1], out[0], rtol=0, atol=1e-5 * np.abs(out[0]).max())


# ------------------------------------------------------------------ files of another Keras session
def _layers(m) -> dict:
    return {s.name: [np.asarray(v.get_value()) for v in m.keras_variables(s.name)] for s in m.layer_specs()}


def _renumber(name: str, shift: int) -> str:
    """``conv2d_3`` -> ``conv2d_<3 + shift>`` (``conv2d`` counts as 0); other names unchanged."""
    for prefix in ("conv2d", "batch_normalization"):
        if name == prefix or name.startswith(prefix + "_") and name[len(prefix) + 1 :].isdigit():
            n = int(name[len(prefix) + 1 :] or 0)
            return f"{prefix}_{n + shift}"
    return name


@pytest.mark.parametrize("shift", [1, 9])
def test_unnamed_layers_matched_by_their_order(tmp_path, shift):
    """Keras numbers layers it was given no name for in its session (Keras 2 from ``_1``; a
    session that built another model first goes on from there): Xception's four residual
    convolutions and BatchNorms are matched by their numbers' order, whatever the numbers and
    the file's layer order."""
    source = model("xception", include_top=False, seed=3)
    values = _layers(source)
    weights = {
        _renumber(s.name, shift): dict(zip(s.weight_names, values[s.name])) for s in source.layer_specs()
    }
    assert "conv2d" not in weights and f"batch_normalization_{3 + shift}" in weights
    path = tmp_path / "xception_session.h5"
    write_legacy_h5(path, weights, layer_names=sorted(weights, reverse=True))  # not the model's order
    target = model("xception", include_top=False, seed=4)
    assert not np.array_equal(target.conv2d_3.kernel[...], source.conv2d_3.kernel[...])
    load_weights(target, path, use_cache=False)
    loaded = _layers(target)
    for name, arrays in values.items():
        for a, b in zip(arrays, loaded[name], strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_missing_unnamed_layer_is_reported(tmp_path):
    source = nnx.eval_shape(lambda: model("xception", include_top=False))
    weights = {
        s.name: {w: np.zeros(shape, np.float32) for w, shape in zip(s.weight_names, s.shapes)}
        for s in source.layer_specs()
        if s.name != "conv2d_2"
    }
    write_legacy_h5(tmp_path / "short.h5", weights)
    with pytest.raises(WeightFileError, match="missing \\['conv2d_2'\\]"):
        load_weights(model("xception", include_top=False), tmp_path / "short.h5", use_cache=False)


@pytest.mark.parametrize(
    "source, target, family",
    [
        ("xception", "resnet50", "Xception"),
        pytest.param("densenet121", "resnet50", "DenseNet", marks=pytest.mark.slow),
        pytest.param("mobilenet", "densenet121", "MobileNet", marks=pytest.mark.slow),
    ],
)
def test_file_of_another_family_is_named(tmp_path, source, target, family):
    """A file of another family is rejected before any array is read, and the message says whose
    it looks like (Xception's layers include VGG's ``block1_conv1``, DenseNet's ResNet's
    ``conv1_conv``: the specific marker wins)."""
    specs = nnx.eval_shape(lambda: model(source, include_top=False)).layer_specs()
    weights = {
        s.name: {w: np.zeros(shape, np.float32) for w, shape in zip(s.weight_names, s.shapes)} for s in specs
    }
    write_legacy_h5(tmp_path / "other.h5", weights)
    target_model = nnx.eval_shape(lambda: model(target, include_top=False))
    with pytest.raises(WeightFileError, match=f"it looks like a {family} file"):
        load_weights(target_model, tmp_path / "other.h5", use_cache=False)
