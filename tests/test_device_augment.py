"""Tests of imgcls_jax.data.device_augment: the JAX ops give the tf.data ops' pixels for the same
explicit parameters (TensorFlow is the reference), the sampled parameters have the configured
distributions, and everything jits with static shapes, stays on the device and keeps a batch's
sharding."""

import math
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax.data import device_augment as da
from imgcls_jax.data.augment import AugmentConfig

tf = pytest.importorskip("tensorflow")
from imgcls_jax.data import augment as aug  # noqa: E402  (its helpers are the TF reference)

B, H, W = 8, 48, 40  # non-square on purpose
#: Pixel agreement with TensorFlow for the same parameters, in grey levels (of 255): float32
#: rounding of the interpolation weights and coordinates. Measured on 2026-11-29 over these configs
#: (8 random-colour 48x40 images each): max 0.0027, mean <= 1e-4 (colour ops alone: max 2e-4).
ATOL, MEAN_TOL = 0.01, 1e-3

CONFIGS = {
    "flip": AugmentConfig(flip="horizontal_and_vertical"),
    "crop": AugmentConfig(random_resized_crop=True),
    "crop_tiny_boxes": AugmentConfig(random_resized_crop=True, crop_scale=(0.01, 0.1), crop_ratio=(0.2, 5.0)),
    **{
        f"affine_{mode}": AugmentConfig(
            rotation=0.3, zoom=0.5, translation=0.3, fill_mode=mode, fill_value=77.0
        )
        for mode in ("reflect", "wrap", "constant", "nearest")
    },
    "brightness": AugmentConfig(brightness=0.5),
    "contrast": AugmentConfig(contrast=0.9),
    "saturation": AugmentConfig(saturation=1.0),
    "hue": AugmentConfig(hue=0.5),
    "everything": AugmentConfig(
        flip="horizontal_and_vertical",
        rotation=0.1,
        zoom=0.2,
        translation=0.1,
        fill_mode="wrap",
        random_resized_crop=True,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        hue=0.05,
    ),  # fmt: skip
}


def random_images(b=B, h=H, w=W, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (b, h, w, 3)).astype(np.uint8)


def tf_params(params: da.AugmentParams, i: int, config: AugmentConfig) -> dict:
    """Example ``i`` of JAX's parameters in ``augment._apply_params``'s form."""
    out = {}
    if config.flip in ("horizontal", "horizontal_and_vertical"):
        out["flip_h"] = tf.constant(bool(params.flip_h[i]))
    if config.flip in ("vertical", "horizontal_and_vertical"):
        out["flip_v"] = tf.constant(bool(params.flip_v[i]))
    if config.random_resized_crop:
        out["crop"] = tf.constant(np.asarray(params.crop[i]))
    if config.rotation or config.zoom or config.translation:
        out.update(angle=params.angle[i], zoom=params.zoom[i], shift=params.shift[i])
    for name in ("brightness", "contrast", "saturation", "hue"):
        if getattr(config, name):
            out[name] = getattr(params, name)[i]
    return {k: tf.constant(np.asarray(v)) for k, v in out.items()}


def tf_reference(images: np.ndarray, params: da.AugmentParams, config: AugmentConfig) -> np.ndarray:
    return np.stack(
        [
            aug._apply_params(tf.constant(x, tf.float32), tf_params(params, i, config), config).numpy()
            for i, x in enumerate(images)
        ]
    )


# ------------------------------------------------------------------- pixels against TensorFlow


@pytest.mark.parametrize("name", CONFIGS)
def test_explicit_parameters_give_tensorflows_pixels(name):
    config, images = CONFIGS[name], random_images()
    params = da.sample_params(jax.random.key(3), B, (H, W), config)
    ours = np.asarray(da.apply_params(jnp.asarray(images), params, config))
    err = np.abs(ours - tf_reference(images, params, config))
    assert ours.shape == images.shape and ours.dtype == np.float32
    assert err.mean() <= MEAN_TOL, f"mean {err.mean():.3g}"
    # a coordinate landing within float rounding of a fill-mode seam may pick the other side of it
    assert (err > ATOL).mean() <= 1e-4, f"max {err.max():.3g}, {(err > ATOL).sum()} values over {ATOL}"


