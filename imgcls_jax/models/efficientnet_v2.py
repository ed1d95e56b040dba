"""EfficientNetV2 B0 / B1 / B2 / B3 / S / M / L in Flax NNX, layer for layer as
``keras.applications.EfficientNetV2B0`` ... ``EfficientNetV2L``
(``keras/src/applications/efficientnet_v2.py``).

Every Keras layer with weights is an attribute named as Keras names it (``stem_conv``,
``stem_bn``, ``block1a_project_conv``, ``block4b_dwconv2``, ``block4b_se_reduce``, ...,
``top_conv``, ``top_bn``, ``predictions``). What Keras does, and so this port does:

* Preprocessing inside the model (Keras's ``include_preprocessing``, default True): B0-B3
  rescale by 1/255 and normalise with the ImageNet mean and variance (``"torch"``), S/M/L
  rescale to ``x / 128 - 1`` (``"tf128"``). ``include_preprocessing=False``: none, as Keras.
* Stem: 3x3 stride-2 convolution, BatchNorm, swish. Then Keras's block table per variant, its
  filters rounded to multiples of 8 (``round_filters``, without EfficientNet's 10% rule) and its
  repeats scaled by the depth coefficient (``ceil``). Two kinds of blocks:

  - *fused* MBConv (the first stages): a kxk convolution (with the stride) expanding the
    channels, BatchNorm, swish, then a 1x1 projection and BatchNorm; without expansion one kxk
    convolution, BatchNorm and swish;
  - MBConv: 1x1 expansion, BatchNorm, swish, kxk depthwise convolution (``dwconv2``), BatchNorm,
    swish, squeeze-and-excitation (``se_reduce`` with swish, ``se_expand`` with sigmoid; the
    reduced width is ``max(1, int(filters_in * se_ratio))``), 1x1 projection, BatchNorm.

  Stride-1 blocks with as many channels out as in add their input, after stochastic depth
  (Keras's ``Dropout(rate, noise_shape=(None, 1, 1, 1))``, rate ``drop_connect_rate * b / n``
  for block b of n; none in the first block, whose rate is 0).
* Every convolution is SAME (stride 2: TensorFlow's rule, the odd pixel after), without bias
  except squeeze-and-excitation's; BatchNorm epsilon 1e-3 (Keras's default), momentum 0.9.
* Top: 1x1 ``top_conv`` (1280 filters, rounded), BatchNorm, swish; with ``include_top``
  average pooling, ``top_dropout`` (0.2) and ``predictions``.

Stochastic depth is on only while its block is being trained (its ``project_bn`` in training
mode), as EfficientNet's (:mod:`imgcls_jax.models.efficientnet`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

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
    init_conv_kernels,
    squeeze_excite,
    stochastic_depth,
    swish,
)

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.9
MIN_SIZE = 32
DEPTH_DIVISOR = 8

#: Keras's ``DEFAULT_BLOCKS_ARGS`` per block table, one stage a row: (fused, kernel, repeats,
#: filters_in, filters_out, expand_ratio, se_ratio, strides).
_B = (
    (True, 3, 1, 32, 16, 1, 0.0, 1),
    (True, 3, 2, 16, 32, 4, 0.0, 2),
    (True, 3, 2, 32, 48, 4, 0.0, 2),
    (False, 3, 3, 48, 96, 4, 0.25, 2),
    (False, 3, 5, 96, 112, 6, 0.25, 1),
    (False, 3, 8, 112, 192, 6, 0.25, 2),
)
BLOCK_TABLES = {
    "b": _B,
    "s": (
        (True, 3, 2, 24, 24, 1, 0.0, 1),
        (True, 3, 4, 24, 48, 4, 0.0, 2),
        (True, 3, 4, 48, 64, 4, 0.0, 2),
        (False, 3, 6, 64, 128, 4, 0.25, 2),
        (False, 3, 9, 128, 160, 6, 0.25, 1),
        (False, 3, 15, 160, 256, 6, 0.25, 2),
    ),
    "m": (
        (True, 3, 3, 24, 24, 1, 0.0, 1),
        (True, 3, 5, 24, 48, 4, 0.0, 2),
        (True, 3, 5, 48, 80, 4, 0.0, 2),
        (False, 3, 7, 80, 160, 4, 0.25, 2),
        (False, 3, 14, 160, 176, 6, 0.25, 1),
        (False, 3, 18, 176, 304, 6, 0.25, 2),
        (False, 3, 5, 304, 512, 6, 0.25, 1),
    ),
    "l": (
        (True, 3, 4, 32, 32, 1, 0.0, 1),
        (True, 3, 7, 32, 64, 4, 0.0, 2),
        (True, 3, 7, 64, 96, 4, 0.0, 2),
        (False, 3, 10, 96, 192, 4, 0.25, 2),
        (False, 3, 19, 192, 224, 6, 0.25, 1),
        (False, 3, 25, 224, 384, 6, 0.25, 2),
        (False, 3, 7, 384, 640, 6, 0.25, 1),
    ),
}


@dataclass(frozen=True)
class Variant:
    """Keras's ``EfficientNetV2(width_coefficient, depth_coefficient, default_size)`` with its
    block table (``"b"``, ``"s"``, ``"m"``, ``"l"``) and the preprocessing its weights expect."""

    width: float
    depth: float
    default_size: int
    table: str
    preprocessing: str
    dropout_rate: float = 0.2
    drop_connect_rate: float = 0.2


#: Registry name -> variant (Keras's ``EfficientNetV2B0`` ... ``EfficientNetV2L``).
VARIANTS = {
    "efficientnetv2b0": Variant(1.0, 1.0, 224, "b", "torch"),
    "efficientnetv2b1": Variant(1.0, 1.1, 240, "b", "torch"),
    "efficientnetv2b2": Variant(1.1, 1.2, 260, "b", "torch"),
    "efficientnetv2b3": Variant(1.2, 1.4, 300, "b", "torch"),
    "efficientnetv2s": Variant(1.0, 1.0, 384, "s", "tf128"),
    "efficientnetv2m": Variant(1.0, 1.0, 480, "m", "tf128"),
    "efficientnetv2l": Variant(1.0, 1.0, 480, "l", "tf128"),
}


def round_filters(filters: float, width: float) -> int:
    """Keras's ``efficientnet_v2.round_filters``: ``filters * width`` to the nearest multiple of
    8, at least 8."""
    filters *= width
    return int(max(DEPTH_DIVISOR, int(filters + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR))


@dataclass(frozen=True)
class Block:
    """One block: Keras's name prefix (``"block4b_"``), stage (1-based) and shapes."""

    prefix: str
    stage: int
    fused: bool
    kernel: int
    strides: int
    filters_in: int
    filters_out: int
    expand_ratio: int
    se_ratio: float
    drop_rate: float

    @property
    def filters(self) -> int:
        return self.filters_in * self.expand_ratio

    @property
    def se_filters(self) -> int:
        return max(1, int(self.filters_in * self.se_ratio)) if 0 < self.se_ratio <= 1 else 0

    @property
    def residual(self) -> bool:
        return self.strides == 1 and self.filters_in == self.filters_out

    @property
    def layers(self) -> tuple[str, ...]:
        """Its weighted layers, in Keras's order."""
        p, names = self.prefix, []
        if self.expand_ratio != 1:
            names += [f"{p}expand_conv", f"{p}expand_bn"]
        if not self.fused:
            names += [f"{p}dwconv2", f"{p}bn"]
        if self.se_filters:
            names += [f"{p}se_reduce", f"{p}se_expand"]
        return (*names, f"{p}project_conv", f"{p}project_bn")


