"""Whole Keras models in: real Keras 3 models saved in every format, imported without Keras,
and compared with Keras's own probabilities on the same raw images (max |diff| <= 1e-5).

Keras 2 whole-model files: tf.keras is not installable beside tensorflow-cpu in CI, so the
model_config and weight layout of real tf_keras 2.21 saves are kept in tests/data/keras2 (see
make_fixtures.py there) and filled with the weights of a Keras 3 twin, the reference.
"""

import json
import zipfile
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from imgcls_jax.models.registry import model_from_config  # noqa: E402
from imgcls_jax.train import write_run_folder  # noqa: E402
from imgcls_jax.train.imported import initialize_from  # noqa: E402
from imgcls_jax.weights import WeightFileError, from_keras, to_keras  # noqa: E402
from tests import keras_builders as kb  # noqa: E402
from tests.keras_references import registry_params  # noqa: E402

KERAS2 = Path(__file__).parent / "data" / "keras2"


@pytest.fixture(scope="module")
def raw():
    return kb.images(6, seed=1)


@pytest.fixture(scope="module")
def base16():
    return kb.vgg_base("vgg16")


@pytest.fixture(scope="module")
def typical(raw, base16, tmp_path_factory):
    """The original experiment's model saved as .keras, .h5, .weights.h5 and its config JSON."""
    model = kb.prepared(kb.typical(base16), raw, seed=3)
    tmp = tmp_path_factory.mktemp("typical")
    model.save(tmp / "m.keras")
    model.save(tmp / "m.h5")
    model.save_weights(tmp / "m.weights.h5")
    (tmp / "m.json").write_text(model.to_json())
    return tmp, kb.keras_out(model, kb.caffe(raw))


TYPICAL_FORMATS = {
    "keras": ("m.keras", {}),
    "h5": ("m.h5", {}),
    "weights+archive": ("m.weights.h5", {"architecture": "m.keras"}),
    "weights+json": ("m.weights.h5", {"architecture": "m.json"}),
    "weights+keywords": (
        "m.weights.h5",
        {"arch": "vgg16", "pooling": "avg", "head_units": (256,), "dropout": 0.5, "num_classes": 5},
    ),
}


@pytest.mark.parametrize("fmt", list(TYPICAL_FORMATS))
def test_typical_model_every_format(typical, raw, fmt):
    tmp, expected = typical
    name, kwargs = TYPICAL_FORMATS[fmt]
    if "architecture" in kwargs:
        kwargs = {**kwargs, "architecture": tmp / kwargs["architecture"]}
    model, info = from_keras(tmp / name, input_shape=(32, 32, 3), **kwargs)
    kb.assert_probabilities_equal(model.probabilities(model(raw)), expected)
    assert (info.arch, info.include_top, info.pooling, info.head_units) == ("vgg16", False, "avg", (256,))
    assert (info.dropout, info.num_classes, info.head_activation) == (0.5, 5, "relu")
    assert (info.preprocessing, info.input_preprocessing, info.keras_output) == ("caffe", "caffe", "softmax")
    assert info.input_shape == (32, 32, 3)
    assert json.loads(json.dumps(info.to_dict()))["head_units"] == [256]


def test_user_preprocessing_other_than_caffe(typical, raw):
    """A model trained on 'tf'-preprocessed inputs: the imported model applies 'tf' itself."""
    tmp, _ = typical
    from keras.applications import imagenet_utils

    x = imagenet_utils.preprocess_input(raw.astype("float32"), mode="tf")
    expected = kb.keras_out(keras.saving.load_model(tmp / "m.keras"), x)
    model, info = from_keras(tmp / "m.keras", preprocessing="tf", class_names="abcde")
    assert info.preprocessing == "tf" and info.class_names == tuple("abcde")
    kb.assert_probabilities_equal(model.probabilities(model(raw)), expected)


@pytest.fixture(scope="module")
def raw64():
    return kb.images(4, seed=8, size=64)


@pytest.fixture(scope="module")
def rescaling_sigmoid(raw64, tmp_path_factory):
    """64x64 inputs: Flatten reads a 2x2x512 map, so its (h, w, c) order is tested."""
    model = kb.sequential_rescaling(size=64)
    kb.prepared(model, raw64, seed=4, preprocess=lambda x: x.astype("float32"))
    tmp = tmp_path_factory.mktemp("seq")
    model.save(tmp / "m.keras")
    model.save(tmp / "m.h5")
    return tmp, kb.keras_out(model, raw64.astype("float32"))


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
def test_sequential_rescaling_flatten_sigmoid(rescaling_sigmoid, raw64, name):
    tmp, expected = rescaling_sigmoid
    model, info = from_keras(tmp / name)
    assert (info.preprocessing, info.input_preprocessing) == ("tf", "none")
    assert (info.pooling, info.output_activation, info.num_classes) == (None, "sigmoid", 3)
    assert info.input_shape == (64, 64, 3) and model.head_logits.kernel.shape == (2 * 2 * 512, 3)
    kb.assert_probabilities_equal(model.probabilities(model(raw64)), expected)


