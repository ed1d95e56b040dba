"""VGG16 / VGG19 in Flax NNX with Keras-compatible layer names.

Layout is NHWC. Every layer with parameters carries the name Keras gives it
(``block1_conv1`` ... ``block5_conv3``, ``fc1``, ``fc2``, ``predictions``), so a Keras weight
file maps one-to-one onto the attributes of :class:`VGG`. Pooling layers (``block1_pool`` ...)
have no parameters and live in the forward pass.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.base import Classifier, LayerSpec, keras_layer_variables
from imgcls_jax.models.conv import ConvGeneralDilated, check_impl, max_pool_2x2
from imgcls_jax.models.head import ACTIVATIONS, OUTPUT_ACTIVATIONS, HeadLayer, classic_head
from imgcls_jax.models.preprocessing import check_mode, preprocess_input

#: Convolutions per block for each architecture; filters double per block up to 512.
BLOCKS = {"vgg16": (2, 2, 3, 3, 3), "vgg19": (2, 2, 4, 4, 4)}
FILTERS = (64, 128, 256, 512, 512)
POOLINGS = (None, "avg", "max")
#: Smallest input height and width, as Keras's ``obtain_input_shape(min_size=32)`` for VGG: five
#: 2x2/2 VALID poolings floor each side, ``H -> H // 2``, so ``block5_pool`` is ``H // 32`` high.
MIN_SIZE = 32

#: Kernel initializers by their Keras names. ``glorot_uniform`` is Keras's default (and what
#: Keras's VGG16 uses); ``he_normal`` (truncated normal, variance 2 / fan_in, as Keras's) keeps
#: the activations' scale through the ReLU stack, which suits inputs of unit scale
#: (``preprocessing="tf"`` or ``"torch"``). With ``"caffe"`` inputs (pixels minus the mean,
#: about +-128) it starts with very large logits: measured on flowers5 at 32x32 (Adam 2e-4),
#: 35% train accuracy after 6 epochs against glorot_uniform's 51%.
KERNEL_INITS = {
    "glorot_uniform": nnx.initializers.glorot_uniform(),
    "he_normal": nnx.initializers.he_normal(),
    "he_uniform": nnx.initializers.he_uniform(),
}
_zeros = nnx.initializers.zeros_init()

#: Activations of the transfer head's layers, by their Keras names (the shared head's, see
#: :mod:`imgcls_jax.models.head`); and how logits become class probabilities.
HEAD_ACTIVATIONS = ACTIVATIONS


def base_layer_specs(arch: str) -> list[LayerSpec]:
    """Convolution layers of ``arch`` in order, with Keras names and HWIO kernel shapes."""
    specs, cin = [], 3
    for b, (n_conv, filters) in enumerate(zip(BLOCKS[arch], FILTERS), start=1):
        for c in range(1, n_conv + 1):
            specs.append(LayerSpec(f"block{b}_conv{c}", ((3, 3, cin, filters), (filters,))))
            cin = filters
    return specs


def top_layer_specs(num_classes: int, flat_features: int = 7 * 7 * 512) -> list[LayerSpec]:
    """Keras's classification top: ``fc1`` and ``fc2`` (4096, ReLU) and ``predictions``."""
    return [
        LayerSpec("fc1", ((flat_features, 4096), (4096,))),
        LayerSpec("fc2", ((4096, 4096), (4096,))),
        LayerSpec("predictions", ((4096, num_classes), (num_classes,))),
    ]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_input_shape(input_shape) -> tuple[int, int, int]:
    """``input_shape`` as ``(H, W, 3)`` ints, or the ``ValueError`` Keras's ``obtain_input_shape``
    gives for VGG (three integers; at least 32x32), with what to do. Channels must be 3 (Keras only
    warns for 1 or 4 without ImageNet weights): the model's ``preprocess_input`` reads RGB."""
    shape = tuple(input_shape) if isinstance(input_shape, (tuple, list)) else None
    if shape is None or len(shape) != 3 or not all(_is_int(d) for d in shape):
        raise ValueError(
            f"`input_shape` must be a tuple of three integers (height, width, 3); received "
            f"input_shape={input_shape!r}"
        )
    height, width, channels = shape = tuple(int(d) for d in shape)
    if channels != 3:
        raise ValueError(
            f"The input must have 3 channels; received input_shape={shape}: the model preprocesses "
            "RGB images (convert grayscale to RGB first)"
        )
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ValueError(
            f"Input size must be at least {MIN_SIZE}x{MIN_SIZE}; received input_shape={shape} "
            "(VGG's five 2x2 poolings halve each side): use a larger input_shape"
        )
    return shape


