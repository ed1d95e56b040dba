"""MobileNetV3 Small / Large in Flax NNX, layer for layer as ``keras.applications.MobileNetV3Small``
and ``MobileNetV3Large`` (``keras/src/applications/mobilenet_v3.py``), with Keras's ``alpha``
(width) and ``minimalistic`` options.

Every Keras layer with weights is an attribute named as Keras names it (``conv``, ``conv_bn``,
``expanded_conv_depthwise``, ``expanded_conv_3_squeeze_excite_conv``, ..., ``conv_1``,
``conv_1_bn``; the top's ``conv_2`` and ``logits``). What Keras does, and so this port does:

* Preprocessing inside the model (``include_preprocessing``, default True): Keras's
  ``Rescaling(1 / 127.5, offset=-1)``, i.e. ``"tf"`` (pixels to [-1, 1]);
  ``include_preprocessing=False``: none.
* Stem ``conv``: 3x3 stride-2 SAME convolution (16 filters, whatever ``alpha``), BatchNorm,
  activation. Then Keras's table of inverted residual blocks (``expanded_conv``,
  ``expanded_conv_1``, ...): 1x1 expansion (``_depth(channels * expansion)``; not in the first
  block), BatchNorm, activation; kxk depthwise convolution (stride 2: Keras's ``correct_pad``
  zero padding then VALID; stride 1: SAME), BatchNorm, activation; squeeze-and-excitation where
  the table says (1x1 convolutions with bias to ``_depth(width / 4)`` and back, ReLU between,
  MobileNetV3's hard sigmoid ``ReLU6(x + 3) / 6`` as the gate); 1x1 projection to
  ``_depth(filters * alpha)``, BatchNorm; the input added when the shapes allow. ``_depth``:
  Keras's rounding to multiples of 8, never 10% below.
* Activations: ReLU in the blocks the table says, hard swish (``x * ReLU6(x + 3) / 6``)
  elsewhere; ``minimalistic=True``: ReLU everywhere, 3x3 kernels only, no squeeze-and-excitation.
* Last ``conv_1``: 1x1 to ``_depth(6 * channels)``, BatchNorm, activation. BatchNorm epsilon
  1e-3, momentum 0.999, in float32 under bfloat16 too.
* Top (``include_top``): average pooling (keeping the 1x1 map), ``conv_2`` (1x1 with bias to
  1024 (Small) / 1280 (Large) channels, scaled by ``alpha`` only when ``alpha > 1``),
  activation, dropout (``top_dropout``, Keras's ``dropout_rate`` 0.2), ``logits`` (1x1 with bias),
  flattened. Keras's top thus has two weighted layers and a hidden activation where the other
  families have one dense layer; both are the head (``trainable="head"``).
"""

from __future__ import annotations

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
    correct_pad,
    hard_sigmoid,
    hard_swish,
    init_glorot_kernels,
    squeeze_excite,
)

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.999
MIN_SIZE = 32
SE_RATIO = 0.25
STEM_FILTERS = 16

#: Keras's ``stack_fn`` tables: (expansion, filters, kernel, stride, squeeze-excite, activation),
#: kernel ``None`` = the model's kernel (5, or 3 when minimalistic), activation ``"relu"`` or
#: ``None`` = the model's (hard swish, or ReLU when minimalistic).
TABLES = {
    "small": (
        (1, 16, 3, 2, True, "relu"),
        (72.0 / 16, 24, 3, 2, False, "relu"),
        (88.0 / 24, 24, 3, 1, False, "relu"),
        (4, 40, None, 2, True, None),
        (6, 40, None, 1, True, None),
        (6, 40, None, 1, True, None),
        (3, 48, None, 1, True, None),
        (3, 48, None, 1, True, None),
        (6, 96, None, 2, True, None),
        (6, 96, None, 1, True, None),
        (6, 96, None, 1, True, None),
    ),
    "large": (
        (1, 16, 3, 1, False, "relu"),
        (4, 24, 3, 2, False, "relu"),
        (3, 24, 3, 1, False, "relu"),
        (3, 40, None, 2, True, "relu"),
        (3, 40, None, 1, True, "relu"),
        (3, 40, None, 1, True, "relu"),
        (6, 80, 3, 2, False, None),
        (2.5, 80, 3, 1, False, None),
        (2.3, 80, 3, 1, False, None),
        (2.3, 80, 3, 1, False, None),
        (6, 112, 3, 1, True, None),
        (6, 112, 3, 1, True, None),
        (6, 160, None, 2, True, None),
        (6, 160, None, 1, True, None),
        (6, 160, None, 1, True, None),
    ),
}
#: Registry name -> (Keras's ``model_type``, its top's ``last_point_ch``).
VARIANTS = {"mobilenetv3small": ("small", 1024), "mobilenetv3large": ("large", 1280)}


