"""Xception (``keras.applications.Xception``) in Flax NNX with Keras's layer names.

Entry: ``block1_conv1`` (3x3/2 VALID, 32) and ``block1_conv2`` (3x3 VALID, 64), each with its
``_bn`` and ReLU. Blocks 2-4 and 13 are downsampling blocks: two 3x3 separable convolutions
(``block{b}_sepconv1``, ``_sepconv2``, each with its ``_bn``; ReLU before each, except before
block 2's first, whose input is already a ReLU's output), 3x3/2 SAME max pooling
``block{b}_pool``, plus a residual 1x1/2 convolution and BatchNorm of the block's input. Keras
gives those four residual layers no names, so they carry the names a fresh Keras session gives
them: ``conv2d``, ``batch_normalization`` (block 2), ``conv2d_1``, ``batch_normalization_1``
(block 3), ``_2`` (block 4), ``_3`` (block 13); a file from a session that numbered them
otherwise is matched by their order (:mod:`imgcls_jax.weights.keras`). Blocks 5-12: three
ReLU + 728-filter separable convolution + BatchNorm, added to the input. Exit ``block14``:
``_sepconv1`` (1536) + BatchNorm + ReLU, ``_sepconv2`` (2048) + BatchNorm + ReLU.

No convolution has a bias; kernels start as Keras's (glorot uniform). BatchNorm: Keras's defaults
(epsilon 1e-3, momentum 0.99), in float32 under bfloat16 compute too. Separable convolutions are
:class:`~imgcls_jax.models.layers.SeparableConv2D` (depthwise by ``depthwise_impl``, then 1x1).
Inputs are normalised with ``"tf"`` preprocessing, as Keras's ImageNet weights expect. Inputs of
at least 71x71 (Keras's rule); Keras's default and ImageNet size is 299. The top, head and weight
mapping are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
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
    SeparableConv2D,
    choose_depthwise_impl,
    conv2d,
    init_glorot_kernels,
    max_pool2d,
)

#: The downsampling blocks: (block, filters of its two separable convolutions, the Keras
#: session number of its residual convolution and BatchNorm).
DOWN = ((2, 128, 128, 0), (3, 256, 256, 1), (4, 728, 728, 2), (13, 728, 1024, 3))
MIDDLE = tuple(range(5, 13))
MIN_SIZE = 71
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
FEATURES = 2048
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = tuple(f"block{b}" for b in range(1, 15))


def _numbered(prefix: str, n: int) -> str:
    return prefix if n == 0 else f"{prefix}_{n}"


def block_layers(block: int) -> tuple[str, ...]:
    """The weighted layers of ``block`` (1..14), in the order Keras creates them."""
    if block == 1:
        return ("block1_conv1", "block1_conv1_bn", "block1_conv2", "block1_conv2_bn")
    down = {d[0]: d for d in DOWN}
    convs = 3 if block in MIDDLE else 2
    layers = tuple(f"block{block}_sepconv{i}{s}" for i in range(1, convs + 1) for s in ("", "_bn"))
    if block in down:
        n = down[block][3]
        return (_numbered("conv2d", n), _numbered("batch_normalization", n), *layers)
    return layers


class Xception(KerasConvNet):
    """``keras.applications.Xception`` (top, transfer head or features; see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages: ``block1`` .. ``block14``; features
    ``[N, h, w, 2048]`` (:meth:`feature_size`; 10x10 at 299 px). ``depthwise_impl``: see
    :func:`~imgcls_jax.models.layers.choose_depthwise_impl`."""

    preprocessing = "tf"
    min_size = MIN_SIZE

    def __init__(
        self,
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (299, 299, 3),
        dtype=jnp.float32,
        preprocessing: str = "tf",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        self._setup(
            "xception", include_top=include_top, pooling=pooling, num_classes=num_classes,
            head_units=head_units, dropout=dropout, input_shape=input_shape, dtype=dtype,
            preprocessing=preprocessing,
        )  # fmt: skip
        choose_depthwise_impl(depthwise_impl)  # checks the name
        self.depthwise_impl = depthwise_impl
        self.block1_conv1 = conv2d(3, 32, 3, strides=2, use_bias=False, dtype=self.dtype, rngs=rngs)
        self.block1_conv1_bn = self._bn(32, rngs)
        self.block1_conv2 = conv2d(32, 64, 3, use_bias=False, dtype=self.dtype, rngs=rngs)
        self.block1_conv2_bn = self._bn(64, rngs)
        cin = 64
        for block in range(2, 15):
            cin = self._make_block(block, cin, rngs)
        init_glorot_kernels(self.conv_kernels(), rngs.params())
        self._build_head(FEATURES, rngs)

    @staticmethod
    def _bn(c: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(c, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    def _make_block(self, block: int, cin: int, rngs: nnx.Rngs) -> int:
        """Create ``block``'s layers for ``cin`` input channels; returns its output channels."""
        down = {d[0]: d for d in DOWN}
        if block in down:
            _, f1, f2, n = down[block]
            residual = conv2d(cin, f2, 1, strides=2, use_bias=False, dtype=self.dtype, rngs=rngs)
            setattr(self, _numbered("conv2d", n), residual)
            setattr(self, _numbered("batch_normalization", n), self._bn(f2, rngs))
            filters = (f1, f2)
        else:
            filters = (728,) * 3 if block in MIDDLE else (1536, 2048)
        for i, f in enumerate(filters, start=1):
            sep = SeparableConv2D(cin, f, 3, dtype=self.dtype, impl=self.depthwise_impl, rngs=rngs)
            setattr(self, f"block{block}_sepconv{i}", sep)
            setattr(self, f"block{block}_sepconv{i}_bn", self._bn(f, rngs))
            cin = f
        return cin

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``block1`` .. ``block14``, each with its layers (a downsampling block's residual
        convolution and BatchNorm included)."""
        return tuple((f"block{b}", block_layers(b)) for b in range(1, 15))

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """``(h, w)``: two VALID 3x3 convolutions (the first strided), then four SAME poolings."""
        out = []
        for n in image_size:
            n = (n - 3) // 2 + 1 - 2
            for _ in range(4):
                n = -(-n // 2)
            out.append(n)
        return tuple(out)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """tf-preprocessed images ``[N, H, W, 3]`` -> the ``block14_sepconv2_act`` map
        ``[N, h, w, 2048]`` (``dropout_key`` unused: no stochastic layer)."""
        x = nnx.relu(self.block1_conv1_bn(self.block1_conv1(x)))
        x = nnx.relu(self.block1_conv2_bn(self.block1_conv2(x)))
        for block in range(2, 15):
            x = self._block(block, x)
        return x

    def _block(self, block: int, x: jax.Array) -> jax.Array:
        def sep_bn(i, y):
            return getattr(self, f"block{block}_sepconv{i}_bn")(getattr(self, f"block{block}_sepconv{i}")(y))

        down = {d[0]: d for d in DOWN}
        if block == 14:
            return nnx.relu(sep_bn(2, nnx.relu(sep_bn(1, x))))
        if block in MIDDLE:
            y = x
            for i in (1, 2, 3):
                y = sep_bn(i, nnx.relu(y))
            return x + y
        n = down[block][3]
        residual = getattr(self, _numbered("batch_normalization", n))(
            getattr(self, _numbered("conv2d", n))(x)
        )
        y = sep_bn(1, x if block == 2 else nnx.relu(x))
        y = sep_bn(2, nnx.relu(y))
        return max_pool2d(y, 3, 2, "same") + residual


def conv_ops(model: Xception, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """Xception's convolutions for one ``image_size`` input, in forward order (a separable
    convolution is its depthwise and its pointwise part); for :func:`flops`."""
    h, w = square(image_size)
    ops = [ConvOp(h, w, 3, 2, NO_PADDING, 3, 32)]
    ops.append(ConvOp(*ops[-1].out, 3, 1, NO_PADDING, 32, 64))
    (h, w), cin = ops[-1].out, 64
    down = {d[0]: d for d in DOWN}
    for block in range(2, 15):
        if block in down:
            _, f1, f2, _ = down[block]
            ops.append(ConvOp(h, w, 1, 2, NO_PADDING, cin, f2))
            filters = (f1, f2)
        else:
            filters = (728,) * 3 if block in MIDDLE else (1536, 2048)
        pads = (same_pads(h, 3, 1), same_pads(w, 3, 1))
        for f in filters:
            ops += [ConvOp(h, w, 3, 1, pads, cin, cin, groups=cin), ConvOp(h, w, 1, 1, NO_PADDING, cin, f)]
            cin = f
        if block in down:
            h, w = -(-h // 2), -(-w // 2)
    return ops


def flops(
    model: Xception, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): convolutions (separable
    ones as depthwise ``k * k`` per output plus pointwise) and the dense layers of its top or
    head; BatchNorm, ReLU, additions, pooling and the optimizer are left out.

    Args:
      model: an :class:`Xception` (its head is counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``, ``"train"`` (forward + weight and input gradients of every layer, no
        input gradient of ``block1_conv1``) or ``"frozen"`` (backbone forward, the head's forward
        and both gradients).
      padding: ``"full"`` (every output position does ``k x k`` taps) or ``"valid"`` (taps on
        zero padding left out, as XLA's cost analysis counts convolutions).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(model, image_size), mode, padding)
