"""MobileNetV2 (``keras.applications.MobileNetV2``, width multiplier ``alpha=1.0``) in Flax NNX
with Keras's layer names.

Stem ``Conv1`` (3x3/2 SAME, 32 filters, no bias) + ``bn_Conv1`` + ReLU6; 17 inverted residual
blocks (``expanded_conv``, ``block_1`` .. ``block_16``): 1x1 ``_expand`` (6x the channels; not in
the first block) + ``_expand_BN`` + ReLU6, 3x3 ``_depthwise`` + ``_depthwise_BN`` + ReLU6 (stride
2: Keras's ``correct_pad`` zero padding then VALID; stride 1: SAME), 1x1 ``_project`` +
``_project_BN`` (linear), plus the input when shapes allow; then 1x1 ``Conv_1`` (1280) +
``Conv_1_bn`` + ReLU6. No convolution has a bias; kernels start as Keras's (glorot uniform).
BatchNorm: epsilon 1e-3, momentum 0.999, in float32 under bfloat16 compute too. Inputs are
normalised with ``"tf"`` preprocessing (to [-1, 1]), as Keras's ImageNet weights expect. The
top, head and weight mapping are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s; the
depthwise convolutions :class:`~imgcls_jax.models.layers.DepthwiseConv2D` (``depthwise_impl``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.conv import check_impl, depthwise_impl_for
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, same_pads, square
from imgcls_jax.models.layers import (
    BatchNorm,
    DepthwiseConv2D,
    choose_depthwise_impl,
    conv2d,
    correct_pad,
    init_glorot_kernels,
)

#: ``(expansion, output channels, stride)`` of the inverted residual blocks 0..16 (alpha 1.0).
BLOCKS = (
    (1, 16, 1), (6, 24, 2), (6, 24, 1), (6, 32, 2), (6, 32, 1), (6, 32, 1), (6, 64, 2), (6, 64, 1),
    (6, 64, 1), (6, 64, 1), (6, 96, 1), (6, 96, 1), (6, 96, 1), (6, 160, 2), (6, 160, 1), (6, 160, 1),
    (6, 320, 1),
)  # fmt: skip
STEM_FILTERS = 32
LAST_FILTERS = 1280
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.999
relu6 = jax.nn.relu6


def block_prefix(i: int) -> str:
    """Keras's name prefix of inverted residual block ``i``."""
    return "expanded_conv" if i == 0 else f"block_{i}"


#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = ("Conv1", *(block_prefix(i) for i in range(len(BLOCKS))), "Conv_1")


def _block_layers(i: int) -> tuple[str, ...]:
    parts = ("depthwise", "depthwise_BN", "project", "project_BN")
    return tuple(f"{block_prefix(i)}_{p}" for p in (("expand", "expand_BN") if i else ()) + parts)