def blocks(arch: str, drop_connect_rate: float | None = None) -> list[Block]:
    """The blocks of ``arch`` in order, as Keras's ``EfficientNetV2`` builds them."""
    variant = VARIANTS[arch]
    rate = variant.drop_connect_rate if drop_connect_rate is None else drop_connect_rate
    table = BLOCK_TABLES[variant.table]
    total = float(sum(math.ceil(variant.depth * row[2]) for row in table))
    out, b = [], 0
    for stage, (fused, kernel, repeats, fin, fout, expand, se, strides) in enumerate(table, 1):
        fin, fout = round_filters(fin, variant.width), round_filters(fout, variant.width)
        for j in range(math.ceil(variant.depth * repeats)):
            out.append(
                Block(f"block{stage}{chr(j + 97)}_", stage, fused, kernel, strides if j == 0 else 1,
                      fin if j == 0 else fout, fout, expand, se, rate * b / total)
            )  # fmt: skip
            b += 1
    return out


def stages(arch: str) -> tuple[str, ...]:
    """``stem``, ``block1`` ... ``block<n>``, ``top``: the stage names of ``arch``."""
    n = len(BLOCK_TABLES[VARIANTS[arch].table])
    return ("stem", *(f"block{i}" for i in range(1, n + 1)), "top")


