"""What the Keras-application families with BatchNorm and a global-average-pooling top share
(EfficientNet, ResNet50, MobileNetV2): options and Keras's size rules, the Keras top, the
transfer head, pooling, and the mapping of Keras weight files onto the model.

A family subclasses :class:`KerasConvNet`, calls :meth:`KerasConvNet._setup` first, creates its
weighted layers as attributes named as Keras names them (with the layers of
:mod:`imgcls_jax.models.layers`), lists them in :attr:`~imgcls_jax.models.Classifier.stages`,
calls :meth:`KerasConvNet._build_head`, and implements :meth:`KerasConvNet.backbone`
(preprocessed images -> last feature map). ``layer_specs`` and ``keras_variables`` follow from
the layers themselves: convolution and dense kernels HWIO / ``[in, out]`` (as Keras stores
them), depthwise kernels ``[k, k, C, 1]``, BatchNorm's gamma, beta, moving mean and moving
variance, Normalization's mean, variance and count.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.base import Classifier, LayerSpec, keras_layer_variables
from imgcls_jax.models.head import HeadLayer, classic_head, parse_head, with_classes
from imgcls_jax.models.layers import (
    DepthwiseConv2D,
    LayerNorm,
    LayerScale,
    Normalization,
    SeparableConv2D,
    _zeros,
)
from imgcls_jax.models.preprocessing import check_mode, preprocess_input

POOLINGS = (None, "avg", "max")
DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
#: Keras's names of each kind of layer's weights, in its file order (others: kernel, bias).
WEIGHT_NAMES = {
    nnx.BatchNorm: ("gamma", "beta", "moving_mean", "moving_variance"),
    Normalization: ("mean", "variance", "count"),
    DepthwiseConv2D: ("depthwise_kernel",),
    SeparableConv2D: ("depthwise_kernel", "pointwise_kernel"),
    LayerNorm: ("gamma", "beta"),
    LayerScale: ("gamma",),
}
#: A BatchNorm built with ``scale=False`` (the Inception families) has no gamma.
BN_NO_SCALE = ("beta", "moving_mean", "moving_variance")
_glorot = nnx.initializers.glorot_uniform()


def check_options(arch, *, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype,
                  min_size: int):  # fmt: skip
    """The options every family takes, checked with Keras's wording for sizes (``ValueError``
    naming the bad one). Returns ``(num_classes, input_shape, dtype)``: 1000 classes for the Keras
    top by default."""
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
    shape = tuple(input_shape)
    if len(shape) != 3:
        raise ValueError(f"`input_shape` must be a tuple of three integers. Received: input_shape={shape}")
    if shape[-1] != 3:
        raise ValueError(f"The input must have 3 channels; Received `input_shape={shape}`")
    if shape[0] < min_size or shape[1] < min_size:
        raise ValueError(
            f"{arch}: Input size must be at least {min_size}x{min_size}; Received: input_shape={shape}"
        )
    dtype = jnp.dtype(dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return num_classes, tuple(int(d) for d in shape), dtype


class KerasConvNet(Classifier):
    """Base of the BatchNorm families: Keras's top (global average pooling, an optional
    ``top_dropout``, ``predictions``), a transfer head, or no head, over a backbone a subclass
    builds.

    * ``include_top=True``: Keras's classifier, logits ``float32[N, num_classes]`` (default 1000)
      from the average-pooled features; any input size the family accepts.
    * ``include_top=False, num_classes=None``: features: the last map ``float32[N, h, w, C]``
      (``pooling=None``; ``h = ceil(H / 32)``) or ``float32[N, C]`` (``"avg"``/``"max"``).
    * ``include_top=False, num_classes=K``: pooling (flatten when ``pooling=None``: the model then
      takes only ``input_shape``) and the transfer head (:mod:`imgcls_jax.models.head`): by
      default ``head_units`` Dense+ReLU layers ``head_fc1, ...`` each followed by dropout (dropout
      on the pooled features without hidden layers), ``head_logits`` (K); any other with
      :meth:`~imgcls_jax.models.Classifier.set_head`.

    Inputs: raw RGB ``[N, H, W, 3]`` (uint8 or float in [0, 255]), normalised by the model
    (:meth:`preprocess`). Computation in ``dtype``, parameters and BatchNorm statistics float32,
    outputs float32. Built in inference mode; ``model.train()`` turns BatchNorm's batch statistics
    and dropout on. Dropout keys: ``fold_in(dropout_key, i)``, ``i`` the head dropout's index (0
    for the top's and for dropout on the pooled features).

    Class attributes a family may set: ``min_size`` (smallest input side), ``keras_aliases``
    (layer name -> other names Keras's published files use for it), ``top_init`` (the
    initializer of ``predictions``' kernel; Keras's default glorot uniform).
    """

    min_size: int = 32
    keras_aliases: dict[str, tuple[str, ...]] = {}
    top_init = staticmethod(_glorot)

    def _setup(self, arch: str, *, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype,
               preprocessing: str | None = None, include_preprocessing: bool = True) -> None:  # fmt: skip
        """Check and set the options every family shares (see :func:`check_options`);
        ``preprocessing``: the family's input normalisation mode (default: its class attribute).
        ``include_preprocessing=False`` (Keras's option, where the Keras model normalises its
        inputs itself): the model applies none (``"none"``): it takes inputs normalised as its
        weights expect."""
        if not include_preprocessing:
            if preprocessing not in (None, "none", getattr(self, "preprocessing", None)):
                raise ValueError(
                    f"{arch}: include_preprocessing=False applies no preprocessing, but preprocessing="
                    f"{preprocessing!r} was asked for: set one of them"
                )
            preprocessing = "none"
        num_classes, shape, dtype = check_options(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, min_size=self.min_size,
        )  # fmt: skip
        self.arch, self.include_top, self.pooling, self.num_classes = arch, include_top, pooling, num_classes
        self.head_units = tuple(int(u) for u in head_units)
        self.dropout_rate = float(dropout)
        self.input_shape, self.dtype = shape, dtype
        if preprocessing is not None:
            self.preprocessing = check_mode(preprocessing)

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

    def _build_head(self, feature_channels: int, rngs: nnx.Rngs, top_dropout: float = 0.0, *,
                    head: Sequence | None = None) -> None:  # fmt: skip
        """Keras's top (``top_dropout`` when its rate is > 0, as Keras builds it, and
        ``predictions``) or the transfer head, after the backbone's layers: ``head`` (layers of
        :mod:`imgcls_jax.models.head`, e.g. ``["dense 64 gelu", "layernorm", "dense 5"]``), by
        default the one of the options ``head_units`` / ``dropout`` (Dense + ReLU + dropout)."""
        self.feature_channels = feature_channels
        self.head_layers: tuple[str, ...] = ()
        if self.include_top:
            if top_dropout > 0:
                self.top_dropout = nnx.Dropout(top_dropout, deterministic=True, rngs=rngs)
            self.predictions = self._dense(feature_channels, self.num_classes, self.top_init, rngs)
            self.head_layers = ("predictions",)
        elif self.num_classes is not None:
            h, w = self.feature_size(self.input_shape[:2])
            fin = feature_channels * (1 if self.pooling else h * w)
            if head is None:
                head = classic_head(self.head_units, "relu", self.dropout_rate, self.num_classes)
            self._make_head(fin, with_classes(parse_head(head), self.num_classes), rngs, _glorot)

    def keras_top(self, num_classes: int) -> tuple[str | None, tuple[HeadLayer, ...], tuple[str, ...]]:
        """Keras's own top as a head: ``(pooling, layers, Keras names)``: ``avg_pool``, the
        ``top_dropout`` when the model has one, ``predictions`` (its softmax is the output's)."""
        dropout = getattr(self, "top_dropout", None)
        layers = () if dropout is None else (HeadLayer("dropout", rate=float(dropout.rate)),)
        names = ("avg_pool", *(() if dropout is None else ("top_dropout",)), "predictions")
        return "avg", (*layers, HeadLayer("dense", units=num_classes)), names

    def conv_kernels(self) -> list[nnx.Param]:
        """The backbone's convolution and depthwise kernels, in forward order (for the family's
        initializer, which draws them all at once)."""
        kernels = []
        for name in self.base_layers:
            layer = getattr(self, name)
            if isinstance(layer, SeparableConv2D):
                kernels += layer.kernels
            elif isinstance(layer, nnx.Conv | DepthwiseConv2D):
                kernels.append(layer.kernel)
        return kernels

    # ------------------------------------------------------------------- what a family adds
    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Preprocessed images ``dtype[N, H, W, 3]`` -> the last feature map ``[N, h, w, C]``;
        ``dropout_key``: the key of the backbone's own stochastic layers, if any (EfficientNet's
        drop connect)."""
        raise NotImplementedError

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """``(h, w)`` of the feature map for input ``(H, W)``: five stride-2 steps ``n -> ceil(n /
        2)`` (Keras's ``correct_pad`` / SAME / VALID choices all give that); a family with
        another rule overrides it."""
        out = []
        for n in image_size:
            for _ in range(5):
                n = -(-n // 2)
            out.append(n)
        return tuple(out)

    def preprocess(self, images: jax.Array) -> jax.Array:
        """Raw RGB ``images`` -> what :meth:`backbone` takes, in the compute dtype: Keras's
        ``preprocess_input`` in the family's mode (``self.preprocessing``)."""
        return preprocess_input(images, self.preprocessing, dtype=self.dtype)

    # ------------------------------------------------------------------- the interface
    def features(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """The last feature map ``dtype[N, h, w, C]`` of raw RGB ``images`` ``[N, H, W, 3]``."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        if min(images.shape[1:3]) < self.min_size:
            raise ValueError(
                f"{self.arch} needs images of at least {self.min_size}x{self.min_size}, got {images.shape}"
            )
        return self.backbone(self.preprocess(images), dropout_key=dropout_key)

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (or features, without a head) of raw RGB ``images``; see the class docstring.
        ``dropout_key``: the PRNG key of dropout (and the backbone's stochastic layers) in
        training mode; default: the model's own ``Rngs`` streams."""
        flatten = not self.include_top and self.num_classes is not None and self.pooling is None
        if flatten and tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"this model flattens the feature map and was built for input_shape "
                f"{self.input_shape}; got images of shape {tuple(images.shape[1:])}"
            )
        x = self.features(images, dropout_key=dropout_key)
        return self.head(self.pool(x), dropout_key=dropout_key)

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

        def dropout(layer, x, i):
            return layer(x, rngs=None if dropout_key is None else jax.random.fold_in(dropout_key, i))

        if self.include_top:
            if hasattr(self, "top_dropout"):
                x = dropout(self.top_dropout, x, 0)
            return self.predictions(x).astype(jnp.float32)
        if self.num_classes is None:
            return x.astype(jnp.float32)
        return self._run_head(x, dropout_key)

    def keras_variables(self, name: str) -> list[nnx.Variable]:
        """The variables of Keras layer ``name`` in Keras's weight order: BatchNorm's gamma (unless
        built without), beta, moving mean, moving variance; LayerNormalization's gamma, beta;
        LayerScale's gamma; Normalization's mean, variance, count; a separable convolution's
        depthwise and pointwise kernels; a convolution's or dense layer's kernel (and bias)."""
        layer = getattr(self, name)
        if isinstance(layer, LayerScale):
            return [layer.gamma]
        if isinstance(layer, Normalization):
            return [layer.mean, layer.variance, layer.count]
        if isinstance(layer, SeparableConv2D):
            return list(layer.kernels)
        return keras_layer_variables(layer)

    def layer_specs(self) -> list[LayerSpec]:
        """The Keras-named layers a Keras weight file for this model holds (the backbone, and the
        top with ``include_top``), with their weights' names and shapes in Keras's order."""
        names = self.base_layers + (self.head_layers if self.include_top else ())
        specs = []
        for name in names:
            variables = self.keras_variables(name)
            kind = next((w for t, w in WEIGHT_NAMES.items() if isinstance(getattr(self, name), t)), None)
            if kind and kind[0] == "gamma" and len(variables) == 3:
                kind = BN_NO_SCALE
            shapes = tuple(tuple(v.shape) for v in variables)
            weights = kind or ("kernel", "bias")[: len(variables)]
            specs.append(LayerSpec(name, shapes, weights, aliases=self.keras_aliases.get(name, ())))
        return specs
