"""The transfer head every family shares: the layers between the pooled features and the logits.

A head is a sequence of :class:`HeadLayer` s, what Keras users put after the base:

* ``dense UNITS [ACTIVATION]``: ``Dense(UNITS, activation=ACTIVATION)`` (default linear);
* ``batchnorm [epsilon=E] [momentum=M] [center=0] [scale=0]``: ``BatchNormalization`` over the
  features (Keras's defaults: epsilon 1e-3, momentum 0.99);
* ``layernorm [epsilon=E] [center=0] [scale=0]``: ``LayerNormalization`` (epsilon 1e-3);
* ``activation NAME``: ``Activation(NAME)`` (:data:`ACTIVATIONS`);
* ``dropout RATE``: ``Dropout(RATE)``.

The last ``dense`` layer gives the logits (``head_logits``); the others are ``head_fc1``,
``head_fc2``, ...; normalisation layers ``head_bn1``, ... and ``head_ln1``, ... (numbered per
kind). A head is written as text, one layer per string (``("dense 256 relu", "dropout 0.5",
"dense 5")``), which is what ``TrainConfig.head`` holds and :func:`parse_head` reads; the classic
options ``head_units`` / ``head_activation`` / ``dropout`` are the head :func:`classic_head`
returns (Dense + activation + dropout per hidden layer; dropout on the pooled features when there
is no hidden layer).

Dropout keys: ``fold_in(dropout_key, i)`` with ``i`` the number of Dense layers before the
dropout (a second dropout at the same place folds in its occurrence too), as the classic head has
always drawn them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

#: Activations by their Keras names; each computes what ``keras.activations.<name>`` does
#: (``gelu`` is the exact erf form, Keras's default).
ACTIVATIONS = {
    "relu": nnx.relu,
    "linear": lambda x: x,
    "tanh": jnp.tanh,
    "sigmoid": nnx.sigmoid,
    "elu": nnx.elu,
    "selu": nnx.selu,
    "gelu": partial(jax.nn.gelu, approximate=False),
    "silu": nnx.silu,
    "swish": nnx.silu,
    "softplus": nnx.softplus,
    "relu6": jax.nn.relu6,
    "softmax": partial(jax.nn.softmax, axis=-1),
}
#: How logits become class probabilities: ``softmax`` (one class per image) or ``sigmoid``
#: (independent classes, e.g. a Keras model ending in ``Dense(K, activation="sigmoid")``).
OUTPUT_ACTIVATIONS = ("softmax", "sigmoid")
KINDS = ("dense", "batchnorm", "layernorm", "activation", "dropout")
#: Keras's defaults for the normalisation layers.
BN_DEFAULTS = {"epsilon": 1e-3, "momentum": 0.99}
LN_DEFAULTS = {"epsilon": 1e-3}
_glorot = nnx.initializers.glorot_uniform()
_zeros = nnx.initializers.zeros_init()


@dataclass(frozen=True)
class HeadLayer:
    """One layer of a head (see the module docstring); fields unused by its kind keep their
    defaults."""

    kind: str
    units: int = 0
    activation: str = "linear"
    rate: float = 0.0
    epsilon: float = 1e-3
    momentum: float = 0.99
    center: bool = True
    scale: bool = True

    def __str__(self) -> str:
        """The text form :func:`parse_head` reads back."""
        if self.kind == "dense":
            return f"dense {self.units}" + ("" if self.activation == "linear" else f" {self.activation}")
        if self.kind == "activation":
            return f"activation {self.activation}"
        if self.kind == "dropout":
            return f"dropout {self.rate:g}"
        options = [f"epsilon={self.epsilon:g}"] if self.epsilon != 1e-3 else []
        if self.kind == "batchnorm" and self.momentum != 0.99:
            options.append(f"momentum={self.momentum:g}")
        options += [f"{k}=0" for k in ("center", "scale") if not getattr(self, k)]
        return " ".join([self.kind, *options])


def _bad(text, why: str) -> ValueError:
    return ValueError(
        f"head layer {text!r}: {why}; expected 'dense UNITS [ACTIVATION]', 'batchnorm [epsilon=E] "
        "[momentum=M] [center=0] [scale=0]', 'layernorm [epsilon=E] [center=0] [scale=0]', "
        f"'activation NAME' or 'dropout RATE' (activations: {', '.join(sorted(ACTIVATIONS))})"
    )


def _number(text, value: str, kind=float):
    try:
        number = kind(value)
    except ValueError:
        raise _bad(text, f"{value!r} is not a number") from None
    if not math.isfinite(number):
        raise _bad(text, f"{value!r} is not finite")
    return number


def parse_layer(text: str | HeadLayer) -> HeadLayer:
    """One head layer from its text (see the module docstring); ``ValueError`` naming it."""
    if isinstance(text, HeadLayer):
        return text
    words = text.split() if isinstance(text, str) else []
    if not words or words[0] not in KINDS:
        raise _bad(text, "unknown kind")
    kind, rest = words[0], words[1:]
    if kind == "dense":
        if not 1 <= len(rest) <= 2 or not rest[0].isdigit() or int(rest[0]) < 1:
            raise _bad(text, "dense takes its units (an integer >= 1) and optionally an activation")
        layer = HeadLayer("dense", units=int(rest[0]), activation=rest[1] if len(rest) == 2 else "linear")
    elif kind == "activation":
        if len(rest) != 1:
            raise _bad(text, "activation takes one name")
        layer = HeadLayer("activation", activation=rest[0])
    elif kind == "dropout":
        rate = _number(text, rest[0]) if len(rest) == 1 else -1.0
        if not 0.0 <= rate < 1.0:
            raise _bad(text, "dropout takes one rate in [0, 1)")
        layer = HeadLayer("dropout", rate=rate)
    else:
        allowed = {"epsilon", "center", "scale"} | ({"momentum"} if kind == "batchnorm" else set())
        options = {}
        for word in rest:
            key, _, value = word.partition("=")
            if key not in allowed or not value:
                raise _bad(text, f"{kind} takes {sorted(allowed)} as key=value")
            number = key in ("epsilon", "momentum")
            options[key] = _number(text, value) if number else value not in ("0", "false")
        layer = HeadLayer(kind, **options)
        if not layer.epsilon > 0 or not 0 <= layer.momentum < 1:
            raise _bad(text, "epsilon must be > 0 and momentum in [0, 1)")
    if layer.activation not in ACTIVATIONS:
        raise _bad(text, f"unknown activation {layer.activation!r}")
    return layer


def parse_head(layers: Sequence[str | HeadLayer]) -> tuple[HeadLayer, ...]:
    """A head from its layers' texts: ``ValueError`` naming the first bad one, or for a head
    without a ``dense`` layer (the logits)."""
    if isinstance(layers, str) or not isinstance(layers, Sequence):
        raise ValueError(f"a head is a list of layers (strings such as 'dense 256 relu'), got {layers!r}")
    parsed = tuple(parse_layer(layer) for layer in layers)
    if not any(layer.kind == "dense" for layer in parsed):
        raise ValueError(f"head {[str(h) for h in parsed]}: no 'dense' layer to give the logits")
    return parsed


def classic_head(head_units: Sequence[int], activation: str, dropout: float, num_classes: int):
    """The head of the classic options: ``dense u activation`` + ``dropout`` per hidden layer
    (dropout on the pooled features without one), then ``dense num_classes``."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown head_activation {activation!r}; expected one of {sorted(ACTIVATIONS)}")
    drop = (HeadLayer("dropout", rate=float(dropout)),)
    layers = [] if head_units else list(drop)
    for units in head_units:
        layers += [HeadLayer("dense", units=int(units), activation=activation), *drop]
    return (*layers, HeadLayer("dense", units=int(num_classes)))


