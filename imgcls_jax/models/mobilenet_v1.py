"""MobileNet (v1; ``keras.applications.MobileNet``, with its width ``alpha`` and
``depth_multiplier``) in Flax NNX with Keras's layer names.

Stem ``conv1`` (3x3/2 SAME, ``int(32 * alpha)`` filters, no bias) + ``conv1_bn`` + ReLU6; 13
depthwise-separable blocks (Keras's ``block_id`` 1..13, stages ``block_1`` .. ``block_13``): 3x3
depthwise ``conv_dw_{i}`` (``depth_multiplier`` outputs per channel; stride 2: Keras's
``ZeroPadding2D(((0, 1), (0, 1)))`` then VALID, stride 1: SAME) + ``conv_dw_{i}_bn`` + ReLU6, 1x1
``conv_pw_{i}`` (``int(filters * alpha)``) + ``conv_pw_{i}_bn`` + ReLU6. No convolution has a bias;
kernels start as Keras's (glorot uniform). BatchNorm: Keras's defaults (epsilon 1e-3, momentum
0.99), in float32 under bfloat16 compute too. Inputs are normalised with ``"tf"`` preprocessing,
as Keras's ImageNet weights expect; at least 32x32 (Keras's rule).

Keras's top is not a dense layer: global average pooling (keeping the 1x1 map), ``Dropout``
(``top_dropout``, Keras's ``dropout``, default 1e-3) and ``conv_preds``, a 1x1 convolution with
bias (kernel ``[1, 1, C, classes]``, as the files hold it), reshaped to the logits. A transfer head
and the weight mapping are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s.

Keras publishes ImageNet weights for ``alpha`` 0.25, 0.5, 0.75 and 1.0 with ``depth_multiplier``
1, one file per input size 128, 160, 192 and 224 (:attr:`MobileNet.imagenet_key` picks the
width's files; :mod:`imgcls_jax.weights.store` the size's).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, same_pads, square
from imgcls_jax.models.layers import (
    BatchNorm,
    DepthwiseConv2D,
    choose_depthwise_impl,
    conv2d,
    init_glorot_kernels,
    pad2d,
)

#: ``(pointwise filters at alpha 1, stride)`` of blocks 1..13.
BLOCKS = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1), (512, 1),
    (512, 1), (1024, 2), (1024, 1),
)  # fmt: skip
STEM_FILTERS = 32
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
relu6 = jax.nn.relu6
#: The widths Keras publishes ImageNet weights of (with ``depth_multiplier=1``).
IMAGENET_ALPHAS = (0.25, 0.5, 0.75, 1.0)
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = ("conv1", *(f"block_{i}" for i in range(1, len(BLOCKS) + 1)))


def block_layers(i: int) -> tuple[str, ...]:
    """The weighted layers of block ``i`` (1..13), in Keras's order."""
    return (f"conv_dw_{i}", f"conv_dw_{i}_bn", f"conv_pw_{i}", f"conv_pw_{i}_bn")


