"""Whole Keras models in: real Keras 3 models saved in every format, imported without Keras,
and compared with Keras's own probabilities on the same raw images (max |diff| <= 1e-5).

Keras 2 whole-model files: tf.keras is not installable beside tensorflow-cpu in CI, so the
model_config and weight layout of real tf_keras 2.21 saves are kept in tests/data/keras2 (see
make_fixtures.py there) and filled with the weights of a Keras 3 twin, the reference.
"""

import json
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from imgcls_jax.train import write_run_folder  # noqa: E402
from imgcls_jax.weights import WeightFileError, from_keras  # noqa: E402
from tests import keras_builders as kb  # noqa: E402

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


def test_resnet_file(tmp_path, raw):
    base = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base.output)
    keras.Model(base.input, keras.layers.Dense(2, activation="softmax")(x)).save(tmp_path / "r.keras")
    _bad(
        tmp_path / "r.keras",
        r"r.keras: layer 'conv2_block1_0_conv' \(Conv2D\) takes its input from .*VGG16/VGG19",
    )


def test_vgg19_file_for_vgg16(binary19):
    _bad(binary19[0] / "m.keras", r"this is a VGG19 model, but arch='vgg16'", arch="vgg16")


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
        "batchnorm": ([gap(), L.Dense(8), L.BatchNormalization(name="bn"), L.Dense(2)], r"'bn' \(BatchNorm"),
        "leaky_relu": ([gap(), L.Dense(8, activation="leaky_relu", name="d"), L.Dense(2)],
                       r"'d' \(Dense\) has activation 'leaky_relu'"),
        "output_act": ([gap(), L.Dense(2, activation="tanh", name="out")], r"'out' \(Dense\) \(the output"),
        "dense_on_map": ([L.Dense(2, name="d")], r"'d' \(Dense\) cannot be mapped"),
    }  # fmt: skip
    for name, (layers, match) in cases.items():
        (tmp_path / f"{name}.json").write_text(_head_on(base16, *layers).to_json())
        _bad(valid_weights, match, architecture=tmp_path / f"{name}.json")


def test_branched_model(base16, valid_weights, tmp_path):
    inputs = keras.Input((32, 32, 3))
    features = keras.layers.GlobalAveragePooling2D()(base16(inputs))
    a, b = keras.layers.Dense(2, name="a")(features), keras.layers.Dense(2, name="b")(features)
    (tmp_path / "two.json").write_text(keras.Model(inputs, keras.layers.Add(name="sum")([a, b])).to_json())
    _bad(valid_weights, r"single chain", architecture=tmp_path / "two.json")


def test_weights_of_another_model(typical, rescaling_sigmoid):
    """The Sequential model's architecture with the functional model's weights."""
    _bad(
        typical[0] / "m.weights.h5", r"weights|not this|belong", architecture=rescaling_sigmoid[0] / "m.keras"
    )


def test_preprocessing_that_matches_no_mode(rescaling_sigmoid):
    _bad(rescaling_sigmoid[0] / "m.keras", r"none of imgcls_jax's preprocessing modes", preprocessing="caffe")


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
