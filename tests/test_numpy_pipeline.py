"""Tests of the TensorFlow-free data path: Pillow checks and decoding (against TensorFlow's, the
tf.data path's reference), NumpyPipeline (against Pipeline's batches), the factory, and the whole
folder -> batches -> device augmentation path in a process where TensorFlow cannot be imported."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls_jax.data import decode, pil_decode
from imgcls_jax.data.augment import AugmentConfig
from imgcls_jax.data.folders import Record
from imgcls_jax.data.numpy_pipeline import NumpyPipeline, make_pipeline
from imgcls_jax.data.pipeline import Pipeline, Source, from_arrays, from_records
from tests.test_folders import BAD_FILES, FORMATS

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
pytest.importorskip("tensorflow")  # the reference; the TF-free run is a subprocess below


def real_photos(every_flower: int = 400, every_ant: int = 12) -> list[str]:
    if not DATA.is_dir():
        pytest.skip(f"real test data not found at {DATA}")
    flowers = sorted(str(p) for p in (DATA / "flowers5").glob("*/*.jpg"))[::every_flower]
    hymenoptera = sorted(str(p) for p in (DATA / "hymenoptera").glob("*/*/*") if p.is_file())
    gif = str(DATA / "hymenoptera" / "train" / "ants" / "imageNotFound.gif")
    return flowers + sorted(set(hymenoptera[::every_ant]) | {gif})


# ------------------------------------------------------------------- decoding against TensorFlow


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_pillow_check_rejects_what_tensorflows_rejects(tmp_path, case):
    name, write, reason = BAD_FILES[case]
    bad = tmp_path / name
    write(bad)
    assert decode.check_image(str(bad)).reason is not None  # TensorFlow's verdict
    check = pil_decode.check_image(str(bad))
    assert check.reason is not None and reason in check.reason, check.reason
    with pytest.raises(ValueError, match=f"{bad.name}: .*{reason}"):
        pil_decode.load_image(str(bad))


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_decode_to_tensorflows_pixels(tmp_path, name):
    image, fmt, ext, _, _ = FORMATS[name]
    path = tmp_path / f"img{ext}"
    image.save(path, fmt)
    ours = pil_decode.load_image(str(path))
    assert ours.dtype == np.uint8 and ours.shape == (10, 14, 3)
    np.testing.assert_array_equal(ours, decode.load_image(str(path)))
    check = pil_decode.check_image(str(path))
    assert check.reason is None and (check.height, check.width, check.channels) == (10, 14, 3)


def test_16bit_pngs_keep_the_high_byte_as_tensorflow(tmp_path):
    grey = np.linspace(0, 65535, 10 * 14).reshape(10, 14).astype(np.uint16)
    Image.fromarray(grey).save(tmp_path / "grey16.png")
    ours = pil_decode.load_image(str(tmp_path / "grey16.png"))
    np.testing.assert_array_equal(ours, decode.load_image(str(tmp_path / "grey16.png")))
    np.testing.assert_array_equal(ours[..., 1], grey >> 8)


def test_real_photos_decode_and_resize_to_the_same_pixels_as_tensorflow():
    """Measured 2026-11-29 on 111 photos (flowers5, hymenoptera with its GIF), 3 modes x 3 sizes:
    every pixel equal (0 grey levels), now that both decode JPEGs with the accurate integer IDCT;
    with TensorFlow's default fast IDCT they differed by up to 20."""
    worst = {}
    for path in real_photos():
        np.testing.assert_array_equal(pil_decode.load_image(path), decode.load_image(path), err_msg=path)
        for mode in ("squash", "center_crop", "pad"):
            for size in ((96, 80), (33, 300)):
                ours, theirs = pil_decode.load_image(path, size, mode), decode.load_image(path, size, mode)
                assert ours.shape == theirs.shape == (*size, 3)
                worst[mode] = max(worst.get(mode, 0), int(np.abs(ours.astype(int) - theirs).max()))
    assert max(worst.values()) <= 1, worst