class EfficientNetV2(KerasConvNet):
    """``keras.applications.EfficientNetV2<Variant>`` (``arch``: ``"efficientnetv2b0"`` ...
    ``"efficientnetv2l"``) with the Keras top, a transfer head, or no head (see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`).

    * ``include_top=True``: ``avg_pool``, ``top_dropout`` (``top_dropout``, default Keras's 0.2;
      none at 0) and ``predictions`` (``num_classes``, default 1000).
    * ``include_top=False``: the ``top_activation`` map ``float32[N, ceil(H / 32), ceil(W / 32),
      C]`` (C = 1280 for B0), pooled with ``pooling``, or a transfer head.

    Inputs: raw RGB ``[N, H, W, 3]`` in [0, 255], H and W >= 32. ``include_preprocessing``: see
    the module docstring. ``drop_connect_rate``: stochastic depth (default Keras's 0.2).
    ``conv_impl``: how every convolution computes (:mod:`imgcls_jax.models.conv`);
    ``depthwise_impl``: how depthwise convolutions compute
    (:func:`~imgcls_jax.models.conv.depthwise_impl_for`). Dropout keys: ``fold_in(dropout_key,
    i)``, i the head dropout's index (0 for the top's), ``1000 + b`` for block b's stochastic depth.
    """

    min_size = MIN_SIZE
    #: Keras's ``DENSE_KERNEL_INITIALIZER`` for ``predictions``
    top_init = staticmethod(nnx.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform"))

    def __init__(
        self,
        arch: str = "efficientnetv2b0",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str | None = None,
        include_preprocessing: bool = True,
        drop_connect_rate: float | None = None,
        top_dropout: float | None = None,
        conv_impl: str = "auto",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(
                f"unknown EfficientNetV2 architecture {arch!r}; expected one of {sorted(VARIANTS)}"
            )
        variant = VARIANTS[arch]
        self.preprocessing = variant.preprocessing  # the default _setup checks against
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing or variant.preprocessing, include_preprocessing=include_preprocessing,
        )  # fmt: skip
        for key, rate in {"drop_connect_rate": drop_connect_rate, "top_dropout": top_dropout}.items():
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {rate}")
        self.conv_impl = check_impl(conv_impl)
        self.depthwise_impl = depthwise_impl
        self._depthwise = depthwise_impl_for(self.conv_impl, choose_depthwise_impl(depthwise_impl))
        self.blocks = tuple(blocks(arch, drop_connect_rate))
        stem = round_filters(BLOCK_TABLES[variant.table][0][3], variant.width)
        self.stem_conv = self._conv(3, stem, 3, 2, rngs)
        self.stem_bn = self._bn(stem, rngs)
        for block in self.blocks:
            self._block_layers(block, rngs)
        self.top_filters = round_filters(1280, variant.width)
        self.top_conv = self._conv(self.blocks[-1].filters_out, self.top_filters, 1, 1, rngs)
        self.top_bn = self._bn(self.top_filters, rngs)
        init_conv_kernels(self.conv_kernels(), rngs.params())
        rate = variant.dropout_rate if top_dropout is None else top_dropout
        self._build_head(self.top_filters, rngs, top_dropout=rate)
        self.drop_rngs = rngs.dropout.fork()

    def _conv(
        self, cin: int, cout: int, k: int, strides: int, rngs: nnx.Rngs, bias: bool = False
    ) -> nnx.Conv:
        return conv2d(
            cin, cout, k, strides=strides, padding="SAME", use_bias=bias, dtype=self.dtype,
            conv_impl=self.conv_impl, rngs=rngs,
        )  # fmt: skip

    @staticmethod
    def _bn(channels: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(channels, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    def _block_layers(self, block: Block, rngs: nnx.Rngs) -> None:
        p, f = block.prefix, block.filters
        if block.expand_ratio != 1:
            k, s = (block.kernel, block.strides) if block.fused else (1, 1)
            setattr(self, f"{p}expand_conv", self._conv(block.filters_in, f, k, s, rngs))
            setattr(self, f"{p}expand_bn", self._bn(f, rngs))
        if not block.fused:
            setattr(
                self,
                f"{p}dwconv2",
                DepthwiseConv2D(f, block.kernel, dtype=self.dtype, impl=self._depthwise),
            )
            setattr(self, f"{p}bn", self._bn(f, rngs))
        if block.se_filters:
            setattr(self, f"{p}se_reduce", self._conv(f, block.se_filters, 1, 1, rngs, bias=True))
            setattr(self, f"{p}se_expand", self._conv(block.se_filters, f, 1, 1, rngs, bias=True))
        plain = block.fused and block.expand_ratio == 1  # one kxk convolution
        k, s = (block.kernel, block.strides) if plain else (1, 1)
        setattr(self, f"{p}project_conv", self._conv(f, block.filters_out, k, s, rngs))
        setattr(self, f"{p}project_bn", self._bn(block.filters_out, rngs))
        if block.residual and block.drop_rate > 0:
            setattr(self, f"{p}drop", stochastic_depth(block.drop_rate))

    # ------------------------------------------------------------------ Classifier interface
    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``stem`` (stem_conv, stem_bn), ``block1`` ... ``block<n>`` (Keras's prefixes), ``top``
        (top_conv, top_bn)."""
        out = [("stem", ("stem_conv", "stem_bn"))]
        for stage in range(1, self.blocks[-1].stage + 1):
            out.append((f"block{stage}", tuple(n for b in self.blocks if b.stage == stage for n in b.layers)))
        return (*out, ("top", ("top_conv", "top_bn")))

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Preprocessed images -> the ``top_activation`` map ``dtype[N, ceil(H/32), ceil(W/32), C]``."""
        x = swish(self.stem_bn(self.stem_conv(x)))
        for index, block in enumerate(self.blocks):
            x = self._block(block, x, index, dropout_key)
        return swish(self.top_bn(self.top_conv(x)))

    def _block(self, block: Block, inputs: jax.Array, index: int, dropout_key) -> jax.Array:
        """Keras's ``FusedMBConvBlock`` / ``MBConvBlock``."""
        p, x = block.prefix, inputs

        def conv_bn(conv, bn, y):
            return getattr(self, f"{p}{bn}")(getattr(self, f"{p}{conv}")(y))

        if block.expand_ratio != 1:
            x = swish(conv_bn("expand_conv", "expand_bn", x))
        if not block.fused:
            k, s = block.kernel, block.strides
            pads = (same_pads(x.shape[1], k, s), same_pads(x.shape[2], k, s))
            x = swish(
                getattr(self, f"{p}bn")(getattr(self, f"{p}dwconv2")(jnp.pad(x, ((0, 0), *pads, (0, 0))), s))
            )
        if block.se_filters:
            x = squeeze_excite(
                x, getattr(self, f"{p}se_reduce"), getattr(self, f"{p}se_expand"), swish, jax.nn.sigmoid
            )
        x = conv_bn("project_conv", "project_bn", x)
        if block.fused and block.expand_ratio == 1:
            x = swish(x)  # project_activation
        if not block.residual:
            return x
        if block.drop_rate > 0 and not getattr(self, f"{p}project_bn").use_running_average:  # being trained
            key = self.drop_rngs() if dropout_key is None else jax.random.fold_in(dropout_key, 1000 + index)
            x = getattr(self, f"{p}drop")(x, deterministic=False, rngs=key)
        return x + inputs


# ------------------------------------------------------------------------------------- FLOPs
def conv_ops(model: EfficientNetV2, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions for one ``image_size`` input, in forward order, with SAME's
    paddings."""

    def op(h, w, k, s, cin, cout, groups=1):
        return ConvOp(h, w, k, s, (same_pads(h, k, s), same_pads(w, k, s)), cin, cout, groups)

    h, w = square(image_size)
    stem = model.stem_conv.kernel.shape[-1]
    ops = [op(h, w, 3, 2, 3, stem)]
    h, w = ops[0].out
    for b in model.blocks:
        f, plain = b.filters, b.fused and b.expand_ratio == 1
        if b.expand_ratio != 1:
            ops.append(op(h, w, b.kernel if b.fused else 1, b.strides if b.fused else 1, b.filters_in, f))
            h, w = ops[-1].out
        if not b.fused:
            ops.append(op(h, w, b.kernel, b.strides, f, f, groups=f))
            h, w = ops[-1].out
        if b.se_filters:
            ops += [
                ConvOp(1, 1, 1, 1, NO_PADDING, f, b.se_filters),
                ConvOp(1, 1, 1, 1, NO_PADDING, b.se_filters, f),
            ]
        ops.append(op(h, w, b.kernel if plain else 1, b.strides if plain else 1, f, b.filters_out))
        h, w = ops[-1].out
    return [*ops, ConvOp(h, w, 1, 1, NO_PADDING, model.blocks[-1].filters_out, model.top_filters)]


def flops(model: EfficientNetV2, image_size: int | tuple[int, int], mode: str = "forward", *,
          padding: str = "full") -> float:  # fmt: skip
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): the convolutions
    (:func:`conv_ops`) and the dense layers of the top or head; BatchNorm, activations, pooling
    and the optimizer are left out. ``mode``: ``"forward"``, ``"train"`` (3 x forward minus the
    stem's input gradient) or ``"frozen"``; ``padding``: ``"full"`` or ``"valid"`` (XLA's count).
    Returns FLOPs per image (float)."""
    return count_flops(model, conv_ops(model, image_size), mode, padding)