@pytest.fixture(scope="module")
def binary19(raw, tmp_path_factory):
    model = kb.prepared(kb.flat_vgg19_binary(), raw, seed=5, preprocess=lambda x: x.astype("float32"))
    tmp = tmp_path_factory.mktemp("bin")
    model.save(tmp / "m.keras")
    model.save(tmp / "m.h5")
    return tmp, kb.keras_out(model, raw.astype("float32"))


@pytest.mark.parametrize("name", ["m.keras", "m.h5"])
def test_flat_vgg19_binary_sigmoid_gelu(binary19, raw, name):
    """Flat layers, augmentation skipped, Rescaling(1/255) -> 'unit', Activation layer merged,
    Dense(1, sigmoid) -> two softmax classes [1 - p, p]."""
    tmp, expected = binary19
    model, info = from_keras(tmp / name)
    assert (info.arch, info.pooling, info.head_units, info.head_activation) == ("vgg19", "max", (32,), "gelu")
    assert (info.preprocessing, info.num_classes, info.keras_output_units) == ("unit", 2, 1)
    assert any("RandomFlip" in n for n in info.notes)
    probs = np.asarray(model.probabilities(model(raw)))
    kb.assert_probabilities_equal(probs, np.concatenate([1 - expected, expected], 1))


def test_keras_vgg_with_its_own_top(raw, tmp_path):
    k_model = keras.applications.VGG16(weights=None, include_top=True, classes=3, input_shape=(32, 32, 3))
    kb.prepared(k_model, raw, seed=6)
    k_model.save(tmp_path / "top.keras")
    model, info = from_keras(tmp_path / "top.keras")
    assert info.include_top and info.num_classes == 3 and model.head_layers == ("fc1", "fc2", "predictions")
    kb.assert_probabilities_equal(model.probabilities(model(raw)), kb.keras_out(k_model, kb.caffe(raw)))


# ------------------------------------------------------------------ Keras 2 (tf.keras) files
def _keras2_twin(name, base):
    k = keras
    inputs = k.Input((32, 32, 3))
    if name == "nested_gap_dense_dropout":
        return kb.typical(base), kb.caffe
    if name == "sequential_rescaling_flatten_sigmoid":
        return kb.sequential_rescaling(base), lambda x: x.astype("float32")
    if name == "preprocess_input_inside":  # preprocess_input applied outside the twin instead
        x = k.layers.GlobalAveragePooling2D()(base(inputs))
        return k.Model(inputs, k.layers.Dense(2, activation="softmax")(x)), kb.caffe
    x = k.layers.GlobalMaxPooling2D()(base(inputs))
    return k.Model(inputs, k.layers.Activation("softmax")(k.layers.Dense(4)(x))), kb.caffe


def _write_keras2(path, saved: dict, twin) -> None:
    """A whole-model .h5 as tf.keras writes it: its saved config and layout, the twin's weights."""
    arrays = iter(twin.get_weights())
    layout = saved["layout"]
    with h5py.File(path, "w") as f:
        f.attrs.update({"backend": layout["backend"], "keras_version": layout["keras_version"]})
        f.attrs["model_config"] = json.dumps(saved["model_config"])
        weights = f.create_group("model_weights")
        weights.attrs["layer_names"] = np.array([n.encode() for n in layout["layer_names"]])
        for name in layout["layer_names"]:
            group = weights.create_group(name)
            names = layout["weight_names"][name]
            group.attrs["weight_names"] = np.array([n.encode() for n in names])
            for wname in names:
                group.create_dataset(wname, data=next(arrays))
    assert next(arrays, None) is None


@pytest.mark.parametrize("name", sorted(p.stem for p in KERAS2.glob("*.json")))
def test_keras2_whole_model_files(name, raw, base16, tmp_path):
    saved = json.loads((KERAS2 / f"{name}.json").read_text())
    twin, preprocess = _keras2_twin(name, base16)
    kb.prepared(twin, raw, seed=7, preprocess=preprocess)
    _write_keras2(tmp_path / "k2.h5", saved, twin)
    model, info = from_keras(tmp_path / "k2.h5")
    assert info.keras_version.startswith("2.") and info.format == "legacy-h5"
    if name == "preprocess_input_inside":
        assert (info.preprocessing, info.input_preprocessing) == ("caffe", "none")
    kb.assert_probabilities_equal(model.probabilities(model(raw)), kb.keras_out(twin, preprocess(raw)))


