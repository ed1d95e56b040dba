"""What every model family offers, so that training, weights and evaluation need nothing
family-specific.

A model is a Flax NNX module whose weighted layers are attributes named as Keras names them
(``block1_conv1``, ``conv2_block1_1_bn``, ``predictions``, ...). It is laid out as

    images -> features (the backbone: named *stages* of layers) -> pool -> head -> logits

and a family says which layers make each stage and which make the head. Training chooses layers
by ``trainable`` specs that only use those names (:meth:`Classifier.trainable_layers`), the
frozen-base fast path calls ``pool(features(x))`` once and ``head`` per step, and the weight
loaders fill each Keras layer through :meth:`Classifier.keras_variables`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models.head import OUTPUT_ACTIVATIONS, HeadLayer, TransferHead, parse_head, with_classes

#: The forms of a ``trainable`` spec (see :func:`parse_trainable`).
TRAINABLE_FORMS = "'head', 'all', 'top:N' or 'keras'"


@dataclass(frozen=True)
class LayerSpec:
    """Name and parameter shapes of one Keras layer, in Keras's weight order (e.g. kernel, bias;
    BatchNorm: gamma, beta, moving mean, moving variance).

    ``weights``: the weights' Keras names, in that order, for messages (default: kernel, bias).
    ``aliases``: other names Keras's published files use for this layer (e.g. a top layer that
    older Keras versions named differently; Keras itself loads those files by layer order)."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    weights: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()

    @property
    def weight_names(self) -> tuple[str, ...]:
        """``weights``, or ``("kernel", "bias")`` cut to the number of shapes."""
        return (
            self.weights
            or ("kernel", "bias", *(f"weight{i}" for i in range(2, len(self.shapes))))[: len(self.shapes)]
        )


@dataclass(frozen=True)
class Trainable:
    """A parsed ``trainable`` spec: ``kind`` is ``"head"``, ``"all"``, ``"top"`` (the last
    ``top`` stages of the backbone plus the head) or ``"keras"`` (the layers the Keras model it
    was imported from trains: its layers' ``trainable`` flags, see
    :attr:`Classifier.keras_trainable`)."""

    kind: str
    top: int = 0

    def __str__(self) -> str:
        return f"top:{self.top}" if self.kind == "top" else self.kind


def parse_trainable(spec: str | Trainable) -> Trainable:
    """``"head"``, ``"all"``, ``"top:N"`` (N >= 0) or ``"keras"`` -> :class:`Trainable`;
    ``ValueError`` otherwise.

    Whether N fits a model is checked by :meth:`Classifier.trainable_layers` (the number of stages
    is the family's)."""
    if isinstance(spec, Trainable):
        return spec
    if spec in ("head", "all", "keras"):
        return Trainable(spec)
    match = re.fullmatch(r"top:(\d+)", spec) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"trainable must be {TRAINABLE_FORMS}, got {spec!r}")
    return Trainable("top", int(match.group(1)))


