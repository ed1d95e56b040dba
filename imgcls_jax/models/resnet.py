"""ResNet50 (``keras.applications.ResNet50``, the v1 "caffe" variant) in Flax NNX with Keras's
layer names.

Stem ``conv1``: ``ZeroPadding2D(3)`` + 7x7/2 ``conv1_conv`` + ``conv1_bn`` + ReLU, then
``ZeroPadding2D(1)`` + 3x3/2 max pooling. Four stages ``conv2``..``conv5`` of bottleneck blocks
``conv{s}_block{b}``: 1x1 ``_1_conv`` (carrying the stage's stride, 2 from ``conv3`` on), 3x3 SAME
``_2_conv``, 1x1 ``_3_conv`` (4x the filters), each followed by its ``_bn`` (ReLU after the first
two), added to the shortcut (the first block's is a strided 1x1 ``_0_conv`` + ``_0_bn``) and
ReLU. Convolutions have biases; kernels start as Keras's (glorot uniform), biases at zero.
BatchNorm: epsilon 1.001e-5, momentum 0.99 (Keras's default), in float32 under bfloat16 compute
too. Inputs are normalised with ``"caffe"`` preprocessing, as Keras's ImageNet weights expect.
The top, head and weight mapping are :class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from imgcls_jax.models.conv import check_impl
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, same_pads, square
from imgcls_jax.models.layers import BatchNorm, conv2d, init_glorot_kernels

#: ``(stage, bottleneck filters, blocks, stride of its first block)``; outputs 4x the filters.
STACKS = (("conv2", 64, 3, 1), ("conv3", 128, 4, 2), ("conv4", 256, 6, 2), ("conv5", 512, 3, 2))
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = ("conv1", *(stage for stage, *_ in STACKS))
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99
FEATURES = 2048


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Keras's ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, strides=2)`` (VALID): ``[N, H, W, C]`` ->
    ``[N, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]``. The padding is zeros, as Keras's (after a
    ReLU, so never above a window's maximum)."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


def _block_parts(block: int) -> tuple[str, ...]:
    """The parts of block ``block`` (1-based): the first has the shortcut convolution ``0``."""
    return ("0", "1", "2", "3") if block == 1 else ("1", "2", "3")


class ResNet50(KerasConvNet):
    """``keras.applications.ResNet50`` (top, transfer head or features; see
    :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages: ``conv1`` (stem), ``conv2`` ..
    ``conv5``; features ``[N, ceil(H / 32), ceil(W / 32), 2048]``. Any input of at least 32x32
    (Keras's rule). ``conv_impl``: how the convolutions run (:mod:`imgcls_jax.models.conv`:
    ``"auto"``, ``"xla"``, ``"im2col"`` (the 3x3 ones), ``"onednn"``)."""

    preprocessing = "caffe"
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
            preprocessing=preprocessing,
        )  # fmt: skip
        self.conv_impl = check_impl(conv_impl)
        self.conv1_conv = self._conv(3, 64, 7, 2, rngs)  # after conv1_pad: ZeroPadding2D(3)
        self.conv1_bn = BatchNorm(64, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)
        cin = 64
        for stage, filters, blocks, stride in STACKS:
            for b in range(1, blocks + 1):
                name, s = f"{stage}_block{b}", stride if b == 1 else 1
                shapes = {"0": (cin, 4 * filters, 1, s), "1": (cin, filters, 1, s)}
                shapes.update({"2": (filters, filters, 3, 1), "3": (filters, 4 * filters, 1, 1)})
                for part in _block_parts(b):
                    fin, fout, k, strides = shapes[part]
                    setattr(self, f"{name}_{part}_conv", self._conv(fin, fout, k, strides, rngs))
                    setattr(
                        self,
                        f"{name}_{part}_bn",
                        BatchNorm(fout, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs),
                    )
                cin = 4 * filters
        init_glorot_kernels(self.conv_kernels(), rngs.params())
        self._build_head(FEATURES, rngs)

    def _conv(self, cin: int, cout: int, k: int, strides: int, rngs: nnx.Rngs) -> nnx.Conv:
        """A VALID convolution with bias, except the 3x3 ones: SAME; all run by ``conv_impl``."""
        padding = "SAME" if k == 3 else "VALID"
        return conv2d(cin, cout, k, strides=strides, padding=padding, use_bias=True, dtype=self.dtype,
                      conv_impl=self.conv_impl, rngs=rngs)  # fmt: skip

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``("conv1", ("conv1_conv", "conv1_bn")), ("conv2", ("conv2_block1_0_conv", ...)), ...``"""
        out = [("conv1", ("conv1_conv", "conv1_bn"))]
        for stage, _, blocks, _ in STACKS:
            layers = [
                f"{stage}_block{b}_{p}_{kind}" for b in range(1, blocks + 1) for p in _block_parts(b)
                for kind in ("conv", "bn")
            ]  # fmt: skip
            out.append((stage, tuple(layers)))
        return tuple(out)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Caffe-preprocessed images ``[N, H, W, 3]`` -> the ``conv5`` map ``[N, h, w, 2048]``
        (``dropout_key`` unused: no stochastic layer in the backbone)."""
        x = jnp.pad(x, ((0, 0), (3, 3), (3, 3), (0, 0)))  # conv1_pad
        x = nnx.relu(self.conv1_bn(self.conv1_conv(x)))
        x = max_pool_3x3_s2(x)  # pool1_pad + pool1_pool
        for stage, _, blocks, _ in STACKS:
            for b in range(1, blocks + 1):
                x = self._block(f"{stage}_block{b}", x, shortcut_conv=b == 1)
        return x

    def _block(self, name: str, x: jax.Array, shortcut_conv: bool) -> jax.Array:
        def conv_bn(part, y):
            return getattr(self, f"{name}_{part}_bn")(getattr(self, f"{name}_{part}_conv")(y))

        shortcut = conv_bn("0", x) if shortcut_conv else x
        y = nnx.relu(conv_bn("1", x))
        y = nnx.relu(conv_bn("2", y))
        return nnx.relu(shortcut + conv_bn("3", y))


def conv_ops(model: ResNet50, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """ResNet50's convolutions for one ``image_size`` input, in forward order (for :func:`flops`;
    ``model`` is there for the signature every family's ``conv_ops`` has: this one is fixed)."""
    h, w = square(image_size)
    ops = [ConvOp(h, w, 7, 2, ((3, 3), (3, 3)), 3, 64)]
    h, w = (-(-n // 2) for n in ops[0].out)  # pool1: 3x3/2 on the 1-padded map
    cin = 64
    for _, filters, blocks, stride in STACKS:
        for b in range(1, blocks + 1):
            s = stride if b == 1 else 1
            if b == 1:
                ops.append(ConvOp(h, w, 1, s, NO_PADDING, cin, 4 * filters))
            first = ConvOp(h, w, 1, s, NO_PADDING, cin, filters)
            h, w = first.out
            pads = (same_pads(h, 3, 1), same_pads(w, 3, 1))
            ops += [
                first,
                ConvOp(h, w, 3, 1, pads, filters, filters),
                ConvOp(h, w, 1, 1, NO_PADDING, filters, 4 * filters),
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
    return count_flops(model, conv_ops(model, image_size), mode, padding)