# -------------------------------------------------------------------------- run folder
def test_run_folder_predicts_like_keras(typical, raw, tmp_path):
    from imgcls_jax import load_run, predict

    tmp, expected = typical
    model, info = from_keras(tmp / "m.keras", class_names=["a", "b", "c", "d", "e"])
    write_run_folder(model, info, tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert loaded.class_names == ["a", "b", "c", "d", "e"] and loaded.image_size == (32, 32)
    predictions = predict(loaded, raw, top_k=5)
    for prediction, row in zip(predictions, expected):
        got = dict(prediction.top_k)
        assert max(abs(got[c] - row[i]) for i, c in enumerate("abcde")) <= 1e-5


def test_run_folder_records_preprocessing_and_activations(binary19, raw, tmp_path):
    """A run folder of a model with 'unit' inputs and a gelu head predicts what Keras does."""
    from imgcls_jax import TrainConfig, load_run, predict

    model, info = from_keras(binary19[0] / "m.keras")
    run = write_run_folder(model, info, tmp_path / "run", class_names=["no", "yes"])
    config = TrainConfig.from_json(run / "config.json")
    assert (config.preprocessing, config.head_activation, config.model) == ("unit", "gelu", "vgg19")
    probs = [p.top_k for p in predict(load_run(run), raw, top_k=2)]
    ours = np.array([[dict(p)["no"], dict(p)["yes"]] for p in probs])
    kb.assert_probabilities_equal(ours, np.concatenate([1 - binary19[1], binary19[1]], 1))


# -------------------------------------------------------------------------- bad inputs
def _bad(path, match, **kwargs):
    with pytest.raises(WeightFileError, match=match) as err:
        from_keras(path, **kwargs)
    print(err.value)
    return str(err.value)


def test_base_of_no_family(tmp_path):
    """A base no registered family builds: the error names the first layer that differs from the
    closest family's."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, name="my_conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(keras.layers.MaxPooling2D(name="my_pool")(x))
    keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(x)).save(tmp_path / "r.keras")
    _bad(tmp_path / "r.keras", r"r.keras: the base .* is none of the families .*'my_pool' \(MaxPooling2D\)")


def test_vgg19_file_for_vgg16(binary19):
    _bad(binary19[0] / "m.keras", r"this is a vgg19 model, but arch='vgg16'", arch="vgg16")


@pytest.fixture(scope="module")
def valid_weights(typical):
    return typical[0] / "m.weights.h5"


def _head_on(base16, *layers):
    inputs = keras.Input((32, 32, 3))
    x = base16(inputs)
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


def test_unmappable_layers(base16, valid_weights, tmp_path):
    """Errors come from the architecture, before any weight is read."""
    L = keras.layers
    gap = L.GlobalAveragePooling2D
    cases = {
        "conv_head": ([L.Conv2D(8, 1, name="head_conv"), gap(), L.Dense(2)], r"'head_conv' \(Conv2D\)"),
        "leaky": ([gap(), L.Dense(8), L.LeakyReLU(name="lr"), L.Dense(2)], r"'lr' \(LeakyReLU\) cannot"),
        "leaky_relu": ([gap(), L.Dense(8, activation="leaky_relu", name="d"), L.Dense(2)],
                       r"'d' \(Dense\) has activation 'leaky_relu'"),
        "output_act": ([gap(), L.Dense(2, activation="tanh", name="out")], r"'out' \(Dense\) \(the output"),
        "dense_on_map": ([L.Dense(2, name="d")], r"'d' \(Dense\) stands where vgg16 has layer 'block5_pool'"),
    }  # fmt: skip
    for name, (layers, match) in cases.items():
        (tmp_path / f"{name}.json").write_text(_head_on(base16, *layers).to_json())
        _bad(valid_weights, match, architecture=tmp_path / f"{name}.json")


def test_branched_model(base16, valid_weights, tmp_path):
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(base16(inputs))
    a, b = keras.layers.Dense(2, name="a")(features), keras.layers.Dense(2, name="b")(features)
    (tmp_path / "two.json").write_text(keras.Model(inputs, keras.layers.Add(name="sum")([a, b])).to_json())
    _bad(valid_weights, r"'sum' \(Add\) joins branches.*single chain", architecture=tmp_path / "two.json")


def test_weights_of_another_model(typical, rescaling_sigmoid):
    """The Sequential model's architecture with the functional model's weights."""
    _bad(
        typical[0] / "m.weights.h5", r"weights|not this|belong", architecture=rescaling_sigmoid[0] / "m.keras"
    )


def test_preprocessing_that_no_mode_computes(base16, valid_weights, tmp_path):
    """Channels swapped (GBR): no per-channel map with or without RGB -> BGR computes that."""
    inputs = keras.Input((32, 32, 3))
    x = keras.ops.stack([inputs[..., 1], inputs[..., 2], inputs[..., 0]], axis=-1)
    x = keras.layers.Dense(5, activation="softmax")(keras.layers.GlobalAveragePooling2D()(base16(x)))
    architecture = _saved(keras.Model(inputs, x), tmp_path)
    _bad(valid_weights, r"vgg16 cannot compute from raw pixels", architecture=architecture)


def test_weights_without_architecture(valid_weights):
    _bad(valid_weights, r"holds weights only.*architecture=")


def test_truncated_keras_archive(typical, tmp_path):
    data = (typical[0] / "m.keras").read_bytes()
    (tmp_path / "cut.keras").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "cut.keras", r"cut.keras: not a readable .keras archive .*truncated")


def test_keras_archive_missing_weights(tmp_path):
    with zipfile.ZipFile(tmp_path / "x.keras", "w") as z:
        z.writestr("config.json", "{}")
    _bad(tmp_path / "x.keras", r"without config.json and model.weights.h5")


@pytest.mark.parametrize("content", [b"", b"not an hdf5 file at all", b"PK\x03\x04junk"])
def test_not_hdf5(tmp_path, content):
    (tmp_path / "x.h5").write_bytes(content)
    _bad(tmp_path / "x.h5", r"x.h5: (neither a .keras \(zip\) archive nor an HDF5|not a readable .keras)")


def test_missing_file(tmp_path):
    _bad(tmp_path / "nope.keras", "no such file")


# -------------------------------------------------------------------------- every family
#: One Keras transfer model per family (tests/keras_builders.py's ``transfer``): the base nested or
#: inline, preprocessing in the graph (``preprocess_input`` traced, Rescaling, Normalization) or
#: outside it, heads with BatchNormalization / LayerNormalization and several activations.
FAMILIES = {
    "vgg16": dict(nested=False, preprocessing="graph", head=("gap", 32, "bn", "relu", 0.3, "ln", 16, "gelu")),
    "resnet50": dict(nested=True, preprocessing="none", head=("gmp", 32, "swish", 0.2), base_trainable=False),
    "mobilenetv2": dict(nested=True, preprocessing="normalization", head=("gap", 16, "bn", "tanh", 0.5)),
    # gamma: the BatchNorm gammas, smaller where float32's rounding through the deeper base reached
    # 1.09e-5 with the default 0.2-0.6 (ResNet101 at 64 px, measured 2026-12-07); with each family's
    # Keras model built in a fresh session (other random draws) ResNet101 was 1.11e-5 off at the default
    # output spread (std 0.25), 6.6e-6 at 0.15 (the difference grows with the logits, as rounding does;
    # a wrong mapping is 1e-2 off). EfficientNetB0 is fed
    # raw pixels (its preprocess_input is the identity): with a Rescaling(1/255) in front of its own the
    # random Normalization statistics leave its inputs varying by 0.4% around their mean, and the
    # comparison was 1.2-1.35e-5 off at 64 px (not analysed further)
    "efficientnetb0": dict(nested=False, preprocessing="none", head=("gap", 0.2, 24, "relu", "ln"),
                           output="sigmoid"),
    # the families added later: one model each (EfficientNetV2's and MobileNetV3's bases normalize raw
    # pixels themselves: their preprocess_input is the identity). ConvNeXt: the pooling=None base, a
    # pooling layer (final_norm='map'); other forms: test_convnext_models_both_ways. NASNet (built for
    # a fixed size): test_nasnet_models_both_ways
    "convnexttiny": dict(nested=True, preprocessing="none", head=("gap", 16, "gelu")),
    "efficientnetv2b0": dict(nested=False, preprocessing="none", head=("gap", "bn", 16, "swish")),
    "mobilenetv3small": dict(nested=True, preprocessing="none", head=("gmp", 16, "relu", 0.2)),
    "resnet101": dict(nested=True, preprocessing="graph", head=("gap", 16, "relu"), gamma=(0.1, 0.4),
                      std=0.15),
    "resnet50v2": dict(nested=True, preprocessing="graph", head=("gap", "ln", 16, "tanh")),
    "densenet121": dict(nested=False, preprocessing="graph", head=("gap", 16, "relu", 0.2)),
    "xception": dict(nested=True, preprocessing="graph", head=("gap", 16, "relu")),
    "mobilenet": dict(nested=True, preprocessing="normalization", head=("gap", 16, "relu")),
    # std: InceptionV3's BatchNorms have no gamma; at the default output spread (0.25) it was 2.1e-5 off
    # Keras's float32 probabilities at 96 px, where Keras's own float32 is 1.7e-5 off Keras in float64
    # and imgcls_jax 1.3e-5 (rounding, not the mapping; measured 2026-12-07)
    "inceptionv3": dict(nested=True, preprocessing="none", head=("gap", 16, "sigmoid"), std=0.1),
    "inceptionresnetv2": dict(nested=False, preprocessing="graph", head=("gap", 16, "relu"), std=0.1),
}  # fmt: skip
#: What each imports as: its head's layers, and what its users feed it (``preprocessing_source``).
FAMILY_HEADS = {
    "vgg16": (("dense 32", "batchnorm", "activation relu", "dropout 0.3", "layernorm", "dense 16 gelu",
               "dense 3"), "graph"),
    "resnet50": (("dense 32 silu", "dropout 0.2", "dense 3"), "assumed"),  # Keras saves swish as silu
    "mobilenetv2": (("dense 16", "batchnorm", "activation tanh", "dropout 0.5", "dense 3"), "graph"),
    "efficientnetb0": (("dropout 0.2", "dense 24 relu", "layernorm", "dense 3"), "assumed"),
    "efficientnetv2b0": (("batchnorm", "dense 16 silu", "dense 3"), "assumed"),
    "convnexttiny": (("dense 16 gelu", "dense 3"), "assumed"),
    "mobilenetv3small": (("dense 16 relu", "dropout 0.2", "dense 3"), "assumed"),
    "resnet101": (("dense 16 relu", "dense 3"), "graph"),
    "resnet50v2": (("layernorm", "dense 16 tanh", "dense 3"), "graph"),
    "densenet121": (("dense 16 relu", "dropout 0.2", "dense 3"), "graph"),
    "xception": (("dense 16 relu", "dense 3"), "graph"),
    "mobilenet": (("dense 16 relu", "dense 3"), "graph"),
    "inceptionv3": (("dense 16 sigmoid", "dense 3"), "assumed"),
    "inceptionresnetv2": (("dense 16 relu", "dense 3"), "graph"),
}  # fmt: skip
QUICK_FAMILY = "mobilenetv2"
FAMILY_SIZES = (32, 64)
#: Families that take larger inputs only (Keras's minimum: Xception 71, the Inceptions 75).
#: kb.images makes sizes that are multiples of 4.
LARGE_SIZES = {"xception": (72, 96), "inceptionv3": (76, 96), "inceptionresnetv2": (76, 96)}


@pytest.fixture(scope="module", params=[a if a == QUICK_FAMILY else pytest.param(a, marks=pytest.mark.slow)
                                        for a in FAMILIES])  # fmt: skip
def family(request, tmp_path_factory):
    """A family's Keras transfer model taking any input size, random weights and BatchNorm moving
    statistics (calibrated on the 64-px test images, then perturbed), saved as .keras, legacy .h5
    and .weights.h5 + its JSON config; a third of the base's layers frozen (the whole base for
    ResNet50). Returns ``(arch, folder, {size: raw images}, {size: Keras's outputs}, model)``."""
    arch = request.param
    keras.backend.clear_session()  # Keras's automatic layer names as in a fresh session (the stored graphs')
    spec = dict(FAMILIES[arch])
    gamma, std = spec.pop("gamma", (0.2, 0.6)), spec.pop("std", None)
    k_model, fed = kb.transfer(arch, None, **spec)
    sizes = LARGE_SIZES.get(arch, FAMILY_SIZES)
    raws = {size: kb.images(4, seed=21, size=size) for size in sizes}
    kb.randomize_all(k_model, seed=31, preprocess=fed, batch=raws[sizes[-1]], gamma=gamma)
    sigmoid = FAMILIES[arch].get("output") == "sigmoid"
    kb.spread_output(k_model, fed(raws[sizes[-1]]), std=std or (0.6 if sigmoid else 0.25))
    base = [layer for layer in kb.leaves(k_model) if layer.weights][:-4]
    for layer in base[: len(base) // 3]:
        layer.trainable = False
    tmp = tmp_path_factory.mktemp(arch)
    k_model.save(tmp / "m.keras")
    k_model.save(tmp / "m.h5")
    k_model.save_weights(tmp / "m.weights.h5")
    (tmp / "m.json").write_text(k_model.to_json())
    expected = {size: kb.keras_out(k_model, fed(raw)) for size, raw in raws.items()}
    return arch, tmp, raws, expected, k_model


@pytest.mark.parametrize("fmt", ["m.keras", pytest.param("m.h5", marks=pytest.mark.slow),
                                 pytest.param("weights+json", marks=pytest.mark.slow)])  # fmt: skip
def test_every_family_in(family, fmt):
    """A Keras model on any registered family comes over: predictions equal Keras's within 1e-5
    (probabilities) at two input sizes, its head and preprocessing as described, its layers'
    trainable flags along."""
    arch, tmp, raws, expected, k_model = family
    kwargs = {"architecture": tmp / "m.json"} if fmt == "weights+json" else {}
    model, info = from_keras(tmp / ("m.weights.h5" if kwargs else fmt), **kwargs)
    head, source = FAMILY_HEADS[arch]
    assert (info.arch, info.head, info.preprocessing_source) == (arch, head, source)
    assert info.output_activation == FAMILIES[arch].get("output", "softmax")
    for size, raw in raws.items():
        kb.assert_probabilities_equal(kb.probabilities(model, raw), expected[size])
    weighted = [layer for layer in kb.leaves(k_model) if layer.weights]
    keras_trainable = {layer.name for layer in weighted if layer.trainable}
    base = set(model.base_layers) - {"normalization"}  # EfficientNet's: computed, not trained
    named = {layer.name for layer in weighted} & base  # unnamed layers: numbered by the Keras session
    assert set(info.trainable_layers) & named == keras_trainable & named
    frozen = [layer for layer in weighted if not layer.trainable]  # and as many frozen as in Keras
    assert len(base - set(info.trainable_layers)) == len(frozen) - (arch == "efficientnetb0"), arch
    assert (
        set(model.head_layers) <= set(info.trainable_layers) <= {*model.base_layers, *model.head_layers}
        and model.keras_trainable == info.trainable_layers
    )
    assert model.trainable_layers("keras") == info.trainable_layers


@pytest.mark.slow
def test_every_family_out_again(family, tmp_path):
    """The imported model written back as a .keras file Keras 3 loads without custom objects,
    predicting what imgcls_jax predicts (and so what the original does) within 1e-5."""
    arch, tmp, raws, expected, _ = family
    size = max(raws)
    model, info = from_keras(tmp / "m.keras", input_shape=(size, size, 3))
    back = keras.saving.load_model(to_keras(model, tmp_path / "back.keras", input_preprocessing="none"))
    ours = kb.probabilities(model, raws[size])
    kb.assert_probabilities_equal(kb.keras_out(back, raws[size].astype("float32")), ours)
    kb.assert_probabilities_equal(ours, expected[size])
    # MobileNetV3's hard sigmoid is Keras 3 operations on constants; InceptionResNetV2's CustomScaleLayer
    # and ConvNeXt's LayerScale classes of their application's module, ConvNeXt's stem a Sequential:
    # a legacy config cannot name them
    if arch.startswith(("mobilenetv3", "convnext")) or arch == "inceptionresnetv2":
        with pytest.raises(ValueError, match=r"legacy \.h5 model config cannot name: export a \.keras"):
            to_keras(model, tmp_path / "back.h5", input_preprocessing="none")
        assert not (tmp_path / "back.h5").exists()
        return
    # a legacy file cannot reverse the channels: caffe models are written for caffe inputs there
    caffe = info.preprocessing == "caffe"
    back = keras.saving.load_model(
        to_keras(model, tmp_path / "back.h5", input_preprocessing=None if caffe else "none")
    )
    fed = kb.caffe(raws[size]) if caffe else raws[size].astype("float32")
    kb.assert_probabilities_equal(kb.keras_out(back, fed), ours)


@pytest.mark.parametrize("name", registry_params())
def test_every_family_has_a_keras_graph(name):
    """Each registered model has its row in KERAS_APPLICATIONS and its stored Keras graph, which
    holds every layer of the family's weight files (no Keras needed: what import and export use)."""
    from flax import nnx

    from imgcls_jax.models.registry import create_model
    from imgcls_jax.weights.keras_families import KERAS_APPLICATIONS, family_graph, graph_path, lead

    assert name in KERAS_APPLICATIONS, f"{name}: add its row to KERAS_APPLICATIONS"
    assert graph_path(name).is_file(), f"{name}: run `python -m tests.keras_graphs {name}`"
    model = nnx.eval_shape(lambda: create_model(name, include_top=False, input_shape=(96, 96, 3)))
    names = {node.name for node in family_graph(name).nodes}
    assert {s.name for s in model.layer_specs()} <= names, name
    assert lead(name).boundary in range(len(family_graph(name).nodes))


@pytest.mark.parametrize("size", [32, pytest.param(76, marks=pytest.mark.slow)])
def test_nasnet_models_both_ways(size, tmp_path):
    """NASNetMobile whole models (Keras builds NASNet for a fixed size: one model per size; its
    graph is stored for 224 px): ``preprocess_input`` in the graph, the base inline, random
    weights and BatchNorm statistics; from .keras (and .h5 at 76 px) with Keras's predictions,
    back out as .keras (and .h5) files Keras loads and predicts the same with (76 px, ``slow``: odd
    maps, so Keras's ``correct_pad`` paddings differ from the stored graph's)."""
    inputs = keras.Input((size, size, 3))
    x = keras.applications.nasnet.preprocess_input(inputs)
    base = keras.applications.NASNetMobile(include_top=False, weights=None, input_tensor=x)
    x = keras.layers.Dense(16, activation="relu")(keras.layers.GlobalAveragePooling2D()(base.output))
    k_model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    raw = kb.images(4, seed=21, size=size)
    kb.randomize_all(k_model, seed=31, preprocess=lambda r: np.asarray(r, np.float32), batch=raw)
    kb.spread_output(k_model, raw.astype(np.float32), std=0.25)
    expected = kb.keras_out(k_model, raw.astype(np.float32))
    formats = ("m.keras", "m.h5") if size != 32 else ("m.keras",)  # .h5: the slow case's
    for name in formats:
        k_model.save(tmp_path / name)
        model, info = from_keras(tmp_path / name)
        assert (info.arch, info.head, info.preprocessing_source) == (
            "nasnetmobile", ("dense 16 relu", "dense 3"), "graph",
        )  # fmt: skip
        ours = kb.probabilities(model, raw)
        kb.assert_probabilities_equal(ours, expected)
    for name in ("back" + f[1:] for f in formats):
        back = keras.saving.load_model(to_keras(model, tmp_path / name, input_preprocessing="none"))
        kb.assert_probabilities_equal(kb.keras_out(back, raw.astype(np.float32)), ours)


def _convnext(form: str):
    """A Keras ConvNeXtTiny model of one of the three forms a user builds:
    ``"map"`` (the ``pooling=None`` base, then the user's GlobalAveragePooling2D: its final
    LayerNormalization on the map), ``"pooled"`` (the ``pooling="avg"`` base: that
    LayerNormalization after the pooling), both at any size, or ``"top"`` (Keras's own top, 5
    classes, 64 px)."""
    app = keras.applications.ConvNeXtTiny
    if form == "top":
        return app(include_top=True, weights=None, classes=5, input_shape=(64, 64, 3))
    inputs = keras.Input((None, None, 3))
    if form == "map":
        x = keras.layers.GlobalAveragePooling2D()(app(include_top=False, weights=None)(inputs))
    else:
        x = app(include_top=False, weights=None, pooling="avg")(inputs)
    x = keras.layers.Dense(16, activation="gelu")(x)
    return keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))


@pytest.mark.parametrize("form", ["map", "pooled", pytest.param("top", marks=pytest.mark.slow)])
def test_convnext_models_both_ways(form, tmp_path):
    """ConvNeXt whole models: the three forms (see :func:`_convnext`) come over with Keras's
    predictions (random weights, 64 px: ConvNeXt's preprocess_input is the identity, so users
    feed raw pixels), their final LayerNormalization where Keras puts it (``final_norm``; the
    other place gives other predictions: the comparison sees it), back to Keras as a .keras
    file, and as a run folder whose config keeps ``final_norm``."""
    from flax import nnx

    from imgcls_jax import TrainConfig, load_run, predict

    k_model = _convnext(form)
    raw = kb.images(4, seed=21, size=64)
    kb.randomize_all(k_model, seed=31, preprocess=lambda r: np.asarray(r, np.float32), batch=raw)
    kb.spread_output(k_model, raw.astype(np.float32), std=2.0 if form == "top" else 0.5)
    k_model.save(tmp_path / "m.keras")
    expected = kb.keras_out(k_model, raw.astype(np.float32))
    model, info = from_keras(tmp_path / "m.keras", input_shape=(64, 64, 3))
    assert info.arch == "convnexttiny" and info.include_top == (form == "top")
    assert info.family_options == ({"final_norm": "map"} if form == "map" else {})
    assert getattr(model, "final_norm", "pooled") == ("map" if form == "map" else "pooled")
    ours = kb.probabilities(model, raw)
    kb.assert_probabilities_equal(ours, expected)
    if form != "top":  # the other place of the final LayerNormalization: other predictions
        other = "pooled" if form == "map" else "map"
        graph, state = nnx.split(model)
        swapped = nnx.merge(graph, state)  # a second model object on the same weights
        swapped.final_norm = other
        assert np.abs(kb.probabilities(swapped, raw) - expected).max() > 1e-3
    back = keras.saving.load_model(to_keras(model, tmp_path / "back.keras", input_preprocessing="none"))
    kb.assert_probabilities_equal(kb.keras_out(back, raw.astype(np.float32)), ours)
    if form == "top":
        return
    names = ["a", "b", "c"]
    run = write_run_folder(model, info, tmp_path / "run", class_names=names)
    config = TrainConfig.from_json(run / "config.json")
    assert config.final_norm == info.family_options.get("final_norm")
    got = np.array([[dict(p.top_k)[c] for c in names] for p in predict(load_run(run), raw, top_k=3)])
    kb.assert_probabilities_equal(got, expected)
    # a fine-tune from the Keras file or the run whose config puts the norm elsewhere: refused
    other = "pooled" if form == "map" else "map"
    wrong = model_from_config(replace(config, final_norm=other), 3, weights=None)
    for source in (tmp_path / "m.keras", run):
        with pytest.raises(ValueError, match="final_norm"):
            initialize_from(wrong, source, names)


def test_final_norm_is_convnexts_option():
    """``TrainConfig.final_norm``: ConvNeXt's two places, refused for another family or value."""
    from imgcls_jax import TrainConfig
    from imgcls_jax.config import ConfigError

    assert (
        TrainConfig(data="photos", model="convnexttiny", final_norm="map", weights="random").final_norm
        == "map"
    )
    with pytest.raises(ConfigError, match=r"TrainConfig.final_norm.*None for vgg16"):
        TrainConfig(data="photos", model="vgg16", final_norm="map", weights="random")
    with pytest.raises(ConfigError, match=r"TrainConfig.final_norm.*'pooled', 'map'"):
        TrainConfig(data="photos", model="convnexttiny", final_norm="before", weights="random")


@pytest.mark.parametrize("name", [n if n == "mobilenetv2" else pytest.param(n, marks=pytest.mark.slow)
                                  for n in sorted(__import__("imgcls_jax").list_models())])  # fmt: skip
def test_stored_keras_graphs_are_keras_own(name):
    """The stored graph of a family is what this Keras builds (else: `python -m tests.keras_graphs`)."""
    from imgcls_jax.weights.keras_families import family_config
    from tests.keras_graphs import keras_base_config

    assert keras_base_config(name) == family_config(name), f"regenerate: python -m tests.keras_graphs {name}"


def _saved(model, tmp_path, name="m.json") -> Path:
    (tmp_path / name).write_text(model.to_json())
    return tmp_path / name


def test_what_cannot_come_over(base16, valid_weights, tmp_path):
    """A Lambda with Python code in front of the base, a custom layer, a second input, a non-image
    input, a layer called twice: each a clear error naming the layer and its class."""
    L = keras.layers

    @keras.saving.register_keras_serializable(package="tests")
    class Doubler(L.Layer):
        def call(self, x):
            return 2 * x

    def model(*layers, inputs=None):
        inputs = inputs or keras.Input((32, 32, 3))
        x = inputs
        for layer in layers:
            x = layer(x)
        return keras.Model(inputs, x)

    gap, out = L.GlobalAveragePooling2D(), L.Dense(5, activation="softmax")
    cases = {
        "lambda": (model(L.Lambda(lambda x: x / 255.0, name="scale"), base16, gap, out),
                   r"'scale' \(Lambda with Python code\) in front of the base cannot be read"),
        "custom": (model(base16, gap, Doubler(name="twice"), out), r"'twice' \(Doubler\) cannot be mapped"),
    }  # fmt: skip
    a, b = keras.Input((32, 32, 3)), keras.Input((32, 32, 3), name="mask")
    cases["second_input"] = (
        keras.Model([a, b], out(gap(base16(L.Add()([a, b]))))),
        r"second model input 'mask'",
    )
    flat = keras.Input((10,), name="vector")
    cases["vector"] = (
        keras.Model(flat, L.Dense(2)(flat)),
        r"'vector' \(InputLayer\) takes inputs of shape \(10,\)",
    )
    shared = L.Dense(512, name="twice_used")  # 512 in, 512 out: callable twice
    inputs = keras.Input((32, 32, 3))
    cases["shared"] = (
        keras.Model(inputs, shared(shared(gap(base16(inputs))))),
        r"'twice_used' \(Dense\) is called 2 times",
    )
    for name, (k_model, match) in cases.items():
        _bad(valid_weights, match, architecture=_saved(k_model, tmp_path, f"{name}.json"))


@pytest.mark.slow
def test_keras_resnet50_with_its_own_top(tmp_path):
    """keras.applications.ResNet50 with its top (3 classes, 64 px): in as include_top=True, out
    with avg_pool and predictions, equal both ways."""
    k_model = keras.applications.ResNet50(weights=None, classes=3, input_shape=(64, 64, 3))
    raw = kb.images(4, seed=5, size=64)
    kb.randomize_all(k_model, seed=6, preprocess=kb.caffe, batch=raw)
    kb.spread_output(k_model, kb.caffe(raw), std=0.25)
    k_model.save(tmp_path / "top.keras")
    model, info = from_keras(tmp_path / "top.keras")
    assert info.include_top and model.head_layers == ("predictions",) and info.arch == "resnet50"
    ours = kb.probabilities(model, raw)
    kb.assert_probabilities_equal(ours, kb.keras_out(k_model, kb.caffe(raw)))
    back = keras.saving.load_model(to_keras(model, tmp_path / "back.keras"))
    assert [layer.name for layer in back.layers][-2:] == ["avg_pool", "predictions"]
    kb.assert_probabilities_equal(kb.keras_out(back, kb.caffe(raw)), ours)
