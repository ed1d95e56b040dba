"""Throughput accounting: the analytic FLOP count against the textbook figure and against XLA's
own count of the compiled steps, MFU arithmetic, the measured peak."""

import jax.numpy as jnp
import pytest

from imgcls_jax import create_model
from imgcls_jax.perf import compiled_flops, mfu, peak_flops, vgg_flops
from imgcls_jax.train import (
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
    split_model,
    trainable_layers,
)


@pytest.mark.parametrize("arch, gmacs", [("vgg16", 15.470264320), ("vgg19", 19.632062464)])
def test_textbook_count_with_the_imagenet_top(arch, gmacs):
    model = create_model(arch)  # Keras top: fc1, fc2, predictions (1000)
    assert vgg_flops(model, 224) == pytest.approx(2e9 * gmacs, rel=1e-9)
    # padding taps left out: 2-3% less at 224 (the 14x14 maps of block 5 lose most)
    assert 0.96 < vgg_flops(model, 224, padding="valid") / vgg_flops(model, 224) < 0.98


def test_train_and_frozen_counts():
    model = create_model("vgg16", num_classes=5, head_units=(256,), pooling="avg", input_shape=(32, 32, 3))
    forward = vgg_flops(model, 32)
    dense = 2.0 * (512 * 256 + 256 * 5)
    first_conv = 2.0 * (3 * 32) ** 2 * 3 * 64
    assert vgg_flops(model, 32, "frozen") == pytest.approx(forward + 2 * dense)
    assert vgg_flops(model, 32, "train") == pytest.approx(3 * forward - first_conv)
    assert vgg_flops(model, (64, 32)) == pytest.approx(2 * (forward - dense) + dense, rel=1e-12)


@pytest.mark.parametrize("mode", ["forward", "train", "frozen"])
def test_analytic_count_matches_xla_cost_analysis(mode):
    """XLA counts convolutions without the padding taps; its figure adds the elementwise work
    (ReLU, bias, pooling, softmax, Adam), well under 2% of the convolutions at 32 px and batch 16
    (Adam's ~10 FLOPs per parameter are per step, not per image: small batches weigh them more)."""
    batch, size = 16, 32
    model = create_model(
        "vgg16", num_classes=5, head_units=(16,), pooling="avg", input_shape=(size, size, 3), conv_impl="xla"
    )
    images = jnp.zeros((batch, size, size, 3), jnp.uint8)
    labels = jnp.zeros((batch,), jnp.int32)
    split = split_model(model, trainable_layers(model, "head" if mode == "frozen" else "all"))
    if mode == "forward":
        step = make_eval_step(split)
        args = (
            split.trainable,
            split.frozen,
            {"image": images, "label": labels, "mask": jnp.ones(batch, bool)},
        )
    else:
        optimizer = make_optimizer("adam", 1e-3)
        step = make_train_step(split, optimizer)
        args = (init_state(split, optimizer), split.frozen, {"image": images, "label": labels})
    xla = compiled_flops(step, *args)
    analytic = batch * vgg_flops(model, size, mode, padding="valid")
    assert analytic <= xla < 1.02 * analytic
    # and the textbook count is off by the padding taps (the 2x2 maps of block 5 keep 4/9)
    assert batch * vgg_flops(model, size, mode) > 1.15 * xla


def test_compiled_flops_without_a_count_is_an_error():
    class NoCount:
        def lower(self, *args):
            return self

        def compile(self):
            return self

        def cost_analysis(self):
            return {}

    with pytest.raises(RuntimeError, match="no FLOP count"):
        compiled_flops(NoCount())


def test_bad_arguments():
    model = create_model("vgg16", num_classes=5, pooling="avg", input_shape=(32, 32, 3))
    with pytest.raises(ValueError, match="mode"):
        vgg_flops(model, 32, "backward")
    with pytest.raises(ValueError, match="padding"):
        vgg_flops(model, 32, padding="same")
    with pytest.raises(ValueError, match="positive"):
        mfu(1e9, 0.0, 1e12)


def test_mfu_and_peak():
    assert mfu(2e12, 0.5, 8e12) == pytest.approx(0.5)
    peak = peak_flops("float32", size=256, repeats=2)
    assert 1e8 < peak < 1e16  # a broken timer gives 0 or inf