def as_classic(head: Sequence[HeadLayer]) -> tuple[tuple[int, ...], str, float] | None:
    """``(head_units, head_activation, dropout)`` when ``head`` is a classic head (one activation,
    one dropout rate, in the classic layout; a dropout of rate 0 may be left out), else None."""
    dense = [h for h in head if h.kind == "dense"]
    units = tuple(h.units for h in dense[:-1])
    activations = {h.activation for h in dense[:-1]} or {"relu"}
    rates = {h.rate for h in head if h.kind == "dropout"} or {0.0}
    if len(activations) != 1 or len(rates) != 1 or dense[-1].activation != "linear":
        return None
    activation, rate = activations.pop(), rates.pop()
    for candidate in (rate, 0.0) if rate == 0.0 else (rate,):
        want = classic_head(units, activation, candidate, dense[-1].units)
        if tuple(head) in (want, tuple(h for h in want if not (h.kind == "dropout" and h.rate == 0.0))):
            return units, activation, candidate
    return None


def layer_names(head: Sequence[HeadLayer]) -> list[str | None]:
    """The attribute name of each layer of ``head`` that has weights (None for the others):
    ``head_fc1``, ... and ``head_logits`` (the last dense), ``head_bn1``, ``head_ln1``, ..."""
    last = max(i for i, h in enumerate(head) if h.kind == "dense")
    counts = {"dense": 0, "batchnorm": 0, "layernorm": 0}
    names: list[str | None] = []
    for i, layer in enumerate(head):
        if layer.kind not in counts:
            names.append(None)
            continue
        counts[layer.kind] += 1
        prefix = {"dense": "head_fc", "batchnorm": "head_bn", "layernorm": "head_ln"}[layer.kind]
        names.append("head_logits" if i == last else f"{prefix}{counts[layer.kind]}")
    return names


