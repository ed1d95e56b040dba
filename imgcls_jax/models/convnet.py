"""What the Keras-application families with BatchNorm and a global-average-pooling top share
(ResNet50, MobileNetV2): their layers, options, heads, Keras weight mapping and FLOP counting.

A family subclasses :class:`KerasConvNet`, creates its weighted layers as attributes named as
Keras names them (with :func:`conv`, :func:`batch_norm`, :class:`DepthwiseConv2D`), lists them
in :attr:`stages`, and implements :meth:`KerasConvNet.backbone` (preprocessed images -> feature
map). Everything else (the Keras top, the transfer head, pooling, ``layer_specs``,
``keras_variables``, input checks) is here.

Layers follow Keras: convolution kernels HWIO (as Keras stores them), depthwise kernels
``[kh, kw, C, 1]`` (Keras's layout), BatchNorm variables in Keras's weight order (gamma = ``scale``,
beta = ``bias``, moving mean = ``mean``, moving variance = ``var``, the last two
``nnx.BatchStat``). BatchNorm computes in float32 whatever the compute dtype, as Keras does under
mixed precision, and casts its output back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from imgcls_jax.models.base import Classifier, LayerSpec, check_input_shape
from imgcls_jax.models.conv import ConvGeneralDilated, check_impl
from imgcls_jax.models.preprocessing import check_mode, preprocess_input

POOLINGS = (None, "avg", "max")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
MODES = ("forward", "train", "frozen")
#: Keras's names of a BatchNormalization layer's weights, in its file order.
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")
#: Keras's default initializers (Conv2D, DepthwiseConv2D and Dense kernels; biases zero).
KERNEL_INIT = nnx.initializers.glorot_uniform()
_zeros = nnx.initializers.zeros_init()
_NHWC = ("NHWC", "HWIO", "NHWC")


# ----------------------------------------------------------------------------------- layers
class DepthwiseConv2D(nnx.Module):
    """Keras's ``DepthwiseConv2D`` with depth multiplier 1 and no bias: a ``k x k`` filter per
    channel. ``kernel``: float32 ``[k, k, C, 1]`` (Keras's layout). ``padding``: ``"SAME"``,
    ``"VALID"``, or ``"correct_pad"``: Keras's ``ZeroPadding2D(correct_pad(x, k))`` then VALID,
    the padding set from the input's size (see :func:`correct_pad`)."""

    def __init__(self, channels: int, kernel_size: int, *, strides: int, padding, dtype, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, channels, 1)
        self.kernel = nnx.Param(KERNEL_INIT(rngs.params(), shape, jnp.float32))
        self.strides, self.padding, self.dtype = (strides, strides), padding, dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        """``x``: ``[N, H, W, C]`` -> ``[N, H', W', C]`` in the compute dtype."""
        kh, kw, channels, _ = self.kernel.shape
        kernel = self.kernel[...].reshape(kh, kw, 1, channels).astype(self.dtype)
        padding = self.padding
        if padding == "correct_pad":
            padding = (correct_pad(x.shape[1], kh), correct_pad(x.shape[2], kw))
        return lax.conv_general_dilated(
            x.astype(self.dtype), kernel, self.strides, padding,
            dimension_numbers=_NHWC, feature_group_count=channels,
        )  # fmt: skip


def conv(cin, cout, kernel_size, *, strides=1, padding="VALID", use_bias=True, dtype, impl, rngs) -> nnx.Conv:
    """A Keras ``Conv2D`` (HWIO kernel ``[k, k, cin, cout]``, optional bias) computing in
    ``dtype`` with float32 parameters; 3x3 SAME stride-1 convolutions run by ``impl`` (see
    :mod:`imgcls_jax.models.conv`)."""
    return nnx.Conv(
        cin, cout, (kernel_size, kernel_size), strides=strides, padding=padding, use_bias=use_bias,
        dtype=dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT, bias_init=_zeros,
        conv_general_dilated=ConvGeneralDilated(impl), rngs=rngs,
    )  # fmt: skip


def batch_norm(features: int, *, epsilon: float, momentum: float, rngs: nnx.Rngs) -> nnx.BatchNorm:
    """A Keras ``BatchNormalization`` over the channel axis, in inference mode until
    ``.train()``: moving averages ``m <- momentum * m + (1 - momentum) * batch statistic``
    (biased batch variance, computed as ``mean((x - mean)^2)``), float32 throughout."""
    return nnx.BatchNorm(
        features, use_running_average=True, momentum=momentum, epsilon=epsilon,
        use_fast_variance=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs,
    )  # fmt: skip


def correct_pad(size: int, kernel_size: int) -> tuple[int, int]:
    """Keras's ``imagenet_utils.correct_pad`` along one axis of length ``size``: the zero padding
    ``(before, after)`` ahead of a stride-2 VALID convolution (one less before on even sizes)."""
    half = kernel_size // 2
    return (half - (1 - size % 2), half)


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """Keras's ``ZeroPadding2D(1)`` + ``MaxPooling2D(3, strides=2)`` (VALID): ``[N, H, W, C]`` ->
    ``[N, (H - 1) // 2 + 1, (W - 1) // 2 + 1, C]``. The padding is zeros, as Keras's."""
    x = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return lax.reduce_window(x, -jnp.inf, lax.max, (1, 3, 3, 1), (1, 2, 2, 1), "VALID")


# ----------------------------------------------------------------------------------- options
def check_options(
    arch, *, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype, min_size
):
    """The options every family takes, checked as Keras does (``ValueError`` naming the bad one).
    Returns ``(num_classes, input_shape, dtype)``: 1000 classes for the Keras top by default."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if include_top and (tuple(head_units) or dropout):
        raise ValueError("head_units/dropout configure the transfer head: use include_top=False")
    if not include_top and num_classes is None and (tuple(head_units) or dropout):
        raise ValueError("head_units/dropout configure the transfer head: set num_classes")
    if include_top and num_classes is None:
        num_classes = 1000
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    shape = check_input_shape(input_shape)
    if shape[0] < min_size or shape[1] < min_size:
        raise ValueError(
            f"{arch}: Input size must be at least {min_size}x{min_size}; Received: input_shape={shape}"
        )
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return num_classes, shape, dtype


# ----------------------------------------------------------------------------------- the model
class KerasConvNet(Classifier):
    """Base of the BatchNorm families: Keras's top (global average pooling, ``predictions``), a
    transfer head, or no head, over a backbone a subclass builds.

    * ``include_top=True``: Keras's classifier, logits ``float32[N, num_classes]`` (default 1000)
      from the average-pooled features; any input size the family accepts.
    * ``include_top=False, num_classes=None``: features: the last map ``float32[N, h, w, C]``
      (``pooling=None``) or ``float32[N, C]`` (``"avg"``/``"max"``).
    * ``include_top=False, num_classes=K``: pooling (flatten when ``pooling=None``: the model then
      takes only ``input_shape``), ``head_units`` Dense+ReLU layers ``head_fc1, ...`` each followed
      by dropout (dropout on the pooled features without hidden layers), ``head_logits`` (K).

    Inputs: raw RGB ``[N, H, W, 3]`` (uint8 or float in [0, 255]), preprocessed by the model
    (``self.preprocessing``). Computation in ``dtype``, parameters float32, outputs float32.
    After construction BatchNorm uses its moving statistics and dropout is off (inference mode);
    ``model.train()`` switches both to training mode.

    Subclasses set ``arch``, ``min_size``, ``feature_channels``, build their layers in
    ``__init__`` after :meth:`_setup` and before :meth:`_build_head`, and implement
    :attr:`stages` and :meth:`backbone`. ``keras_aliases`` maps a layer name to other names
    Keras's published files use for it.
    """

    min_size: int = 32
    feature_channels: int
    keras_aliases: dict[str, tuple[str, ...]] = {}

    def _setup(self, arch, *, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype,
               preprocessing, conv_impl):  # fmt: skip
        num_classes, shape, dtype = check_options(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, min_size=self.min_size,
        )  # fmt: skip
        self.arch, self.include_top, self.pooling, self.num_classes = arch, include_top, pooling, num_classes
        self.head_units = tuple(int(u) for u in head_units)
        self.dropout_rate = float(dropout)
        self.input_shape, self.dtype = shape, dtype
        self.preprocessing = check_mode(preprocessing)
        self.conv_impl = check_impl(conv_impl)

    def _dense(self, fin: int, fout: int, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(
            fin, fout, dtype=self.dtype, param_dtype=jnp.float32, kernel_init=KERNEL_INIT, bias_init=_zeros,
            rngs=rngs,
        )  # fmt: skip

    def _build_head(self, rngs: nnx.Rngs) -> None:
        """Keras's top (``predictions``) or the transfer head, after the backbone's layers."""
        self.head_layers: tuple[str, ...] = ()
        if self.include_top:
            self.predictions = self._dense(self.feature_channels, self.num_classes, rngs)
            self.head_layers = ("predictions",)
        elif self.num_classes is not None:
            fin = self.feature_channels if self.pooling else self._flat_features()
            names = []
            for i, units in enumerate(self.head_units, start=1):
                setattr(self, f"head_fc{i}", self._dense(fin, units, rngs))
                names.append(f"head_fc{i}")
                fin = units
            self.head_logits = self._dense(fin, self.num_classes, rngs)
            self.head_layers = (*names, "head_logits")
            self.head_dropout = nnx.Dropout(self.dropout_rate, deterministic=True, rngs=rngs)

    def _flat_features(self) -> int:
        h, w = self.feature_size(self.input_shape[:2])
        return h * w * self.feature_channels

    # ------------------------------------------------------------------- what a family adds
    def backbone(self, x: jax.Array) -> jax.Array:
        """Preprocessed images ``dtype[N, H, W, 3]`` -> the last feature map ``[N, h, w, C]``."""
        raise NotImplementedError

    def feature_size(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """``(h, w)`` of the feature map for input ``(H, W)``."""
        raise NotImplementedError

    # ------------------------------------------------------------------- the interface
    def features(self, images: jax.Array) -> jax.Array:
        """The last feature map ``dtype[N, h, w, C]`` of raw RGB ``images`` ``[N, H, W, 3]``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        if min(images.shape[1:3]) < self.min_size:
            raise ValueError(
                f"{self.arch} needs images of at least {self.min_size}x{self.min_size}, got {images.shape}"
            )
        return self.backbone(preprocess_input(images, self.preprocessing, dtype=self.dtype))

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (or features, without a head) of raw RGB ``images``; see the class docstring.
        ``dropout_key``: a PRNG key for the head's dropout in training mode (each dropout layer
        folds in its index); default: the model's own ``Rngs`` stream."""
        flatten = not self.include_top and self.num_classes is not None and self.pooling is None
        if flatten and tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"this model flattens the feature map and was built for input_shape "
                f"{self.input_shape}; got images of shape {tuple(images.shape[1:])}"
            )
        return self.head(self.pool(self.features(images)), dropout_key=dropout_key)

    def pool(self, features: jax.Array) -> jax.Array:
        """Feature map ``[N, h, w, C]`` -> what the head reads: ``[N, C]`` (average for the Keras
        top and ``pooling="avg"``, max for ``"max"``), the flattened map for a transfer head
        without pooling, else the map unchanged."""
        if self.include_top or self.pooling == "avg":
            return jnp.mean(features.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.pooling == "max":
            return jnp.max(features, axis=(1, 2))
        if self.num_classes is not None:
            return features.reshape(features.shape[0], -1)
        return features

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``float32[N, K]`` from :meth:`pool`'s output (the features as float32 for a
        model without a head)."""
        x = pooled.astype(self.dtype)
        if self.include_top:
            return self.predictions(x).astype(jnp.float32)
        if self.num_classes is None:
            return x.astype(jnp.float32)

        def dropout(x, i):
            key = None if dropout_key is None else jax.random.fold_in(dropout_key, i)
            return self.head_dropout(x, rngs=key)

        if not self.head_units:
            x = dropout(x, 0)
        for i in range(1, len(self.head_units) + 1):
            x = dropout(nnx.relu(getattr(self, f"head_fc{i}")(x)), i)
        return self.head_logits(x).astype(jnp.float32)

    def bn(self, name: str, x: jax.Array) -> jax.Array:
        """BatchNorm layer ``name`` on ``x`` (in float32), cast back to the compute dtype."""
        return getattr(self, name)(x).astype(self.dtype)

    def keras_variables(self, name: str) -> list[nnx.Variable]:
        """The variables of Keras layer ``name`` in Keras's weight order: kernel (and bias) of a
        convolution or dense layer; gamma, beta, moving mean, moving variance of a BatchNorm."""
        layer = getattr(self, name)
        if isinstance(layer, nnx.BatchNorm):
            return [layer.scale, layer.bias, layer.mean, layer.var]
        bias = getattr(layer, "bias", None)
        return [layer.kernel] if bias is None else [layer.kernel, bias]

    def layer_specs(self) -> list[LayerSpec]:
        """The Keras-named layers a Keras weight file for this model holds (the backbone, and the
        top with ``include_top``), with their weights' names and shapes in Keras's order."""
        names = self.base_layers + (self.head_layers if self.include_top else ())
        specs = []
        for name in names:
            variables = self.keras_variables(name)
            kind = BN_WEIGHTS if isinstance(getattr(self, name), nnx.BatchNorm) else ("kernel", "bias")
            specs.append(
                LayerSpec(
                    name, tuple(tuple(v.shape) for v in variables), weights=kind[: len(variables)],
                    aliases=self.keras_aliases.get(name, ()),
                )
            )  # fmt: skip
        return specs


# ----------------------------------------------------------------------------------- FLOPs
@dataclass(frozen=True)
class ConvOp:
    """One convolution of a forward pass, for FLOP counting: input ``(h, w)``, square kernel
    ``k``, ``stride``, zero padding ``pads = ((top, bottom), (left, right))`` (implicit or
    explicit), channels ``cin -> cout``, ``groups`` (``cin`` for a depthwise convolution)."""

    h: int
    w: int
    k: int
    stride: int
    pads: tuple[tuple[int, int], tuple[int, int]]
    cin: int
    cout: int
    groups: int = 1

    @property
    def out(self) -> tuple[int, int]:
        (top, bottom), (left, right) = self.pads
        return (
            (self.h + top + bottom - self.k) // self.stride + 1,
            (self.w + left + right - self.k) // self.stride + 1,
        )

    def flops(self, padding: str) -> float:
        """Forward FLOPs (multiply-add = 2); ``padding="valid"`` leaves out taps on the padding."""
        taps = [
            _taps(n, o, self.k, self.stride, p[0], padding)
            for n, o, p in zip((self.h, self.w), self.out, self.pads)
        ]
        return 2.0 * taps[0] * taps[1] * self.cin * self.cout / self.groups


def _taps(size: int, out: int, k: int, stride: int, before: int, padding: str) -> int:
    """Kernel taps summed over the ``out`` output positions along one axis."""
    if padding == "full":
        return out * k
    if padding != "valid":
        raise ValueError(f"padding must be 'full' or 'valid', got {padding!r}")
    return sum(1 for o in range(out) for j in range(k) if 0 <= o * stride + j - before < size)


def same_pads(size: int, k: int, stride: int) -> tuple[int, int]:
    """The padding of a ``"SAME"`` convolution along an axis of ``size`` (TensorFlow's and XLA's:
    the odd pixel after)."""
    out = -(-size // stride)
    total = max((out - 1) * stride + k - size, 0)
    return (total // 2, total - total // 2)


def count_flops(model: KerasConvNet, ops: Sequence[ConvOp], mode: str, padding: str) -> float:
    """FLOPs of one image: ``ops`` (the backbone's convolutions in order) and the model's dense
    layers. ``mode``: ``"forward"``; ``"train"`` (every layer's forward, weight gradient and input
    gradient, except the first convolution's input gradient); ``"frozen"`` (the backbone's forward,
    the dense layers' three passes)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    convs = [op.flops(padding) for op in ops]
    dense = [2.0 * float(getattr(model, n).kernel.size) for n in model.head_layers]
    if mode == "forward":
        return sum(convs) + sum(dense)
    if mode == "frozen":
        return sum(convs) + 3 * sum(dense)
    return 3 * sum(convs) - convs[0] + 3 * sum(dense)
