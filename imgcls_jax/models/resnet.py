"""ResNet50 / 101 / 152 (``keras.applications.ResNet50`` ..., v1, "caffe") and ResNet50V2 / 101V2 /
152V2 (``keras.applications.ResNet50V2`` ..., pre-activation, "tf") in Flax NNX with Keras's layer
names: one file, as Keras builds both from one ``ResNet`` function with ``preact`` on or off.

Stem ``conv1``: ``ZeroPadding2D(3)`` + 7x7/2 ``conv1_conv`` (with bias) + (v1 only) ``conv1_bn`` +
ReLU, then ``ZeroPadding2D(1)`` + 3x3/2 max pooling (the padding is zeros, as Keras's, also in v2
where the map before it can be negative). Four stages ``conv2``..``conv5`` of bottleneck blocks
``conv{s}_block{b}`` (:data:`VARIANTS`: how many blocks each stage has; 4x the filters out):

* v1: 1x1 ``_1_conv`` (carrying the stage's stride, 2 from ``conv3`` on, in its first block),
  3x3 SAME ``_2_conv``, 1x1 ``_3_conv``, each followed by its ``_bn`` (ReLU after the first two),
  added to the shortcut (the first block's is a strided 1x1 ``_0_conv`` + ``_0_bn``) and ReLU.
  Every convolution has a bias.
* v2 (pre-activation): ``_preact_bn`` + ReLU first; the first block's shortcut is a 1x1
  ``_0_conv`` (bias, no BatchNorm) of that, the others' the input itself (subsampled by
  ``MaxPooling2D(1, stride)`` in a strided block); 1x1 ``_1_conv`` + ``_1_bn`` + ReLU,
  ``ZeroPadding2D(1)`` + 3x3 ``_2_conv`` (VALID, carrying the stride: 2 in the *last* block of
  ``conv2``..``conv4``, none in ``conv5``) + ``_2_bn`` + ReLU, 1x1 ``_3_conv`` (bias), added to the
  shortcut, no activation. ``_1_conv`` and ``_2_conv`` have no bias. After ``conv5``: ``post_bn``
  + ReLU (part of stage ``conv5`` here).

BatchNorm: epsilon 1.001e-5, momentum 0.99 (Keras's default), in float32 under bfloat16 compute
too. Kernels start as Keras's (glorot uniform), biases at zero. The top, head and weight mapping
are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from imgcls_jax.models.conv import check_impl
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, same_pads, square
from imgcls_jax.models.layers import BatchNorm, conv2d, init_glorot_kernels


@dataclass(frozen=True)
class Variant:
    """``v2``: pre-activation (ResNetV2); ``blocks``: the blocks of ``conv2``..``conv5``."""

    v2: bool
    blocks: tuple[int, int, int, int]


#: Keras's ``stack_fn`` of each application.
VARIANTS = {
    "resnet50": Variant(False, (3, 4, 6, 3)),
    "resnet101": Variant(False, (3, 4, 23, 3)),
    "resnet152": Variant(False, (3, 8, 36, 3)),
    "resnet50v2": Variant(True, (3, 4, 6, 3)),
    "resnet101v2": Variant(True, (3, 4, 23, 3)),
    "resnet152v2": Variant(True, (3, 8, 36, 3)),
}
#: Bottleneck filters of ``conv2``..``conv5``; each block outputs 4x these.
FILTERS = (64, 128, 256, 512)
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = ("conv1", "conv2", "conv3", "conv4", "conv5")
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99
FEATURES = 2048


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Keras's ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, strides=2)`` (VALID): ``[N, H, W, C]`` ->
    ``[N, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]``. The padding is zeros, as Keras's."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def block_stride(variant: Variant, stage: int, block: int) -> int:
    """The stride of block ``block`` (1-based) of stage ``stage`` (0 = ``conv2``): v1 strides in
    the first block of ``conv3``..``conv5``, v2 in the last block of ``conv2``..``conv4``."""
    if variant.v2:
        return 2 if stage < 3 and block == variant.blocks[stage] else 1
    return 2 if stage > 0 and block == 1 else 1


def block_layers(variant: Variant, name: str, block: int) -> tuple[str, ...]:
    """The weighted layers of block ``name`` (the ``block``-th of its stage), in Keras's order."""
    if variant.v2:
        parts = (
            "preact_bn",
            *(("0_conv",) if block == 1 else ()),
            "1_conv",
            "1_bn",
            "2_conv",
            "2_bn",
            "3_conv",
        )
    else:
        parts = tuple(
            f"{p}_{kind}" for p in (("0",) if block == 1 else ()) + ("1", "2", "3") for kind in ("conv", "bn")
        )
    return tuple(f"{name}_{p}" for p in parts)


