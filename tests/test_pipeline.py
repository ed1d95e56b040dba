import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data import (
    AugmentConfig,
    Pipeline,
    from_arrays,
    from_records,
    from_tfds,
    prefetch_to_device,
    scan_folder,
    split_records,
    write_manifest,
)


def arrays(n=10, size=32, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


def collect(pipeline, epoch=0):
    return list(pipeline.epoch(epoch))


@pytest.mark.parametrize("n, batch", [(10, 4), (8, 4), (3, 8), (1, 1)])
def test_eval_counts_every_image_exactly_once(n, batch):
    images, labels = arrays(n)
    pipe = Pipeline(from_arrays(images, labels), image_size=(32, 32), batch_size=batch, training=False)
    batches = collect(pipe)
    assert len(batches) == len(pipe) == -(-n // batch)
    for b in batches:
        assert b["image"].shape == (batch, 32, 32, 3) and b["image"].dtype == np.uint8
        assert b["label"].shape == (batch,) and b["mask"].dtype == bool
    mask = np.concatenate([b["mask"] for b in batches])
    assert mask.sum() == n and mask[:n].all()
    got = np.concatenate([b["image"] for b in batches])[mask]
    np.testing.assert_array_equal(got, images)  # same size: resize is the identity, order kept
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[mask], labels)


def test_training_epochs_are_seeded_shuffles():
    images, labels = arrays(20)
    ids = np.arange(20)
    images[:, 0, 0, 0] = ids  # tag each image
    pipe = Pipeline(from_arrays(images, labels), image_size=(32, 32), batch_size=6, training=True, seed=1)
    assert len(pipe) == 3

    def order(epoch):
        return np.concatenate([b["image"][:, 0, 0, 0] for b in collect(pipe, epoch)])

    e0, e0_again, e1 = order(0), order(0), order(1)
    assert len(e0) == 18 and len(set(e0)) == 18  # drop remainder, no duplicates
    np.testing.assert_array_equal(e0, e0_again)
    assert not np.array_equal(e0, e1)
    other_seed = Pipeline(
        from_arrays(images, labels), image_size=(32, 32), batch_size=6, training=True, seed=2
    )
    assert not np.array_equal(e0, np.concatenate([b["image"][:, 0, 0, 0] for b in collect(other_seed)]))
    assert all(b["mask"].all() for b in collect(pipe))


def test_augmentation_only_in_training_and_reproducible():
    images, labels = arrays(8)
    aug = AugmentConfig(flip="horizontal", rotation=0.1, brightness=0.2)
    train = Pipeline(
        from_arrays(images, labels), image_size=(32, 32), batch_size=4, training=True, augment=aug, seed=3
    )
    a, b = collect(train), collect(train)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert a[0]["image"].dtype == np.uint8
    evaluation = Pipeline(
        from_arrays(images, labels), image_size=(32, 32), batch_size=4, training=False, augment=aug
    )
    assert evaluation.augment is None
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in collect(evaluation)]), images)


def test_mixup_gives_soft_labels():
    images, labels = arrays(8, classes=4)
    pipe = Pipeline(
        from_arrays(images, labels, class_names=list("abcd")),
        image_size=(32, 32),
        batch_size=4,
        training=True,
        augment=AugmentConfig(mixup_alpha=0.4),
    )
    batch = collect(pipe)[0]
    assert batch["label"].shape == (4, 4) and batch["label"].dtype == np.float32
    np.testing.assert_allclose(batch["label"].sum(axis=1), 1.0, rtol=1e-5)
    assert batch["image"].dtype == np.uint8


def _folder(root: Path, classes=("cat", "dog"), per_class=5, size=(40, 30)):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / c / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


@pytest.mark.parametrize("resize", ["squash", "center_crop", "pad"])
def test_files_split_manifest_and_batches(tmp_path, resize):
    root = _folder(tmp_path / "data")
    found = scan_folder(root)
    records = split_records(found.records, {"train": 0.6, "val": 0.4}, seed=0)
    write_manifest(tmp_path / "manifest.csv", records, found.class_names, root=root)
    train = [r for r in records if r.split == "train"]
    pipe = Pipeline(
        from_records(train, found.class_names),
        image_size=(32, 32),
        batch_size=2,
        training=False,
        resize=resize,
    )
    batches = collect(pipe)
    assert sum(b["mask"].sum() for b in batches) == len(train) == 6
    assert batches[0]["image"].shape == (2, 32, 32, 3)
    if resize == "pad":  # 40x30 fitted into 32x32 leaves zero rows at top and bottom
        assert batches[0]["image"][0, 0].max() == 0


