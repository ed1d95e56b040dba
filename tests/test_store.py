"""weights='imagenet' resolution (env dir -> Keras cache -> download with md5), the offline
message, and the converted-parameter cache."""

import dataclasses
import logging
import os

import numpy as np
import pytest
from flax import nnx

import imgcls_jax
from imgcls_jax.weights import ChecksumError, WeightsUnavailableError, load_weights, store
from tests.helpers import write_random_legacy

NOTOP = ("vgg16", False)


@pytest.fixture
def published_file(tmp_path, monkeypatch):
    """A random VGG16 no-top file under the published name, registered with its own md5."""
    pub = store.IMAGENET[NOTOP]
    path = tmp_path / "mirror" / pub.filename
    path.parent.mkdir()
    layers = write_random_legacy(path)
    monkeypatch.setitem(store.IMAGENET, NOTOP, dataclasses.replace(pub, file_hash=store.md5sum(path)))
    return path, layers


def small_notop():
    return imgcls_jax.create_model("vgg16", include_top=False, input_shape=(32, 32, 3))


def test_published_table_matches_keras():
    from keras.src.applications import vgg16, vgg19

    for arch, module in (("vgg16", vgg16), ("vgg19", vgg19)):
        assert store.IMAGENET[(arch, True)].url == module.WEIGHTS_PATH
        assert store.IMAGENET[(arch, False)].url == module.WEIGHTS_PATH_NO_TOP
        source = open(module.__file__).read()
        assert (
            store.IMAGENET[(arch, True)].file_hash in source
            and store.IMAGENET[(arch, False)].file_hash in source
        )


def test_keras_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "kh"))
    assert store.keras_cache_dir() == tmp_path / "kh" / "models"
    monkeypatch.delenv("KERAS_HOME")
    assert str(store.keras_cache_dir()) == os.path.expanduser("~/.keras/models")


def test_offline_error_says_what_to_put_where(monkeypatch):
    monkeypatch.setattr(store, "_BASE_URL", "http://127.0.0.1:9/unreachable")  # connection refused
    with pytest.raises(WeightsUnavailableError) as err:
        imgcls_jax.create_model("vgg16", num_classes=5, weights="imagenet", input_shape=(32, 32, 3))
    msg = str(err.value)
    pub = store.IMAGENET[NOTOP]
    assert pub.filename in msg and pub.file_hash in msg and "IMGCLS_JAX_WEIGHTS_DIR" in msg
    assert str(store.keras_cache_dir() / pub.filename) in msg
    assert not list(store.keras_cache_dir().glob("*"))  # no partial download left behind


def test_download_into_keras_cache_with_md5(published_file, monkeypatch):
    path, layers = published_file
    monkeypatch.setattr(
        store.PublishedWeights, "url", property(lambda self: (path.parent / self.filename).as_uri())
    )
    model = imgcls_jax.create_model("vgg16", num_classes=5, weights="imagenet", input_shape=(32, 32, 3))
    cached = store.keras_cache_dir() / path.name
    assert cached.read_bytes() == path.read_bytes()
    np.testing.assert_array_equal(model.block2_conv2.kernel[...], layers["block2_conv2"][0])


def test_download_with_wrong_md5_saves_nothing(published_file, monkeypatch):
    path, _ = published_file
    monkeypatch.setitem(store.IMAGENET, NOTOP, dataclasses.replace(store.IMAGENET[NOTOP], file_hash="0" * 32))
    monkeypatch.setattr(
        store.PublishedWeights, "url", property(lambda self: (path.parent / self.filename).as_uri())
    )
    with pytest.raises(ChecksumError, match="nothing was saved"):
        load_weights(small_notop(), "imagenet")
    assert not store.keras_cache_dir().exists() or not list(store.keras_cache_dir().iterdir())


def test_env_dir_wins_over_keras_cache(published_file, monkeypatch, tmp_path):
    path, layers = published_file
    other = store.keras_cache_dir() / path.name
    other.parent.mkdir(parents=True)
    other.write_bytes(path.read_bytes())
    model = small_notop()
    assert load_weights(model, "imagenet").path == other  # Keras cache, no env var
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(path.parent))
    assert load_weights(model, "imagenet").path == path
    np.testing.assert_array_equal(model.block1_conv1.kernel[...], layers["block1_conv1"][0])
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(tmp_path / "empty"))  # file not there: next place
    assert load_weights(model, "imagenet").path == other