def test_rotation_half_turn_and_translation_are_exact_pixel_moves():
    """Independent of TF: a half turn is rot180, a whole-pixel shift moves pixels (constant fill)."""
    images = random_images(2)
    config = AugmentConfig(rotation=0.5, translation=0.5, fill_mode="constant", fill_value=9.0)
    params = da.sample_params(jax.random.key(0), 2, (H, W), config)
    half_turn = params._replace(angle=jnp.full(2, math.pi, jnp.float32), shift=jnp.zeros((2, 2), jnp.float32))
    out = np.asarray(da.apply_params(jnp.asarray(images), half_turn, config))
    np.testing.assert_allclose(
        out, images[:, ::-1, ::-1].astype(np.float32), atol=0.01
    )  # sin(pi) != 0 in f32
    shifted = params._replace(angle=jnp.zeros(2), zoom=jnp.ones(2), shift=jnp.array([[3.0, 5.0]] * 2))
    out = np.asarray(da.apply_params(jnp.asarray(images), shifted, config))
    np.testing.assert_allclose(out[:, 3:, 5:], images[:, :-3, :-5].astype(np.float32), atol=1e-3)
    assert (out[:, :3] == 9.0).all() and (out[:, :, :5] == 9.0).all()


def test_full_image_crop_is_identity_and_colour_identities():
    images = random_images(2)
    config = AugmentConfig(random_resized_crop=True, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.1)
    params = da.sample_params(jax.random.key(0), 2, (H, W), config)
    neutral = params._replace(
        crop=jnp.array([[0, 0, H, W]] * 2), brightness=jnp.zeros(2), contrast=jnp.ones(2),
        saturation=jnp.ones(2), hue=jnp.zeros(2),
    )  # fmt: skip
    out = np.asarray(da.apply_params(jnp.asarray(images), neutral, config))
    np.testing.assert_allclose(out, images.astype(np.float32), atol=1e-3)


def test_mixup_and_cutmix_with_explicit_parameters_match_tensorflow():
    images = random_images().astype(np.float32)
    labels = np.eye(5, dtype=np.float32)[np.arange(B) % 5]
    for lam in (0.0, 0.3, 1.0):
        ours = da.apply_mix(
            jnp.asarray(images), jnp.asarray(labels),
            da.MixParams(jnp.bool_(False), jnp.float32(lam), jnp.zeros(4, jnp.int32)),
            AugmentConfig(mixup_alpha=1),
        )  # fmt: skip
        ref = aug._mixup(tf.constant(images), tf.constant(labels), tf.constant(lam, tf.float32))
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-3)
    for box in ([0, H, 0, W], [5, 20, 7, 33], [0, 0, 3, 9], [47, 48, 0, 1]):
        params = da.MixParams(jnp.bool_(True), jnp.float32(0.5), jnp.array(box, jnp.int32))
        config = AugmentConfig(mixup_alpha=0.5, cutmix_alpha=1.0)  # both on: the choice picks cutmix
        ours = da.apply_mix(jnp.asarray(images), jnp.asarray(labels), params, config)
        ref = aug._paste_box(tf.constant(images), tf.constant(labels), tf.constant(box))
        for a, b in zip(ours, ref):
            np.testing.assert_allclose(np.asarray(a), b.numpy(), atol=1e-6)


# ------------------------------------------------------------------- distributions

N = 4000
EVERYTHING = AugmentConfig(
    flip="horizontal_and_vertical", rotation=0.2, zoom=0.3, translation=0.25, brightness=0.4,
    contrast=0.5, saturation=0.6, hue=0.3, random_resized_crop=True,
)  # fmt: skip


def check_uniform(values, low, high):
    values = np.asarray(values, np.float64)
    assert low <= values.min() and values.max() <= high
    sd = (high - low) / math.sqrt(12)
    assert values.mean() == pytest.approx((low + high) / 2, abs=5 * sd / math.sqrt(len(values)))
    assert values.std() == pytest.approx(sd, rel=0.05)
    assert values.min() < low + 0.01 * (high - low) and values.max() > high - 0.01 * (high - low)


def test_sampled_parameters_have_the_configured_ranges():
    p = da.sample_params(jax.random.key(7), N, (60, 90), EVERYTHING)
    c = EVERYTHING
    check_uniform(p.angle, -2 * math.pi * c.rotation, 2 * math.pi * c.rotation)
    check_uniform(p.zoom, 1 - c.zoom, 1 + c.zoom)
    check_uniform(p.shift[:, 0], -60 * c.translation, 60 * c.translation)  # pixels of height
    check_uniform(p.shift[:, 1], -90 * c.translation, 90 * c.translation)  # and of width
    check_uniform(p.brightness, -255 * c.brightness, 255 * c.brightness)
    check_uniform(p.contrast, 1 - c.contrast, 1 + c.contrast)
    check_uniform(p.saturation, 1 - c.saturation, 1 + c.saturation)
    check_uniform(p.hue, -c.hue, c.hue)
    for flips in (p.flip_h, p.flip_v):
        assert np.mean(flips) == pytest.approx(0.5, abs=5 * 0.5 / math.sqrt(N))
    # every op draws from its own key: no correlation between any two parameters
    table = np.stack(
        [p.angle, p.zoom, p.shift[:, 0], p.shift[:, 1], p.brightness, p.contrast, p.saturation, p.hue,
         p.flip_h, p.flip_v, p.crop[:, 2]]
    ).astype(np.float64)  # fmt: skip
    corr = np.corrcoef(table) - np.eye(len(table))
    assert np.abs(corr).max() < 5 / math.sqrt(N)