def test_file_cache_is_reused_for_the_same_images(tmp_path):
    images, labels = arrays(6)
    prefix = tmp_path / "cache" / "train"
    pipe = Pipeline(
        from_arrays(images, labels), image_size=(32, 32), batch_size=3, training=False, cache=str(prefix)
    )
    first = collect(pipe)
    assert pipe.cache_files.parent == prefix.parent and pipe.cache_files.name.startswith("train-32x32-")
    assert Path(f"{pipe.cache_files}.index").is_file()  # a finished tf.data cache
    # Same fingerprint, other pixels behind it: the batches come from the cache files.
    source = from_arrays(images, labels)
    other = from_arrays(255 - images, labels)
    source.make = other.make
    again = collect(Pipeline(source, image_size=(32, 32), batch_size=3, training=False, cache=str(prefix)))
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a["image"], b["image"])


def test_file_caches_sharing_a_prefix_keep_their_own_images(tmp_path):
    # Regression: train and validation pipelines of a run share TrainConfig.cache; the second
    # one used to read the first one's files (its images, labels and count).
    prefix = str(tmp_path / "cache" / "run")
    (a, ya), (b, yb) = arrays(6, seed=1), arrays(4, seed=2)
    yb = (yb + 1) % 3
    for size in [(32, 32), (32, 32), (64, 64)]:
        for images, labels in ((a, ya), (b, yb)):
            pipe = Pipeline(
                from_arrays(images, labels), image_size=size, batch_size=2, training=False, cache=prefix
            )
            reference = Pipeline(from_arrays(images, labels), image_size=size, batch_size=2, training=False)
            got, want = collect(pipe), collect(reference)
            assert len(got) == len(want)
            for x, y in zip(got, want):
                np.testing.assert_array_equal(x["image"], y["image"])
                np.testing.assert_array_equal(x["label"], y["label"])
    assert len(list((tmp_path / "cache").glob("*.index"))) == 4  # 2 sources x 2 sizes


def test_file_cache_key_follows_the_files(tmp_path):
    root = tmp_path / "images"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    found = scan_folder(root)
    prefix = tmp_path / "cache" / "c"
    before = Pipeline(from_records(found.records, found.class_names), image_size=(8, 8), batch_size=4,
                      training=False, cache=str(prefix))  # fmt: skip
    collect(before)
    Image.fromarray(np.full((8, 8, 3), 250, np.uint8)).save(root / "a" / "0.png")
    os.utime(root / "a" / "0.png", ns=(1, 1))  # a new mtime even on coarse clocks
    after = Pipeline(from_records(found.records, found.class_names), image_size=(8, 8), batch_size=4,
                     training=False, cache=str(prefix))  # fmt: skip
    assert after.cache_files != before.cache_files
    (batch,) = collect(after)
    first = [str(r.path) for r in found.records].index(str(root / "a" / "0.png"))
    assert batch["image"][first].min() == 250  # the rewritten file, not the stale cache


CACHE_CHILD = """
import os, signal, sys
import numpy as np
from imgcls_jax.data import Pipeline, from_arrays
images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
pipe = Pipeline(from_arrays(images, np.arange(64) % 3), image_size=(32, 32), batch_size=4,
                training=False, cache=sys.argv[1])
for i, _ in enumerate(pipe.epoch(0)):
    if i == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # dies while tf.data writes the cache
"""


def test_file_cache_left_unfinished_by_a_killed_run_is_rebuilt(tmp_path, caplog):
    from tests.helpers import child_env

    prefix = tmp_path / "cache" / "train"
    proc = subprocess.run(
        [sys.executable, "-c", CACHE_CHILD, str(prefix)],
        env=child_env(Path(__file__).resolve().parents[1], {"TF_CPP_MIN_LOG_LEVEL": "2"}),
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list(prefix.parent.glob("*.lockfile")), sorted(p.name for p in prefix.parent.iterdir())
    images = np.random.default_rng(0).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    with caplog.at_level("WARNING", logger="imgcls_jax.data.pipeline"):
        pipe = Pipeline(from_arrays(images, np.arange(64) % 3), image_size=(32, 32), batch_size=4,
                        training=False, cache=str(prefix))  # fmt: skip
    assert "removing the unfinished tf.data cache" in caplog.text
    batches = collect(pipe)  # tf.data would refuse: "cache lockfile already exists"
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches]), images)
    assert Path(f"{pipe.cache_files}.index").is_file()