class Classifier(TransferHead, nnx.Module):
    """Base class of the model families.

    A family sets, in its ``__init__``: ``arch`` (its registry name), ``include_top``,
    ``pooling``, ``num_classes``, ``input_shape`` ``(H, W, 3)``, ``dtype`` (compute dtype),
    ``preprocessing`` (the :func:`~imgcls_jax.models.preprocess_input` mode it applies to raw
    pixels itself) and ``head_layers`` (names of the head's weighted layers, in order); and
    implements :attr:`stages`, :meth:`features`, :meth:`pool`, :meth:`head`,
    :meth:`layer_specs` and :meth:`keras_variables`. The transfer head is the one every family
    shares (:mod:`imgcls_jax.models.head`): built with ``_make_head``, run with ``_run_head``,
    replaced with :meth:`set_head`.

    ``output_activation`` (``"softmax"`` or ``"sigmoid"``) is how :meth:`probabilities` turns
    logits into class probabilities. ``keras_trainable``: for a model imported from Keras, the
    weighted layers its Keras ``trainable`` flags train (what ``trainable="keras"`` trains), else
    None.
    """

    arch: str
    head_layers: tuple[str, ...] = ()
    head_spec: tuple[HeadLayer, ...] = ()
    output_activation: str = "softmax"
    keras_trainable: tuple[str, ...] | None = None

    # ------------------------------------------------------------------ what a family implements
    @property
    def stages(self) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The backbone in forward order: ``(stage name, names of its weighted layers)``."""
        raise NotImplementedError

    def features(self, images: jax.Array) -> jax.Array:
        """The backbone's output map ``[N, h, w, C]`` (compute dtype) of raw RGB ``images``."""
        raise NotImplementedError

    def pool(self, features: jax.Array) -> jax.Array:
        """:meth:`features`' output -> what :meth:`head` reads (pooled or flattened)."""
        raise NotImplementedError

    def head(self, pooled: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits ``float32[N, K]`` from :meth:`pool`'s output (the features themselves, as
        float32, for a model without a head)."""
        raise NotImplementedError

    def layer_specs(self) -> list[LayerSpec]:
        """The Keras-named weighted layers a Keras weight file for this model provides, in order."""
        raise NotImplementedError

    def keras_variables(self, name: str) -> list[nnx.Variable]:
        """The variables of Keras layer ``name`` in the order of its weights in a Keras file."""
        raise NotImplementedError

    def adapt_imagenet_weights(self, layers: dict[str, list]) -> dict[str, list]:
        """Keras's published ImageNet file's arrays (``{layer: [arrays in Keras's order]}``,
        validated, read-only) -> the arrays to assign, for what Keras's application does beyond
        loading that file (e.g. EfficientNet's extra input rescaling). May raise ``ValueError``
        for a model Keras would not load them into. Default: as they are."""
        return layers

    # ----------------------------------------------------------------------------- shared logic
    def head_kernel_init(self):
        """The initializer of the head's Dense kernels: Keras's default, glorot uniform."""
        return nnx.initializers.glorot_uniform()

    def head_layer_specs(self) -> list[LayerSpec]:
        """The transfer head's weighted layers as Keras holds them (Dense: kernel, bias;
        BatchNormalization: gamma, beta, moving mean, moving variance; LayerNormalization: gamma,
        beta; without gamma or beta when built without them), under their names here."""
        if getattr(self, "include_top", False):
            return [s for s in self.layer_specs() if s.name in self.head_layers]
        specs = []
        for name in self.head_layers:
            variables, layer = self.keras_variables(name), getattr(self, name)
            specs.append(LayerSpec(name, tuple(tuple(v.shape) for v in variables), keras_weight_names(layer)))
        return specs

    def probabilities(self, logits: jax.Array) -> jax.Array:
        """Class probabilities ``float32[N, K]`` from :meth:`__call__`'s logits ``[N, K]``: a
        softmax over the classes, or an elementwise sigmoid when ``output_activation`` is
        ``"sigmoid"``."""
        logits = jnp.asarray(logits, jnp.float32)
        if self.output_activation == "sigmoid":
            return jax.nn.sigmoid(logits)
        return jax.nn.softmax(logits, axis=-1)

    def set_head(self, head, *, output_activation: str | None = None, seed: int = 0) -> None:
        """Replace the transfer head with ``head`` (:class:`~imgcls_jax.models.head.HeadLayer` s or
        their texts, e.g. ``["dense 64", "batchnorm", "activation gelu", "dense 5"]``; its last
        dense layer keeps the model's ``num_classes`` whatever it says), drawn afresh from
        ``seed``. ``output_activation``: see :meth:`probabilities` (default: unchanged).

        Raises ``ValueError`` for a model without a transfer head (the Keras top, or features
        only) or a bad head."""
        if getattr(self, "include_top", False) or getattr(self, "num_classes", None) is None:
            raise ValueError(
                f"{self.arch}: set_head needs a transfer head (include_top=False, num_classes set)"
            )
        if output_activation is not None and output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output_activation!r}"
            )
        head = with_classes(parse_head(head), self.num_classes)
        first = next(name for name in self.head_layers if hasattr(getattr(self, name), "kernel"))
        fin = getattr(self, first).kernel.shape[0]
        for name in (*self.head_layers, *dict(getattr(self, "_head_dropouts", ())).values()):
            delattr(self, name)
        self._make_head(fin, head, nnx.Rngs(params=seed, dropout=seed + 1), self.head_kernel_init())
        if output_activation is not None:
            self.output_activation = output_activation

    def base_batchnorms(self) -> list[nnx.BatchNorm]:
        """The BatchNorm layers of the base (not the transfer head's), in graph order."""
        head = set(self.head_layers) | set(dict(getattr(self, "_head_dropouts", ())).values())
        return [m for path, m in nnx.iter_modules(self)
                if isinstance(m, nnx.BatchNorm) and path[:1] and str(path[0]) not in head]  # fmt: skip

    def set_batchnorm_momentum(self, momentum: float) -> int:
        """Set every BatchNorm layer of the base (not the transfer head's, which its spec sets) to
        update its moving statistics with ``momentum`` (Keras: ``layer.momentum = momentum`` on
        each ``BatchNormalization``) and return how many there are; ``ValueError`` where the base
        has none (e.g. VGG), rather than nothing happening."""
        if not 0 <= momentum < 1:
            raise ValueError(f"BatchNorm momentum must be in [0, 1), got {momentum!r}")
        layers = self.base_batchnorms()
        if not layers:
            raise ValueError(f"{self.arch} has no BatchNorm layer in its base: bn_momentum does not apply")
        for layer in layers:
            layer.momentum = float(momentum)
        return len(layers)

    def __call__(self, images: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (or features, without a head) of raw RGB ``images`` ``[N, H, W, 3]``, uint8 or
        float in [0, 255]. ``dropout_key``: a PRNG key for dropout in training mode (default: the
        model's own ``Rngs`` stream)."""
        return self.head(self.pool(self.features(images)), dropout_key=dropout_key)

    @property
    def stage_names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.stages)

    @property
    def base_layers(self) -> tuple[str, ...]:
        """Names of the backbone's weighted layers, in order (what ImageNet weights cover)."""
        return tuple(layer for _, layers in self.stages for layer in layers)

    def trainable_layers(self, spec: str | Trainable) -> tuple[str, ...]:
        """Names of the layers a phase with ``trainable=spec`` trains.

        ``"head"``: the transfer head (or the Keras top); ``"all"``: every layer; ``"top:N"``:
        the last N stages of the backbone (:attr:`stages`) plus the head; ``"keras"``:
        :attr:`keras_trainable`.
        """
        spec = parse_trainable(spec)
        head = tuple(self.head_layers)
        if spec.kind == "keras":
            if self.keras_trainable is None:
                raise ValueError(
                    "trainable='keras' trains the layers a Keras model's trainable flags train, but this "
                    "model was not imported from Keras: start from one (init_from a Keras model file or an "
                    "import-keras run folder), or use 'head', 'all' or 'top:N'"
                )
            return tuple(self.keras_trainable)
        if spec.kind == "head":
            if not head:
                raise ValueError("trainable='head' but the model has no head (num_classes unset)")
            return head
        if spec.kind == "all":
            return self.base_layers + head
        stages = self.stage_names
        if spec.top > len(stages):
            raise ValueError(
                f"top:{spec.top} asks for more stages than {self.arch} has: top:N takes N in "
                f"0..{len(stages)} (its stages: {', '.join(stages)})"
            )
        chosen = self.stages[len(stages) - spec.top :]
        return tuple(layer for _, layers in chosen for layer in layers) + head


def keras_layer_variables(layer) -> list[nnx.Variable]:
    """A layer's variables in Keras's weight order: BatchNorm's gamma, beta, moving mean, moving
    variance; LayerNorm's gamma, beta; a convolution's or dense layer's kernel and bias (those a
    layer was built without are left out)."""
    if isinstance(layer, nnx.BatchNorm):
        return [v for v in (layer.scale, layer.bias) if v is not None] + [layer.mean, layer.var]
    if isinstance(layer, nnx.LayerNorm):
        return [v for v in (layer.scale, layer.bias) if v is not None]
    bias = getattr(layer, "bias", None)
    return [layer.kernel] if bias is None else [layer.kernel, bias]


def keras_weight_names(layer) -> tuple[str, ...]:
    """The Keras names of :func:`keras_layer_variables`' variables."""
    if isinstance(layer, nnx.BatchNorm | nnx.LayerNorm):
        names = [n for n, v in (("gamma", layer.scale), ("beta", layer.bias)) if v is not None]
        return (*names, *(("moving_mean", "moving_variance") if isinstance(layer, nnx.BatchNorm) else ()))
    return ("kernel", "bias") if getattr(layer, "bias", None) is not None else ("kernel",)


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(H, W, 3)`` as ints, or ``ValueError``."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"input_shape must be (H, W, 3), got {tuple(input_shape)}")
    return shape