def test_switching_an_op_on_does_not_change_the_others_draws():
    key = jax.random.key(11)
    a = da.sample_params(key, 64, (H, W), AugmentConfig(flip="horizontal", rotation=0.1))
    b = da.sample_params(key, 64, (H, W), AugmentConfig(flip="horizontal", rotation=0.1, hue=0.2, zoom=0.1))
    np.testing.assert_array_equal(a.flip_h, b.flip_h)
    np.testing.assert_array_equal(a.angle, b.angle)


def test_crop_boxes_follow_tensorflows_distribution():
    """Crop boxes from JAX's sampler and from augment.py's TF sampler: same distributions of area
    fraction, aspect ratio and offset (two-sample Kolmogorov-Smirnov), all boxes inside the image."""
    stats = pytest.importorskip("scipy.stats")
    h, w, n = 60, 90, 2000
    config = AugmentConfig(random_resized_crop=True, crop_scale=(0.2, 1.0), crop_ratio=(0.5, 2.0))
    ours = np.asarray(da.sample_params(jax.random.key(5), n, (h, w), config).crop, np.float64)
    sample = tf.function(
        lambda seeds: tf.map_fn(
            lambda s: aug._sample_crop(tf.constant([h, w, 3]), s, config.crop_scale, config.crop_ratio),
            seeds, fn_output_signature=tf.int32,
        )
    )  # fmt: skip
    theirs = sample(tf.stack([tf.fill([n], tf.constant(9, tf.int64)), tf.range(n, dtype=tf.int64)], 1))
    theirs = theirs.numpy().astype(np.float64)
    for boxes in (ours, theirs):
        top, left, ch, cw = boxes.T
        assert (top >= 0).all() and (left >= 0).all() and (top + ch <= h).all() and (left + cw <= w).all()
        assert (ch >= 1).all() and (cw >= 1).all()

    def features(boxes):
        top, left, ch, cw = boxes.T
        return {
            "area": ch * cw / (h * w),
            "aspect": cw / ch,
            "top": top / np.maximum(h - ch, 1),
            "left": left / np.maximum(w - cw, 1),
        }

    a, b = features(ours), features(theirs)
    for name in a:
        assert stats.ks_2samp(a[name], b[name]).pvalue > 1e-3, name


def test_crop_falls_back_to_the_centre_crop():
    """No attempt fits (aspect ratios far from the image's): the largest centred box of clamped ratio."""
    p = da.sample_params(jax.random.key(0), 16, (40, 40), AugmentConfig(random_resized_crop=True,
                         crop_scale=(1.0, 1.0), crop_ratio=(3.0, 4.0)))  # fmt: skip
    np.testing.assert_array_equal(np.asarray(p.crop), [[13, 0, 13, 40]] * 16)  # round(40 / 3) rows