def test_file_cache_needs_a_fingerprint(tmp_path):
    source = from_arrays(*arrays(4))
    source.fingerprint = None
    with pytest.raises(ValueError, match="cannot be cached in files"):
        Pipeline(source, image_size=(32, 32), batch_size=2, training=False, cache=str(tmp_path / "c"))
    Pipeline(source, image_size=(32, 32), batch_size=2, training=False, cache="memory")


def test_resized_keeps_the_pipeline_settings():
    images, labels = arrays(8)
    pipe = Pipeline(from_arrays(images, labels), image_size=(32, 32), batch_size=4, training=True,
                    augment=AugmentConfig(flip="horizontal"), seed=5)  # fmt: skip
    assert pipe.resized((32, 32)) is pipe
    big = pipe.resized((64, 64))
    assert big.image_size == (64, 64) and big.source is pipe.source
    assert (big.batch_size, big.training, big.augment, big.seed) == (4, True, pipe.augment, 5)
    (batch, *_) = collect(big)
    assert batch["image"].shape == (4, 64, 64, 3)


def test_tfds_source_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=7):
        source = from_tfds("tf_flowers", "train")
        assert source.num_examples == 7 and source.num_classes == 5
        pipe = Pipeline(source, image_size=(32, 32), batch_size=4, training=False)
        batches = collect(pipe)
    assert sum(b["mask"].sum() for b in batches) == 7
    assert batches[0]["image"].dtype == np.uint8 and batches[0]["label"].max() < 5


@pytest.mark.parametrize(
    "images, labels, match",
    [
        (np.zeros((2, 8, 8, 3), np.float32), [0, 1], "uint8"),
        (np.zeros((2, 8, 8, 4), np.uint8), [0, 1], r"\[N, H, W, 3\]"),
        (np.zeros((2, 8, 8, 3), np.uint8), [0], "labels must be integers"),
        (np.zeros((2, 8, 8, 3), np.uint8), [0.0, 1.0], "labels must be integers"),
        (np.zeros((2, 8, 8, 3), np.uint8), [0, -1], r"labels must be in"),
    ],
)
def test_bad_arrays(images, labels, match):
    with pytest.raises(ValueError, match=match):
        from_arrays(images, np.asarray(labels))


def test_too_few_training_images():
    with pytest.raises(ValueError, match="fewer than one batch"):
        Pipeline(from_arrays(*arrays(3)), image_size=(32, 32), batch_size=4, training=True)


def test_grayscale_arrays_become_rgb():
    gray = np.arange(2 * 32 * 32, dtype=np.uint32).reshape(2, 32, 32).astype(np.uint8)
    batch = collect(
        Pipeline(from_arrays(gray, np.array([0, 1])), image_size=(32, 32), batch_size=2, training=False)
    )[0]
    np.testing.assert_array_equal(batch["image"][..., 0], gray)
    np.testing.assert_array_equal(batch["image"][..., 2], gray)


def test_prefetch_to_device_single():
    import jax

    batches = [{"image": np.full((4, 2, 2, 3), i, np.uint8), "label": np.arange(4)} for i in range(5)]
    out = list(prefetch_to_device(batches, size=2))
    assert len(out) == 5 and isinstance(out[0]["image"], jax.Array)
    assert [int(b["image"][0, 0, 0, 0]) for b in out] == list(range(5))


def test_prefetch_shards_over_devices():
    code = (
        "import numpy as np, jax\n"
        "from imgcls_jax.data.prefetch import prefetch_to_device\n"
        "out = list(prefetch_to_device([{'x': np.arange(8)}]))\n"
        "assert len(out[0]['x'].sharding.device_set) == 4, out[0]['x'].sharding\n"
        "assert out[0]['x'].addressable_shards[1].data.tolist() == [2, 3]\n"
        "try:\n"
        "    list(prefetch_to_device([{'x': np.arange(6)}]))\n"
        "except ValueError as e:\n"
        "    assert 'does not divide' in str(e)\n"
        "else:\n"
        "    raise AssertionError('no error for 6 over 4 devices')\n"
        "import sys; assert 'tensorflow' not in sys.modules\n"
    )
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_tfds_not_prepared_is_a_clear_error(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="'mnist' is not prepared in .*download_and_prepare"):
        from_tfds("mnist", "train", data_dir=tmp_path)


def test_lazy_names_are_not_shadowed_by_submodules():
    import imgcls_jax.data as data
    import imgcls_jax.data.dataset_audit  # noqa: F401  (importing a submodule must not shadow a name)

    for name in data.__all__:
        assert not isinstance(getattr(data, name), type(data)), name