def test_resize_geometry_without_tensorflow_on_extreme_shapes():
    """Tall, wide and tiny images: NumPy's resize gives tf.image.resize's pixels in every mode."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (3, 200), (301, 7), (64, 64), (17, 23)):
        image = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
        for mode in ("squash", "center_crop", "pad"):
            for size in ((32, 32), (5, 40), (81, 9)):
                try:
                    theirs = tf.cast(tf.round(decode.resize_image(image, size, mode)), tf.uint8).numpy()
                except tf.errors.InvalidArgumentError:  # 'pad' leaving a 0-pixel side
                    with pytest.raises(ValueError, match="resize='pad' of a .* leaves a"):
                        pil_decode.resize_image(image, size, mode)
                    continue
                ours = pil_decode.resize_image(image, size, mode)
                np.testing.assert_array_equal(ours, theirs, err_msg=f"{shape} {mode} {size}")


# ------------------------------------------------------------------- the pipeline against tf.data


@pytest.fixture(scope="module")
def photo_source() -> Source:
    paths = real_photos(every_flower=150, every_ant=40)
    return from_records(records(paths), ["a", "b", "c"])


def records(paths):
    return [Record(p, i % 3) for i, p in enumerate(paths)]


@pytest.mark.parametrize("resize", ["squash", "pad"])
def test_evaluation_batches_equal_the_tf_data_pipelines(photo_source, resize):
    kwargs = dict(image_size=(40, 56), batch_size=8, training=False, resize=resize)
    ours, theirs = NumpyPipeline(photo_source, **kwargs), Pipeline(photo_source, **kwargs)
    assert len(ours) == len(theirs) and ours.num_examples == theirs.num_examples
    batches = list(zip(ours.epoch(0), theirs.epoch(0), strict=True))
    for a, b in batches:
        assert a.keys() == b.keys() and a["image"].dtype == np.uint8 and a["label"].dtype == np.int32
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    assert batches[-1][0]["mask"].sum() == photo_source.num_examples - 8 * (len(ours) - 1)


def test_training_epochs_are_seeded_permutations(photo_source):
    pipe = NumpyPipeline(photo_source, image_size=(24, 24), batch_size=5, training=True, seed=3)
    n, images = photo_source.num_examples, pipe.images()
    assert len(pipe) == n // 5
    orders = {}
    for epoch in (0, 1):
        batches = list(pipe.epoch(epoch))
        assert len(batches) == n // 5 and all(b["mask"].all() and len(b["label"]) == 5 for b in batches)
        order = pipe.order(epoch)
        assert sorted(order) == list(range(n))
        seen = np.concatenate([b["image"] for b in batches])
        np.testing.assert_array_equal(seen, images[order[: len(seen)]])
        np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches]), photo_source.labels[
            order[: len(seen)]])  # fmt: skip
        orders[epoch] = order
    assert not np.array_equal(orders[0], orders[1])
    again = NumpyPipeline(photo_source, image_size=(24, 24), batch_size=5, training=True, seed=3)
    np.testing.assert_array_equal(again.order(1), orders[1])
    other_seed = NumpyPipeline(photo_source, image_size=(24, 24), batch_size=5, training=True, seed=4)
    assert not np.array_equal(other_seed.order(1), orders[1])


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), batch=st.integers(1, 12))
def test_eval_counts_every_image_exactly_once(n, batch):
    images = np.arange(n, dtype=np.uint8)[:, None, None, None] * np.ones((1, 2, 3, 3), np.uint8)
    pipe = NumpyPipeline(from_arrays(images, np.arange(n) % 2), image_size=(2, 3), batch_size=batch,
                         training=False)  # fmt: skip
    batches = list(pipe.epoch())
    assert len(batches) == len(pipe) and all(b["image"].shape == (batch, 2, 3, 3) for b in batches)
    seen = np.concatenate([b["image"][b["mask"], 0, 0, 0] for b in batches])
    np.testing.assert_array_equal(seen, np.arange(n))


def test_file_cache_is_written_once_and_mapped_after(photo_source, tmp_path, monkeypatch):
    kwargs = dict(image_size=(20, 28), batch_size=4, training=False, cache=str(tmp_path / "cache" / "val"))
    first = NumpyPipeline(photo_source, **kwargs)
    expected = np.array(first.images())
    (npy,) = (tmp_path / "cache").glob("*.npy")
    assert npy == first.cache_files and npy.name.startswith("val-20x28-")
    assert not list((tmp_path / "cache").glob("*partial*"))

    def no_decoding(path):
        raise AssertionError(f"decoded {path} again")

    monkeypatch.setattr(pil_decode, "decode_file", no_decoding)
    second = NumpyPipeline(photo_source, **kwargs)
    assert isinstance(second.images(), np.memmap)
    np.testing.assert_array_equal(second.images(), expected)
    np.testing.assert_array_equal(next(second.epoch())["image"], expected[:4])
    other_size = NumpyPipeline(photo_source, **{**kwargs, "image_size": (16, 16)})
    assert other_size.cache_files != first.cache_files
    with pytest.raises(AssertionError, match="decoded .* again"):
        other_size.images()


def test_arrays_source_grayscale_and_resize():
    grey = np.random.default_rng(0).integers(0, 256, (6, 9, 11)).astype(np.uint8)
    pipe = NumpyPipeline(from_arrays(grey, np.arange(6) % 2), image_size=(5, 7), batch_size=3,
                         training=False, resize="center_crop")  # fmt: skip
    batch = next(pipe.epoch())
    assert batch["image"].shape == (3, 5, 7, 3)
    np.testing.assert_array_equal(batch["image"][..., 0], batch["image"][..., 2])
    ref = Pipeline(from_arrays(grey, np.arange(6) % 2), image_size=(5, 7), batch_size=3, training=False,
                   resize="center_crop")  # fmt: skip
    np.testing.assert_array_equal(batch["image"], next(ref.epoch())["image"])


def test_resized_keeps_the_settings(photo_source):
    config = AugmentConfig(flip="horizontal", mixup_alpha=0.2)
    pipe = NumpyPipeline(photo_source, image_size=(16, 16), batch_size=4, training=True, augment=config,
                         resize="pad", seed=9, workers=3)  # fmt: skip
    bigger = pipe.resized((24, 24))
    assert pipe.resized((16, 16)) is pipe
    assert (bigger.image_size, bigger.batch_size, bigger.training, bigger.augment_on_device) == (
        (24, 24), 4, True, config)  # fmt: skip
    assert (bigger.resize, bigger.seed, bigger.workers, bigger.source) == ("pad", 9, 3, photo_source)
    evaluation = NumpyPipeline(
        photo_source, image_size=(16, 16), batch_size=4, training=False, augment=config
    )
    assert evaluation.augment_on_device is None  # augmentation is for training only


def test_bad_arguments_are_clear_errors(photo_source):
    tfds_like = Source(10, ["a", "b"], make=lambda: None, description="tfds mnist[train]")
    with pytest.raises(ValueError, match="tfds mnist.*no files or arrays.*TensorFlow"):
        NumpyPipeline(tfds_like, image_size=(8, 8), batch_size=2, training=False)
    with pytest.raises(ValueError, match="does not augment on the host"):
        NumpyPipeline(photo_source, image_size=(8, 8), batch_size=2, training=True,
                      augment=AugmentConfig(flip="horizontal"), device_augment=False)  # fmt: skip
    with pytest.raises(ValueError, match="fewer than one batch"):
        NumpyPipeline(photo_source, image_size=(8, 8), batch_size=10_000, training=True)
    with pytest.raises(ValueError, match="resize mode"):
        NumpyPipeline(photo_source, image_size=(8, 8), batch_size=2, training=False, resize="zoom")
    with pytest.raises(ValueError, match="backend must be one of"):
        make_pipeline(photo_source, backend="torch", image_size=(8, 8), batch_size=2, training=False)


def test_a_file_that_fails_to_decode_names_itself(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4)
    source = from_records(records([str(bad)] * 2), ["a", "b", "c"])
    pipe = NumpyPipeline(source, image_size=(8, 8), batch_size=2, training=False)
    with pytest.raises(ValueError, match=r"broken\.jpg: corrupt or truncated JPEG"):
        pipe.images()


def test_factory_picks_tf_data_here_and_either_on_request(photo_source):
    kwargs = dict(image_size=(8, 8), batch_size=2, training=True, augment=AugmentConfig(flip="horizontal"))
    assert decode.tensorflow_available()
    assert isinstance(make_pipeline(photo_source, **kwargs), Pipeline)
    assert isinstance(make_pipeline(photo_source, backend="numpy", workers=2, **kwargs), NumpyPipeline)
    tf_pipe = make_pipeline(photo_source, backend="tf", device_augment=True, workers=2, **kwargs)
    assert isinstance(tf_pipe, Pipeline) and tf_pipe.augment_on_device == kwargs["augment"]


def test_tf_data_pipeline_can_leave_augmentation_to_the_device():
    images = np.random.default_rng(0).integers(0, 256, (12, 8, 8, 3)).astype(np.uint8)
    source = from_arrays(images, np.arange(12) % 3)
    config = AugmentConfig(flip="horizontal", brightness=0.5, mixup_alpha=0.4)
    plain = Pipeline(source, image_size=(8, 8), batch_size=4, training=True, seed=1)
    device = Pipeline(source, image_size=(8, 8), batch_size=4, training=True, seed=1, augment=config,
                      device_augment=True)  # fmt: skip
    host = Pipeline(source, image_size=(8, 8), batch_size=4, training=True, seed=1, augment=config)
    assert device.augment_on_device == config and host.augment_on_device is None
    assert plain.augment_on_device is None and device.resized((6, 6)).augment_on_device == config
    for a, b in zip(plain.epoch(2), device.epoch(2), strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert b["label"].dtype == np.int32  # mixing waits for the device too
    assert next(host.epoch(2))["label"].dtype == np.float32


# ------------------------------------------------------------------- without TensorFlow

BLOCKERS = {
    "meta_path": """
        import sys
        class NoTensorFlow:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("tensorflow", "tensorflow_datasets"):
                    raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)")
        sys.meta_path.insert(0, NoTensorFlow())
    """,
    "sys_modules_none": """
        import sys
        sys.modules["tensorflow"] = None
        sys.modules["tensorflow_datasets"] = None
    """,
}

WITHOUT_TF = """
import logging, sys
logging.basicConfig(level=logging.WARNING)
from pathlib import Path
import numpy as np
import imgcls_jax, imgcls_jax.data as data
from imgcls_jax.data import (AugmentConfig, NumpyPipeline, make_pipeline, scan_folder, split_records,
    write_manifest, read_manifest, from_records, load_image, tensorflow_available, check_images)
