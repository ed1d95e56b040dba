"""EfficientNet against Keras itself: ``keras.applications.EfficientNetB0(weights=None)`` with
random weights and random BatchNorm statistics (``tests/bn_helpers.py``), saved in the legacy
layout (Keras's own writer, as the published files) and as Keras 3 ``.weights.h5``, ported, and
compared on the same raw images, at an even and an odd, non-square size (``correct_pad`` differs),
for B0 and once for B2.

Tolerances: float32, max |flax - keras| <= 1e-4 * max |keras| (measured 6.5e-7 to 5.1e-6).
bfloat16 compute (float32 parameters and statistics, BatchNorm in float32 as Keras's mixed
precision) against Keras float32: <= 0.1 * max |keras| (measured 3.3e-2 at 64 px, B0 with the
top; 4.0e-2 to 5.2e-2 when BatchNorm ran in bfloat16: bfloat16 keeps 8 significant bits through
16 blocks of BatchNorm, squeeze-excite gating and residual sums; VGG's 16 layers measure 1e-2).
"""

import dataclasses

import numpy as np
import pytest

import imgcls_jax
from imgcls_jax.weights import load_weights, store
from tests.bn_helpers import assert_close, forward, randomize_keras, save_both_layouts

keras = pytest.importorskip("keras")
from keras.src.applications import efficientnet as keras_efficientnet  # noqa: E402

F32_TOL = 1e-4
BF16_TOL = 0.1
SIZES = {"even": (64, 64), "odd": (49, 57)}
#: (registry name, size, include_top): B0 at both sizes with and without the top, and B2 (width
#: 1.1, depth 1.2: Keras's rounding of filters and repeats) once.
CASES = [("efficientnetb0", s, top) for s in SIZES for top in (False, True)]
CASES.append(("efficientnetb2", "odd", False))


def keras_app(arch, size, include_top, pooling=None, weights=None):
    return getattr(keras.applications, f"EfficientNetB{arch[-1]}")(
        weights=weights, include_top=include_top, pooling=pooling, input_shape=(*size, 3),
        classifier_activation=None,
    )  # fmt: skip


def keras_b0(size, include_top, pooling=None, weights=None):
    return keras_app("efficientnetb0", size, include_top, pooling, weights)


def images(size, n=2, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *size, 3)).astype(np.uint8)


@pytest.fixture(scope="module", params=CASES, ids=lambda case: "-".join(map(str, case)))
def keras_files(request, tmp_path_factory):
    """A random Keras EfficientNet, its files in both layouts, the Keras model the legacy file
    loads into (Keras users' path; it also makes Keras's Normalization read its weights), and
    our model of the same shape (weights loaded by the tests)."""
    arch, which, include_top = request.param
    size = SIZES[which]
    source = keras_app(arch, size, include_top)
    randomize_keras(source, seed=len(which) + include_top)
    files = save_both_layouts(source, tmp_path_factory.mktemp(arch), f"{arch}_{which}_{include_top}")
    reference = keras_app(arch, size, include_top)
    reference.load_weights(files["legacy"])
    x = images(size)
    ours = imgcls_jax.create_model(arch, include_top=include_top, input_shape=(*size, 3))
    return dict(
        arch=arch, size=size, include_top=include_top, files=files, source=source, reference=reference,
        x=x, theirs=np.asarray(reference(x.astype(np.float32))), ours=ours,
    )  # fmt: skip