@pytest.mark.parametrize("alpha", [0.2, 1.0])
def test_mix_parameters_distribution(alpha):
    keys = jax.random.split(jax.random.key(1), N)
    config = AugmentConfig(mixup_alpha=alpha, cutmix_alpha=alpha)
    p = jax.vmap(lambda k: da.sample_mix_params(k, (H, W), config))(keys)
    lam, var = np.asarray(p.lam, np.float64), 1 / (4 * (2 * alpha + 1))  # Beta(a, a)
    assert ((0 <= lam) & (lam <= 1)).all()
    assert lam.mean() == pytest.approx(0.5, abs=5 * math.sqrt(var / N))
    assert lam.var() == pytest.approx(var, rel=0.1)
    assert np.mean(p.use_cutmix) == pytest.approx(0.5, abs=5 * 0.5 / math.sqrt(N))
    y0, y1, x0, x1 = np.asarray(p.box).T
    assert ((0 <= y0) & (y0 <= y1) & (y1 <= H) & (0 <= x0) & (x0 <= x1) & (x1 <= W)).all()
    unclipped = (y0 > 0) & (y1 < H) & (x0 > 0) & (x1 < W)
    cut = np.sqrt(1 - lam[unclipped])  # sides sqrt(1 - lam) of the image's, rounded down to even
    np.testing.assert_array_equal(y1[unclipped] - y0[unclipped], (H * cut).astype(int) // 2 * 2)


def test_mix_batch_labels_are_soft_and_sum_to_one():
    images, labels = jnp.asarray(random_images()), jnp.arange(B) % 5
    for i in range(6):
        out_images, out_labels = da.mix_batch(
            images, labels, jax.random.key(i), AugmentConfig(mixup_alpha=0.4, cutmix_alpha=1.0), 5
        )
        assert out_images.dtype == jnp.float32 and out_labels.shape == (B, 5)
        np.testing.assert_allclose(np.asarray(out_labels).sum(1), 1.0, atol=1e-6)
    off_images, off_labels = da.mix_batch(images, labels, jax.random.key(0), AugmentConfig(), 5)
    np.testing.assert_array_equal(off_images, np.asarray(images, np.float32))
    np.testing.assert_array_equal(off_labels, np.eye(5)[np.arange(B) % 5])
    with pytest.raises(ValueError, match="3 classes, num_classes is 5"):
        da.mix_batch(images, jnp.ones((B, 3)) / 3, jax.random.key(0), AugmentConfig(mixup_alpha=1.0), 5)


# ------------------------------------------------------------------- jit, determinism, devices


def test_same_key_same_output_and_keys_differ():
    images = jnp.asarray(random_images())
    config = CONFIGS["everything"]
    a = da.augment_batch(images, jax.random.key(1), config)
    np.testing.assert_array_equal(a, da.augment_batch(images, jax.random.key(1), config))
    assert not np.array_equal(a, da.augment_batch(images, jax.random.key(2), config))
    step_keys = [jax.random.fold_in(jax.random.key(0), step) for step in (5, 5, 6)]
    outs = [da.augment_batch(images, k, config) for k in step_keys]
    np.testing.assert_array_equal(outs[0], outs[1])  # a resumed run replays step 5 exactly
    assert not np.array_equal(outs[0], outs[2])
    assert 0 <= float(a.min()) and float(a.max()) <= 255 and a.dtype == jnp.float32


def test_identity_config_returns_the_images_as_float():
    images = random_images()
    np.testing.assert_array_equal(
        da.augment_batch(jnp.asarray(images), jax.random.key(0), AugmentConfig()), images
    )


def test_jits_once_with_static_shapes_and_no_host_round_trip():
    config = CONFIGS["everything"]
    mixing = AugmentConfig(**{**vars(config), "mixup_alpha": 0.2, "cutmix_alpha": 1.0})
    batch = {"image": jnp.asarray(random_images()), "label": jnp.arange(B) % 5, "mask": jnp.ones(B, bool)}
    step = jax.jit(lambda b, key: da.augment_train_batch(b, key, mixing, 5))
    jaxpr = jax.make_jaxpr(lambda b, key: da.augment_train_batch(b, key, mixing, 5))(batch, jax.random.key(0))
    text = str(jaxpr)
    assert "callback" not in text, "a host callback inside augmentation"
    keys = [jax.random.key(i) for i in range(3)]  # placed on the device before the guard
    with jax.transfer_guard("disallow"):  # any implicit host <-> device copy raises
        outs = [step(batch, k) for k in keys]
    assert step._cache_size() == 1  # one compilation for every key
    assert outs[0]["image"].shape == (B, H, W, 3) and outs[0]["label"].shape == (B, 5)


def test_bad_shapes_are_clear_errors():
    with pytest.raises(ValueError, match=r"\[B, H, W, 3\].*\(8, 48, 40\)"):
        da.augment_batch(jnp.zeros((B, H, W), jnp.uint8), jax.random.key(0), CONFIGS["flip"])


def test_batch_sharded_over_devices_stays_sharded_and_equals_one_device():
    code = """
import numpy as np, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from imgcls_jax.data import device_augment as da
from imgcls_jax.data.augment import AugmentConfig
config = AugmentConfig(flip="horizontal", rotation=0.1, zoom=0.1, translation=0.1, random_resized_crop=True,
                       brightness=0.2, contrast=0.2, saturation=0.2, hue=0.05, mixup_alpha=0.2,
                       cutmix_alpha=1.0)
images = np.random.default_rng(0).integers(0, 256, (8, 32, 24, 3)).astype(np.uint8)
batch = {"image": images, "label": np.arange(8) % 3}
sharding = NamedSharding(Mesh(np.asarray(jax.devices()), ("data",)), P("data"))
sharded = jax.device_put(batch, sharding)
step = jax.jit(lambda b, k: da.augment_train_batch(b, k, config, 3))
out = step(sharded, jax.random.key(4))
single = step(jax.device_put(batch, jax.devices()[0]), jax.random.key(4))
assert len(out["image"].sharding.device_set) == 4, out["image"].sharding
assert out["image"].sharding.is_equivalent_to(sharding, 4), out["image"].sharding
np.testing.assert_allclose(np.asarray(out["image"]), np.asarray(single["image"]), atol=1e-3)
np.testing.assert_allclose(np.asarray(out["label"]), np.asarray(single["label"]), atol=1e-6)
import sys; assert "tensorflow" not in sys.modules
"""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=300)
