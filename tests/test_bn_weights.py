"""Weight files of ResNet50 and MobileNetV2: Keras's published table (checked against what Keras
itself asks for), no hash where Keras publishes none, the file per input size, and bad files:
each gets a clear error naming the file and the layer, and leaves the model untouched. (The
hash algorithm by length: tests/test_store.py; EfficientNet's files: tests/test_efficientnet.py.)"""

import logging
import warnings

import h5py
import jax
import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.weights import WeightFileError, check_hash, load_weights, save_ported, store
from tests.bn_helpers import BN_MODELS, keras_app, keras_preprocess, randomize_keras, save_both_layouts

keras = pytest.importorskip("keras")

SIZE = 32


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Keras-written random files (legacy layout) of both families, with and without the top."""
    tmp = tmp_path_factory.mktemp("bnfiles")
    out = {}
    for arch in BN_MODELS:
        top = keras_app(arch, True, SIZE)
        randomize_keras(top, seed=3, preprocess=keras_preprocess(arch))
        out[(arch, True)] = save_both_layouts(top, tmp, f"{arch}_top")["legacy"]
        notop = keras_app(arch, False, SIZE)
        notop.set_weights(top.get_weights()[: len(notop.weights)])
        out[(arch, False)] = save_both_layouts(notop, tmp, f"{arch}_notop")["legacy"]
    return out


def weight_names(group) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in group.attrs["weight_names"]]


def model(arch, include_top=False, **kw):
    return imgcls_jax.create_model(arch, include_top=include_top, input_shape=(SIZE, SIZE, 3), **kw)


def snapshot(m):
    """Every parameter and BatchNorm statistic of ``m``."""
    return [np.asarray(leaf) for leaf in jax.tree.leaves(nnx.state(m, nnx.Any(nnx.Param, nnx.BatchStat)))]


def load_fails(m, path, match):
    before = snapshot(m)
    with pytest.raises(WeightFileError, match=match) as err:
        load_weights(m, path, use_cache=False)
    assert str(path) in str(err.value)
    for a, b in zip(snapshot(m), before, strict=True):
        np.testing.assert_array_equal(a, b)
    return str(err.value)


# ------------------------------------------------------------------------ Keras's published files
class _Asked(Exception):
    pass


def keras_asks_for(monkeypatch, app, **kw):
    """``(file name, URL, hash)`` Keras's application ``app`` downloads for ``weights="imagenet"``."""
    from keras.src.utils import file_utils

    def get_file(fname, origin, **options):
        raise _Asked(fname, origin, options.get("file_hash"))

    monkeypatch.setattr(file_utils, "get_file", get_file)
    with pytest.raises(_Asked) as asked, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Keras's own warning for a size it has no file of
        app(weights="imagenet", **kw)
    return asked.value.args


@pytest.mark.parametrize(
    "arch, include_top, size",
    [("resnet50", True, 224), ("resnet50", False, 64), ("mobilenetv2", True, 96), ("mobilenetv2", False, 128),
     ("mobilenetv2", False, 100), ("mobilenetv2", True, 224)],
)  # fmt: skip
def test_published_files_are_the_ones_keras_downloads(monkeypatch, caplog, arch, include_top, size):
    app = {"resnet50": keras.applications.ResNet50, "mobilenetv2": keras.applications.MobileNetV2}[arch]
    fname, url, file_hash = keras_asks_for(
        monkeypatch, app, include_top=include_top, input_shape=(size, size, 3)
    )
    with caplog.at_level(logging.WARNING, logger="imgcls_jax.weights.store"):
        ours = store.IMAGENET[(arch, include_top)].for_size((size, size, 3))
    assert (ours.filename, ours.url, ours.file_hash) == (fname, url, file_hash)
    assert ours.preprocessing == imgcls_jax.models.model_info(arch).preprocessing
    assert ("loading the weights for (224, 224)" in caplog.text) == (size == 100)  # Keras warns too


@pytest.mark.parametrize(
    "arch, shape, match",
    [("resnet50", (64, 64, 3), r"should be \(224, 224, 3\)"),
     ("mobilenetv2", (100, 100, 3), r"\(224, 224, 3\)"), ("mobilenetv2", (128, 96, 3), r"\(224, 224, 3\)")],
)  # fmt: skip
def test_imagenet_top_needs_a_published_size(arch, shape, match):
    """Keras: 'When setting include_top=True and loading imagenet weights, input_shape should be
    ...'; raised before any file is looked for."""
    with pytest.raises(ValueError, match=match):
        store.resolve_imagenet(arch, True, input_shape=shape, allow_download=False)


def test_no_published_hash_is_not_checked(tmp_path, caplog):
    """Keras publishes no hash for MobileNetV2's files (its ``get_file`` call passes none): the
    file is taken as it is, as Keras takes it, and the log says so."""
    path = tmp_path / "w.h5"
    path.write_bytes(b"some weights")
    published = store.IMAGENET[("mobilenetv2", False)].for_size((128, 128, 3))
    assert published.file_hash is None
    with caplog.at_level(logging.INFO, logger="imgcls_jax.weights.store"):
        check_hash(path, published)
    assert "publishes no hash" in caplog.text


# ------------------------------------------------------------------------ bad files
def test_good_file_loads_every_weight_and_statistic(files):
    m = model("resnet50")
    load_weights(m, files[("resnet50", False)], use_cache=False)
    with h5py.File(files[("resnet50", False)]) as f:
        group = f["conv3_block2_2_bn"]
        gamma, beta, mean, var = (group[n][()] for n in weight_names(group))
    np.testing.assert_array_equal(m.conv3_block2_2_bn.scale[...], gamma)
    np.testing.assert_array_equal(m.conv3_block2_2_bn.bias[...], beta)
    np.testing.assert_array_equal(m.conv3_block2_2_bn.mean[...], mean)
    np.testing.assert_array_equal(m.conv3_block2_2_bn.var[...], var)