class ResNet(KerasConvNet):
    """``keras.applications.ResNet50`` ... ``ResNet152V2`` (``arch``, a key of :data:`VARIANTS`;
    top, transfer head or features: see :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages
    ``conv1`` (stem) .. ``conv5``; features ``[N, ceil(H / 32), ceil(W / 32), 2048]``. Any input of
    at least 32x32 (Keras's rule). Preprocessing: ``"caffe"`` (v1), ``"tf"`` (v2), as Keras's
    ImageNet weights expect. ``conv_impl``: how the convolutions run (:mod:`imgcls_jax.models.conv`:
    ``"auto"``, ``"xla"``, ``"im2col"`` (the 3x3 stride-1 ones), ``"onednn"``)."""

    #: the published top file's dense layer is ``probs`` (keras-applications' ``resnet_common``)
    keras_aliases = {"predictions": ("probs",)}

    def __init__(
        self,
        arch: str = "resnet50",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str | None = None,
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(f"unknown ResNet architecture {arch!r}; expected one of {sorted(VARIANTS)}")
        self.variant = VARIANTS[arch]
        self.preprocessing = "tf" if self.variant.v2 else "caffe"
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, preprocessing=preprocessing,
        )  # fmt: skip
        self.conv_impl = check_impl(conv_impl)
        self.conv1_conv = conv2d(3, 64, 7, strides=2, use_bias=True, dtype=self.dtype,
                                 conv_impl=self.conv_impl, rngs=rngs)  # fmt: skip
        if not self.variant.v2:
            self.conv1_bn = self._bn(64, rngs)
        cin = 64
        for stage, (filters, blocks) in enumerate(zip(FILTERS, self.variant.blocks)):
            for b in range(1, blocks + 1):
                name = f"{STAGE_NAMES[stage + 1]}_block{b}"
                for layer in block_layers(self.variant, name, b):
                    setattr(
                        self,
                        layer,
                        self._layer(layer, cin, filters, block_stride(self.variant, stage, b), rngs),
                    )
                cin = 4 * filters
        if self.variant.v2:
            self.post_bn = self._bn(FEATURES, rngs)
        init_glorot_kernels(self.conv_kernels(), rngs.params())
        self._build_head(FEATURES, rngs)

    @staticmethod
    def _bn(channels: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(channels, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    def _layer(self, layer: str, cin: int, filters: int, stride: int, rngs: nnx.Rngs) -> nnx.Module:
        """Block layer ``layer`` (``..._{part}_{kind}``) of a block taking ``cin`` channels."""
        part, kind = layer.rsplit("_", 2)[-2:]
        if part == "preact":
            return self._bn(cin, rngs)
        cout = 4 * filters if part in ("0", "3") else filters
        if kind == "bn":
            return self._bn(cout, rngs)
        v2 = self.variant.v2
        fin = cin if part in ("0", "1") else filters
        bias = not v2 or part in ("0", "3")
        if part == "2" and (v2 and stride == 1 or not v2):  # 3x3, stride 1: ZeroPadding2D(1) / SAME
            return conv2d(fin, cout, 3, padding=((1, 1), (1, 1)), use_bias=bias, dtype=self.dtype, rngs=rngs,
                          conv_impl=self.conv_impl)  # fmt: skip
        if part == "2":  # v2's strided 3x3 after ZeroPadding2D(1)
            return conv2d(fin, cout, 3, strides=2, padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                          conv_impl=self.conv_impl, rngs=rngs)  # fmt: skip
        strides = stride if not v2 and part in ("0", "1") else 1
        return conv2d(fin, cout, 1, strides=strides, use_bias=bias, dtype=self.dtype,
                      conv_impl=self.conv_impl, rngs=rngs)  # fmt: skip

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``("conv1", ("conv1_conv", ...)), ("conv2", ("conv2_block1_...", ...)), ...``; v2's
        ``post_bn`` closes ``conv5``."""
        out = [("conv1", ("conv1_conv",) if self.variant.v2 else ("conv1_conv", "conv1_bn"))]
        for stage, blocks in zip(STAGE_NAMES[1:], self.variant.blocks):
            layers = [
                n for b in range(1, blocks + 1) for n in block_layers(self.variant, f"{stage}_block{b}", b)
            ]
            out.append((stage, tuple(layers)))
        if self.variant.v2:
            out[-1] = ("conv5", (*out[-1][1], "post_bn"))
        return tuple(out)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Preprocessed images ``[N, H, W, 3]`` -> the last map ``[N, h, w, 2048]`` (``conv5_out``
        for v1, ``post_relu`` for v2; ``dropout_key`` unused: no stochastic layer)."""
        x = self.conv1_conv(jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0))))  # conv1_pad
        if not self.variant.v2:
            x = nnx.relu(self.conv1_bn(x))
        x = max_pool_3x3_s2(x)  # pool1_pad + pool1_pool
        for stage, blocks in enumerate(self.variant.blocks):
            for b in range(1, blocks + 1):
                name = f"{STAGE_NAMES[stage + 1]}_block{b}"
                if self.variant.v2:
                    x = self._block_v2(name, x, b == 1, block_stride(self.variant, stage, b))
                else:
                    x = self._block_v1(name, x, b == 1)
        return nnx.relu(self.post_bn(x)) if self.variant.v2 else x

    def _block_v1(self, name: str, x: jax.Array, shortcut_conv: bool) -> jax.Array:
        def conv_bn(part, y):
            return getattr(self, f"{name}_{part}_bn")(getattr(self, f"{name}_{part}_conv")(y))

        shortcut = conv_bn("0", x) if shortcut_conv else x
        y = nnx.relu(conv_bn("1", x))
        y = nnx.relu(conv_bn("2", y))
        return nnx.relu(shortcut + conv_bn("3", y))

    def _block_v2(self, name: str, x: jax.Array, shortcut_conv: bool, stride: int) -> jax.Array:
        def layer(part):
            return getattr(self, f"{name}_{part}")

        preact = nnx.relu(layer("preact_bn")(x))
        if shortcut_conv:
            shortcut = layer("0_conv")(preact)
        else:  # MaxPooling2D(1, strides=stride): every stride-th pixel
            shortcut = x[:, ::stride, ::stride] if stride > 1 else x
        y = nnx.relu(layer("1_bn")(layer("1_conv")(preact)))
        y = nnx.relu(layer("2_bn")(layer("2_conv")(y)))
        return shortcut + layer("3_conv")(y)