def depth(v: float, divisor: int = 8) -> int:
    """Keras's ``mobilenet_v3._depth``: ``v`` to the nearest multiple of ``divisor`` (at least
    ``divisor``), one more step if that is 10% below ``v``."""
    new = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * v else new


@dataclass(frozen=True)
class Block:
    """One inverted residual block as built: Keras's prefix (``expanded_conv_3_``), its channels
    in, expanded and out, kernel, stride, squeeze-excite width (0: none), activation name."""

    prefix: str
    cin: int
    width: int
    cout: int
    kernel: int
    stride: int
    se: int
    activation: str

    @property
    def stage(self) -> str:
        return self.prefix[:-1]

    @property
    def layers(self) -> tuple[str, ...]:
        p = self.prefix
        names = [f"{p}expand", f"{p}expand_bn"] if p != "expanded_conv_" else []
        names += [f"{p}depthwise", f"{p}depthwise_bn"]
        if self.se:
            names += [f"{p}squeeze_excite_conv", f"{p}squeeze_excite_conv_1"]
        return (*names, f"{p}project", f"{p}project_bn")


def blocks(model_type: str, alpha: float, minimalistic: bool) -> list[Block]:
    """The blocks Keras's ``MobileNetV3`` builds for ``model_type``, ``alpha``, ``minimalistic``."""
    kernel, act = (3, "relu") if minimalistic else (5, "hard_swish")
    out, cin = [], STEM_FILTERS
    for i, (expansion, filters, k, stride, se, activation) in enumerate(TABLES[model_type]):
        width = depth(cin * expansion)
        cout = depth(filters * alpha)
        prefix = f"expanded_conv_{i}_" if i else "expanded_conv_"
        se_width = depth(width * SE_RATIO) if se and not minimalistic else 0
        out.append(
            Block(prefix, cin, width if i else cin, cout, k or kernel, stride, se_width, activation or act)
        )
        cin = cout
    return out


ACTIVATIONS = {"relu": jax.nn.relu, "hard_swish": hard_swish}


def stages(arch: str) -> tuple[str, ...]:
    """``conv`` (the stem), ``expanded_conv``, ``expanded_conv_1``, ..., ``conv_1``: the stage
    names of ``arch`` (``trainable="top:N"`` trains the last N and the head)."""
    n = len(TABLES[VARIANTS[arch][0]])
    return ("conv", "expanded_conv", *(f"expanded_conv_{i}" for i in range(1, n)), "conv_1")


