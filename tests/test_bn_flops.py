"""Analytic FLOPs of the BatchNorm families (``flops`` in ``imgcls_jax.models.efficientnet``,
``resnet`` and ``mobilenet``): against the multiply-adds of Keras's own layers (their output and
kernel shapes), the published figures, and XLA's cost analysis of the compiled steps, as
tests/test_perf.py does for VGG."""

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks.perf import compiled_flops
from imgcls_jax import create_model
from imgcls_jax.models import (
    convnext,
    densenet,
    efficientnet,
    efficientnet_v2,
    inception_resnet_v2,
    inception_v3,
    mobilenet,
    mobilenet_v1,
    mobilenet_v3,
    nasnet,
    resnet,
    xception,
)
from imgcls_jax.train import init_state, make_eval_step, make_optimizer, make_train_step, split_model
from tests.keras_references import keras_app, weighted_layers

keras = pytest.importorskip("keras")

MODULES = {
    "efficientnetb0": efficientnet, "mobilenetv2": mobilenet, "resnet50": resnet, "convnexttiny": convnext,
    "efficientnetv2b0": efficientnet_v2, "mobilenetv3small": mobilenet_v3,
}  # fmt: skip
#: Forward multiply-adds at 224x224 with the ImageNet top, as published: EfficientNet-B0 0.39 B
#: (Tan & Le 2019, table 2), MobileNetV2 300 M (Sandler et al. 2018, table 3), ResNet-50 3.8-3.9 B
#: (He et al. 2015 count 3.8 B without the biases' and the shortcuts' exact terms).
#: ConvNeXt-T 4.5 G (Liu et al. 2022, table 1), EfficientNetV2-B0 0.72 B (Tan & Le 2021, its
#: Keras table), MobileNetV3-Small 56 M (Howard et al. 2019, table 3).
PUBLISHED_GMACS = {
    "efficientnetb0": (0.39, 0.005), "mobilenetv2": (0.30, 0.005), "resnet50": (3.86, 0.05),
    "convnexttiny": (4.5, 0.05), "efficientnetv2b0": (0.72, 0.005), "mobilenetv3small": (0.056, 0.001),
}  # fmt: skip
#: Each family with the implementation XLA's count is taken of: ResNet50's 3x3 convolutions as
#: XLA's (im2col, the CPU default on small maps, computes the taps on the zero padding too),
#: the depthwise convolutions as the CPU default (shifted multiply-adds: XLA counts a grouped
#: convolution's kernel gradient as C times its arithmetic, 7.4x the analytic train count).
#: Convolutions as XLA's own (XLA's cost analysis does not count oneDNN's custom calls, which
#: "auto" picks on CPU where they are available).
OPTIONS = {
    "efficientnetb0": {"conv_impl": "xla", "depthwise_impl": "shift"},
    "mobilenetv2": {"conv_impl": "xla", "depthwise_impl": "shift"},
    "resnet50": {"conv_impl": "xla"},
    "convnexttiny": {"conv_impl": "xla"},
    "efficientnetv2b0": {"conv_impl": "xla", "depthwise_impl": "shift"},
    "mobilenetv3small": {"conv_impl": "xla", "depthwise_impl": "shift"},
}
#: XLA's count / the analytic "valid" count (convolutions and dense layers only): XLA adds the
#: elementwise work (BatchNorm, activations, squeeze-excite gating, additions, pooling, softmax,
#: the optimizer). Measured at 32 px, batch 8: efficientnetb0 forward 1.106, frozen 1.103, train
#: 1.386; mobilenetv2 1.073, 1.070, 1.294; resnet50 1.021, 1.021, 1.074; convnexttiny 1.068,
#: 1.068, 1.557 (LayerNorm and the exact GELU are elementwise work; XLA counts the grouped 7x7
#: convolutions' kernel gradients as dense); efficientnetv2b0 1.037, 1.036, 1.112;
#: mobilenetv3small 1.119, 1.113, 1.761.
MARGIN = {
    "efficientnetb0": (1.2, 1.2, 1.6),
    "mobilenetv2": (1.12, 1.12, 1.45),
    "resnet50": (1.04, 1.04, 1.15),
    "convnexttiny": (1.12, 1.12, 1.7),
    "efficientnetv2b0": (1.08, 1.08, 1.2),
    "mobilenetv3small": (1.17, 1.17, 1.9),
}
MODES = ("forward", "frozen", "train")


