"""Analytic FLOPs of ResNet50 and MobileNetV2 (``resnet.flops``, ``mobilenet.flops``): against the
multiply-adds of Keras's own layers (their output and kernel shapes), and against XLA's cost
analysis of the compiled steps, as tests/test_perf.py does for VGG."""

import jax.numpy as jnp
import numpy as np
import pytest

from imgcls_jax import create_model
from imgcls_jax.models import mobilenet, resnet
from imgcls_jax.perf import compiled_flops
from imgcls_jax.train import init_state, make_eval_step, make_optimizer, make_train_step, split_model
from tests.keras_bn import BN_MODELS, keras, keras_model

MODULES = {"resnet50": resnet, "mobilenetv2": mobilenet}
#: XLA's count / the analytic "valid" count (convolutions and dense layers only): XLA adds the
#: elementwise work (BatchNorm, ReLU, additions, pooling, softmax, Adam). Measured at 32 px,
#: batch 16: resnet50 forward 1.021, frozen 1.021, train 1.095; mobilenetv2 forward 1.047,
#: frozen 1.044, train 1.105 (after xla_depthwise_wgrad's term).
MARGIN = {
    ("resnet50", "forward"): 1.04, ("resnet50", "frozen"): 1.04, ("resnet50", "train"): 1.15,
    ("mobilenetv2", "forward"): 1.07, ("mobilenetv2", "frozen"): 1.07, ("mobilenetv2", "train"): 1.15,
}  # fmt: skip


def keras_flops(model) -> float:
    """2 x the multiply-adds of a Keras model's Conv2D, DepthwiseConv2D and Dense layers, from
    their output shapes and kernels (every output position does the whole kernel)."""
    total = 0
    for layer in model.layers:
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw, _, _ = layer.kernel.shape
            total += h * w * kh * kw * c
        elif isinstance(layer, keras.layers.Conv2D):
            _, h, w, _ = layer.output.shape
            total += h * w * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):
            total += int(np.prod(layer.kernel.shape))
    return 2.0 * total


@pytest.mark.parametrize("arch", BN_MODELS)
@pytest.mark.parametrize("size", [224, 57])
def test_full_count_equals_keras_layers(arch, size):
    theirs = keras_flops(keras_model(arch, True, size))
    ours = create_model(arch, input_shape=(size, size, 3))
    assert MODULES[arch].flops(ours, size) == pytest.approx(theirs, rel=1e-12)
    if size == 224:  # the usual figures: 3.86 (resnet50) and 0.30 (mobilenetv2) GMACs at 224
        print(f"{arch}: {theirs / 2e9:.3f} GMACs forward at 224x224")


@pytest.mark.parametrize("arch", BN_MODELS)
def test_train_frozen_and_valid_counts(arch):
    module = MODULES[arch]
    model = create_model(arch, num_classes=5, head_units=(16,), pooling="avg", input_shape=(64, 64, 3))
    forward = module.flops(model, 64)
    dense = 2.0 * (model.feature_channels * 16 + 16 * 5)
    first_conv = module.conv_ops(64)[0].flops("full")
    assert module.flops(model, 64, "frozen") == pytest.approx(forward + 2 * dense)
    assert module.flops(model, 64, "train") == pytest.approx(3 * forward - first_conv)
    assert 0.5 * forward < module.flops(model, 64, padding="valid") < forward  # padding taps left out
    assert module.flops(model, (64, 96)) > forward
    with pytest.raises(ValueError, match="mode"):
        module.flops(model, 64, "backward")
    with pytest.raises(ValueError, match="padding"):
        module.flops(model, 64, padding="same")


def xla_depthwise_wgrad(arch, size) -> float:
    """What XLA's cost analysis adds for depthwise convolutions in a train step: it counts each
    one's weight gradient (a convolution with ``batch_group_count = C``) as ``C`` times its
    forward multiply-adds (checked on a lone depthwise layer: 0.84 * C = 81x its valid count at
    8x8x96), where the arithmetic needs one time. Zero for ResNet50."""
    return sum((op.groups - 1) * op.flops("valid") for op in MODULES[arch].conv_ops(size) if op.groups > 1)


@pytest.mark.parametrize("arch", BN_MODELS)
@pytest.mark.parametrize("mode", ["forward", "frozen", "train"])
def test_analytic_count_matches_xla_cost_analysis(arch, mode):
    """XLA counts convolutions without their zero-padding taps (explicit padding included):
    the analytic ``padding="valid"`` count; see MARGIN for what XLA adds."""
    batch, size = 16, 32
    model = create_model(
        arch, num_classes=5, head_units=(16,), pooling="avg", input_shape=(size, size, 3), conv_impl="xla"
    )
    images = jnp.zeros((batch, size, size, 3), jnp.uint8)
    labels = jnp.zeros((batch,), jnp.int32)
    split = split_model(model, model.trainable_layers("head" if mode == "frozen" else "all"))
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
    analytic = batch * MODULES[arch].flops(model, size, mode, padding="valid")
    if mode == "train":
        analytic += batch * xla_depthwise_wgrad(arch, size)
    print(f"{arch} {mode}: XLA / analytic = {xla / analytic:.4f} (margin {MARGIN[(arch, mode)]})")
    assert analytic <= xla < MARGIN[(arch, mode)] * analytic