class ResNet50(ResNet):
    """``keras.applications.ResNet50``: :class:`ResNet` ``"resnet50"``."""

    def __init__(self, **options):
        super().__init__("resnet50", **options)


def conv_ops(model: ResNet, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions for one ``image_size`` input, in forward order, padded as the model
    pads them (for :func:`flops`)."""
    variant = model.variant
    h, w = square(image_size)
    ops = [ConvOp(h, w, 7, 2, ((3, 3), (3, 3)), 3, 64)]
    h, w = (-(-n // 2) for n in ops[0].out)  # pool1: 3x3/2 on the 1-padded map
    cin = 64
    for stage, (filters, blocks) in enumerate(zip(FILTERS, variant.blocks)):
        for b in range(1, blocks + 1):
            s = block_stride(variant, stage, b)
            if b == 1:  # the shortcut convolution (v1: strided; v2: never strided)
                ops.append(ConvOp(h, w, 1, 1 if variant.v2 else s, NO_PADDING, cin, 4 * filters))
            first = ConvOp(h, w, 1, 1 if variant.v2 else s, NO_PADDING, cin, filters)
            h, w = first.out
            pads = ((1, 1), (1, 1)) if variant.v2 else (same_pads(h, 3, 1), same_pads(w, 3, 1))
            middle = ConvOp(h, w, 3, s if variant.v2 else 1, pads, filters, filters)
            h, w = middle.out
            ops += [first, middle, ConvOp(h, w, 1, 1, NO_PADDING, filters, 4 * filters)]
            cin = 4 * filters
    return ops


def flops(
    model: ResNet, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): convolutions and the
    dense layers of its top or head; BatchNorm, ReLU, additions, pooling and the optimizer are
    left out.

    Args:
      model: a :class:`ResNet` (its variant and head are counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``, ``"train"`` (forward + weight and input gradients of every layer, no
        input gradient of ``conv1_conv``) or ``"frozen"`` (backbone forward, the head's forward
        and both gradients).
      padding: ``"full"`` (every output position does ``k x k`` taps, the textbook count, the
        stem's 3-pixel zero padding included) or ``"valid"`` (taps on zero padding left out, as
        XLA's cost analysis counts convolutions).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(model, image_size), mode, padding)