def keras_flops(model) -> float:
    """2 x the multiply-adds of a Keras model's Conv2D, DepthwiseConv2D and Dense layers, from
    their output shapes and kernels (every output position does the whole kernel)."""
    total = 0
    for layer in weighted_layers(model):
        if isinstance(layer, keras.layers.SeparableConv2D):
            _, h, w, _ = layer.output.shape
            kh, kw, c, m = layer.depthwise_kernel.shape
            total += h * w * (kh * kw * c * m + int(np.prod(layer.pointwise_kernel.shape)))
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            _, h, w, c = layer.output.shape
            kh, kw, _, _ = layer.kernel.shape
            total += h * w * kh * kw * c
        elif isinstance(layer, keras.layers.Conv2D):  # a grouped one's kernel is [k, k, C / groups, O]
            _, h, w, _ = layer.output.shape
            total += h * w * int(np.prod(layer.kernel.shape))
        elif isinstance(layer, keras.layers.Dense):  # on a map (ConvNeXt's pointwise layers) per position
            total += int(np.prod(layer.output.shape[1:-1])) * int(np.prod(layer.kernel.shape))
    return 2.0 * total


@pytest.mark.parametrize("arch", sorted(MODULES))
@pytest.mark.parametrize("size", [224, 57])
def test_full_count_equals_keras_layers(arch, size):
    theirs = keras_flops(keras_app(arch, True, size))
    ours = MODULES[arch].flops(create_model(arch, input_shape=(size, size, 3)), size)
    assert ours == pytest.approx(theirs, rel=1e-12)
    if size == 224:
        print(f"{arch}: {theirs / 2e9:.3f} GMACs forward at 224x224")
        gmacs, tol = PUBLISHED_GMACS[arch]
        assert theirs / 2e9 == pytest.approx(gmacs, abs=tol)


@pytest.mark.parametrize("arch", sorted(MODULES))
def test_train_frozen_and_valid_counts(arch):
    module = MODULES[arch]
    model = create_model(arch, num_classes=5, head_units=(16,), pooling="avg", input_shape=(64, 64, 3))
    forward = module.flops(model, 64)
    dense = 2.0 * (model.feature_channels * 16 + 16 * 5)
    first_conv = module.conv_ops(model, 64)[0].flops("full")
    assert module.flops(model, 64, "frozen") == pytest.approx(forward + 2 * dense)
    assert module.flops(model, 64, "train") == pytest.approx(3 * forward - first_conv)
    assert 0.5 * forward < module.flops(model, 64, padding="valid") < forward  # padding taps left out
    assert module.flops(model, (64, 96)) > forward
    with pytest.raises(ValueError, match="mode"):
        module.flops(model, 64, "backward")
    with pytest.raises(ValueError, match="padding"):
        module.flops(model, 64, padding="same")


#: (arch, mode) cases; the depthwise families' train steps (EfficientNet's 38-53 s, MobileNetV3's
#: 108 s, EfficientNetV2's 82 s, ConvNeXt's 30 s on a loaded 2-core CPU) are marked slow
SLOW_TRAIN = {"efficientnetb0", "convnexttiny", "efficientnetv2b0", "mobilenetv3small"}
CASES = [
    pytest.param(arch, mode, marks=[pytest.mark.slow] if mode == "train" and arch in SLOW_TRAIN else [])
    for arch in sorted(MODULES)
    for mode in MODES
]


@pytest.mark.parametrize("arch, mode", CASES)
def test_analytic_count_matches_xla_cost_analysis(arch, mode):
    """XLA counts convolutions without their zero-padding taps (explicit padding included):
    the analytic ``padding="valid"`` count; see MARGIN for what XLA adds."""
    batch, size = 8, 32
    model = create_model(
        arch, num_classes=5, head_units=(16,), pooling="avg", input_shape=(size, size, 3),
        **OPTIONS.get(arch, {}),
    )  # fmt: skip
    images, labels = jnp.zeros((batch, size, size, 3), jnp.uint8), jnp.zeros((batch,), jnp.int32)
    split = split_model(model, model.trainable_layers("head" if mode == "frozen" else "all"))
    if mode == "forward":
        batch_in = {"image": images, "label": labels, "mask": jnp.ones(batch, bool)}
        xla = compiled_flops(make_eval_step(split), split.trainable, split.frozen, batch_in)
    else:
        optimizer = make_optimizer("sgd", 0.1, momentum=0.0)
        step = make_train_step(split, optimizer)
        xla = compiled_flops(
            step, init_state(split, optimizer), split.frozen, {"image": images, "label": labels}
        )
    analytic = batch * MODULES[arch].flops(model, size, mode, padding="valid")
    margin = MARGIN[arch][MODES.index(mode)]
    print(f"{arch} {mode}: XLA / analytic = {xla / analytic:.4f} (margin {margin})")
    assert analytic <= xla < margin * analytic


