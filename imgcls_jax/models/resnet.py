"""ResNet50 (``keras.applications.ResNet50``, the v1 "caffe" variant) in Flax NNX with Keras's
layer names.

Stem ``conv1``: ``ZeroPadding2D(3)`` + 7x7/2 ``conv1_conv`` + ``conv1_bn`` + ReLU, then
``ZeroPadding2D(1)`` + 3x3/2 max pooling. Four stages ``conv2``..``conv5`` of bottleneck blocks
``conv{s}_block{b}``: 1x1 ``_1_conv`` (carrying the stage's stride, 2 from ``conv3`` on), 3x3 SAME
``_2_conv``, 1x1 ``_3_conv`` (4x the filters), each followed by its ``_bn`` (ReLU after the first
two), added to the shortcut (the first block's is a strided 1x1 ``_0_conv`` + ``_0_bn``) and
ReLU. Convolutions have biases. BatchNorm: epsilon 1.001e-5, momentum 0.99 (Keras's default).
Inputs are normalised with ``"caffe"`` preprocessing, as Keras's ImageNet weights expect.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.convnet import (
    ConvOp,
    KerasConvNet,
    batch_norm,
    conv,
    count_flops,
    max_pool_3x3_s2,
    same_pads,
)

#: ``(stage, bottleneck filters, blocks, stride of its first block)``; outputs 4x the filters.
STACKS = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = ("conv1", *(stage for stage, *_ in STACKS))
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99


def _pool_size(n: int) -> int:
    """Map size after the stem (7x7/2 conv on 3-padded input, then 3x3/2 pool on 1-padded)."""
    n = (n + 6 - 7) // 2 + 1
    return (n + 2 - 3) // 2 + 1


class ResNet50(KerasConvNet):
    """``keras.applications.ResNet50`` (top, transfer head or features; see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages: ``conv1`` (stem), ``conv2`` ..
    ``conv5``; features ``[N, h, w, 2048]`` with ``h = ceil(H / 32)`` for ``H`` a multiple of 32.
    Any input of at least 32x32 (Keras's rule)."""

    feature_channels = 2048
    #: the published top file's dense layer is ``probs`` (keras-applications' ``resnet_common``)
    keras_aliases = {"predictions": ("probs",)}

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
        preprocessing: str = "caffe",
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self._setup(
            "resnet50", include_top=include_top, pooling=pooling, num_classes=num_classes,
            head_units=head_units, dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing, conv_impl=conv_impl,
        )  # fmt: skip
        options = dict(dtype=self.dtype, impl=self.conv_impl, rngs=rngs)
        self.conv1_conv = conv(3, 64, 7, strides=2, padding=((3, 3), (3, 3)), **options)
        self.conv1_bn = self._bn(64, rngs)
        cin = 64
        for stage, filters, blocks, stride in STACKS:
            for b in range(1, blocks + 1):
                name, s = f"{stage}_block{b}", stride if b == 1 else 1
                if b == 1:
                    setattr(self, f"{name}_0_conv", conv(cin, 4 * filters, 1, strides=s, **options))
                    setattr(self, f"{name}_0_bn", self._bn(4 * filters, rngs))
                setattr(self, f"{name}_1_conv", conv(cin, filters, 1, strides=s, **options))
                setattr(self, f"{name}_1_bn", self._bn(filters, rngs))
                setattr(self, f"{name}_2_conv", conv(filters, filters, 3, padding="SAME", **options))
                setattr(self, f"{name}_2_bn", self._bn(filters, rngs))
                setattr(self, f"{name}_3_conv", conv(filters, 4 * filters, 1, **options))
                setattr(self, f"{name}_3_bn", self._bn(4 * filters, rngs))
                cin = 4 * filters
        self._build_head(rngs)

    @staticmethod
    def _bn(features: int, rngs: nnx.Rngs) -> nnx.BatchNorm:
        return batch_norm(features, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``("conv1", ("conv1_conv", "conv1_bn")), ("conv2", ("conv2_block1_0_conv", ...)), ...``"""
        out = [("conv1", ("conv1_conv", "conv1_bn"))]
        for stage, _, blocks, _ in STACKS:
            layers = []
            for b in range(1, blocks + 1):
                parts = ("0", "1", "2", "3") if b == 1 else ("1", "2", "3")
                layers += [f"{stage}_block{b}_{p}_{kind}" for p in parts for kind in ("conv", "bn")]
            out.append((stage, tuple(layers)))
        return tuple(out)

    def feature_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the ``conv5`` map for input ``(H, W)``: the stem, then three stride-2
        1x1 convolutions (VALID: ``n -> (n - 1) // 2 + 1``)."""
        out = []
        for n in image_size:
            n = _pool_size(n)
            for _ in range(3):
                n = (n - 1) // 2 + 1
            out.append(n)
        return tuple(out)

    def backbone(self, x: jax.Array) -> jax.Array:
        """Caffe-preprocessed images ``[N, H, W, 3]`` -> the ``conv5`` map ``[N, h, w, 2048]``."""
        x = nnx.relu(self.bn("conv1_bn", self.conv1_conv(x)))
        x = max_pool_3x3_s2(x)  # pool1_pad + pool1_pool
        for stage, _, blocks, _ in STACKS:
            for b in range(1, blocks + 1):
                x = self._block(f"{stage}_block{b}", x, shortcut_conv=b == 1)
        return x

    def _block(self, name: str, x: jax.Array, shortcut_conv: bool) -> jax.Array:
        layer = lambda part: getattr(self, f"{name}_{part}")  # noqa: E731
        shortcut = self.bn(f"{name}_0_bn", layer("0_conv")(x)) if shortcut_conv else x
        y = nnx.relu(self.bn(f"{name}_1_bn", layer("1_conv")(x)))
        y = nnx.relu(self.bn(f"{name}_2_bn", layer("2_conv")(y)))
        y = self.bn(f"{name}_3_bn", layer("3_conv")(y))
        return nnx.relu(shortcut + y)


def conv_ops(image_size: int | tuple[int, int]) -> list[ConvOp]:
    """ResNet50's convolutions for one ``image_size`` input, in forward order (for :func:`flops`)."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    ops = [ConvOp(h, w, 7, 2, ((3, 3), (3, 3)), 3, 64)]
    h, w, cin = _pool_size(h), _pool_size(w), 64
    for _, filters, blocks, stride in STACKS:
        for b in range(1, blocks + 1):
            s = stride if b == 1 else 1
            if b == 1:
                ops.append(ConvOp(h, w, 1, s, ((0, 0), (0, 0)), cin, 4 * filters))
            first = ConvOp(h, w, 1, s, ((0, 0), (0, 0)), cin, filters)
            h, w = first.out
            pads = (same_pads(h, 3, 1), same_pads(w, 3, 1))
            ops += [
                first,
                ConvOp(h, w, 3, 1, pads, filters, filters),
                ConvOp(h, w, 1, 1, ((0, 0), (0, 0)), filters, 4 * filters),
            ]
            cin = 4 * filters
    return ops


def flops(
    model: ResNet50, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): convolutions and the
    dense layers of its top or head; BatchNorm, ReLU, additions, pooling and the optimizer are
    left out.

    Args:
      model: a :class:`ResNet50` (its head is counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``, ``"train"`` (forward + weight and input gradients of every layer, no
        input gradient of ``conv1_conv``) or ``"frozen"`` (backbone forward, the head's forward
        and both gradients).
      padding: ``"full"`` (every output position does ``k x k`` taps, the textbook count, the
        stem's 3-pixel zero padding included) or ``"valid"`` (taps on zero padding left out, as
        XLA's cost analysis counts convolutions).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(image_size), mode, padding)