def _depthwise_pads(size: Sequence[int], stride: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Keras's padding of a 3x3 depthwise convolution: ``((0, 1), (0, 1))`` then VALID at stride 2,
    SAME (one pixel each side) at stride 1."""
    return ((0, 1), (0, 1)) if stride == 2 else ((1, 1), (1, 1))


class MobileNet(KerasConvNet):
    """``keras.applications.MobileNet`` (top, transfer head or features; see the module
    docstring and :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages ``conv1``, ``block_1``
    .. ``block_13``; features ``[N, h, w, int(1024 * alpha)]`` (:meth:`feature_size`; ``H / 32``
    for a multiple of 32).
    ``depthwise_impl``: see :func:`~imgcls_jax.models.layers.choose_depthwise_impl`."""

    preprocessing = "tf"

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
        depth_multiplier: int = 1,
        top_dropout: float = 1e-3,
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if not alpha > 0:
            raise ValueError(f"mobilenet: alpha must be > 0 (Keras's width multiplier), got {alpha!r}")
        if int(depth_multiplier) != depth_multiplier or depth_multiplier < 1:
            raise ValueError(f"mobilenet: depth_multiplier must be an integer >= 1, got {depth_multiplier!r}")
        if not 0.0 <= top_dropout < 1.0:
            raise ValueError(f"top_dropout must be in [0, 1), got {top_dropout}")
        self._setup(
            "mobilenet", include_top=include_top, pooling=pooling, num_classes=num_classes,
            head_units=head_units, dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing,
        )  # fmt: skip
        self.alpha, self.depth_multiplier = float(alpha), int(depth_multiplier)
        choose_depthwise_impl(depthwise_impl)  # checks the name
        self.depthwise_impl = depthwise_impl
        cin = int(STEM_FILTERS * self.alpha)
        self.conv1 = conv2d(3, cin, 3, strides=2, padding="SAME", use_bias=False, dtype=self.dtype, rngs=rngs)
        self.conv1_bn = self._bn(cin, rngs)
        for i, (filters, _) in enumerate(BLOCKS, start=1):
            width, cout = cin * self.depth_multiplier, int(filters * self.alpha)
            dw = DepthwiseConv2D(
                cin, 3, dtype=self.dtype, impl=depthwise_impl, depth_multiplier=self.depth_multiplier
            )
            setattr(self, f"conv_dw_{i}", dw)
            setattr(self, f"conv_dw_{i}_bn", self._bn(width, rngs))
            setattr(self, f"conv_pw_{i}", conv2d(width, cout, 1, use_bias=False, dtype=self.dtype, rngs=rngs))
            setattr(self, f"conv_pw_{i}_bn", self._bn(cout, rngs))
            cin = cout
        init_glorot_kernels(self.conv_kernels(), rngs.params())
        self._build_top(cin, top_dropout, rngs)

    @staticmethod
    def _bn(channels: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(channels, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    def _build_top(self, channels: int, top_dropout: float, rngs: nnx.Rngs) -> None:
        """Keras's top (dropout and the 1x1 ``conv_preds`` on the pooled map), or the transfer head."""
        if not self.include_top:
            self._build_head(channels, rngs)
            return
        self.feature_channels = channels
        if top_dropout > 0:
            self.top_dropout = nnx.Dropout(top_dropout, deterministic=True, rngs=rngs)
        self.conv_preds = conv2d(channels, self.num_classes, 1, use_bias=True, dtype=self.dtype, rngs=rngs)
        init_glorot_kernels([self.conv_preds.kernel], rngs.params())
        self.head_layers = ("conv_preds",)

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """``(h, w)``: the stem halves rounding up (SAME), each stride-2 block rounding down
        (Keras pads one pixel after, then a VALID 3x3: ``(n - 2) // 2 + 1``)."""
        out = []
        for n in image_size:
            n = -(-n // 2)
            for _, stride in BLOCKS:
                n = (n - 2) // 2 + 1 if stride == 2 else n
            out.append(n)
        return tuple(out)

    @property
    def imagenet_key(self) -> str:
        """The key of Keras's published files for this width (``"mobilenet"``,
        ``"mobilenet_0.75"``, ...; :data:`imgcls_jax.weights.store.IMAGENET`); ``ValueError`` with
        Keras's rule for a model Keras publishes no weights of."""
        if self.depth_multiplier != 1:
            raise ValueError(
                "If imagenet weights are being loaded, depth multiplier must be 1 (Keras's rule); "
                f"got depth_multiplier={self.depth_multiplier}"
            )
        if self.alpha not in IMAGENET_ALPHAS:
            raise ValueError(
                "If imagenet weights are being loaded, alpha can be one of `0.25`, `0.50`, `0.75` or "
                f"`1.0` only (Keras's rule); got alpha={self.alpha}"
            )
        return "mobilenet" if self.alpha == 1.0 else f"mobilenet_{self.alpha}"

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``conv1`` (the stem) and the blocks ``block_1`` .. ``block_13``."""
        blocks = ((f"block_{i}", block_layers(i)) for i in range(1, len(BLOCKS) + 1))
        return (("conv1", ("conv1", "conv1_bn")), *blocks)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """tf-preprocessed images ``[N, H, W, 3]`` -> the ``conv_pw_13_relu`` map (``dropout_key``
        unused: no stochastic layer in the backbone)."""
        x = relu6(self.conv1_bn(self.conv1(x)))
        for i, (_, stride) in enumerate(BLOCKS, start=1):
            x = pad2d(x, _depthwise_pads(x.shape[1:3], stride))
            x = relu6(getattr(self, f"conv_dw_{i}_bn")(getattr(self, f"conv_dw_{i}")(x, stride)))
            x = relu6(getattr(self, f"conv_pw_{i}_bn")(getattr(self, f"conv_pw_{i}")(x)))
        return x

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Keras's top on the pooled features ``[N, C]``: dropout (key ``fold_in(dropout_key,
        0)``) and ``conv_preds``; or the transfer head / the features."""
        if not self.include_top:
            return super().head(pooled, dropout_key=dropout_key)
        x = pooled.astype(self.dtype)[:, None, None, :]
        if hasattr(self, "top_dropout"):
            x = self.top_dropout(x, rngs=None if dropout_key is None else jax.random.fold_in(dropout_key, 0))
        return self.conv_preds(x).reshape(x.shape[0], -1).astype(jnp.float32)


def conv_ops(model: MobileNet, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions for one ``image_size`` input, in forward order (for :func:`flops`)."""
    h, w = square(image_size)
    cin = int(STEM_FILTERS * model.alpha)
    ops = [ConvOp(h, w, 3, 2, (same_pads(h, 3, 2), same_pads(w, 3, 2)), 3, cin)]
    h, w = ops[0].out
    for filters, stride in BLOCKS:
        width, cout = cin * model.depth_multiplier, int(filters * model.alpha)
        ops.append(ConvOp(h, w, 3, stride, _depthwise_pads((h, w), stride), cin, width, groups=cin))
        h, w = ops[-1].out
        ops.append(ConvOp(h, w, 1, 1, NO_PADDING, width, cout))
        cin = cout
    return ops


def flops(
    model: MobileNet, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): convolutions (depthwise
    ones at ``k * k`` multiply-adds per output) and the top's ``conv_preds`` or the head's dense
    layers; BatchNorm, ReLU6, pooling and the optimizer are left out.

    Args:
      model: a :class:`MobileNet` (its width, depth multiplier and head are counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``, ``"train"`` (forward + weight and input gradients of every layer, no
        input gradient of ``conv1``) or ``"frozen"`` (backbone forward, the head's forward and both
        gradients).
      padding: ``"full"`` (every output position does ``k x k`` taps) or ``"valid"`` (taps on zero
        padding left out, as XLA's cost analysis counts convolutions).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(model, image_size), mode, padding)