class MobileNetV3(KerasConvNet):
    """``keras.applications.MobileNetV3Small`` / ``Large`` (``arch``: ``"mobilenetv3small"``,
    ``"mobilenetv3large"``) with Keras's top, a transfer head, or no head.

    * ``include_top=True``: Keras's top (``conv_2``, activation, dropout ``top_dropout`` (default
      Keras's 0.2), ``logits``): logits ``float32[N, num_classes]``.
    * ``include_top=False``: the ``conv_1`` map after its activation ``float32[N, ceil(H / 32),
      ceil(W / 32), C]`` (C = 576 for Small, 960 for Large, at ``alpha=1``), pooled with
      ``pooling``, or a transfer head on it.

    ``alpha``: width multiplier (any > 0; ImageNet weights exist for 0.75 and 1.0, 1.0 only when
    minimalistic: Keras's rule). ``minimalistic``: see the module docstring.
    ``include_preprocessing``: Keras's (True: ``"tf"`` inside the model). ``conv_impl``: how
    every convolution computes (:mod:`imgcls_jax.models.conv`); ``depthwise_impl``: how the
    depthwise ones do (:func:`~imgcls_jax.models.conv.depthwise_impl_for`). Inputs: raw RGB
    ``[N, H, W, 3]`` in [0, 255], H, W >= 32.
    """

    preprocessing = "tf"
    min_size = MIN_SIZE

    def __init__(
        self,
        arch: str = "mobilenetv3large",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str = "tf",
        include_preprocessing: bool = True,
        alpha: float = 1.0,
        minimalistic: bool = False,
        top_dropout: float = 0.2,
        conv_impl: str = "auto",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(f"unknown MobileNetV3 architecture {arch!r}; expected one of {sorted(VARIANTS)}")
        if not alpha > 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        if not 0.0 <= top_dropout < 1.0:
            raise ValueError(f"top_dropout must be in [0, 1), got {top_dropout}")
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, preprocessing=preprocessing,
            include_preprocessing=include_preprocessing,
        )  # fmt: skip
        self.conv_impl = check_impl(conv_impl)
        self._depthwise = depthwise_impl_for(self.conv_impl, choose_depthwise_impl(depthwise_impl))
        self.alpha, self.minimalistic, self.depthwise_impl = float(alpha), bool(minimalistic), depthwise_impl
        self.model_type, last_point = VARIANTS[arch]
        self.activation = "relu" if minimalistic else "hard_swish"
        self.blocks = tuple(blocks(self.model_type, self.alpha, self.minimalistic))
        self.conv = self._conv(3, STEM_FILTERS, 3, rngs, strides=2, padding="SAME")
        self.conv_bn = self._bn(STEM_FILTERS, rngs)
        for block in self.blocks:
            self._block_layers(block, rngs)
        self.last_conv = depth(self.blocks[-1].cout * 6)
        self.conv_1 = self._conv(self.blocks[-1].cout, self.last_conv, 1, rngs)
        self.conv_1_bn = self._bn(self.last_conv, rngs)
        self.last_point = depth(last_point * alpha) if alpha > 1.0 else last_point
        self._build_top(top_dropout, rngs)
        top = [getattr(self, n).kernel for n in self.head_layers if isinstance(getattr(self, n), nnx.Conv)]
        init_glorot_kernels(self.conv_kernels() + top, rngs.params())  # Keras's default initializer

    def _conv(self, cin: int, cout: int, k: int, rngs: nnx.Rngs, bias: bool = False, **options) -> nnx.Conv:
        return conv2d(cin, cout, k, use_bias=bias, dtype=self.dtype, conv_impl=self.conv_impl, rngs=rngs,
                      **options)  # fmt: skip

    @staticmethod
    def _bn(channels: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(channels, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    def _block_layers(self, b: Block, rngs: nnx.Rngs) -> None:
        p = b.prefix
        if p != "expanded_conv_":
            setattr(self, f"{p}expand", self._conv(b.cin, b.width, 1, rngs))
            setattr(self, f"{p}expand_bn", self._bn(b.width, rngs))
        setattr(
            self,
            f"{p}depthwise",
            DepthwiseConv2D(b.width, b.kernel, dtype=self.dtype, impl=self._depthwise),
        )
        setattr(self, f"{p}depthwise_bn", self._bn(b.width, rngs))
        if b.se:
            setattr(self, f"{p}squeeze_excite_conv", self._conv(b.width, b.se, 1, rngs, bias=True))
            setattr(self, f"{p}squeeze_excite_conv_1", self._conv(b.se, b.width, 1, rngs, bias=True))
        setattr(self, f"{p}project", self._conv(b.width, b.cout, 1, rngs))
        setattr(self, f"{p}project_bn", self._bn(b.cout, rngs))

    def _build_top(self, top_dropout: float, rngs: nnx.Rngs) -> None:
        """Keras's top (``conv_2``, dropout, ``logits``: 1x1 convolutions on the pooled map), or
        the transfer head."""
        if not self.include_top:
            self._build_head(self.last_conv, rngs)
            return
        self.feature_channels = self.last_conv
        self.conv_2 = self._conv(self.last_conv, self.last_point, 1, rngs, bias=True)
        if top_dropout > 0:
            self.top_dropout = nnx.Dropout(top_dropout, deterministic=True, rngs=rngs)
        self.logits = self._conv(self.last_point, self.num_classes, 1, rngs, bias=True)
        self.head_layers = ("conv_2", "logits")

    @property
    def imagenet_key(self) -> str:
        """The key of Keras's published files for this width (:data:`imgcls_jax.weights.store.IMAGENET`):
        ``"mobilenetv3large"``, ``"mobilenetv3large_0.75"``, ``"mobilenetv3large_minimalistic"``.
        ``ValueError`` with Keras's rule for a width Keras publishes no weights of."""
        if (self.minimalistic and self.alpha != 1.0) or self.alpha not in (0.75, 1.0):
            raise ValueError(
                "If imagenet weights are being loaded, alpha can be one of `0.75`, `1.0` for non "
                f"minimalistic or `1.0` for minimalistic only (Keras's rule); got alpha={self.alpha}, "
                f"minimalistic={self.minimalistic}"
            )
        suffix = "_minimalistic" if self.minimalistic else ("_0.75" if self.alpha == 0.75 else "")
        return f"{self.arch}{suffix}"

    # ------------------------------------------------------------------ Classifier interface
    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``conv`` (the stem), ``expanded_conv``, ``expanded_conv_1`` ..., ``conv_1``."""
        blocks_ = tuple((b.stage, b.layers) for b in self.blocks)
        return (("conv", ("conv", "conv_bn")), *blocks_, ("conv_1", ("conv_1", "conv_1_bn")))

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Preprocessed images -> the ``conv_1`` map after its activation
        ``dtype[N, ceil(H / 32), ceil(W / 32), C]``."""
        act = ACTIVATIONS[self.activation]
        x = act(self.conv_bn(self.conv(x)))
        for block in self.blocks:
            x = self._block(block, x)
        return act(self.conv_1_bn(self.conv_1(x)))

    def _block(self, b: Block, inputs: jax.Array) -> jax.Array:
        """Keras's ``_inverted_res_block``."""
        p, act, x = b.prefix, ACTIVATIONS[b.activation], inputs
        if p != "expanded_conv_":
            x = act(getattr(self, f"{p}expand_bn")(getattr(self, f"{p}expand")(x)))
        pads = _depthwise_pads(x.shape[1:3], b.kernel, b.stride)
        x = getattr(self, f"{p}depthwise")(jnp.pad(x, ((0, 0), *pads, (0, 0))), b.stride)
        x = act(getattr(self, f"{p}depthwise_bn")(x))
        if b.se:
            reduce, expand = (
                getattr(self, f"{p}squeeze_excite_conv"),
                getattr(self, f"{p}squeeze_excite_conv_1"),
            )
            x = squeeze_excite(x, reduce, expand, jax.nn.relu, hard_sigmoid)
        x = getattr(self, f"{p}project_bn")(getattr(self, f"{p}project")(x))
        return inputs + x if b.stride == 1 and b.cin == b.cout else x

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Keras's top on the pooled features ``[N, C]``: ``conv_2``, activation, dropout (key
        ``fold_in(dropout_key, 0)``), ``logits``; or the transfer head / the features."""
        if not self.include_top:
            return super().head(pooled, dropout_key=dropout_key)
        x = ACTIVATIONS[self.activation](self.conv_2(pooled.astype(self.dtype)[:, None, None, :]))
        if hasattr(self, "top_dropout"):
            x = self.top_dropout(x, rngs=None if dropout_key is None else jax.random.fold_in(dropout_key, 0))
        return self.logits(x).reshape(x.shape[0], -1).astype(jnp.float32)


def _depthwise_pads(size, k: int, stride: int):
    """Keras's padding of a depthwise convolution: ``correct_pad`` at stride 2 (then VALID), SAME
    at stride 1 (``k // 2`` each side)."""
    return correct_pad(tuple(size), k) if stride == 2 else ((k // 2, k // 2),) * 2


# ------------------------------------------------------------------------------------- FLOPs
def conv_ops(model: MobileNetV3, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions for one ``image_size`` input, in forward order."""
    h, w = square(image_size)
    ops = [ConvOp(h, w, 3, 2, (same_pads(h, 3, 2), same_pads(w, 3, 2)), 3, STEM_FILTERS)]
    h, w = ops[0].out
    for b in model.blocks:
        if b.prefix != "expanded_conv_":
            ops.append(ConvOp(h, w, 1, 1, NO_PADDING, b.cin, b.width))
        pads = _depthwise_pads((h, w), b.kernel, b.stride)
        ops.append(ConvOp(h, w, b.kernel, b.stride, pads, b.width, b.width, groups=b.width))
        h, w = ops[-1].out
        if b.se:
            ops += [
                ConvOp(1, 1, 1, 1, NO_PADDING, b.width, b.se),
                ConvOp(1, 1, 1, 1, NO_PADDING, b.se, b.width),
            ]
        ops.append(ConvOp(h, w, 1, 1, NO_PADDING, b.width, b.cout))
    return [*ops, ConvOp(h, w, 1, 1, NO_PADDING, model.blocks[-1].cout, model.last_conv)]


def flops(model: MobileNetV3, image_size: int | tuple[int, int], mode: str = "forward", *,
          padding: str = "full") -> float:  # fmt: skip
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): the convolutions
    (:func:`conv_ops`) and the top's or head's layers (the top's 1x1 convolutions on the pooled
    map count as dense layers); BatchNorm, activations, squeeze-excite gating, pooling and the
    optimizer are left out. ``mode``: ``"forward"``, ``"train"`` or ``"frozen"``; ``padding``:
    ``"full"`` or ``"valid"``. Returns FLOPs per image (float)."""
    return count_flops(model, conv_ops(model, image_size), mode, padding)