@pytest.mark.parametrize(
    "arch, other, family", [("resnet50", "mobilenetv2", "MobileNetV2"), ("mobilenetv2", "resnet50", "ResNet")]
)
def test_file_of_another_family(files, arch, other, family):
    msg = load_fails(model(arch), files[(other, False)], f"layers do not match {arch}")
    assert f"it looks like a {family} file" in msg


def test_vgg_file_into_resnet(tmp_path):
    from tests.helpers import write_random_legacy

    write_random_legacy(tmp_path / "vgg16_notop.h5")
    assert "looks like a VGG file" in load_fails(
        model("resnet50"), tmp_path / "vgg16_notop.h5", "do not match"
    )


def test_top_file_into_topless_model(files):
    load_fails(
        model("resnet50"), files[("resnet50", True)], r"classification top \(predictions\).*include_top=False"
    )


def test_topless_file_into_top_model(files):
    load_fails(
        model("resnet50", True), files[("resnet50", False)], "no classification top.*predictions missing"
    )


def test_top_with_another_class_count(files):
    load_fails(
        model("mobilenetv2", True, num_classes=10), files[("mobilenetv2", True)], "file has 1000 classes"
    )


def _edit_copy(src, dst, edit):
    with h5py.File(src) as a, h5py.File(dst, "w") as b:
        for key in a:
            a.copy(a[key], b, name=key)
        for key, value in a.attrs.items():
            b.attrs[key] = value
        edit(b)
    return dst


def test_batchnorm_statistics_missing(files, tmp_path):
    def drop_stats(f):
        names = f["conv4_block2_2_bn"].attrs["weight_names"]
        f["conv4_block2_2_bn"].attrs["weight_names"] = names[:2]  # gamma, beta only

    path = _edit_copy(files[("resnet50", False)], tmp_path / "nostats.h5", drop_stats)
    msg = load_fails(model("resnet50"), path, "'conv4_block2_2_bn': expected 4 weights")
    assert "gamma, beta, moving_mean, moving_variance" in msg and "moving statistics are missing" in msg


def test_negative_moving_variance(files, tmp_path):
    def negate(f):
        name = weight_names(f["Conv_1_bn"])[3]
        f["Conv_1_bn"][name][0] = -1.0

    path = _edit_copy(files[("mobilenetv2", True)], tmp_path / "negvar.h5", negate)
    load_fails(model("mobilenetv2", True), path, "'Conv_1_bn' moving_variance has negative values")


@pytest.mark.parametrize("arch, old_name", [("resnet50", "probs"), ("mobilenetv2", "Logits")])
def test_top_named_as_in_keras_applications_files(files, tmp_path, arch, old_name):
    """keras-applications named the top ``probs`` (ResNet) and ``Logits`` (MobileNetV2); its
    published files keep those names, and Keras loads them by layer order."""

    def rename(f):
        f.move("predictions", old_name)
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in f.attrs["layer_names"]]
        f.attrs["layer_names"] = np.array([(old_name if n == "predictions" else n).encode() for n in names])

    path = _edit_copy(files[(arch, True)], tmp_path / f"{old_name}.h5", rename)
    m = model(arch, True)
    load_weights(m, path, use_cache=False)
    with h5py.File(files[(arch, True)]) as f:
        kernel = f["predictions"][weight_names(f["predictions"])[0]][()]
    np.testing.assert_array_equal(m.predictions.kernel[...], kernel)
    msg = load_fails(model(arch), path, "classification top")  # and it is recognised as a top
    assert old_name in msg


@pytest.mark.parametrize("arch", ["resnet50", "mobilenetv2"])
def test_sizes_the_family_rejects(arch):
    with pytest.raises(
        ValueError, match=r"Input size must be at least 32x32; Received: input_shape=\(31, 64, 3\)"
    ):
        imgcls_jax.create_model(arch, include_top=False, input_shape=(31, 64, 3))
    m = model(arch)
    with pytest.raises(ValueError, match="at least 32x32"):
        m(np.zeros((1, 16, 16, 3), np.uint8))


def test_mobilenetv2_other_widths_are_rejected():
    with pytest.raises(ValueError, match=r"alpha=0.5 is not implemented; only alpha=1.0"):
        imgcls_jax.create_model("mobilenetv2", alpha=0.5)
    with pytest.raises(ValueError, match="does not take the option alpha"):
        imgcls_jax.create_model("resnet50", alpha=0.5)


# ------------------------------------------------------------------------ caches and ported folders
def test_converted_cache_and_ported_folder_keep_the_statistics(files, tmp_path, monkeypatch):
    monkeypatch.setenv("IMGCLS_JAX_CACHE", str(tmp_path / "cache"))
    path = files[("mobilenetv2", True)]
    first = model("mobilenetv2", True)
    assert not load_weights(first, path).from_cache
    second = model("mobilenetv2", True, seed=5)
    assert load_weights(second, path).from_cache
    save_ported(first, tmp_path / "ported", source=str(path), preprocessing="tf")
    third = model("mobilenetv2", True, seed=6, weights=str(tmp_path / "ported"))
    for other in (second, third):
        for a, b in zip(snapshot(first), snapshot(other), strict=True):
            np.testing.assert_array_equal(a, b)
    assert float(np.asarray(third.Conv_1_bn.var[...]).min()) != 1.0  # the file's, not the init's