def test_corrupt_file_in_keras_cache_fails_md5(published_file):
    path, _ = published_file
    bad = store.keras_cache_dir() / path.name
    bad.parent.mkdir(parents=True)
    write_random_legacy(bad, seed=3)  # a valid file, but not the published one
    with pytest.raises(ChecksumError, match="does not match the published md5"):
        load_weights(small_notop(), "imagenet")


def test_imagenet_weights_fix_preprocessing(published_file, monkeypatch):
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(published_file[0].parent))
    with pytest.raises(ValueError, match="trained with 'caffe' preprocessing but the model applies 'tf'"):
        imgcls_jax.create_model(
            "vgg16", num_classes=3, weights="imagenet", preprocessing="tf", input_shape=(32, 32, 3)
        )
    model = imgcls_jax.create_model("vgg16", num_classes=3, weights="imagenet", input_shape=(32, 32, 3))
    assert model.preprocessing == "caffe"


def test_second_load_uses_converted_cache(tmp_path):
    path = tmp_path / "w.h5"
    layers = write_random_legacy(path)
    first, second = small_notop(), small_notop()
    assert not load_weights(first, path).from_cache
    info = load_weights(second, path)
    assert info.from_cache and info.layout == "legacy"
    for name in first.base_layers:
        np.testing.assert_array_equal(getattr(second, name).kernel[...], layers[name][0])
    # the cache is still validated against the model
    top = nnx.eval_shape(lambda: imgcls_jax.create_model("vgg16"))  # refused before a weight is set
    with pytest.raises(imgcls_jax.WeightFileError, match="no classification top"):
        load_weights(top, path)


def test_changed_source_is_converted_again(tmp_path):
    path = tmp_path / "w.h5"
    write_random_legacy(path, seed=1)
    model = small_notop()
    load_weights(model, path)
    layers = write_random_legacy(path, seed=2)
    os.utime(path, ns=(1, 1))  # a different mtime, as a re-download gives
    assert not load_weights(model, path).from_cache
    np.testing.assert_array_equal(model.block1_conv1.kernel[...], layers["block1_conv1"][0])
    assert len(list(store.converted_cache_dir().glob("*.params"))) == 1  # the stale one is gone


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_cache_is_rebuilt_with_a_warning(tmp_path, caplog, damage):
    path = tmp_path / "w.h5"
    layers = write_random_legacy(path)
    model = small_notop()
    load_weights(model, path)
    cache = store.cache_path(path)
    if damage == "truncate":
        cache.write_bytes(cache.read_bytes()[:1000])
    else:
        cache.write_bytes(b"not a cache")
    with caplog.at_level(logging.WARNING):
        info = load_weights(model, path)
    assert not info.from_cache and "ignoring damaged weight cache" in caplog.text
    np.testing.assert_array_equal(model.block5_conv3.kernel[...], layers["block5_conv3"][0])
    assert load_weights(model, path).from_cache


def test_unwritable_cache_still_loads(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("IMGCLS_JAX_CACHE", str(blocker / "sub"))  # cannot mkdir under a file
    path = tmp_path / "w.h5"
    write_random_legacy(path)
    with caplog.at_level(logging.WARNING):
        assert not load_weights(small_notop(), path).from_cache
    assert "could not cache" in caplog.text


def test_hash_algorithm_follows_the_hash_length(tmp_path):
    """Keras's ``get_file`` rule: a 64-digit hash is a sha256, a 32-digit one an md5."""
    import hashlib

    path = tmp_path / "w.h5"
    path.write_bytes(b"some weights")
    sha256 = hashlib.sha256(b"some weights").hexdigest()
    published = dataclasses.replace(store.IMAGENET[NOTOP], file_hash=sha256)
    assert published.hash_algorithm == "sha256" and store.IMAGENET[NOTOP].hash_algorithm == "md5"
    store.check_hash(path, published)
    with pytest.raises(ChecksumError, match=f"sha256 .* does not match the published sha256 {'0' * 64}"):
        store.check_hash(path, dataclasses.replace(published, file_hash="0" * 64))
    assert store.md5sum(path) == hashlib.md5(b"some weights").hexdigest()
