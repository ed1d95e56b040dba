"""EfficientNet B0-B7 in Flax NNX, layer for layer as ``keras.applications.EfficientNetB0``...``B7``.

Layout is NHWC. Every Keras layer with weights is an attribute named as Keras names it
(``normalization``, ``stem_conv``, ``stem_bn``, ``block1a_dwconv``, ``block1a_se_reduce``,
``block2a_expand_conv``, ..., ``top_conv``, ``top_bn``, ``predictions``), so a Keras weight file
maps one-to-one onto the model (:meth:`EfficientNet.layer_specs`). The architecture is Keras's
table scaled by each variant's width and depth coefficients, with Keras's rounding
(:mod:`imgcls_jax.models.efficientnet_arch`); the layers beyond VGG's are in
:mod:`imgcls_jax.models.layers`, the top, head and weight mapping the BatchNorm families share in
:mod:`imgcls_jax.models.convnet`.

What Keras does, and so this port does:

* Inputs are raw RGB pixels in [0, 255]: the model rescales them by 1/255 and normalises them with
  its ``normalization`` layer (``(x - mean) / sqrt(variance)``; variables in the weight files, the
  identity before any are loaded). ``preprocessing`` is therefore ``"none"``.
* Keras's ImageNet model (``weights="imagenet"``) has one more layer, ``Rescaling(1 /
  sqrt(stddev))``, because its published files hold the ImageNet standard deviation where the
  Normalization layer expects a variance (tensorflow/tensorflow#49930). Here that factor is folded
  into the ``normalization`` variance when the published file is loaded
  (:meth:`EfficientNet.adapt_imagenet_weights`): ``(x - m) / sqrt(v) / sqrt(s) = (x - m) /
  sqrt(v * s)``, so the model's variables alone define its function (checkpoints and exported
  files keep it). A file loaded by path is taken as Keras's ``weights=path`` takes it: as is.
* Stride-2 convolutions zero-pad first with ``imagenet_utils.correct_pad`` (one pixel fewer
  before than after on even sides, both equal on odd ones), then run VALID; stride-1 depthwise
  convolutions are SAME.
* BatchNorm: epsilon 1e-3, momentum 0.99 (Keras's defaults, which EfficientNet keeps), in
  float32 under bfloat16 compute too (as Keras's mixed precision); in training the batch
  statistics (biased variance) normalise and the moving statistics move by
  ``momentum * moving + (1 - momentum) * batch``.
* Squeeze-and-excitation in every block; swish activations (``x * sigmoid(x)``).
* Stochastic depth ("drop connect"): Keras's ``Dropout(rate, noise_shape=(None, 1, 1, 1))``
  on the residual branch of block ``b`` of ``n``, with rate ``drop_connect_rate * b / n``;
  the top has ``Dropout(dropout_rate)`` before ``predictions``.

Training: a block's drop connect is on only while that block is being trained (its
``project_bn`` in training mode): layers a phase freezes run in inference mode, so a frozen base
computes the same features as the frozen-base fast path. (Keras with ``layer.trainable=False``
on the frozen layers keeps their drop connect on in ``fit``; with ``trainable=False`` on the
base model called with ``training=False``, as Keras's transfer-learning guide does, it is off.)
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax.models.base import LayerSpec
from imgcls_jax.models.conv import check_impl, depthwise_impl_for
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.efficientnet_arch import (
    BLOCKS_ARGS,
    BN_EPSILON,
    BN_MOMENTUM,
    IMAGENET_STDDEV_RGB,
    MIN_SIZE,
    VARIANTS,
    Block,
    base_layer_specs,
    blocks,
    round_filters,
)
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, same_pads, square
from imgcls_jax.models.layers import (
    BatchNorm,
    DepthwiseConv2D,
    Normalization,
    choose_depthwise_impl,
    conv2d,
    correct_pad,
    init_conv_kernels,
    swish,
)


# ------------------------------------------------------------------------------------- model
class EfficientNet(KerasConvNet):
    """EfficientNet ``arch`` (``"efficientnetb0"`` ... ``"efficientnetb7"``) with the Keras top, a
    transfer head, or no head (see :class:`~imgcls_jax.models.convnet.KerasConvNet`).

    * ``include_top=True``: Keras's ImageNet classifier: ``avg_pool``, ``top_dropout``
      (``top_dropout``, default the variant's ``dropout_rate``: 0.2 for B0; none at 0, as Keras)
      and ``predictions`` (``num_classes``, default 1000). Any input size.
    * ``include_top=False``: the ``top_activation`` map ``float32[N, h, w, C]`` (``h = ceil(H /
      32)``; C = 1280 for B0), pooled with ``pooling``, or a transfer head (``num_classes``).

    Inputs: raw RGB ``[N, H, W, 3]``, uint8 or float in [0, 255], H and W >= 32 (Keras's
    minimum). Computation in ``dtype`` (float32, bfloat16 or float16); parameters and BatchNorm
    statistics float32; outputs float32. ``drop_connect_rate``: stochastic depth (default Keras's
    0.2). ``conv_impl``: how every convolution computes (:mod:`imgcls_jax.models.conv`);
    ``depthwise_impl``: the depthwise ones, when not ``"auto"``
    (:func:`~imgcls_jax.models.conv.depthwise_impl_for`); same parameters and, to rounding,
    outputs. Built in inference mode; ``model.train()`` turns
    BatchNorm batch statistics, dropout and drop connect on (see the module docstring for frozen
    blocks).

    Dropout keys: ``fold_in(dropout_key, i)`` with i = the head dropout's index (0 for the top's),
    ``1000 + b`` for block b's drop connect.
    """

    preprocessing = "none"
    min_size = MIN_SIZE
    #: Keras's ``DENSE_KERNEL_INITIALIZER`` for ``predictions``
    top_init = staticmethod(nnx.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform"))

    def __init__(
        self,
        arch: str = "efficientnetb0",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        drop_connect_rate: float | None = None,
        top_dropout: float | None = None,
        conv_impl: str = "auto",
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(
                f"unknown EfficientNet architecture {arch!r}; expected one of {sorted(VARIANTS)}"
            )
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype,
        )  # fmt: skip
        variant = VARIANTS[arch]
        for key, rate in {"drop_connect_rate": drop_connect_rate, "top_dropout": top_dropout}.items():
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {rate}")
        self.conv_impl = check_impl(conv_impl)
        self.depthwise_impl = choose_depthwise_impl(depthwise_impl)  # checks the name
        self.blocks = tuple(blocks(arch, drop_connect_rate))
        self.normalization = Normalization(3)
        for spec in base_layer_specs(arch):
            if spec.name != "normalization":
                setattr(self, spec.name, self._layer(spec, rngs))
        init_conv_kernels(self.conv_kernels(), rngs.params())
        for block in self.blocks:
            if block.residual:
                drop = nnx.Dropout(block.drop_rate, broadcast_dims=(1, 2, 3), deterministic=True)
                setattr(self, f"{block.prefix}drop", drop)
        rate = variant.dropout_rate if top_dropout is None else top_dropout
        self._build_head(round_filters(1280, variant.width), rngs, top_dropout=rate)
        self.drop_rngs = rngs.dropout.fork()

    def _layer(self, spec: LayerSpec, rngs: nnx.Rngs) -> nnx.Module:
        """The Flax layer for Keras layer ``spec`` (BatchNorm, depthwise, conv with or without bias)."""
        if spec.weight_names[0] == "gamma":
            return BatchNorm(spec.shapes[0][0], epsilon=BN_EPSILON, momentum=BN_MOMENTUM, rngs=rngs)
        kh, _, cin, cout = spec.shapes[0]
        if spec.weight_names[0] == "depthwise_kernel":
            impl = depthwise_impl_for(self.conv_impl, self.depthwise_impl)
            return DepthwiseConv2D(cin, kh, dtype=self.dtype, impl=impl)
        strides = 2 if spec.name == "stem_conv" else 1
        return conv2d(cin, cout, kh, strides=strides, use_bias=len(spec.shapes) == 2, dtype=self.dtype,
                      conv_impl=self.conv_impl, rngs=rngs)  # fmt: skip

    # ------------------------------------------------------------------ Classifier interface
    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``stem`` (normalization, stem_conv, stem_bn), ``block1`` ... ``block7``, ``top``
        (top_conv, top_bn): Keras's layer-name prefixes."""
        specs = [s.name for s in base_layer_specs(self.arch)]
        out = [("stem", tuple(specs[:3]))]
        for stage in range(1, len(BLOCKS_ARGS) + 1):
            out.append((f"block{stage}", tuple(n for n in specs if _stage_of(n) == stage)))
        return (*out, ("top", ("top_conv", "top_bn")))

    def adapt_imagenet_weights(self, layers: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """Keras's published files: fold Keras's extra ``Rescaling(1 / sqrt(stddev))`` into the
        normalization variance (see the module docstring). (Keras's rule that its ImageNet top
        takes only the variant's default size is checked by the loader, before this.)"""
        mean, variance, count = layers["normalization"]
        stddev = np.asarray(IMAGENET_STDDEV_RGB, np.float32)
        return {**layers, "normalization": [mean, np.asarray(variance, np.float32) * stddev, count]}

    # --------------------------------------------------------------------------- forward pass
    def preprocess(self, images: jax.Array) -> jax.Array:
        """Keras's ``Rescaling(1/255)`` and the ``normalization`` layer, in float32, then the
        compute dtype."""
        x = jnp.asarray(images).astype(jnp.float32) * jnp.float32(1.0 / 255.0)
        return self.normalization(x).astype(self.dtype)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Normalised images -> the ``top_activation`` map ``dtype[N, ceil(H/32), ceil(W/32), C]``;
        ``dropout_key``: the drop connect's key in training mode."""
        x = jnp.pad(x, ((0, 0), *correct_pad(x.shape[1:3], 3), (0, 0)))  # stem_conv_pad
        x = swish(self.stem_bn(self.stem_conv(x)))  # stride 2, VALID
        for index, block in enumerate(self.blocks):
            x = self._block(block, x, index, dropout_key)
        return swish(self.top_bn(self.top_conv(x)))

    def _block(self, block: Block, inputs: jax.Array, index: int, dropout_key) -> jax.Array:
        """Keras's ``efficientnet.block``: expand, depthwise, squeeze-excite, project, residual."""
        p = block.prefix
        x = inputs
        if block.expand_ratio != 1:
            x = swish(getattr(self, f"{p}expand_bn")(getattr(self, f"{p}expand_conv")(x)))
        # stride 2: Keras's dwconv_pad (correct_pad); stride 1: "same" (odd kernels: k // 2 each side)
        pad = (
            correct_pad(x.shape[1:3], block.kernel) if block.strides == 2 else ((block.kernel // 2,) * 2,) * 2
        )
        x = getattr(self, f"{p}dwconv")(jnp.pad(x, ((0, 0), *pad, (0, 0))), block.strides)
        x = swish(getattr(self, f"{p}bn")(x))
        se = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)  # se_squeeze
        se = jax.nn.sigmoid(getattr(self, f"{p}se_expand")(swish(getattr(self, f"{p}se_reduce")(se))))
        x = getattr(self, f"{p}project_bn")(getattr(self, f"{p}project_conv")(x * se))
        if not block.residual:
            return x
        bn = getattr(self, f"{p}project_bn")
        if not bn.use_running_average and block.drop_rate > 0:  # the block is being trained
            key = self.drop_rngs() if dropout_key is None else jax.random.fold_in(dropout_key, 1000 + index)
            x = getattr(self, f"{p}drop")(x, deterministic=False, rngs=key)
        return x + inputs


def _stage_of(name: str) -> int | None:
    return int(name[5]) if name.startswith("block") else None


# ------------------------------------------------------------------------------------- FLOPs
def conv_ops(model: EfficientNet, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions (stem, expand, depthwise, squeeze-excite, project, top) for one
    ``image_size`` input, in forward order, padded as the model pads them (``correct_pad`` at
    stride 2, SAME at stride 1)."""
    (h, w), width = square(image_size), VARIANTS[model.arch].width
    stem = round_filters(32, width)
    ops = [ConvOp(h, w, 3, 2, correct_pad((h, w), 3), 3, stem)]
    h, w = ops[0].out
    for block in model.blocks:
        if block.expand_ratio != 1:
            ops.append(ConvOp(h, w, 1, 1, NO_PADDING, block.filters_in, block.filters))
        k, s = block.kernel, block.strides
        pads = correct_pad((h, w), k) if s == 2 else (same_pads(h, k, 1), same_pads(w, k, 1))
        ops.append(ConvOp(h, w, k, s, pads, block.filters, block.filters, groups=block.filters))
        h, w = ops[-1].out
        ops += [
            ConvOp(1, 1, 1, 1, NO_PADDING, block.filters, block.se_filters),  # se_reduce
            ConvOp(1, 1, 1, 1, NO_PADDING, block.se_filters, block.filters),  # se_expand
            ConvOp(h, w, 1, 1, NO_PADDING, block.filters, block.filters_out),  # project
        ]
    return [*ops, ConvOp(h, w, 1, 1, NO_PADDING, model.blocks[-1].filters_out, model.feature_channels)]


def flops(model: EfficientNet, image_size: int | tuple[int, int], mode: str = "forward", *,
          padding: str = "full") -> float:  # fmt: skip
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): the convolutions
    (:func:`conv_ops`) and the dense layers of the top or head. BatchNorm, activations, pooling
    and the optimizer are left out.

    Args:
      model: an :class:`EfficientNet` (its variant, top or head are counted).
      image_size: input height and width in pixels (an int for square inputs).
      mode: ``"forward"``; ``"train"`` (every layer trained: forward, weight and input gradients,
        no input gradient of the stem convolution: 3 x forward - stem); ``"frozen"`` (the base
        forward, the dense layers' three passes).
      padding: ``"full"`` (every output position does k x k taps) or ``"valid"`` (taps on the
        zero padding not counted, as XLA's cost analysis counts a convolution).
    Returns: FLOPs per image (float).
    """
    return count_flops(model, conv_ops(model, image_size), mode, padding)