# ------------------------------------------------------------------ ResNet V1/V2, DenseNet, ... NASNet
#: ``arch -> (module, the size its ImageNet top takes, a small odd size Keras accepts, published
#: forward multi-adds (billions) at the first size or None, tolerance)``. Published: He et al. 2015
#: table 1 (ResNet-101 7.6, ResNet-152 11.3), torchvision's model table (DenseNet-121 / 169 / 201:
#: 2.83 / 3.36 / 4.29, Inception V3 at 299: 5.71), Howard et al. 2017 table 8 (MobileNet 1.0-224:
#: 569 M), Zoph et al. 2018 table 2 (NASNet-A Mobile 564 M, Large at 331: 23.8 B).
CLASSIC = {
    "resnet101": (resnet, 224, 57, (7.6, 0.05)),
    "resnet152": (resnet, 224, 57, (11.3, 0.05)),
    "resnet50v2": (resnet, 224, 57, None),
    "resnet101v2": (resnet, 224, 57, None),
    "resnet152v2": (resnet, 224, 57, None),
    "densenet121": (densenet, 224, 57, (2.83, 0.01)),
    "densenet169": (densenet, 224, 57, (3.36, 0.01)),
    "densenet201": (densenet, 224, 57, (4.29, 0.01)),
    "xception": (xception, 299, 73, None),
    "inceptionv3": (inception_v3, 299, 77, (5.71, 0.01)),
    "inceptionresnetv2": (inception_resnet_v2, 299, 77, None),
    "mobilenet": (mobilenet_v1, 224, 57, (0.569, 0.001)),
    "nasnetmobile": (nasnet, 224, 57, (0.564, 0.001)),
    "nasnetlarge": (nasnet, 331, 57, (23.8, 0.05)),
}
#: one per family in the quick tier, at its small size (the Keras models at 224-331 px: slow)
CLASSIC_QUICK = ("resnet50v2", "densenet121", "xception", "inceptionv3", "mobilenet", "nasnetmobile")


def _classic_cases():
    for arch, (_, default, small, _) in CLASSIC.items():
        yield pytest.param(arch, default, marks=pytest.mark.slow, id=f"{arch}-{default}")
        quick = arch in CLASSIC_QUICK
        yield pytest.param(arch, small, marks=[] if quick else [pytest.mark.slow], id=f"{arch}-{small}")


@pytest.mark.parametrize("arch, size", list(_classic_cases()))
def test_classic_full_count_equals_keras_layers(arch, size):
    module, default, _, published = CLASSIC[arch]
    theirs = keras_flops(keras_app(arch, True, size))
    ours = module.flops(create_model(arch, input_shape=(size, size, 3)), size)
    assert ours == pytest.approx(theirs, rel=1e-12)
    if size == default:
        print(f"{arch}: {theirs / 2e9:.3f} GMACs forward at {size}x{size}")
        if published is not None:
            assert theirs / 2e9 == pytest.approx(published[0], abs=published[1])


@pytest.mark.parametrize("arch", CLASSIC_QUICK)
def test_classic_train_frozen_and_valid_counts(arch):
    module, _, small, _ = CLASSIC[arch]
    size = max(small, 64)
    model = create_model(arch, num_classes=5, head_units=(16,), pooling="avg", input_shape=(size, size, 3))
    forward = module.flops(model, size)
    dense = 2.0 * (model.feature_channels * 16 + 16 * 5)
    first_conv = module.conv_ops(model, size)[0].flops("full")
    assert module.flops(model, size, "frozen") == pytest.approx(forward + 2 * dense)
    assert module.flops(model, size, "train") == pytest.approx(3 * forward - first_conv)
    assert 0.5 * forward < module.flops(model, size, padding="valid") <= forward
    assert module.flops(model, (size, size + 32)) > forward
