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
from flax import nnx

#: The forms of a ``trainable`` spec (see :func:`parse_trainable`).
TRAINABLE_FORMS = "'head', 'all' or 'top:N'"


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
    """A parsed ``trainable`` spec: ``kind`` is ``"head"``, ``"all"`` or ``"top"`` (the last
    ``top`` stages of the backbone plus the head)."""

    kind: str
    top: int = 0

    def __str__(self) -> str:
        return f"top:{self.top}" if self.kind == "top" else self.kind


def parse_trainable(spec: str | Trainable) -> Trainable:
    """``"head"``, ``"all"`` or ``"top:N"`` (N >= 0) -> :class:`Trainable`; ``ValueError`` otherwise.

    Whether N fits a model is checked by :meth:`Classifier.trainable_layers` (the number of stages
    is the family's)."""
    if isinstance(spec, Trainable):
        return spec
    if spec in ("head", "all"):
        return Trainable(spec)
    match = re.fullmatch(r"top:(\d+)", spec) if isinstance(spec, str) else None
    if not match:
        raise ValueError(f"trainable must be {TRAINABLE_FORMS}, got {spec!r}")
    return Trainable("top", int(match.group(1)))


class Classifier(nnx.Module):
    """Base class of the model families.

    A family sets, in its ``__init__``: ``arch`` (its registry name), ``include_top``,
    ``pooling``, ``num_classes``, ``input_shape`` ``(H, W, 3)``, ``dtype`` (compute dtype),
    ``preprocessing`` (the :func:`~imgcls_jax.models.preprocess_input` mode it applies to raw
    pixels itself) and ``head_layers`` (names of the head's weighted layers, in order); and
    implements :attr:`stages`, :meth:`features`, :meth:`pool`, :meth:`head`,
    :meth:`layer_specs` and :meth:`keras_variables`.
    """

    arch: str
    head_layers: tuple[str, ...] = ()

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
        the last N stages of the backbone (:attr:`stages`) plus the head.
        """
        spec = parse_trainable(spec)
        head = tuple(self.head_layers)
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


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """``(H, W, 3)`` as ints, or ``ValueError``."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3 or shape[-1] != 3:
        raise ValueError(f"input_shape must be (H, W, 3), got {tuple(input_shape)}")
    return shape