def _depthwise_pads(size: tuple[int, int], stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras's padding of a 3x3 depthwise convolution: ``correct_pad`` at stride 2 (then VALID),
    SAME at stride 1."""
    return correct_pad(size, 3) if stride == 2 else ((1, 1), (1, 1))


class MobileNetV2(KerasConvNet):
    """``keras.applications.MobileNetV2(alpha=1.0)`` (top, transfer head or features; see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages, named as Keras's layers: ``Conv1``
    (stem), ``expanded_conv``, ``block_1`` .. ``block_16``, ``Conv_1``; features
    ``[N, ceil(H / 32), ceil(W / 32), 1280]``. Any input of at least 32x32 (Keras's rule). Other
    widths (``alpha``) are not implemented: ``ValueError``. ``conv_impl``: how every convolution
    runs (:mod:`imgcls_jax.models.conv`); ``depthwise_impl``: the depthwise ones, when not
    ``"auto"`` (:func:`~imgcls_jax.models.conv.depthwise_impl_for`)."""

    preprocessing = "tf"
    #: keras-applications' MobileNetV2 named its top ``Logits``, which its published files keep
    keras_aliases = {"predictions": ("Logits",)}

    def __init__(
        self,
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str = "tf",
        alpha: float = 1.0,
        conv_impl: str = "auto",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if alpha != 1.0:
            raise ValueError(
                f"mobilenetv2: alpha={alpha!r} is not implemented; only alpha=1.0 (Keras's default "
                "width, the one with published weights at every input size) is"
            )
        self._setup(
            "mobilenetv2", include_top=include_top, pooling=pooling, num_classes=num_classes,
            head_units=head_units, dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing,
        )  # fmt: skip
        self.alpha = 1.0
        self.conv_impl = check_impl(conv_impl)
        self.depthwise_impl = choose_depthwise_impl(depthwise_impl)  # checks the name
        dw_impl = depthwise_impl_for(conv_impl, depthwise_impl)
        self.Conv1 = self._conv(3, STEM_FILTERS, 3, rngs, strides=2, padding="SAME")
        self.bn_Conv1 = self._bn(STEM_FILTERS, rngs)
        cin = STEM_FILTERS
        for i, (expansion, cout, _) in enumerate(BLOCKS):
            p, width = block_prefix(i), expansion * cin
            if i:
                setattr(self, f"{p}_expand", self._conv(cin, width, 1, rngs))
                setattr(self, f"{p}_expand_BN", self._bn(width, rngs))
            setattr(self, f"{p}_depthwise", DepthwiseConv2D(width, 3, dtype=self.dtype, impl=dw_impl))
            setattr(self, f"{p}_depthwise_BN", self._bn(width, rngs))
            setattr(self, f"{p}_project", self._conv(width, cout, 1, rngs))
            setattr(self, f"{p}_project_BN", self._bn(cout, rngs))
            cin = cout
        self.Conv_1 = self._conv(cin, LAST_FILTERS, 1, rngs)
        self.Conv_1_bn = self._bn(LAST_FILTERS, rngs)
        init_glorot_kernels(self.conv_kernels(), rngs.params())
        self._build_head(LAST_FILTERS, rngs)

    def _conv(self, cin: int, cout: int, k: int, rngs: nnx.Rngs, **options) -> nnx.Conv:
        return conv2d(cin, cout, k, use_bias=False, dtype=self.dtype, conv_impl=self.conv_impl, rngs=rngs,
                      **options)  # fmt: skip

    @staticmethod
    def _bn(channels: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(channels, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``("Conv1", ("Conv1", "bn_Conv1")), ("expanded_conv", (...)), ("block_1", (...)), ...,
        ("Conv_1", ("Conv_1", "Conv_1_bn"))``."""
        blocks = tuple((block_prefix(i), _block_layers(i)) for i in range(len(BLOCKS)))
        return (("Conv1", ("Conv1", "bn_Conv1")), *blocks, ("Conv_1", ("Conv_1", "Conv_1_bn")))

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """tf-preprocessed images ``[N, H, W, 3]`` -> the ``out_relu`` map ``[N, h, w, 1280]``
        (``dropout_key`` unused: no stochastic layer in the backbone)."""
        x = relu6(self.bn_Conv1(self.Conv1(x)))
        for i in range(len(BLOCKS)):
            x = self._block(i, x)
        return relu6(self.Conv_1_bn(self.Conv_1(x)))

    def _block(self, i: int, x: jax.Array) -> jax.Array:
        """Keras's ``_inverted_res_block``: expand, depthwise (padded as Keras pads it), project,
        and the input added when the shapes allow (stride 1, as many channels)."""
        p, stride = block_prefix(i), BLOCKS[i][2]

        def bn(name, y):
            return getattr(self, f"{p}_{name}_BN")(y)

        y = relu6(bn("expand", getattr(self, f"{p}_expand")(x))) if i else x
        y = jnp.pad(y, ((0, 0), *_depthwise_pads(y.shape[1:3], stride), (0, 0)))
        y = relu6(bn("depthwise", getattr(self, f"{p}_depthwise")(y, stride)))
        y = bn("project", getattr(self, f"{p}_project")(y))
        return x + y if x.shape == y.shape else y


def conv_ops(model: MobileNetV2, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """MobileNetV2's convolutions for one ``image_size`` input, in forward order (for :func:`flops`;
    ``model`` is there for the signature every family's ``conv_ops`` has: this one is fixed)."""
    h, w = square(image_size)
    ops = [ConvOp(h, w, 3, 2, (same_pads(h, 3, 2), same_pads(w, 3, 2)), 3, STEM_FILTERS)]
    (h, w), cin = ops[0].out, STEM_FILTERS
    for i, (expansion, cout, stride) in enumerate(BLOCKS):
        width = expansion * cin
        if i:
            ops.append(ConvOp(h, w, 1, 1, NO_PADDING, cin, width))
        ops.append(ConvOp(h, w, 3, stride, _depthwise_pads((h, w), stride), width, width, groups=width))
        (h, w), cin = ops[-1].out, cout
        ops.append(ConvOp(h, w, 1, 1, NO_PADDING, width, cout))
    return [*ops, ConvOp(h, w, 1, 1, NO_PADDING, cin, LAST_FILTERS)]


def flops(
    model: MobileNetV2, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): convolutions (depthwise
    ones at ``k * k`` multiply-adds per output) and the dense layers of its top or head;
    BatchNorm, ReLU6, additions, pooling and the optimizer are left out.

    Args:
      model: a :class:`MobileNetV2` (its head is counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``, ``"train"`` (forward + weight and input gradients of every layer, no
        input gradient of ``Conv1``) or ``"frozen"`` (backbone forward, the head's forward and
        both gradients).
      padding: ``"full"`` (every output position does ``k x k`` taps, the textbook count) or
        ``"valid"`` (taps on zero padding left out, as XLA's cost analysis counts convolutions).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(model, image_size), mode, padding)
