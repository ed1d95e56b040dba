"""The frozen-base fast path: cached base outputs give the same logits, every example once."""

import jax
import numpy as np
import pytest

from imgcls_jax import create_model
from imgcls_jax.train.features import FeatureBatches


@pytest.mark.parametrize("pooling", ["avg", "max", None])
def test_head_on_pooled_features_equals_the_full_model(pooling):
    model = create_model(
        "vgg16", num_classes=3, pooling=pooling, head_units=(8,), input_shape=(32, 32, 3), seed=1
    )
    images = np.asarray(jax.random.randint(jax.random.key(0), (2, 32, 32, 3), 0, 256), np.uint8)
    full = np.asarray(model(images))
    staged = np.asarray(model.head(model.pool(model.features(images))))
    np.testing.assert_allclose(staged, full, rtol=1e-6, atol=1e-6)


def test_feature_batches_train_and_eval():
    feats = np.arange(11 * 4, dtype=np.float32).reshape(11, 4)
    labels = np.arange(11, dtype=np.int32) % 3
    train = FeatureBatches(feats, labels, batch_size=4, training=True, seed=2)
    assert len(train) == 2
    e0, e1 = list(train.epoch(0)), list(train.epoch(1))
    assert [b["features"].shape for b in e0] == [(4, 4), (4, 4)]
    seen = np.concatenate([b["label"] for b in e0])
    assert len(set(np.concatenate([b["features"][:, 0] for b in e0]).tolist())) == 8  # no repeats
    assert not np.array_equal(e0[0]["features"], e1[0]["features"])  # reshuffled per epoch
    assert [np.array_equal(a["features"], b["features"]) for a, b in zip(e0, train.epoch(0))] == [True] * 2
    assert seen.dtype == np.int32
    ev = FeatureBatches(feats, labels, batch_size=4, training=False)
    batches = list(ev.epoch(0))
    assert len(batches) == 3 and batches[-1]["mask"].tolist() == [True, True, True, False]
    got = np.concatenate([b["features"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(got, feats)  # every example exactly once, in order
    with pytest.raises(ValueError, match="fewer than one batch"):
        FeatureBatches(feats[:3], labels[:3], batch_size=4, training=True)


def test_fit_uses_cached_features_only_when_the_base_is_frozen_and_images_unaugmented(tmp_path, caplog):
    from PIL import Image

    from imgcls_jax.config import PhaseConfig, TrainConfig
    from imgcls_jax.train.loop import fit

    rng = np.random.default_rng(0)
    for name, color in (("a", (200, 40, 40)), ("b", (40, 40, 200))):
        (tmp_path / "d" / name).mkdir(parents=True)
        for i in range(8):
            pixels = np.clip(rng.normal(color, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(tmp_path / "d" / name / f"{i}.png")
    phases = [
        PhaseConfig(epochs=2, trainable="head", learning_rate=1e-3, schedule="constant"),
        PhaseConfig(epochs=1, trainable="top:1", optimizer="sgd", learning_rate=1e-3),
    ]
    kw = dict(
        data=str(tmp_path / "d"),
        weights="random",
        image_size=32,
        batch_size=4,
        head_units=(8,),
        phases=phases,
    )
    with caplog.at_level("INFO", logger="imgcls_jax.train"):
        fast = fit(TrainConfig(run_dir=str(tmp_path / "fast"), augment={}, **kw))
    assert sum("computed once" in r.message for r in caplog.records) == 1  # phase 0 only
    caplog.clear()
    with caplog.at_level("INFO", logger="imgcls_jax.train"):
        fit(TrainConfig(run_dir=str(tmp_path / "slow"), augment={}, cache_features=False, **kw))
        fit(TrainConfig(run_dir=str(tmp_path / "aug"), augment={"flip": "horizontal"}, **kw))
    assert not any("computed once" in r.message for r in caplog.records)
    assert [h["epoch"] for h in fast.history] == [0, 1, 2]
    assert all(np.isfinite(h["train_loss"]) and 0 <= h["val_accuracy"] <= 1 for h in fast.history)