def test_keras_reads_the_legacy_file_identically(keras_files):
    """The legacy file (Keras's writer) holds what Keras had: Keras loads it back bit for bit,
    BatchNorm statistics and the Normalization variables included."""
    for a, b in zip(keras_files["reference"].get_weights(), keras_files["source"].get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_reference_depends_on_its_input(keras_files):
    """Guards the parity test against a degenerate random model (see tests/bn_helpers.py)."""
    x, theirs = keras_files["x"], keras_files["theirs"]
    other = np.asarray(keras_files["reference"](x[:, ::-1].astype(np.float32)))  # images upside down
    assert np.abs(theirs - other).max() > 0.05 * np.abs(theirs).max()


@pytest.mark.parametrize("layout", ["legacy", "keras3"])
def test_outputs_equal_keras(keras_files, layout):
    ours, x = keras_files["ours"], keras_files["x"]
    info = load_weights(ours, keras_files["files"][layout], preprocessing="none")
    assert info.layout == layout and not info.from_cache
    assert_close(forward(ours, x), keras_files["theirs"], F32_TOL)


def test_create_model_with_a_file(keras_files):
    size, include_top = keras_files["size"], keras_files["include_top"]
    if size != SIZES["odd"] or keras_files["arch"] != "efficientnetb0":
        pytest.skip("create_model(weights=path): once per top")
    model = imgcls_jax.create_model(
        "efficientnetb0",
        include_top=include_top,
        input_shape=(*size, 3),
        weights=keras_files["files"]["keras3"],
    )
    for name in ("normalization", "stem_bn", "block6d_se_expand", "top_bn"):
        for a, b in zip(model.keras_variables(name), keras_files["ours"].keras_variables(name), strict=True):
            np.testing.assert_array_equal(a[...], b[...])


@pytest.mark.parametrize("pooling", ["avg", "max"])
def test_pooled_features_equal_keras(keras_files, pooling):
    size, x = keras_files["size"], keras_files["x"]
    if keras_files["include_top"] or size != SIZES["even"] or keras_files["arch"] != "efficientnetb0":
        pytest.skip("pooling: once, at the even size, without the top")
    theirs_model = keras_b0(size, False, pooling=pooling)
    theirs_model.set_weights(keras_files["source"].get_weights())
    for layer in theirs_model.layers:
        if hasattr(layer, "finalize_state"):  # Normalization reads its variables only then
            layer.finalize_state()
    ours = imgcls_jax.create_model(
        "efficientnetb0", include_top=False, pooling=pooling, input_shape=(*size, 3),
        weights=keras_files["files"]["keras3"],
    )  # fmt: skip
    assert_close(forward(ours, x), np.asarray(theirs_model(x.astype(np.float32))), F32_TOL)


def test_bfloat16_close_to_keras(keras_files):
    size, include_top, x = keras_files["size"], keras_files["include_top"], keras_files["x"]
    if size != SIZES["even"] or not include_top or keras_files["arch"] != "efficientnetb0":
        pytest.skip("bfloat16: once, B0 with its top at the even size")
    ours = imgcls_jax.create_model(
        "efficientnetb0", include_top=include_top, input_shape=(*size, 3), dtype="bfloat16",
        weights=keras_files["files"]["legacy"],
    )  # fmt: skip
    assert ours.normalization.variance[...].dtype == np.float32  # parameters and statistics stay float32
    assert_close(forward(ours, x), keras_files["theirs"], BF16_TOL)


def test_imagenet_weights_as_keras_builds_them(tmp_path, monkeypatch):
    """``weights="imagenet"`` reproduces Keras's ImageNet model, whose extra
    ``Rescaling(1/sqrt(stddev))`` layer exists only when Keras loads its published file: Keras
    builds that model around a random file standing in for ``efficientnetb0_notop.h5`` (its
    download replaced by the file), and we load the same file as the published one."""
    size = SIZES["odd"]
    placeholder = save_both_layouts(keras_b0(size, False), tmp_path, "placeholder")["legacy"]
    monkeypatch.setattr(keras_efficientnet.file_utils, "get_file", lambda *a, **k: str(placeholder))
    theirs = keras_b0(size, False, weights="imagenet")
    assert [type(layer).__name__ for layer in theirs.layers[1:4]] == [
        "Rescaling",
        "Normalization",
        "Rescaling",
    ]
    randomize_keras(theirs, seed=7)  # calibrated with the extra rescaling in place
    path = save_both_layouts(theirs, tmp_path, "efficientnetb0_notop")["legacy"]
    key = ("efficientnetb0", False)
    published = store.IMAGENET[key]
    monkeypatch.setitem(store.IMAGENET, key, dataclasses.replace(published, file_hash=store.md5sum(path)))
    monkeypatch.setenv("IMGCLS_JAX_WEIGHTS_DIR", str(tmp_path))
    ours = imgcls_jax.create_model(
        "efficientnetb0", include_top=False, input_shape=(*size, 3), weights="imagenet"
    )
    x = images(size, seed=3)
    assert_close(forward(ours, x), np.asarray(theirs(x.astype(np.float32))), F32_TOL)
    # the same file by path is what Keras's weights=path gives: no extra rescaling
    by_path = imgcls_jax.create_model(
        "efficientnetb0", include_top=False, input_shape=(*size, 3), weights=path
    )
    plain = keras_b0(size, False, weights=str(path))
    assert_close(forward(by_path, x), np.asarray(plain(x.astype(np.float32))), F32_TOL)
