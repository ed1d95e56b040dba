"""And back out: imgcls_jax models written as Keras files (without Keras), loaded by
``keras.saving.load_model`` and compared with imgcls_jax's probabilities (max |diff| <= 1e-5);
Keras -> imgcls_jax -> Keras round trips compared with the original Keras model. Also the VGG
head options the import needs (hidden activations against ``keras.activations``, sigmoid
outputs, the ``unit`` preprocessing mode)."""

import jax
import numpy as np
import pytest
from flax import nnx

keras = pytest.importorskip("keras")

from imgcls_jax.models import VGG, preprocess_input  # noqa: E402
from imgcls_jax.models.vgg import HEAD_ACTIVATIONS  # noqa: E402
from imgcls_jax.weights import from_keras, to_keras  # noqa: E402
from tests import keras_builders as kb  # noqa: E402


@pytest.fixture(scope="module")
def raw():
    return kb.images(6, seed=2)


def _load(path):
    return keras.saving.load_model(path, compile=False)


@pytest.fixture(scope="module")
def typical(raw, tmp_path_factory):
    k_model = kb.prepared(kb.typical(), raw, seed=11)
    path = tmp_path_factory.mktemp("typ") / "m.keras"
    k_model.save(path)
    return path, kb.keras_out(k_model, kb.caffe(raw))


@pytest.mark.parametrize("suffix,nested", [(".keras", None), (".keras", False), (".h5", None)])
def test_round_trip_typical(typical, raw, tmp_path, suffix, nested):
    path, expected = typical
    model, info = from_keras(path)
    out = to_keras(model, tmp_path / f"back{suffix}", nested=nested)
    back = _load(out)
    kb.assert_probabilities_equal(kb.keras_out(back, kb.caffe(raw)), expected)
    names = [layer.name for layer in back.layers]
    assert ("vgg16" in names) == (suffix == ".keras" and nested is None), names
    again, info2 = from_keras(out)  # and in again: same description
    assert (info2.pooling, info2.head_units, info2.dropout, info2.num_classes) == (
        info.pooling, info.head_units, info.dropout, info.num_classes)  # fmt: skip


def test_round_trip_rescaling_sigmoid(raw, tmp_path):
    """Raw-pixel input: the Rescaling layer is written back, sigmoid outputs stay sigmoids."""
    k_model = kb.prepared(kb.sequential_rescaling(), raw, seed=12, preprocess=lambda x: x.astype("float32"))
    k_model.save(tmp_path / "m.keras")
    model, info = from_keras(tmp_path / "m.keras")
    back = _load(to_keras(model, tmp_path / "back.keras", input_preprocessing=info.input_preprocessing))
    rescaling = [layer for layer in back.layers if isinstance(layer, keras.layers.Rescaling)]
    assert len(rescaling) == 1 and np.isclose(rescaling[0].scale, 1 / 127.5)
    expected = kb.keras_out(k_model, raw.astype("float32"))
    kb.assert_probabilities_equal(kb.keras_out(back, raw.astype("float32")), expected)


def test_round_trip_binary_sigmoid(raw, tmp_path):
    k_model = kb.prepared(kb.flat_vgg19_binary(), raw, seed=13, preprocess=lambda x: x.astype("float32"))
    k_model.save(tmp_path / "m.keras")
    model, info = from_keras(tmp_path / "m.keras")
    out = to_keras(model, tmp_path / "back.keras", keras_output=info.keras_output, input_preprocessing="none")
    back = _load(out)
    assert back.layers[-1].units == 1 and back.layers[-1].get_config()["activation"] == "sigmoid"
    expected = kb.keras_out(k_model, raw.astype("float32"))
    kb.assert_probabilities_equal(kb.keras_out(back, raw.astype("float32")), expected)


def _trained_here(seed=0, **kwargs):
    """A model built here, weights scrambled as training would (He-scaled, non-zero biases)."""
    model = VGG("vgg16", include_top=False, input_shape=(32, 32, 3), rngs=nnx.Rngs(seed), **kwargs)
    params = nnx.state(model, nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    rng = np.random.default_rng(seed)
    new = [
        rng.normal(0, np.sqrt(2.0 / np.prod(x.shape[:-1])) if x.ndim > 1 else 0.1, x.shape).astype(np.float32)
        for x in leaves
    ]
    nnx.update(model, jax.tree.unflatten(tree, new))
    return model


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_model_trained_here_loads_in_keras(raw, tmp_path, suffix):
    model = _trained_here(
        num_classes=4, pooling="max", head_units=(24, 16), dropout=0.25, head_activation="tanh",
        preprocessing="unit",
    )  # fmt: skip
    ours = np.asarray(model.probabilities(model(raw)))
    back = _load(to_keras(model, tmp_path / f"m{suffix}"))
    assert any(isinstance(layer, keras.layers.Rescaling) for layer in back.layers)  # 'unit': raw pixels in
    dropouts = [layer.rate for layer in back.layers if isinstance(layer, keras.layers.Dropout)]
    assert dropouts == [0.25, 0.25]
    kb.assert_probabilities_equal(kb.keras_out(back, raw.astype("float32")), ours)


def test_export_errors(tmp_path):
    model = _trained_here(num_classes=3, pooling="avg")
    with pytest.raises(ValueError, match="suffix must be .keras"):
        to_keras(model, tmp_path / "m.weights.h5")
    with pytest.raises(ValueError, match="reverses the channels"):
        to_keras(model, tmp_path / "m.h5", input_preprocessing="none")  # caffe model, legacy file
    with pytest.raises(ValueError, match="needs 2 classes"):
        to_keras(model, tmp_path / "m.keras", keras_output="sigmoid")
    with pytest.raises(ValueError, match="no classifier head"):
        to_keras(
            VGG("vgg16", include_top=False, input_shape=(32, 32, 3), rngs=nnx.Rngs(0)), tmp_path / "f.keras"
        )
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------- VGG head options
@pytest.mark.parametrize("name", sorted(HEAD_ACTIVATIONS))
def test_head_activations_match_keras(name):
    x = np.linspace(-6, 6, 97, dtype=np.float32)
    ours = np.asarray(HEAD_ACTIVATIONS[name](x))
    theirs = np.asarray(keras.activations.get(name)(x))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)


