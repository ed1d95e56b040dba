"""ConvNeXt Tiny / Small / Base / Large / XLarge in Flax NNX, layer for layer as
``keras.applications.ConvNeXtTiny`` ... ``ConvNeXtXLarge`` (``keras/src/applications/convnext.py``).

Every Keras layer with weights is an attribute named as Keras names it, with the Keras model's
name in front (``convnext_tiny_stem_conv``, ``convnext_tiny_stage_2_block_4_pointwise_conv_1``,
``convnext_tiny_head_dense``, ...), so Keras's weight files map one to one onto the model.

What Keras does, and so this port does:

* Inputs are raw RGB pixels in [0, 255]; the model normalises them itself with the ImageNet mean
  and standard deviation (Keras's ``PreStem``: a ``Normalization`` layer with fixed mean
  ``255 * (0.485, 0.456, 0.406)`` and variance ``(255 * (0.229, 0.224, 0.225))^2``, no weights):
  ``"torch"`` preprocessing, applied inside the model as Keras does (``include_preprocessing``,
  default True; False: the model applies none, as Keras's).
* Stem: a 4x4 stride-4 convolution (VALID, with bias) and LayerNormalization. Four stages of
  ``depths`` blocks; before stages 1-3 a downsampling block (LayerNormalization, then a 2x2
  stride-2 convolution). Maps shrink ``n -> floor(n / 4)``, then ``floor(n / 2)`` three times.
* Block: a 7x7 depthwise convolution (Keras's ``Conv2D(groups=C)``, SAME, with bias: kernel
  ``[7, 7, 1, C]``), LayerNormalization, a Dense layer to 4C (``pointwise_conv_1``), GELU (the
  exact, erf form), a Dense layer back to C (``pointwise_conv_2``), layer scale (``gamma``
  starting at 1e-6), stochastic depth, and the block's input added.
* Every LayerNormalization has epsilon 1e-6 and computes in float32 (under bfloat16 too, as
  Keras's mixed precision). No BatchNorm anywhere.
* Top (``include_top``): global average pooling, ``<name>_head_layernorm``, ``<name>_head_dense``.
  Without the top Keras ends with one more LayerNormalization (named after its class,
  ``layer_normalization``) *after* pooling (``"avg"`` / ``"max"``), or on the map itself
  (``pooling=None``): here it is the last layer of the last stage, and :meth:`ConvNeXt.pool`
  applies it, so the frozen-base path and the transfer head see what Keras's base outputs. A
  Keras user who pools the ``pooling=None`` base's output with a layer of their own computes
  pooling(LayerNormalization(map)) instead: ``final_norm="map"`` (what a whole Keras model of that
  form imports as; the default ``"pooled"`` is Keras's ``pooling="avg"`` / ``"max"`` base).
* Stochastic depth: Keras's applications build every variant with ``drop_path_rate=0`` (none);
  ``drop_path_rate`` here gives block ``b`` of ``n`` the rate ``drop_path_rate * b / (n - 1)``
  (Keras's ``linspace``), on only while the block is trained (its layer scale in training mode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from imgcls_jax.models.conv import check_impl
from imgcls_jax.models.convnet import KerasConvNet
from imgcls_jax.models.flops import NO_PADDING, ConvOp, count_flops, same_pads, square
from imgcls_jax.models.head import HeadLayer
from imgcls_jax.models.layers import (
    LayerNorm,
    LayerScale,
    _zeros,
    conv2d,
    gelu,
    init_glorot_kernels,
    stochastic_depth,
)

LN_EPSILON = 1e-6
LAYER_SCALE_INIT = 1e-6
MIN_SIZE = 32
#: The backbone's stages (``trainable="top:N"`` trains the last N and the head): the stem, then
#: stage i = its downsampling block (i > 0) and its ConvNeXt blocks.
STAGES = ("stem", "stage_0", "stage_1", "stage_2", "stage_3")


@dataclass(frozen=True)
class Variant:
    """Keras's ``MODEL_CONFIGS`` entry and the Keras model's name (its layers' prefix)."""

    keras_name: str
    depths: tuple[int, int, int, int]
    dims: tuple[int, int, int, int]
    default_size: int = 224


#: Registry name -> variant (Keras's ``MODEL_CONFIGS``).
VARIANTS = {
    "convnexttiny": Variant("convnext_tiny", (3, 3, 9, 3), (96, 192, 384, 768)),
    "convnextsmall": Variant("convnext_small", (3, 3, 27, 3), (96, 192, 384, 768)),
    "convnextbase": Variant("convnext_base", (3, 3, 27, 3), (128, 256, 512, 1024)),
    "convnextlarge": Variant("convnext_large", (3, 3, 27, 3), (192, 384, 768, 1536)),
    "convnextxlarge": Variant("convnext_xlarge", (3, 3, 27, 3), (256, 512, 1024, 2048)),
}
#: Where the final LayerNormalization of a model without top stands (see :class:`ConvNeXt`); the
#: first is the default.
FINAL_NORMS = ("pooled", "map")
BLOCK_PARTS = ("depthwise_conv", "layernorm", "pointwise_conv_1", "pointwise_conv_2", "layer_scale")


class ConvNeXt(KerasConvNet):
    """``keras.applications.ConvNeXt<Variant>`` (``arch``: ``"convnexttiny"`` ...
    ``"convnextxlarge"``) with the Keras top, a transfer head, or no head.

    * ``include_top=True``: Keras's classifier: average pooling, ``<name>_head_layernorm``,
      ``<name>_head_dense`` (``num_classes``, default 1000); logits ``float32[N, K]``.
    * ``include_top=False``: the last map after Keras's final LayerNormalization,
      ``float32[N, h, w, C]`` (``h = floor(H / 32)``; C = 768 for Tiny), or pooled (``"avg"`` /
      ``"max"``, then that LayerNormalization), or a transfer head on it (``num_classes``).

    Inputs: raw RGB ``[N, H, W, 3]``, uint8 or float in [0, 255], H and W >= 32. Computation in
    ``dtype``; parameters float32; outputs float32. ``drop_path_rate``: stochastic depth (default
    Keras's 0: none). ``final_norm``: where Keras's final LayerNormalization of a model without
    top stands for ``pooling`` ``"avg"`` / ``"max"``: ``"pooled"`` (default, after the pooling,
    as Keras's ``pooling=`` base) or ``"map"`` (on the map, before it: Keras's ``pooling=None``
    base followed by a user's pooling layer). ``conv_impl``: how every convolution computes
    (:mod:`imgcls_jax.models.conv`).
    Dropout keys: ``fold_in(dropout_key, i)``, i the head dropout's index, ``1000
    + b`` for block b's stochastic depth. See the module docstring for what Keras does.
    """

    preprocessing = "torch"
    min_size = MIN_SIZE

    def __init__(
        self,
        arch: str = "convnexttiny",
        *,
        include_top: bool = True,
        pooling: str | None = None,
        num_classes: int | None = None,
        head_units: Sequence[int] = (),
        dropout: float = 0.0,
        input_shape: tuple[int, int, int] = (224, 224, 3),
        dtype=jnp.float32,
        preprocessing: str = "torch",
        include_preprocessing: bool = True,
        drop_path_rate: float = 0.0,
        final_norm: str = "pooled",
        conv_impl: str = "auto",
        rngs: nnx.Rngs,
    ):
        if arch not in VARIANTS:
            raise ValueError(f"unknown ConvNeXt architecture {arch!r}; expected one of {sorted(VARIANTS)}")
        if final_norm not in FINAL_NORMS:
            raise ValueError(f"final_norm must be one of {FINAL_NORMS}, got {final_norm!r}")
        if final_norm == "map" and include_top:
            raise ValueError("final_norm='map' is for a model without Keras's top (include_top=False)")
        self.final_norm = final_norm
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        self._setup(
            arch, include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
            dropout=dropout, input_shape=input_shape, dtype=dtype, preprocessing=preprocessing,
            include_preprocessing=include_preprocessing,
        )  # fmt: skip
        variant = VARIANTS[arch]
        self.keras_name, self.depths, self.dims = variant.keras_name, variant.depths, variant.dims
        self.drop_path_rate = float(drop_path_rate)
        self.conv_impl = check_impl(conv_impl)
        p = self.keras_name
        self._set(
            f"{p}_stem_conv",
            self._conv(3, self.dims[0], 4, rngs, strides=4),
        )
        self._set(f"{p}_stem_layernorm", LayerNorm(self.dims[0], epsilon=LN_EPSILON, rngs=rngs))
        rates = np.linspace(0.0, self.drop_path_rate, sum(self.depths))
        for i, (depth, dim) in enumerate(zip(self.depths, self.dims)):
            if i:
                self._set(
                    f"{p}_downsampling_layernorm_{i - 1}",
                    LayerNorm(self.dims[i - 1], epsilon=LN_EPSILON, rngs=rngs),
                )
                self._set(
                    f"{p}_downsampling_conv_{i - 1}",
                    self._conv(self.dims[i - 1], dim, 2, rngs, strides=2),
                )
            for j in range(depth):
                self._block_layers(
                    f"{p}_stage_{i}_block_{j}", dim, float(rates[sum(self.depths[:i]) + j]), rngs
                )
        init_glorot_kernels(
            [self.keras_variables(n)[0] for n in self.base_layers if "conv" in n], rngs.params()
        )
        self._build_top(rngs)
        self.drop_rngs = rngs.dropout.fork()

    def _set(self, name: str, layer) -> None:
        setattr(self, name, layer)

    def _conv(self, cin: int, cout: int, k: int, rngs: nnx.Rngs, **options) -> nnx.Conv:
        """Keras's ``Conv2D`` with a bias, as every ConvNeXt convolution."""
        return conv2d(cin, cout, k, use_bias=True, dtype=self.dtype, conv_impl=self.conv_impl, rngs=rngs,
                      **options)  # fmt: skip

    def _block_layers(self, b: str, dim: int, rate: float, rngs: nnx.Rngs) -> None:
        self._set(
            f"{b}_depthwise_conv",
            self._conv(dim, dim, 7, rngs, padding="SAME", groups=dim),
        )
        self._set(f"{b}_layernorm", LayerNorm(dim, epsilon=LN_EPSILON, rngs=rngs))
        self._set(f"{b}_pointwise_conv_1", self._dense(dim, 4 * dim, _zeros, rngs))
        self._set(f"{b}_pointwise_conv_2", self._dense(4 * dim, dim, _zeros, rngs))
        self._set(f"{b}_layer_scale", LayerScale(dim, LAYER_SCALE_INIT))
        if rate > 0:
            self._set(f"{b}_stochastic_depth", stochastic_depth(rate))

    def _build_top(self, rngs: nnx.Rngs) -> None:
        """Keras's top (its own names), or the final LayerNormalization and the transfer head."""
        channels, p = self.dims[-1], self.keras_name
        if not self.include_top:
            self.layer_normalization = LayerNorm(channels, epsilon=LN_EPSILON, rngs=rngs)
            self._build_head(channels, rngs)
            return
        self.feature_channels = channels
        self._set(f"{p}_head_layernorm", LayerNorm(channels, epsilon=LN_EPSILON, rngs=rngs))
        self._set(f"{p}_head_dense", self._dense(channels, self.num_classes, self.top_init, rngs))
        self.head_layers = (f"{p}_head_layernorm", f"{p}_head_dense")

    # ------------------------------------------------------------------ Classifier interface
    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """``stem`` (stem conv and LayerNormalization), ``stage_0`` (its blocks), ``stage_1`` ..
        ``stage_3`` (the downsampling block before them, their blocks; the last also Keras's final
        LayerNormalization when the model has no top)."""
        p = self.keras_name
        out = [("stem", (f"{p}_stem_conv", f"{p}_stem_layernorm"))]
        for i, depth in enumerate(self.depths):
            layers = [f"{p}_downsampling_layernorm_{i - 1}", f"{p}_downsampling_conv_{i - 1}"] if i else []
            layers += [f"{p}_stage_{i}_block_{j}_{part}" for j in range(depth) for part in BLOCK_PARTS]
            if i == len(self.depths) - 1 and not self.include_top:
                layers.append("layer_normalization")
            out.append((f"stage_{i}", tuple(layers)))
        return tuple(out)

    def feature_size(self, image_size: Sequence[int]) -> tuple[int, int]:
        """``(floor(H / 32), floor(W / 32))``: the VALID 4x4/4 stem and 2x2/2 downsamplings."""
        return tuple(n // 4 // 2 // 2 // 2 for n in image_size)

    def backbone(self, x: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Normalised images -> the last stage's map ``dtype[N, H // 32, W // 32, C]`` (before
        the final LayerNormalization, which :meth:`pool` applies)."""
        p, index = self.keras_name, 0
        x = getattr(self, f"{p}_stem_layernorm")(getattr(self, f"{p}_stem_conv")(x))
        for i, depth in enumerate(self.depths):
            if i:
                x = getattr(self, f"{p}_downsampling_layernorm_{i - 1}")(x)
                x = getattr(self, f"{p}_downsampling_conv_{i - 1}")(x)
            for j in range(depth):
                x = self._block(f"{p}_stage_{i}_block_{j}", x, index, dropout_key)
                index += 1
        return x

    def _block(self, b: str, inputs: jax.Array, index: int, dropout_key) -> jax.Array:
        """Keras's ``ConvNeXtBlock``: depthwise 7x7, LayerNorm, Dense 4C, GELU, Dense C, layer
        scale, stochastic depth (while the block is trained), residual."""
        x = getattr(self, f"{b}_layernorm")(getattr(self, f"{b}_depthwise_conv")(inputs))
        x = getattr(self, f"{b}_pointwise_conv_2")(gelu(getattr(self, f"{b}_pointwise_conv_1")(x)))
        scale = getattr(self, f"{b}_layer_scale")
        x = scale(x)
        if hasattr(self, f"{b}_stochastic_depth") and not scale.deterministic:
            key = self.drop_rngs() if dropout_key is None else jax.random.fold_in(dropout_key, 1000 + index)
            x = getattr(self, f"{b}_stochastic_depth")(x, deterministic=False, rngs=key)
        return inputs + x

    def pool(self, features: jax.Array) -> jax.Array:
        """The map -> what the head reads: average-pooled for Keras's top; without it, pooled
        (``"avg"``/``"max"``) or the map itself, then Keras's final LayerNormalization (flattened
        for a transfer head without pooling); with ``final_norm="map"`` that LayerNormalization
        first, then the pooling."""
        if self.include_top:
            return super().pool(features)
        if self.final_norm == "map":
            features = self.layer_normalization(features)
        if self.pooling == "avg":
            x = jnp.mean(features.astype(jnp.float32), axis=(1, 2)).astype(self.dtype)
        else:
            x = jnp.max(features, axis=(1, 2)) if self.pooling == "max" else features
        if self.final_norm != "map":
            x = self.layer_normalization(x)
        return x.reshape(x.shape[0], -1) if self.pooling is None and self.num_classes is not None else x

    def keras_top(self, num_classes: int) -> tuple[str | None, tuple[HeadLayer, ...], tuple[str, ...]]:
        """Keras's own top as a head: ``(pooling, layers, Keras names)``: ``<name>_head_gap``,
        ``<name>_head_layernorm`` (epsilon 1e-6), ``<name>_head_dense`` (its softmax is the
        output's)."""
        p = self.keras_name
        layers = (HeadLayer("layernorm", epsilon=LN_EPSILON), HeadLayer("dense", units=num_classes))
        return "avg", layers, (f"{p}_head_gap", f"{p}_head_layernorm", f"{p}_head_dense")

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Keras's top (head LayerNormalization and Dense) on the pooled features, or the
        transfer head / the features (:class:`~imgcls_jax.models.convnet.KerasConvNet`)."""
        if not self.include_top:
            return super().head(pooled, dropout_key=dropout_key)
        p = self.keras_name
        x = getattr(self, f"{p}_head_layernorm")(pooled.astype(self.dtype))
        return getattr(self, f"{p}_head_dense")(x).astype(jnp.float32)


# ------------------------------------------------------------------------------------- FLOPs
def conv_ops(model: ConvNeXt, image_size: int | tuple[int, int]) -> list[ConvOp]:
    """``model``'s convolutions and pointwise Dense layers (as 1x1 convolutions) for one
    ``image_size`` input, in forward order."""
    h, w = square(image_size)
    ops = [ConvOp(h, w, 4, 4, NO_PADDING, 3, model.dims[0])]
    h, w = ops[0].out
    for i, (depth, dim) in enumerate(zip(model.depths, model.dims)):
        if i:
            ops.append(ConvOp(h, w, 2, 2, NO_PADDING, model.dims[i - 1], dim))
            h, w = ops[-1].out
        for _ in range(depth):
            ops += [
                ConvOp(h, w, 7, 1, (same_pads(h, 7, 1), same_pads(w, 7, 1)), dim, dim, groups=dim),
                ConvOp(h, w, 1, 1, NO_PADDING, dim, 4 * dim),
                ConvOp(h, w, 1, 1, NO_PADDING, 4 * dim, dim),
            ]
    return ops


def flops(model: ConvNeXt, image_size: int | tuple[int, int], mode: str = "forward", *,
          padding: str = "full") -> float:  # fmt: skip
    """Analytic FLOPs of one image through ``model`` (multiply-add = 2): the convolutions and
    pointwise Dense layers (:func:`conv_ops`) and the dense layers of the top or head;
    LayerNormalization, GELU, layer scale, pooling and the optimizer are left out.

    ``mode``: ``"forward"``, ``"train"`` (3 x forward minus the stem's input gradient) or
    ``"frozen"``; ``padding``: ``"full"`` or ``"valid"`` (taps on the depthwise convolutions'
    zero padding left out, as XLA counts). Returns FLOPs per image (float)."""
    return count_flops(model, conv_ops(model, image_size), mode, padding)
