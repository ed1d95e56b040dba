"""EfficientNet B0-B7 in Flax NNX, layer for layer as ``keras.applications.EfficientNetB0``...``B7``.

Layout is NHWC. Every Keras layer with weights is an attribute named as Keras names it
(``normalization``, ``stem_conv``, ``stem_bn``, ``block1a_dwconv``, ``block1a_se_reduce``,
``block2a_expand_conv``, ..., ``top_conv``, ``top_bn``, ``predictions``), so a Keras weight file
maps one-to-one onto the model (:meth:`EfficientNet.layer_specs`). The architecture is Keras's
table scaled by each variant's width and depth coefficients, with Keras's rounding
(:mod:`imgcls_jax.models.efficientnet_arch`); the layers beyond VGG's are in
:mod:`imgcls_jax.models.layers`.

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
* BatchNorm: epsilon 1e-3, momentum 0.99 (Keras's defaults, which EfficientNet keeps); in
  training the batch statistics (biased variance) normalise and the moving statistics move by
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

from imgcls_jax.models.base import Classifier, LayerSpec
from imgcls_jax.models.efficientnet_arch import (
    BLOCKS_ARGS,
    BN_EPSILON,
    BN_MOMENTUM,
    IMAGENET_STDDEV_RGB,
    MIN_SIZE,
    POOLINGS,
    VARIANTS,
    Block,
    base_layer_specs,
    blocks,
    round_filters,
)
from imgcls_jax.models.layers import (
    DepthwiseConv2D,
    Normalization,
    _ones,
    _zeros,
    choose_depthwise_impl,
    correct_pad,
    init_conv_kernels,
    swish,
)

_dense_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_out", "uniform")
_glorot = nnx.initializers.glorot_uniform()


# ------------------------------------------------------------------------------------- model
class EfficientNet(Classifier):
    """EfficientNet ``arch`` (``"efficientnetb0"`` ... ``"efficientnetb7"``) with the Keras top, a
    transfer head, or no head.

    * ``include_top=True``: Keras's ImageNet classifier: ``avg_pool``, ``top_dropout``
      (``top_dropout``, default the variant's ``dropout_rate``: 0.2 for B0) and ``predictions``
      (``num_classes``, default 1000). Logits ``float32[N, num_classes]``; any input size.
    * ``include_top=False, num_classes=None``: features: the ``top_activation`` map
      ``float32[N, h, w, C]`` (``h = ceil(H / 32)``; C = 1280 for B0) with ``pooling=None``,
      ``float32[N, C]`` with ``"avg"``/``"max"``.
    * ``include_top=False, num_classes=K``: a transfer head as :class:`~imgcls_jax.models.VGG`'s:
      pooling (flatten when ``pooling=None``: then the input must be ``input_shape``), a Dense+ReLU
      ``head_fc{i}`` per ``head_units`` entry each followed by dropout ``dropout`` (with no hidden
      units, dropout on the pooled features), then ``head_logits`` (K).

    Inputs: raw RGB ``[N, H, W, 3]``, uint8 or float in [0, 255], H and W >= 32 (Keras's
    minimum). Computation in ``dtype`` (float32, bfloat16 or float16); parameters and BatchNorm
    statistics float32; outputs float32. ``drop_connect_rate``: stochastic depth (default Keras's
    0.2). ``depthwise_impl``: how depthwise convolutions compute (:func:`choose_depthwise_impl`;
    same parameters and, to rounding, outputs). Built in inference mode; ``model.train()`` turns
    BatchNorm batch statistics, dropout and drop connect on (see the module docstring for frozen
    blocks).

    Dropout keys: ``fold_in(dropout_key, i)`` with i = the head dropout's index (0 for the top's),
    ``1000 + b`` for block b's drop connect.
    """

    preprocessing = "none"

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
        depthwise_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        num_classes, dtype = _check_options(
            arch, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype
        )
        variant = VARIANTS[arch]
        rates = {"drop_connect_rate": drop_connect_rate, "top_dropout": top_dropout}
        for key, rate in rates.items():
            if rate is not None and not 0.0 <= rate < 1.0:
                raise ValueError(f"{key} must be in [0, 1), got {rate}")
        self.arch = arch
        self.include_top = include_top
        self.pooling = pooling
        self.num_classes = num_classes
        self.head_units = tuple(int(u) for u in head_units)
        self.dropout_rate = float(dropout)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.dtype = dtype
        choose_depthwise_impl(depthwise_impl)  # checks the name
        self.depthwise_impl = depthwise_impl
        self.blocks = tuple(blocks(arch, drop_connect_rate))
        self.normalization = Normalization(3)
        for spec in base_layer_specs(arch):
            if spec.name != "normalization":
                setattr(self, spec.name, self._layer(spec, rngs))
        kernels = [
            self.keras_variables(s.name)[0] for s in base_layer_specs(arch) if "kernel" in s.weight_names[0]
        ]
        init_conv_kernels(kernels, rngs.params())
        for block in self.blocks:
            if block.residual:
                setattr(
                    self,
                    f"{block.prefix}drop",
                    nnx.Dropout(block.drop_rate, broadcast_dims=(1, 2, 3), deterministic=True),
                )
        self.features_dim = round_filters(1280, variant.width)
        self.head_layers: tuple[str, ...] = ()
        if include_top:
            rate = variant.dropout_rate if top_dropout is None else top_dropout
            self.top_dropout = nnx.Dropout(rate, deterministic=True, rngs=rngs)
            self.predictions = self._dense(self.features_dim, num_classes, _dense_init, rngs)
            self.head_layers = ("predictions",)
        elif num_classes is not None:
            fin = self.features_dim * (self._flat_pixels() if pooling is None else 1)
            for i, units in enumerate(self.head_units, start=1):
                setattr(self, f"head_fc{i}", self._dense(fin, units, _glorot, rngs))
                fin = units
            self.head_logits = self._dense(fin, num_classes, _glorot, rngs)
            self.head_layers = (*(f"head_fc{i}" for i in range(1, len(self.head_units) + 1)), "head_logits")
            self.head_dropout = nnx.Dropout(self.dropout_rate, deterministic=True, rngs=rngs)
        self.drop_rngs = rngs.dropout.fork()

    def _layer(self, spec: LayerSpec, rngs: nnx.Rngs) -> nnx.Module:
        """The Flax layer for Keras layer ``spec`` (BatchNorm, depthwise, conv with or without bias)."""
        if spec.weight_names[0] == "gamma":
            return nnx.BatchNorm(
                spec.shapes[0][0], epsilon=BN_EPSILON, momentum=BN_MOMENTUM, use_running_average=True,
                use_fast_variance=False, dtype=self.dtype, param_dtype=jnp.float32, scale_init=_ones,
                bias_init=_zeros, rngs=rngs,
            )  # fmt: skip
        kh, kw, cin, cout = spec.shapes[0]
        if spec.weight_names[0] == "depthwise_kernel":
            return DepthwiseConv2D(cin, kh, dtype=self.dtype, impl=self.depthwise_impl)
        return nnx.Conv(
            cin, cout, (kh, kw), strides=2 if spec.name == "stem_conv" else 1, padding="VALID",
            use_bias=len(spec.shapes) == 2, dtype=self.dtype, param_dtype=jnp.float32,
            kernel_init=_zeros, bias_init=_zeros, rngs=rngs,
        )  # fmt: skip

    def _dense(self, fin: int, fout: int, init, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(
            fin,
            fout,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=init,
            bias_init=_zeros,
            rngs=rngs,
        )

    def _flat_pixels(self) -> int:
        h, w = self.input_shape[:2]
        for _ in range(5):  # five stride-2 stages, each ceil(n / 2) with correct_pad
            h, w = -(-h // 2), -(-w // 2)
        return h * w

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

    def layer_specs(self) -> list[LayerSpec]:
        """Keras-named weighted layers of this model in Keras's order (a notop file has all but
        ``predictions``)."""
        specs = base_layer_specs(self.arch)
        if self.include_top:
            specs.append(
                LayerSpec("predictions", ((self.features_dim, self.num_classes), (self.num_classes,)))
            )
        return specs

    def keras_variables(self, name: str) -> list[nnx.Variable]:
        """Layer ``name``'s variables in Keras's weight order (BatchNorm: gamma, beta, moving mean,
        moving variance; normalization: mean, variance, count; convolutions: kernel[, bias])."""
        layer = getattr(self, name)
        if isinstance(layer, nnx.BatchNorm):
            return [layer.scale, layer.bias, layer.mean, layer.var]
        if isinstance(layer, Normalization):
            return [layer.mean, layer.variance, layer.count]
        return [layer.kernel] + ([layer.bias] if getattr(layer, "bias", None) is not None else [])

    @property
    def imagenet_size(self) -> int:
        """The input side its published ImageNet top was trained at (Keras's default size)."""
        return VARIANTS[self.arch].default_size

    def adapt_imagenet_weights(self, layers: dict[str, list[np.ndarray]]) -> dict[str, list[np.ndarray]]:
        """Keras's published files: fold Keras's extra ``Rescaling(1 / sqrt(stddev))`` into the
        normalization variance (see the module docstring). (Keras's rule that its ImageNet top
        takes only :attr:`imagenet_size` is checked by the loader, before this.)"""
        mean, variance, count = layers["normalization"]
        stddev = np.asarray(IMAGENET_STDDEV_RGB, np.float32)
        return {**layers, "normalization": [mean, np.asarray(variance, np.float32) * stddev, count]}

    # --------------------------------------------------------------------------- forward pass
    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (or features, without a head) of raw RGB ``images``; see the class docstring.
        ``dropout_key``: PRNG key of the drop connect and dropout in training mode (default:
        the model's own ``Rngs`` streams)."""
        flatten = not self.include_top and self.num_classes is not None and self.pooling is None
        if flatten and tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"this model flattens the feature map and was built for input_shape "
                f"{self.input_shape}; got images of shape {tuple(images.shape[1:])}"
            )
        x = self.features(images, dropout_key=dropout_key)
        return self.head(self.pool(x), dropout_key=dropout_key)

    def features(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """The ``top_activation`` map ``dtype[N, ceil(H/32), ceil(W/32), C]`` of raw RGB ``images``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        if images.shape[1] < MIN_SIZE or images.shape[2] < MIN_SIZE:
            raise ValueError(
                f"{self.arch} needs images of at least {MIN_SIZE}x{MIN_SIZE}, got {images.shape}"
            )
        x = jnp.asarray(images).astype(jnp.float32) * jnp.float32(1.0 / 255.0)  # Keras's Rescaling
        x = self.normalization(x).astype(self.dtype)
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

    def pool(self, features: jax.Array) -> jax.Array:
        """:meth:`features`' map -> what :meth:`head` reads: ``[N, C]`` pooled (average for the
        Keras top, ``pooling`` otherwise), the flattened map for a transfer head without pooling,
        else the map unchanged."""
        if self.include_top or self.pooling == "avg":
            return jnp.mean(features.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.pooling == "max":
            return jnp.max(features, axis=(1, 2))
        if self.num_classes is not None:
            return features.reshape(features.shape[0], -1)
        return features

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``float32[N, K]`` from :meth:`pool`'s output (the identity, as float32, for a
        model without a head)."""
        x = pooled.astype(self.dtype)

        def dropout(layer, x, i):
            return layer(x, rngs=None if dropout_key is None else jax.random.fold_in(dropout_key, i))

        if self.include_top:
            return self.predictions(dropout(self.top_dropout, x, 0)).astype(jnp.float32)
        if self.num_classes is None:
            return x.astype(jnp.float32)
        if not self.head_units:
            x = dropout(self.head_dropout, x, 0)
        for i in range(1, len(self.head_units) + 1):
            x = dropout(self.head_dropout, nnx.relu(getattr(self, f"head_fc{i}")(x)), i)
        return self.head_logits(x).astype(jnp.float32)


def _stage_of(name: str) -> int | None:
    return int(name[5]) if name.startswith("block") else None


def _check_options(arch, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype):
    """The options checked (``ValueError`` naming the bad one, with Keras's wording for sizes);
    returns the number of classes (1000 for the Keras top by default) and the compute dtype."""
    if arch not in VARIANTS:
        raise ValueError(f"unknown EfficientNet architecture {arch!r}; expected one of {sorted(VARIANTS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"`input_shape` must be a tuple of three integers. Received: input_shape={shape}")
    if shape[-1] != 3:
        raise ValueError(f"The input must have 3 channels; Received `input_shape={shape}`")
    if shape[0] < MIN_SIZE or shape[1] < MIN_SIZE:
        raise ValueError(f"Input size must be at least {MIN_SIZE}x{MIN_SIZE}; Received: input_shape={shape}")
    if include_top and (head_units or dropout):
        raise ValueError("head_units/dropout configure the transfer head: use include_top=False")
    if include_top and num_classes is None:
        num_classes = 1000
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return num_classes, dtype


# ------------------------------------------------------------------------------------- FLOPs
FLOP_MODES = ("forward", "train", "frozen")


def _taps(n: int, kernel: int, stride: int, pad: tuple[int, int], padding: str) -> tuple[int, int]:
    """``(output size, kernel taps summed over the outputs)`` along one axis of length ``n``;
    ``padding="valid"`` leaves out taps on the zero padding (XLA's count), ``"full"`` not."""
    out = (n + pad[0] + pad[1] - kernel) // stride + 1
    if padding == "full":
        return out, out * kernel
    if padding != "valid":
        raise ValueError(f"padding must be 'full' or 'valid', got {padding!r}")
    return out, sum(1 for o in range(out) for t in range(kernel) if 0 <= o * stride + t - pad[0] < n)


def _spatial(size: tuple[int, int], kernel: int, stride: int, padding: str) -> tuple[tuple[int, int], int]:
    """Output size and taps (rows x columns) of a k x k convolution on a ``size`` map, padded as
    the model pads it (``correct_pad`` at stride 2, SAME at stride 1)."""
    pads = correct_pad(size, kernel) if stride == 2 else ((kernel // 2,) * 2,) * 2
    (h, taps_h), (w, taps_w) = (_taps(n, kernel, stride, p, padding) for n, p in zip(size, pads))
    return (h, w), taps_h * taps_w


def flops(model: EfficientNet, image_size: int | tuple[int, int], mode: str = "forward", *,
          padding: str = "full") -> float:  # fmt: skip
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): the convolutions
    (stem, expand, depthwise, squeeze-excite, project, top) and the dense layers of the top or
    head. BatchNorm, activations, pooling and the optimizer are left out.

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
    if mode not in FLOP_MODES:
        raise ValueError(f"mode must be one of {FLOP_MODES}, got {mode!r}")
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    width = VARIANTS[model.arch].width
    stem_out = round_filters(32, width)
    size, taps = _spatial(size, 3, 2, padding)
    stem = 2.0 * taps * 3 * stem_out
    convs = []
    for block in model.blocks:
        h, w = size
        if block.expand_ratio != 1:
            convs.append(2.0 * h * w * block.filters_in * block.filters)
        size, taps = _spatial(size, block.kernel, block.strides, padding)
        convs.append(2.0 * taps * block.filters)  # depthwise: one input channel per output
        convs.append(2.0 * 2 * block.filters * block.se_filters)  # se_reduce, se_expand
        convs.append(2.0 * size[0] * size[1] * block.filters * block.filters_out)
    convs.append(2.0 * size[0] * size[1] * model.blocks[-1].filters_out * model.features_dim)  # top_conv
    dense = sum(2.0 * np.prod(getattr(model, name).kernel.shape) for name in model.head_layers)
    base = stem + sum(convs)
    if mode == "forward":
        return base + dense
    if mode == "frozen":
        return base + 3 * dense
    return 3 * base - stem + 3 * dense
