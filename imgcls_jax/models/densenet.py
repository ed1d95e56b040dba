"""DenseNet121 / 169 / 201 (``keras.applications.DenseNet121`` ...) in Flax NNX with Keras's layer
names.

Stem ``conv1``: ``ZeroPadding2D(3)`` + 7x7/2 ``conv1_conv`` + ``conv1_bn`` + ReLU, then
``ZeroPadding2D(1)`` + 3x3/2 max pooling ``pool1``. Four dense blocks ``conv2``..``conv5`` of
:data:`VARIANTS` layers each: layer ``conv{s}_block{b}`` is ``_0_bn`` + ReLU, 1x1 ``_1_conv``
(128 filters) + ``_1_bn`` + ReLU, 3x3 SAME ``_2_conv`` (32 filters, the growth rate), whose output
is concatenated to its input. Between blocks a transition ``pool2``..``pool4``: ``_bn`` + ReLU,
1x1 ``_conv`` halving the channels, 2x2/2 average pooling (VALID: an odd row or column is
dropped). After ``conv5``: ``bn`` + ReLU (part of stage ``conv5`` here). No convolution has a bias;
kernels start as Keras's (glorot uniform). BatchNorm: epsilon 1.001e-5, momentum 0.99, in float32
under bfloat16 compute too. Inputs are normalised with ``"torch"`` preprocessing, as Keras's
ImageNet weights expect. The top, head and weight mapping are
:class:`~imgcls_jax.models.convnet.KerasConvNet`'s.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.conv import ConvGeneralDilated, check_impl
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, square
from imgcls_jax.models.layers import BatchNorm, avg_pool2d, conv2d, init_glorot_kernels, max_pool2d, pad2d

#: Keras's ``blocks`` argument: the layers of the dense blocks ``conv2``..``conv5``.
VARIANTS = {"densenet121": (6, 12, 24, 16), "densenet169": (6, 12, 32, 32), "densenet201": (6, 12, 48, 32)}
GROWTH = 32
STEM_FILTERS = 64
#: Stage names in forward order (``top:N`` trains the last N and the head).
STAGE_NAMES = ("conv1", "conv2", "pool2", "conv3", "pool3", "conv4", "pool4", "conv5")
BN_EPSILON = 1.001e-5
BN_MOMENTUM = 0.99


def channels(blocks: Sequence[int]) -> list[int]:
    """The input channels of each dense block and, last, the output's."""
    out, c = [], STEM_FILTERS
    for i, n in enumerate(blocks):
        out.append(c)
        c += GROWTH * n
        if i < len(blocks) - 1:
            c //= 2  # the transition: int(c * 0.5)
    return [*out, c]