def test_probabilities_and_options(raw):
    model = _trained_here(num_classes=3, pooling="avg", output_activation="sigmoid")
    logits = np.asarray(model(raw), np.float64)
    np.testing.assert_allclose(model.probabilities(logits), 1 / (1 + np.exp(-logits)), rtol=1e-5, atol=1e-7)
    softmax = _trained_here(num_classes=3, pooling="avg")
    e = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(
        softmax.probabilities(logits), e / e.sum(1, keepdims=True), rtol=1e-5, atol=1e-7
    )
    for bad, match in [({"head_activation": "mish"}, "unknown head_activation"),
                       ({"output_activation": "tanh"}, "output_activation must be")]:  # fmt: skip
        with pytest.raises(ValueError, match=match):
            VGG("vgg16", include_top=False, num_classes=2, input_shape=(32, 32, 3), rngs=nnx.Rngs(0), **bad)
    with pytest.raises(ValueError, match="use include_top=False"):
        VGG("vgg16", include_top=True, head_activation="tanh", input_shape=(32, 32, 3), rngs=nnx.Rngs(0))


def test_unit_preprocessing(raw):
    np.testing.assert_allclose(preprocess_input(raw, "unit"), raw.astype(np.float64) / 255.0, rtol=1e-6)


def test_reading_and_writing_need_no_keras(tmp_path):
    """to_keras then from_keras in a fresh process: neither Keras nor TensorFlow gets imported."""
    import subprocess
    import sys

    code = f"""
import sys
from flax import nnx
from imgcls_jax.models import VGG
from imgcls_jax.weights import from_keras, to_keras
model = VGG("vgg16", include_top=False, num_classes=2, pooling="avg", input_shape=(32, 32, 3),
            rngs=nnx.Rngs(0))
to_keras(model, r"{tmp_path}/m.keras")
again, info = from_keras(r"{tmp_path}/m.keras")
assert info.num_classes == 2 and info.pooling == "avg"
print(sorted(m for m in ("keras", "tensorflow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


# ------------------------------------------------------------ the head every family shares
HEAD = ("dense 16", "batchnorm", "activation gelu", "dropout 0.2", "layernorm epsilon=1e-05", "dense 8 swish",
        "batchnorm epsilon=0.01 momentum=0.9 center=0", "dense 3")  # fmt: skip


def test_head_layers_compute_what_keras_does():
    """Dense, BatchNormalization (moving statistics, no beta), LayerNormalization, activations and
    dropout (at inference) as Keras computes them, with Keras's weights copied in Keras's order."""
    from imgcls_jax.models import create_model

    L = keras.layers
    inputs = keras.Input((512,))
    x = L.BatchNormalization()(L.Dense(16)(inputs))
    x = L.LayerNormalization(epsilon=1e-5)(L.Dropout(0.2)(L.Activation("gelu")(x)))
    x = L.BatchNormalization(epsilon=0.01, momentum=0.9, center=False)(L.Dense(8, activation="swish")(x))
    k_head = keras.Model(inputs, L.Dense(3)(x))
    rng = np.random.default_rng(3)
    weights = [rng.uniform(0.5, 2.0, w.shape) if "variance" in w.path else rng.normal(0, 0.3, w.shape)
               for w in k_head.weights]  # fmt: skip
    k_head.set_weights([w.astype(np.float32) for w in weights])
    model = create_model("vgg16", num_classes=3, pooling="avg", head=HEAD, input_shape=(32, 32, 3))
    assert model.head_layers == ("head_fc1", "head_bn1", "head_ln1", "head_fc2", "head_bn2", "head_logits")
    keras_layers = [layer for layer in k_head.layers if layer.weights]
    for name, layer in zip(model.head_layers, keras_layers, strict=True):
        for variable, array in zip(model.keras_variables(name), layer.get_weights(), strict=True):
            variable.set_value(jax.numpy.asarray(array))
    features = rng.normal(0, 2.0, (6, 512)).astype(np.float32)
    ours = np.asarray(model.head(features))
    theirs = np.asarray(k_head(features, training=False))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert [str(h) for h in model.head_spec] == list(HEAD)


def test_head_texts_and_their_errors():
    from imgcls_jax.models.head import as_classic, classic_head, parse_head

    assert [str(h) for h in parse_head(HEAD)] == list(HEAD)
    classic = classic_head((64, 32), "gelu", 0.5, 5)
    assert [str(h) for h in classic] == [
        "dense 64 gelu",
        "dropout 0.5",
        "dense 32 gelu",
        "dropout 0.5",
        "dense 5",
    ]
    assert as_classic(classic) == ((64, 32), "gelu", 0.5) and as_classic(parse_head(HEAD)) is None
    bad = {"dense": "dense takes its units", "dense 0": "dense takes its units", "dropout 1.0": "rate in",
           "batchnorm momentum=2": "momentum in", "activation mish": "unknown activation",
           "conv 3": "unknown kind", "layernorm momentum=0.9": "layernorm takes"}  # fmt: skip
    for text, match in bad.items():
        with pytest.raises(ValueError, match=match):
            parse_head([text, "dense 2"])
    with pytest.raises(ValueError, match="no 'dense' layer"):
        parse_head(["batchnorm"])


QUICK_HEADS = ("vgg16", "mobilenetv2")  # the head is one class's: two families in the quick tier


@pytest.mark.parametrize("name", [n if n in QUICK_HEADS else pytest.param(n, marks=pytest.mark.slow)
                                  for n in __import__("imgcls_jax").list_models()])  # fmt: skip
def test_every_family_takes_the_head(name):
    """The one head is every family's: ``create_model(head=...)`` (and ``head_activation``,
    ``output_activation``) for each registered family; ``TrainConfig.head`` builds it."""
    from imgcls_jax import TrainConfig
    from imgcls_jax.config import ConfigError
    from imgcls_jax.models import create_model
    from imgcls_jax.models.registry import model_from_config, model_info

    size = max(32, model_info(name).min_size)  # Xception 71, the Inceptions 75
    model = nnx.eval_shape(lambda: create_model(name, num_classes=3, pooling="avg", head=HEAD,
                                                input_shape=(size, size, 3)))  # fmt: skip
    assert model.head_layers == ("head_fc1", "head_bn1", "head_ln1", "head_fc2", "head_bn2", "head_logits")
    options = dict(num_classes=3, pooling="avg", head_units=(8,), head_activation="tanh",
                   output_activation="sigmoid", input_shape=(size, size, 3))  # fmt: skip
    other = nnx.eval_shape(lambda: create_model(name, **options))
    assert [str(h) for h in other.head_spec] == ["dense 8 tanh", "dropout 0", "dense 3"]  # dropout 0: classic
    assert other.output_activation == "sigmoid"
    config = TrainConfig(
        data="x",
        model=name,
        image_size=size,
        head=list(HEAD),
        phases=[{"trainable": "keras"}],
        weights="random",  # trainable 'keras' keeps what Keras froze frozen: a random base on purpose
    )
    assert config.head == HEAD
    model = nnx.eval_shape(lambda: model_from_config(config, 3, weights=None))
    assert [str(h) for h in model.head_spec] == list(HEAD)
    with pytest.raises(ValueError, match="trainable='keras'.*not imported from Keras"):
        model.trainable_layers("keras")
    with pytest.raises(ConfigError, match=r"TrainConfig.head: head layer 'dense x'"):
        TrainConfig(data="x", head=["dense x"])


@pytest.mark.parametrize(
    "name",
    ["mobilenetv2", "nasnetmobile", "resnet50"]
    + [pytest.param(n, marks=pytest.mark.slow) for n in ("mobilenet", "efficientnetb0", "mobilenetv3small",
                                                        "densenet121")],
)  # fmt: skip
def test_exported_paddings_are_what_keras_builds_at_the_size(name):
    """The base ``to_keras`` writes has the paddings Keras's own builder writes at that size: the
    ``correct_pad`` ones follow the sizes of the maps they pad (odd sides at 76 and 97 px, even at
    96), MobileNet's fixed ones, NASNet's shift-by-one padding and ResNet's and DenseNet's
    symmetric paddings before their strided poolings stay as they are."""
    from imgcls_jax.weights.keras_export import _base_config
    from imgcls_jax.weights.keras_families import KERAS_APPLICATIONS

    row = KERAS_APPLICATIONS[name]
    for size in (76, 96, 97):
        keras.backend.clear_session()
        options = {"include_top": False, "weights": None, **row.kwargs, "input_shape": (size, size, 3)}
        theirs = getattr(keras.applications, row.builder)(**options).get_config()["layers"]
        ours = _base_config(name, (size, size, 3))["config"]["layers"]
        pads = [{e["name"]: e["config"]["padding"] for e in c if e["class_name"] == "ZeroPadding2D"}
                for c in (ours, theirs)]  # fmt: skip
        assert pads[0] and pads[0] == {k: [list(p) for p in v] for k, v in pads[1].items()}, (name, size)