def with_classes(head: Sequence[HeadLayer], num_classes: int) -> tuple[HeadLayer, ...]:
    """``head`` with its logits layer giving ``num_classes`` (and normalisation layers after it
    following)."""
    last = max(i for i, h in enumerate(head) if h.kind == "dense")
    return tuple(replace(h, units=num_classes) if i == last else h for i, h in enumerate(head))


class TransferHead:
    """Builds and runs a head on a model (a mixin of :class:`~imgcls_jax.models.Classifier`):
    :meth:`_make_head` adds the layers as attributes, :meth:`_run_head` applies them."""

    def _make_head(self, fin: int, head: Sequence[HeadLayer], rngs: nnx.Rngs, kernel_init=_glorot) -> None:
        """Add ``head``'s layers for ``fin`` input features; sets ``head_spec`` and
        ``head_layers`` (weighted layers, in order)."""
        self.head_spec = tuple(head)
        names, rates = layer_names(self.head_spec), {}
        for layer, name in zip(self.head_spec, names):
            if layer.kind == "dense":
                dense = nnx.Linear(fin, layer.units, dtype=self.dtype, param_dtype=jnp.float32,
                                   kernel_init=kernel_init, bias_init=_zeros, rngs=rngs)  # fmt: skip
                setattr(self, name, dense)
                fin = layer.units
            elif layer.kind == "batchnorm":
                # Keras's BatchNormalization as the families' (models.layers.BatchNorm, which this module
                # cannot import: layers -> flops -> vgg -> base -> head): float32, the biased batch
                # variance in training; _run_head casts its output back to the compute dtype
                norm = nnx.BatchNorm(fin, epsilon=layer.epsilon, momentum=layer.momentum,
                                     use_running_average=True, use_fast_variance=False, dtype=jnp.float32,
                                     param_dtype=jnp.float32, use_bias=layer.center, use_scale=layer.scale,
                                     rngs=rngs)  # fmt: skip
                setattr(self, name, norm)
            elif layer.kind == "layernorm":
                norm = nnx.LayerNorm(fin, epsilon=layer.epsilon, use_bias=layer.center, use_scale=layer.scale,
                                     use_fast_variance=False, dtype=jnp.float32, param_dtype=jnp.float32,
                                     rngs=rngs)  # fmt: skip
                setattr(self, name, norm)
            elif layer.kind == "dropout" and layer.rate not in rates:
                rates[layer.rate] = "head_dropout" if not rates else f"head_dropout_{len(rates) + 1}"
                setattr(self, rates[layer.rate], nnx.Dropout(layer.rate, deterministic=True, rngs=rngs))
        self._head_dropouts = tuple(rates.items())  # static: (rate, attribute name)
        self.head_layers = tuple(n for n in names if n is not None)

    def _run_head(self, x: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
        """The head on pooled features ``x`` ``[N, F]`` (compute dtype) -> logits ``float32[N, K]``."""
        dense_seen, seen = 0, {}
        for layer, name in zip(self.head_spec, layer_names(self.head_spec)):
            if layer.kind == "dense":
                x = ACTIVATIONS[layer.activation](getattr(self, name)(x))
                dense_seen += 1
            elif layer.kind in ("batchnorm", "layernorm"):
                x = getattr(self, name)(x).astype(x.dtype)
            elif layer.kind == "activation":
                x = ACTIVATIONS[layer.activation](x)
            else:
                occurrence = seen[dense_seen] = seen.get(dense_seen, -1) + 1
                key = None if dropout_key is None else jax.random.fold_in(dropout_key, dense_seen)
                if key is not None and occurrence:
                    key = jax.random.fold_in(key, occurrence)
                x = getattr(self, dict(self._head_dropouts)[layer.rate])(x, rngs=key)
        return x.astype(jnp.float32)