class DenseNet(KerasConvNet):
    """``keras.applications.DenseNet121`` / ``169`` / ``201`` (``arch``; top, transfer head or
    features: see :class:`~imgcls_jax.models.convnet.KerasConvNet`). Stages: ``conv1``, ``conv2``,
    ``pool2``, ``conv3``, ``pool3``, ``conv4``, ``pool4``, ``conv5``; features ``[N, h, w, C]``
    (C = 1024 / 1664 / 1920; see :meth:`feature_size`). Any input of at least 32x32 (Keras's
    rule). ``conv_impl``: how the 3x3 convolutions run (:mod:`imgcls_jax.models.conv`)."""

    preprocessing = "torch"

    def __init__(
        self,
        arch: str = "densenet121",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str = "torch",
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(f"unknown DenseNet architecture {arch!r}; expected one of {sorted(VARIANTS)}")
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, preprocessing=preprocessing,
        )  # fmt: skip
        self.blocks = VARIANTS[arch]
        self.conv_impl = check_impl(conv_impl)
        self.conv1_conv = self._conv(3, STEM_FILTERS, 7, rngs, strides=2)
        self.conv1_bn = self._bn(STEM_FILTERS, rngs)
        cins = channels(self.blocks)
        for s, n in enumerate(self.blocks):
            c = cins[s]
            for b in range(1, n + 1):
                name = f"conv{s + 2}_block{b}"
                setattr(self, f"{name}_0_bn", self._bn(c, rngs))
                setattr(self, f"{name}_1_conv", self._conv(c, 4 * GROWTH, 1, rngs))
                setattr(self, f"{name}_1_bn", self._bn(4 * GROWTH, rngs))
                setattr(self, f"{name}_2_conv", self._conv(4 * GROWTH, GROWTH, 3, rngs))
                c += GROWTH
            if s < len(self.blocks) - 1:
                setattr(self, f"pool{s + 2}_bn", self._bn(c, rngs))
                setattr(self, f"pool{s + 2}_conv", self._conv(c, c // 2, 1, rngs))
        self.bn = self._bn(cins[-1], rngs)
        init_glorot_kernels(self.conv_kernels(), rngs.params())
        self._build_head(cins[-1], rngs)

    def _conv(self, cin: int, cout: int, k: int, rngs: nnx.Rngs, strides: int = 1) -> nnx.Conv:
        """No bias; the 3x3 convolutions SAME, run by ``conv_impl``."""
        if k == 3:
            return conv2d(cin, cout, 3, padding="SAME", use_bias=False, dtype=self.dtype, rngs=rngs,
                          conv_general_dilated=ConvGeneralDilated(self.conv_impl))  # fmt: skip
        return conv2d(cin, cout, k, strides=strides, use_bias=False, dtype=self.dtype, rngs=rngs)

    @staticmethod
    def _bn(c: int, rngs: nnx.Rngs) -> BatchNorm:
        return BatchNorm(c, epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``conv1`` (stem), the dense blocks ``conv2``..``conv5`` (``conv5`` with the final
        ``bn``) and the transitions ``pool2``..``pool4`` between them."""
        out = [("conv1", ("conv1_conv", "conv1_bn"))]
        for s, n in enumerate(self.blocks):
            parts = ("0_bn", "1_conv", "1_bn", "2_conv")
            layers = tuple(f"conv{s + 2}_block{b}_{p}" for b in range(1, n + 1) for p in parts)
            if s < len(self.blocks) - 1:
                out += [(f"conv{s + 2}", layers), (f"pool{s + 2}", (f"pool{s + 2}_bn", f"pool{s + 2}_conv"))]
            else:
                out.append((f"conv{s + 2}", (*layers, "bn")))
        return tuple(out)

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """``(h, w)`` of the feature map: the stem halves twice rounding up (``n -> ceil(n / 2)``),
        each of the three transitions halves rounding down."""
        out = []
        for n in image_size:
            for _ in range(2):
                n = -(-n // 2)
            for _ in range(3):
                n //= 2
            out.append(n)
        return tuple(out)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Torch-preprocessed images ``[N, H, W, 3]`` -> the ``relu`` map ``[N, h, w, C]``
        (``dropout_key`` unused: no stochastic layer in the backbone)."""
        x = nnx.relu(self.conv1_bn(self.conv1_conv(pad2d(x, ((3, 3), (3, 3))))))
        x = max_pool2d(pad2d(x, ((1, 1), (1, 1))), 3, 2)  # pool1 (zeros after a ReLU: as -inf)
        for s, n in enumerate(self.blocks):
            for b in range(1, n + 1):
                name = f"conv{s + 2}_block{b}"

                def layer(part, name=name):
                    return getattr(self, f"{name}_{part}")

                y = nnx.relu(layer("1_bn")(layer("1_conv")(nnx.relu(layer("0_bn")(x)))))
                x = jnp.concatenate([x, layer("2_conv")(y)], axis=-1)
            if s < len(self.blocks) - 1:
                p = f"pool{s + 2}"
                x = avg_pool2d(getattr(self, f"{p}_conv")(nnx.relu(getattr(self, f"{p}_bn")(x))), 2, 2)
        return nnx.relu(self.bn(x))


def conv_ops(model: DenseNet, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions for one ``image_size`` input, in forward order (for :func:`flops`)."""
    h, w = square(image_size)
    ops = [ConvOp(h, w, 7, 2, ((3, 3), (3, 3)), 3, STEM_FILTERS)]
    h, w = (-(-n // 2) for n in ops[0].out)  # pool1
    cins = channels(model.blocks)
    for s, n in enumerate(model.blocks):
        c = cins[s]
        for _ in range(n):
            ops += [
                ConvOp(h, w, 1, 1, NO_PADDING, c, 4 * GROWTH),
                ConvOp(h, w, 3, 1, ((1, 1), (1, 1)), 4 * GROWTH, GROWTH),
            ]
            c += GROWTH
        if s < len(model.blocks) - 1:
            ops.append(ConvOp(h, w, 1, 1, NO_PADDING, c, c // 2))
            h, w = h // 2, w // 2
    return ops


def flops(
    model: DenseNet, image_size: int | tuple[int, int], mode: str = "forward", *, padding: str = "full"
) -> float:
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): convolutions and the
    dense layers of its top or head; BatchNorm, ReLU, concatenations, pooling and the optimizer
    are left out.

    Args:
      model: a :class:`DenseNet` (its variant and head are counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``, ``"train"`` (forward + weight and input gradients of every layer, no
        input gradient of ``conv1_conv``) or ``"frozen"`` (backbone forward, the head's forward
        and both gradients).
      padding: ``"full"`` (every output position does ``k x k`` taps) or ``"valid"`` (taps on
        zero padding left out, as XLA's cost analysis counts convolutions).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(model, image_size), mode, padding)