from imgcls_jax.data import device_augment
import jax
root = Path(sys.argv[1])
assert not tensorflow_available()
found = scan_folder(root)  # Pillow checks: the text file named .jpg is skipped, the GIF kept
assert [Path(p).name for p, _ in found.skipped] == ["text.jpg"], found.skipped
assert "not a supported image" in found.skipped[0][1]
records = split_records(found.records, {"train": 0.75, "val": 0.25}, seed=0)
manifest = write_manifest(root.parent / "manifest.csv", records, found.class_names, root=root)
records, names = read_manifest(manifest, root=root)
train = [r for r in records if r.split == "train"]
val = [r for r in records if r.split == "val"]
config = AugmentConfig(flip="horizontal", rotation=0.1, random_resized_crop=True, hue=0.05, mixup_alpha=0.2)
pipe = make_pipeline(from_records(train, names), image_size=(32, 32), batch_size=4, training=True,
                     augment=config)
assert isinstance(pipe, NumpyPipeline) and pipe.augment_on_device == config
batch = next(pipe.epoch(0))
assert batch["image"].shape == (4, 32, 32, 3) and batch["image"].dtype == np.uint8
out = device_augment.augment_train_batch(jax.device_put(batch), jax.random.key(0), config, len(names))
assert out["image"].dtype == np.float32 and out["label"].shape == (4, len(names))
evaluation = make_pipeline(from_records(val, names), image_size=(32, 32), batch_size=4, training=False)
assert sum(int(b["mask"].sum()) for b in evaluation.epoch()) == len(val)
assert load_image(str(root / "ants" / "imageNotFound.gif"), (8, 8)).shape == (8, 8, 3)
try:
    make_pipeline(from_records(val, names), backend="tf", image_size=(8, 8), batch_size=2, training=False)
except ValueError as exc:
    assert "TensorFlow is not importable" in str(exc)
else:
    raise AssertionError("backend='tf' without TensorFlow did not fail")
leaked = [m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets", "keras")
          and sys.modules[m] is not None]
assert not leaked, leaked
print("ok without tensorflow:", len(train), "train,", len(val), "val")
"""


@pytest.mark.parametrize("blocker", list(BLOCKERS))
def test_folder_to_device_batches_without_tensorflow(tmp_path, blocker):
    photos = [p for p in real_photos(every_flower=10_000, every_ant=25) if "hymenoptera" in p]
    root = tmp_path / "data"
    for photo in photos:
        target = root / Path(photo).parent.name / Path(photo).name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, target)
    (root / "bees" / "text.jpg").write_text("not an image\n")
    code = textwrap.dedent(BLOCKERS[blocker]) + WITHOUT_TF
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run(
        [sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok without tensorflow" in result.stdout