class VGG(Classifier):
    """VGG16/VGG19 backbone with the Keras top, a transfer head, or no head.

    Three shapes of model, as in ``keras.applications.VGG16``:

    * ``include_top=True``: the ImageNet classifier (``fc1``, ``fc2``, ``predictions``);
      input must be ``input_shape`` (224x224 by default; ImageNet weights need exactly that, as
      in Keras) because ``fc1`` is a dense layer over the flattened ``(H // 32) x (W // 32) x 512``
      map. Returns logits ``float32[N, num_classes]``.
    * ``include_top=False, num_classes=None``: a feature extractor. ``pooling=None`` returns the
      ``block5_pool`` map ``float32[N, H // 32, W // 32, 512]``; ``"avg"``/``"max"`` return
      ``float32[N, 512]``. Any input of at least 32x32 works, non-square and odd sizes included:
      each 2x2/2 VALID pooling drops an odd last row/column, as Keras's (180x180 gives 5x5).
    * ``include_top=False, num_classes=K``: a transfer head over the features: pooling (or
      flatten when ``pooling=None``), then for each entry of ``head_units`` a Dense+ReLU layer
      (``head_fc1``, ...) followed by dropout, then ``head_logits`` (K). With no hidden units the
      dropout is applied to the pooled features. Returns logits ``float32[N, K]``.
      ``head_activation`` names the hidden layers' activation (see :data:`HEAD_ACTIVATIONS`); any
      other head (normalisation layers, several activations and dropout rates) with
      :meth:`~imgcls_jax.models.Classifier.set_head`.

    Outputs are always logits; :meth:`probabilities` turns them into class probabilities with
    ``output_activation`` (``"softmax"``, the default, or ``"sigmoid"``).

    Inputs are RGB images ``[N, H, W, 3]``, ``uint8`` or float in ``[0, 255]``; the model applies
    ``preprocess_input(images, self.preprocessing)`` itself, so weights are never paired with the
    wrong normalisation. Computation runs in ``dtype`` (float32 or bfloat16); parameters are
    always float32 and outputs are float32.

    ``kernel_init`` names the initializer of every kernel (see :data:`KERNEL_INITS`; biases start
    at zero); it matters only for layers that are not loaded from a weight file.

    ``conv_impl`` picks how the 3x3 convolutions compute (see :mod:`imgcls_jax.models.conv`):
    ``"auto"`` (default: on CPU oneDNN's kernels where they are available, im2col + matmul for
    small maps; XLA's convolution elsewhere), ``"xla"``, ``"im2col"`` or ``"onednn"``. All give
    the same parameters and, to float rounding, the same outputs; only speed and memory differ.
    Max pooling always uses :func:`imgcls_jax.models.conv.max_pool_2x2` (``nnx.max_pool``'s
    values and gradient, faster).

    Dropout is off after construction (inference mode, like calling a Keras model); call
    ``model.train()`` to enable it and ``model.eval()`` to disable it again.
    """

    def __init__(
        self,
        arch: str = "vgg16",
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
        kernel_init: str = "glorot_uniform",
        head_activation: str = "relu",
        output_activation: str = "softmax",
        rngs: nnx.Rngs,
    ):
        num_classes, dtype = _check_options(
            arch, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype, kernel_init
        )
        _check_activations(include_top, head_activation, output_activation)
        height, width, channels = check_input_shape(input_shape)

        self.arch = arch
        self.include_top = include_top
        self.pooling = pooling
        self.num_classes = num_classes
        self.head_units = tuple(int(u) for u in head_units)
        self.dropout_rate = float(dropout)
        self.input_shape = (height, width, channels)
        self.dtype = dtype
        self.preprocessing = check_mode(preprocessing)
        self.conv_impl = check_impl(conv_impl)
        self.kernel_init = kernel_init
        self.head_activation = head_activation
        self.output_activation = output_activation
        conv_fn = ConvGeneralDilated(conv_impl)

        for spec in base_layer_specs(arch):
            (kh, kw, cin, cout), _ = spec.shapes
            conv = nnx.Conv(
                cin,
                cout,
                (kh, kw),
                padding="SAME",
                dtype=dtype,
                param_dtype=jnp.float32,
                kernel_init=KERNEL_INITS[kernel_init],
                bias_init=_zeros,
                conv_general_dilated=conv_fn,
                rngs=rngs,
            )
            setattr(self, spec.name, conv)

        self.head_layers: tuple[str, ...] = ()
        if include_top:
            for spec in top_layer_specs(num_classes, self._flat_features()):
                (fin, fout), _ = spec.shapes
                setattr(self, spec.name, self._dense(fin, fout, rngs))
            self.head_layers = ("fc1", "fc2", "predictions")
        elif num_classes is not None:
            fin = self._flat_features() if pooling is None else FILTERS[-1]
            head = classic_head(self.head_units, head_activation, self.dropout_rate, num_classes)
            self._make_head(fin, head, rngs, self.head_kernel_init())

    def head_kernel_init(self):
        """The head's Dense kernels start as every kernel: ``kernel_init``."""
        return KERNEL_INITS[self.kernel_init]

    def _flat_features(self) -> int:
        height, width, _ = self.input_shape
        return (height // 32) * (width // 32) * FILTERS[-1]

    def _dense(self, fin: int, fout: int, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(
            fin,
            fout,
            dtype=self.dtype,
            param_dtype=jnp.float32,
            kernel_init=KERNEL_INITS[self.kernel_init],
            bias_init=_zeros,
            rngs=rngs,
        )

    def keras_top(self, num_classes: int) -> tuple[str | None, tuple[HeadLayer, ...], tuple[str, ...]]:
        """Keras's own top as a head: ``(pooling, layers, Keras names)``: ``flatten``, ``fc1`` and
        ``fc2`` (4096, ReLU) and ``predictions`` (``num_classes``; its softmax is the output's)."""
        fc = HeadLayer("dense", units=4096, activation="relu")
        return None, (fc, fc, HeadLayer("dense", units=num_classes)), ("flatten", "fc1", "fc2", "predictions")

    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The five convolution blocks, ``("block1", ("block1_conv1", "block1_conv2")), ...``."""
        return tuple(
            (f"block{b}", tuple(f"block{b}_conv{c}" for c in range(1, n_conv + 1)))
            for b, n_conv in enumerate(BLOCKS[self.arch], start=1)
        )

    def keras_variables(self, name: str) -> list[nnx.Variable]:
        """Kernel and bias of the convolution or dense layer ``name`` (Keras's weight order; a
        head's normalisation layers: see :func:`~imgcls_jax.models.base.keras_layer_variables`)."""
        return keras_layer_variables(getattr(self, name))

    def layer_specs(self) -> list[LayerSpec]:
        """Keras-named layers a Keras weight file for this model must provide, in order."""
        specs = base_layer_specs(self.arch)
        if self.include_top:
            specs += top_layer_specs(self.num_classes, self._flat_features())
        return specs

    def features(self, images: jax.Array) -> jax.Array:
        """``block5_pool`` output, ``dtype[N, H // 32, W // 32, 512]``, from raw RGB ``images``
        ``[N, H, W, 3]`` with H, W >= 32 (any size; it need not be ``input_shape``)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected images [N, H, W, 3], got shape {images.shape}")
        if images.shape[1] < MIN_SIZE or images.shape[2] < MIN_SIZE:
            raise ValueError(
                f"Input size must be at least {MIN_SIZE}x{MIN_SIZE}; received images of shape "
                f"{images.shape} (five 2x2 poolings would leave an empty map): resize them first"
            )
        x = preprocess_input(images, self.preprocessing, dtype=self.dtype)
        for b, n_conv in enumerate(BLOCKS[self.arch], start=1):
            for c in range(1, n_conv + 1):
                x = nnx.relu(getattr(self, f"block{b}_conv{c}")(x))
            x = max_pool_2x2(x)  # block{b}_pool: nnx.max_pool 2x2/2 with a faster gradient
        return x

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (or features, without a head) of raw RGB ``images``; see the class docstring.

        ``dropout_key``: a PRNG key for the head's dropout in training mode (each dropout layer
        folds in its index); default: the model's own ``Rngs`` stream.
        """
        x = self.features(images)
        flatten = self.include_top or (self.num_classes is not None and self.pooling is None)
        if flatten and tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"this model flattens the feature map and was built for input_shape "
                f"{self.input_shape}; got images of shape {tuple(images.shape[1:])}"
            )
        return self.head(self.pool(x), dropout_key=dropout_key)

    def pool(self, features: jax.Array) -> jax.Array:
        """The ``block5_pool`` map ``[N, h, w, 512]`` -> what the head reads: ``[N, 512]`` with
        ``pooling`` avg/max, the flattened map (row-major over h, w, c, as Keras's ``Flatten``)
        when the model has a top or a head without pooling, else the map unchanged."""
        if self.include_top:
            return features.reshape(features.shape[0], -1)
        if self.pooling == "avg":
            return jnp.mean(features.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        if self.pooling == "max":
            return jnp.max(features, axis=(1, 2))
        if self.num_classes is not None:
            return features.reshape(features.shape[0], -1)
        return features

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``float32[N, K]`` from :meth:`pool`'s output (the identity, as float32, for a
        model without a head). Training a head on cached features calls this alone."""
        x = pooled.astype(self.dtype)
        if self.include_top:
            x = nnx.relu(self.fc1(x))
            x = nnx.relu(self.fc2(x))
            return self.predictions(x).astype(jnp.float32)
        if self.num_classes is None:
            return x.astype(jnp.float32)
        return self._run_head(x, dropout_key)


def _check_options(
    arch, include_top, pooling, num_classes, head_units, dropout, input_shape, dtype, kernel_init
):
    """:class:`VGG`'s options checked (``ValueError`` naming the bad one); returns the number of
    classes (1000 for the Keras top by default) and the compute dtype."""
    if arch not in BLOCKS:
        raise ValueError(f"unknown VGG architecture {arch!r}; expected one of {sorted(BLOCKS)}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    check_input_shape(input_shape)
    if include_top and (head_units or dropout):
        raise ValueError("head_units/dropout configure the transfer head: use include_top=False")
    if include_top and num_classes is None:
        num_classes = 1000
    if num_classes is not None and num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if kernel_init not in KERNEL_INITS:
        raise ValueError(f"unknown kernel_init {kernel_init!r}; expected one of {sorted(KERNEL_INITS)}")
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    return num_classes, dtype


def _check_activations(include_top: bool, head_activation: str, output_activation: str) -> None:
    if head_activation not in HEAD_ACTIVATIONS:
        raise ValueError(
            f"unknown head_activation {head_activation!r}; expected one of {sorted(HEAD_ACTIVATIONS)}"
        )
    if include_top and head_activation != "relu":
        raise ValueError("head_activation configures the transfer head: use include_top=False")
    if output_activation not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}")
