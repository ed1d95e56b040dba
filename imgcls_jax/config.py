"""The config objects from which a training run is fully reproducible (saved beside every run),
and every check of them: the one place where a config is validated.

``TrainConfig``, ``PhaseConfig`` and ``AugmentConfig`` are frozen dataclasses that validate
themselves when built (change one with ``dataclasses.replace``, which validates again): a bad
value (a wrong type, an unknown name, a number out of range, splits that do not sum to 1, a
``top:N`` deeper than the model, a random base kept frozen) is a :class:`ConfigError` (a
``ValueError``) naming the field, for every user, not at some epoch of a run. The checks that
need more than the config live here too: :func:`check_devices` (the batch over the devices),
:func:`check_trainable` (what ``fit`` can train), :func:`resume_differences` (a resumed run's
config against the one stored in its folder) and :func:`check_study_options` (a tune file's
``study``). Integers must fit JAX's int32 (:data:`MAX_INT`; seeds :data:`MAX_SEED`), numbers be
finite, paths be strings the file system can take; messages cut long values (:func:`short_repr`).
Nothing here imports JAX, TensorFlow or the models at import time.

:meth:`TrainConfig.recipe` is the transfer-learning recipe (what ``imgcls-jax train --data DIR``
and ``examples/train.py`` run).
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine", "piecewise", "exponential")
#: ``PhaseConfig.schedule`` values: the optax schedules plus reduce-on-plateau.
PHASE_SCHEDULES = (*SCHEDULES, "plateau")
MONITORS = ("val_accuracy", "val_loss")
POOLINGS = (None, "avg", "max")
DTYPES = ("float32", "bfloat16")
#: Where training augmentation runs (``TrainConfig.augment_on``) and which input pipeline feeds
#: the devices (``TrainConfig.data_backend``).
AUGMENT_PLACES = ("auto", "host", "device")
DATA_BACKENDS = ("auto", "tf", "numpy")
FLIP_MODES = ("horizontal", "vertical", "horizontal_and_vertical")
FILL_MODES = ("reflect", "wrap", "constant", "nearest")
#: Allowed [low, high] of each numeric strength field of :class:`AugmentConfig`.
AUGMENT_BOUNDS = {
    "rotation": (0.0, 1.0),
    "zoom": (0.0, 1.0),
    "translation": (0.0, 1.0),
    "brightness": (0.0, 1.0),
    "contrast": (0.0, 1.0),
    "saturation": (0.0, 1.0),
    "hue": (0.0, 0.5),
    "mixup_alpha": (0.0, math.inf),
    "cutmix_alpha": (0.0, math.inf),
}


#: Kernel initializers by their Keras names, for families that take ``kernel_init``.
KERNEL_INITS = ("glorot_uniform", "he_normal", "he_uniform")


#: The largest integer a count, size or step may be: JAX's default integers are int32.
MAX_INT = 2**31 - 1
#: The largest seed: numpy's and TensorFlow's seeds are unsigned 32-bit.
MAX_SEED = 2**32 - 1
#: The largest image side in pixels: a VGG16 activation at this size is 8192^2 x 64 float32s,
#: 16 GiB for one image, past what one device holds; a larger value is a typo.
MAX_IMAGE_SIZE = 8192
#: Split names: they name the ``eval_<split>/`` folder and a manifest column.
SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")


#: What a config with both ``weights`` and ``init_from`` is told (the API and the command line).
WEIGHTS_AND_INIT_FROM = (
    "TrainConfig: set weights (the base's; imgcls-jax train --weights) or init_from (the whole model, "
    "head included; --init-from), not both"
)


class ConfigError(ValueError):
    """A config (or tune file) that cannot be used: the message names the file or field, the
    value and what is allowed. Always a mistake in the input, never a failure of a run."""


class FrozenDict(dict):
    """A ``dict`` that cannot be changed after it is built (``TrainConfig.splits``): a frozen
    config stays what it was validated as. JSON and ``dataclasses.asdict`` see a plain dict."""

    def _frozen(self, *args, **kwargs):
        raise TypeError("a config's mapping cannot be changed: use dataclasses.replace(config, splits={...})")

    __setitem__ = __delitem__ = __ior__ = _frozen
    clear = pop = popitem = setdefault = update = _frozen

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.items(), key=repr)))

    def __reduce__(self):  # copy, deepcopy and pickle build it whole (they would set items one by one)
        return FrozenDict, (dict(self),)


def _set(obj, name: str, value) -> None:
    """Set a normalised field of a frozen dataclass while it validates itself."""
    object.__setattr__(obj, name, value)


def _is_number(value) -> bool:
    """A finite real number (not a bool, not NaN or infinite, not an int too large for a float)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(float(value))
    except (OverflowError, ValueError):
        return False


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check(ok: bool, where: str, what: str, value) -> None:
    if not ok:
        raise ConfigError(f"{where} must be {what}, got {short_repr(value)}")


def short_repr(value, limit: int = 200) -> str:
    """``repr(value)``, cut to ``limit`` characters (a 5000-digit number stays readable)."""
    try:
        text = repr(value)
    except ValueError:  # an int past Python's 4300-digit str() limit
        text = f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
    except RecursionError:
        text = f"<a {type(value).__name__} nested too deep to print>"
    return text if len(text) <= limit else text[: limit - 5] + " ...>"


def _path(where: str, value, *, empty_ok: bool = False) -> str:
    """``value`` if it is a string the file system can take as a path (no NUL, encodable)."""
    ok = isinstance(value, str) and (empty_ok or bool(value)) and "\x00" not in value
    if ok:
        try:
            os.fsencode(value)
        except UnicodeEncodeError:
            ok = False
    _check(ok, where, "a path (a string without NUL or unpaired surrogate characters)", value)
    return value


def _number(where: str, value, low: float, high: float, *, low_open=False, high_open=False) -> float:
    """``value`` as a float if it is a number in the range (closed unless ``*_open``)."""
    ok = _is_number(value) and (value > low if low_open else value >= low)
    ok = ok and (value < high if high_open else value <= high)
    brackets = ("(" if low_open else "[") + f"{low:g}, {high:g}" + (")" if high_open else "]")
    _check(ok, where, f"a number in {brackets}", value)
    return float(value)


def _integer(where: str, value, low: int, high: int = MAX_INT) -> int:
    _check(_is_int(value) and low <= value <= high, where, f"an integer >= {low} and <= {high}", value)
    return int(value)


def _choice(where: str, value, choices: Sequence) -> None:
    ok = isinstance(value, str | None) and value in choices
    _check(ok, where, f"one of {tuple(choices)}", value)


def _known(cls, raw: dict, where: str, elsewhere: dict[str, type] | None = None) -> dict:
    """``raw`` if its keys are ``cls``'s fields, else a :class:`ConfigError` naming the unknown
    ones, with the field meant where one is close (in ``cls`` or, for a key that belongs to a
    nested config, in ``elsewhere``: ``{"phases": PhaseConfig, ...}``)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object of {cls.__name__} fields, got {short_repr(raw)}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(str(k) if len(str(k)) <= 60 else str(k)[:55] + " ..." for k in set(raw) - known)
    if unknown:
        hints = [_hint(k, known, elsewhere or {}) for k in unknown[:10]]
        hint = f" ({'; '.join(h for h in hints if h)})" if any(hints) else ""
        raise ConfigError(
            f"unknown {cls.__name__} field(s) {unknown} in {where}{hint}; known: {sorted(known)}"
        )
    return raw


def _hint(key: str, known: set[str], elsewhere: dict[str, type]) -> str:
    if match := _close(key, known):
        return f"{key!r}: did you mean {match[0]!r}?"
    for holder, cls in elsewhere.items():
        if match := _close(key, {f.name for f in fields(cls)}):
            return f"{key!r}: {match[0]!r} is a field of {holder!r} ({cls.__name__}), not of the top level"
    return ""


@contextlib.contextmanager
def _renamed(prefix: str, where: str):
    """Re-raise a :class:`ConfigError` of a nested config with its field named from the top
    (``PhaseConfig.epochs`` -> ``TrainConfig.phases[1].epochs``)."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(str(e).replace(prefix, where, 1)) from None


def _close(name: str, known) -> list[str]:
    import difflib

    return difflib.get_close_matches(name, sorted(known), n=1)


def image_size_hw(size, where: str = "image_size") -> tuple[int, int]:
    """An image size ``S`` (square) or ``[H, W]`` as ``(H, W)`` ints in [1, MAX_IMAGE_SIZE]."""
    given = size
    if _is_int(size):
        size = (size, size)
    ok = isinstance(size, Sequence) and not isinstance(size, str) and len(size) == 2
    ok = ok and all(_is_int(s) and 1 <= s <= MAX_IMAGE_SIZE for s in size)
    _check(ok, where, f"an integer in [1, {MAX_IMAGE_SIZE}] or [height, width]", given)
    return int(size[0]), int(size[1])


def _image_size(where: str, value):
    """An image size as the config keeps it: ``S`` (square) or ``(H, W)`` (a list from JSON becomes
    a tuple), each side in [1, MAX_IMAGE_SIZE]; the family's own minimum is checked with the model."""
    hw = image_size_hw(value, where)
    return value if _is_int(value) else hw


@dataclass(frozen=True)
class AugmentConfig:
    """Training-time augmentation; all off by default (see :mod:`imgcls_jax.data.augment`).

    Attributes:
      flip: ``None``, ``"horizontal"`` (left-right), ``"vertical"`` (top-bottom) or
        ``"horizontal_and_vertical"``; each flip happens with probability 1/2 (independently for the
        two axes, as Keras 2; Keras 3 flips both axes or neither).
      rotation: angle uniform in ``[-rotation, rotation] * 2 pi`` about the centre (Keras
        ``RandomRotation(factor)``), in [0, 1].
      zoom: scale uniform in ``[1 - zoom, 1 + zoom]``, the same for both axes; > 1 zooms out,
        < 1 zooms in (Keras ``RandomZoom(height_factor=zoom)``), in [0, 1].
      translation: shifts uniform in ``[-translation, translation]`` times height and width,
        independently (Keras ``RandomTranslation(translation, translation)``), in [0, 1].
      fill_mode: ``"reflect"``, ``"wrap"``, ``"constant"`` or ``"nearest"``: how rotation, zoom and
        translation fill points from outside the input, as Keras; ``fill_value`` for ``"constant"``
        (restricted to [0, 255] so outputs stay in range).
      random_resized_crop: Inception-style crop (torchvision ``RandomResizedCrop``): area fraction
        uniform in ``crop_scale`` (within (0, 1]), aspect ratio w/h log-uniform in ``crop_ratio``,
        10 attempts, then a centre crop; the crop is resized (bilinear) back to the input size.
      brightness: adds ``delta * 255`` with delta uniform in ``[-brightness, brightness]`` (Keras
        ``RandomBrightness``), in [0, 1].
      contrast: ``(x - mean) * c + mean`` per channel, c uniform in ``[1 - contrast, 1 + contrast]``
        (Keras ``RandomContrast``), in [0, 1].
      saturation: HSV saturation times s, s uniform in ``[1 - saturation, 1 + saturation]``
        (torchvision ``ColorJitter(saturation=)``; as ``tf.image.adjust_saturation``), in [0, 1].
      hue: hue rotated by d turns, d uniform in ``[-hue, hue]`` (torchvision ``ColorJitter(hue=)``;
        ``tf.image.adjust_hue``), in [0, 0.5]; the same distribution as Keras ``RandomHue(2 * hue)``.
      mixup_alpha, cutmix_alpha: Beta(alpha, alpha) parameters of mixup/cutmix; 0 turns it off.
    """

    flip: str | None = None
    rotation: float = 0.0
    zoom: float = 0.0
    translation: float = 0.0
    fill_mode: str = "reflect"
    fill_value: float = 0.0
    random_resized_crop: bool = False
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0

    def __post_init__(self):
        _choice("AugmentConfig.flip", self.flip, (None, *FLIP_MODES))
        _choice("AugmentConfig.fill_mode", self.fill_mode, FILL_MODES)
        for name, (low, high) in AUGMENT_BOUNDS.items():
            _number(f"AugmentConfig.{name}", getattr(self, name), low, high)
        _number("AugmentConfig.fill_value", self.fill_value, 0, 255)
        _check(isinstance(self.random_resized_crop, bool), "AugmentConfig.random_resized_crop", "a bool",
               self.random_resized_crop)  # fmt: skip
        for name, high in (("crop_scale", 1.0), ("crop_ratio", math.inf)):
            value = getattr(self, name)
            ok = isinstance(value, Sequence) and len(value) == 2 and all(_is_number(v) for v in value)
            _check(ok and 0 < value[0] <= value[1] <= high, f"AugmentConfig.{name}",
                   f"(low, high) with 0 < low <= high <= {high}", value)  # fmt: skip
            object.__setattr__(self, name, (float(value[0]), float(value[1])))

    @property
    def is_identity(self) -> bool:
        """True when augmentation and mixing both return their inputs unchanged."""
        off = all(getattr(self, name) == 0 for name in AUGMENT_BOUNDS)
        return off and self.flip is None and not self.random_resized_crop

    @classmethod
    def from_dict(cls, raw: dict | AugmentConfig, where: str = "augment") -> AugmentConfig:
        """``raw`` as an ``AugmentConfig``; errors name fields as ``<where>.<field>``."""
        if isinstance(raw, cls):
            return raw
        with _renamed("AugmentConfig.", f"{where}."):
            return cls(**_known(cls, raw, where))


@dataclass(frozen=True)
class PhaseConfig:
    """One transfer-learning phase: which layers train, for how long, with what optimizer.

    ``trainable``: ``"head"``, ``"all"`` or ``"top:N"`` (the model's last N stages + head; for
    VGG a stage is a convolution block). ``learning_rate`` is the peak rate of ``schedule`` (per
    optimizer step), after ``warmup_epochs`` of linear warmup. ``schedule``: ``constant``,
    ``cosine``, ``piecewise``, ``exponential`` or ``plateau``: constant, multiplied by
    ``plateau_factor`` after ``plateau_patience`` epochs in which the monitored validation metric
    did not improve on its best by more than ``plateau_min_delta`` (absolute), exactly as Keras's
    ``ReduceLROnPlateau(factor, patience, min_delta)`` with its defaults ``cooldown=0``,
    ``min_lr=0`` (decided by :func:`imgcls_jax.train.callbacks.plateau_learning_rates`; the
    default ``plateau_min_delta`` is Keras's 1e-4). ``momentum`` and ``nesterov`` are SGD's.
    ``base_lr_multiplier`` scales the learning rate of the backbone relative to the head
    (e.g. 0.1 when fine-tuning). ``weight_decay``: L2 added to the gradient for sgd/adam,
    decoupled for adamw.
    ``image_size``: the phase's input size (default: ``TrainConfig.image_size``). Phases of
    growing sizes train at low resolution first and adapt at a higher one (progressive resizing);
    it needs a pooled head (``TrainConfig.pooling`` "avg" or "max"), whose weights do not depend
    on the input size.
    """

    epochs: int = 1
    trainable: str = "head"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    schedule: str = "cosine"
    warmup_epochs: float = 0.0
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    base_lr_multiplier: float = 1.0
    plateau_factor: float = 0.1
    plateau_patience: int = 2
    image_size: int | tuple[int, int] | None = None
    plateau_min_delta: float = 1e-4

    def __post_init__(self):
        self._validate("PhaseConfig")

    def _validate(self, where: str) -> None:
        """Raise :class:`ConfigError` naming ``where.<field>`` for the first bad field."""
        from imgcls_jax.models.base import parse_trainable  # plain Python, no JAX work

        _set(self, "epochs", _integer(f"{where}.epochs", self.epochs, 1))
        ok = isinstance(self.trainable, str) and len(self.trainable) <= 16  # no 5000-digit N to parse
        try:
            ok = ok and bool(parse_trainable(self.trainable))
        except ValueError:
            ok = False
        _check(ok, f"{where}.trainable", "'head', 'all', 'top:N' (N >= 0) or 'keras'", self.trainable)
        _choice(f"{where}.optimizer", self.optimizer, OPTIMIZERS)
        _choice(f"{where}.schedule", self.schedule, PHASE_SCHEDULES)
        _number(f"{where}.learning_rate", self.learning_rate, 0, math.inf, low_open=True, high_open=True)
        _number(f"{where}.warmup_epochs", self.warmup_epochs, 0, self.epochs)
        _number(f"{where}.momentum", self.momentum, 0, 1, high_open=True)
        _check(isinstance(self.nesterov, bool), f"{where}.nesterov", "a bool", self.nesterov)
        _number(f"{where}.weight_decay", self.weight_decay, 0, math.inf, high_open=True)
        _number(f"{where}.base_lr_multiplier", self.base_lr_multiplier, 0, math.inf, high_open=True)
        _number(f"{where}.plateau_factor", self.plateau_factor, 0, 1, low_open=True, high_open=True)
        _integer(f"{where}.plateau_patience", self.plateau_patience, 1)
        _number(f"{where}.plateau_min_delta", self.plateau_min_delta, 0, math.inf, high_open=True)
        if self.image_size is not None:
            _set(self, "image_size", _image_size(f"{where}.image_size", self.image_size))


def _phase(raw: dict | PhaseConfig, where: str) -> PhaseConfig:
    """``raw`` as a ``PhaseConfig``; errors name fields as ``<where>.<field>``."""
    if isinstance(raw, PhaseConfig):
        return raw
    with _renamed("PhaseConfig.", f"{where}."):
        return PhaseConfig(**_known(PhaseConfig, raw, where))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs. ``data`` is an image folder (``root/<class>/...`` or pre-split
    ``root/{train,val,test}/<class>/...``); a flat folder is split by ``splits`` (stratified,
    seeded). Every field is checked when the config is built (see the module docstring); the
    config is frozen: ``dataclasses.replace(config, batch_size=64)`` makes a changed (and
    checked) copy. :meth:`recipe` builds the transfer-learning recipe for a folder.

    The base must not stay random while a phase keeps (part of) it frozen: with ``weights=None``
    and no ``init_from``, the first phase must train every layer (``trainable="all"``, training
    from scratch); ``weights="random"`` asks for a seeded random base on purpose (a test, a
    random-feature baseline) and lifts that check."""

    data: str = ""
    run_dir: str = "runs/run"
    splits: dict[str, float] = field(default_factory=lambda: {"train": 0.75, "val": 0.25})
    #: Folder-name glob patterns left out of ``data`` (e.g. ``["* GT"]``: segmentation masks).
    exclude: tuple[str, ...] = ()
    #: Input size in pixels: ``S`` (square) or ``[height, width]``; each side at least the model's
    #: minimum (32 for the Keras families). Images are resized to it (``squash``).
    image_size: int | tuple[int, int] = 224
    batch_size: int = 32
    eval_batch_size: int | None = None
    #: Train steps run in one XLA execution (Keras's ``compile(steps_per_execution=)``): fewer
    #: dispatches, and on the CPU the step's temporary memory is allocated once per execution
    #: instead of once per step (VGG16 64x64 batch 16: ~37,000 page faults a step at 1, ~10,700 at
    #: 4; benchmarks/RESULTS.md). The same steps and data; the numbers may differ from 1's by
    #: float rounding (XLA fuses the loop's body on its own), so a run resumes with its own value.
    steps_per_execution: int = 1
    model: str = "vgg16"
    #: The base's starting weights: None (seeded random init; then the first phase must train
    #: every layer), ``"imagenet"`` (Keras's published file), a Keras weight file or a folder of
    #: ``imgcls-jax port-weights``, or ``"random"`` (seeded random init, allowed under a frozen phase).
    weights: str | None = None
    pooling: str | None = "avg"
    head_units: tuple[int, ...] = (256,)
    dropout: float = 0.5
    dtype: str = "float32"
    #: Initializer of the kernels not loaded from ``weights``, for families that take one (VGG:
    #: ``glorot_uniform``, Keras's default, ``he_normal``, ``he_uniform``). None: the family's own.
    kernel_init: str | None = None
    #: The moving-average momentum of every BatchNorm layer of the base (``moving <- m * moving +
    #: (1 - m) * batch``, Keras's ``BatchNormalization(momentum=)``); None: the family's own, as
    #: Keras builds it (MobileNetV2 0.999, EfficientNet 0.99, ...). From scratch over ~1,000 steps,
    #: 0.999 leaves the moving statistics far behind the weights (inference-mode outputs can be
    #: constant); 0.99 is Keras's layer default. A base without BatchNorm (VGG) refuses it.
    bn_momentum: float | None = None
    #: ConvNeXt without Keras's top: where its final LayerNormalization stands with ``pooling``
    #: "avg" / "max": ``"pooled"`` (after the pooling: Keras's ``pooling="avg"`` base) or ``"map"``
    #: (on the map, then the pooling: Keras's ``pooling=None`` base followed by a user's own
    #: pooling layer, what such an imported Keras model needs). None: the family's own
    #: (``"pooled"``); other families refuse it.
    final_norm: str | None = None
    #: The input normalisation the model applies to raw pixels (``caffe``, ``tf``, ``torch``,
    #: ``unit``, ``none``); None: the one its family's weights expect (VGG: ``caffe``).
    preprocessing: str | None = None
    #: The transfer head's hidden activation (a Keras name: ``relu``, ``gelu``, ``tanh``, ...).
    head_activation: str = "relu"
    #: How logits become probabilities in prediction: ``softmax``, or ``sigmoid`` (a Keras model
    #: ending in sigmoid units; evaluated and predicted, not trained: ``fit`` is softmax).
    output_activation: str = "softmax"
    #: The whole transfer head as layers (``["dense 64", "batchnorm", "activation gelu", "dense 5"]``,
    #: see :mod:`imgcls_jax.models.head`), instead of head_units / head_activation / dropout.
    head: tuple[str, ...] | None = None
    #: A run folder or a Keras model file (``.keras``, or ``.h5`` from ``model.save``) whose whole
    #: model, head included, starts the training (its architecture must be this config's).
    init_from: str | None = None
    augment: AugmentConfig = field(
        default_factory=lambda: AugmentConfig(flip="horizontal", rotation=0.05, zoom=0.1)
    )
    #: Where ``augment`` runs: ``"host"`` (tf.data, per image, before the batch is copied),
    #: ``"device"`` (jitted JAX inside the train step, on the uint8 batch already on the device)
    #: or ``"auto"``: the device on a GPU/TPU or without TensorFlow, the host on a CPU (measured
    #: on the 2-core CPU at 224x224: tf.data 0.14-0.55 s a batch of 32, JAX 1.1-2.0 s).
    augment_on: str = "auto"
    #: The input pipeline: ``"tf"`` (tf.data), ``"numpy"`` (Pillow decoding, NumPy batches; no
    #: TensorFlow needed; augmentation on the device) or ``"auto"`` (tf.data where TensorFlow
    #: imports).
    data_backend: str = "auto"
    phases: tuple[PhaseConfig, ...] = (PhaseConfig(),)
    label_smoothing: float = 0.0
    grad_clip: float | None = None
    #: Keep an exponential moving average of the weights with this decay per step (e.g. 0.999;
    #: timm's ``--model-ema``, Keras's ``use_ema``) and validate, checkpoint and evaluate it
    #: instead of the raw weights. Each phase starts its average afresh. None: no average.
    ema_decay: float | None = None
    seed: int = 0
    monitor: str = "val_accuracy"
    early_stopping_patience: int | None = None
    keep_checkpoints: int = 2
    cache: str | None = "memory"
    #: Train a head-only phase on base outputs computed once, when there is no augmentation.
    cache_features: bool = True
    #: Shard parameter and optimizer-state leaves of at least this many elements over the devices
    #: (FSDP-style; XLA gathers them for each step) instead of replicating them. None: replicate.
    fsdp_min_size: int | None = None

    def __post_init__(self):
        _set(self, "augment", AugmentConfig.from_dict(self.augment, "TrainConfig.augment"))
        if not isinstance(self.phases, list | tuple) or not self.phases:
            raise ConfigError(
                f"TrainConfig.phases must be a non-empty list of phases, got {short_repr(self.phases)}"
            )
        _set(self, "phases", tuple(_phase(p, f"TrainConfig.phases[{i}]") for i, p in enumerate(self.phases)))
        self._validate_data()
        self._validate_model()
        self._validate_training()
        self._validate_start()  # last: a field's own error comes first

    def _validate_data(self) -> None:
        _path("TrainConfig.data", self.data, empty_ok=True)
        _path("TrainConfig.run_dir", self.run_dir)
        ok = isinstance(self.splits, dict) and bool(self.splits)
        ok = ok and all(isinstance(k, str) and _is_number(v) and 0 < v <= 1 for k, v in self.splits.items())
        _check(ok, "TrainConfig.splits", "a mapping of split name -> fraction in (0, 1]", self.splits)
        bad = [k for k in self.splits if not SPLIT_NAME.fullmatch(k)]
        _check(not bad, "TrainConfig.splits", "named with letters, digits, '_' and '-' only", bad)
        total = sum(self.splits.values())
        _check(abs(total - 1) <= 1e-6, "TrainConfig.splits", f"fractions summing to 1 (sum {total:g})",
               self.splits)  # fmt: skip
        _check("train" in self.splits, "TrainConfig.splits", "a mapping with a 'train' split", self.splits)
        _set(self, "splits", FrozenDict(self.splits))
        ok = isinstance(self.exclude, list | tuple) and all(isinstance(p, str) for p in self.exclude)
        _check(ok, "TrainConfig.exclude", "a list of folder-name patterns", self.exclude)
        _set(self, "exclude", tuple(self.exclude))
        _set(self, "image_size", _image_size("TrainConfig.image_size", self.image_size))
        _integer("TrainConfig.batch_size", self.batch_size, 1)
        if self.eval_batch_size is not None:
            _integer("TrainConfig.eval_batch_size", self.eval_batch_size, 1)
        _integer("TrainConfig.steps_per_execution", self.steps_per_execution, 1)
        _choice("TrainConfig.augment_on", self.augment_on, AUGMENT_PLACES)
        _choice("TrainConfig.data_backend", self.data_backend, DATA_BACKENDS)
        if self.data_backend == "numpy" and self.augment_on == "host":
            raise ConfigError(
                "TrainConfig: data_backend='numpy' cannot augment on the host; "
                "use augment_on 'device' or 'auto'"
            )
        ok = self.cache is None or isinstance(self.cache, str) and bool(self.cache)
        _check(ok, "TrainConfig.cache", "None, 'memory' or a file prefix", self.cache)
        if self.cache not in (None, "memory"):
            _path("TrainConfig.cache", self.cache)
        _check(
            isinstance(self.cache_features, bool), "TrainConfig.cache_features", "a bool", self.cache_features
        )

    def _validate_model(self) -> None:
        from imgcls_jax.models.registry import model_info  # the registry: names and stages

        _check(isinstance(self.model, str), "TrainConfig.model", "a model name", self.model)
        try:
            info = model_info(self.model)
        except ValueError:
            from imgcls_jax.models.registry import list_models

            _check(False, "TrainConfig.model", f"a registered model, one of {list_models()}", self.model)
        _check(self.weights is None or isinstance(self.weights, str), "TrainConfig.weights",
               "None, 'imagenet', 'random' or a path", self.weights)  # fmt: skip
        if self.weights is not None:
            _path("TrainConfig.weights", self.weights)
        _choice("TrainConfig.pooling", self.pooling, POOLINGS)
        ok = isinstance(self.head_units, Sequence) and not isinstance(self.head_units, str)
        ok = ok and all(_is_int(u) and 1 <= u <= MAX_INT for u in self.head_units)
        _check(ok, "TrainConfig.head_units", f"a list of integers >= 1 and <= {MAX_INT}", self.head_units)
        _set(self, "head_units", tuple(int(u) for u in self.head_units))
        _number("TrainConfig.dropout", self.dropout, 0, 1, high_open=True)
        _choice("TrainConfig.dtype", self.dtype, DTYPES)
        if self.bn_momentum is not None:
            from imgcls_jax.models.registry import has_batchnorm

            momentum = _number("TrainConfig.bn_momentum", self.bn_momentum, 0, 1, high_open=True)
            _set(self, "bn_momentum", momentum)
            _check(has_batchnorm(self.model), "TrainConfig.bn_momentum",
                   f"None for {self.model} (its base has no BatchNorm layer)", self.bn_momentum)  # fmt: skip
        if self.final_norm is not None:
            from imgcls_jax.models.convnext import FINAL_NORMS

            _check(info.accepts("final_norm"), "TrainConfig.final_norm", f"None for {self.model}",
                   self.final_norm)  # fmt: skip
            _choice("TrainConfig.final_norm", self.final_norm, FINAL_NORMS)
        if self.kernel_init is not None:
            _check(info.accepts("kernel_init"), "TrainConfig.kernel_init", f"None for {self.model}",
                   self.kernel_init)  # fmt: skip
            _choice("TrainConfig.kernel_init", self.kernel_init, KERNEL_INITS)
        self._validate_head(info)
        for i, phase in enumerate(self.phases):
            top = phase.trainable.startswith("top:") and int(phase.trainable[4:])
            if info.stages and top and top > len(info.stages):
                raise ConfigError(
                    f"TrainConfig.phases[{i}].trainable={phase.trainable!r}: {self.model} has "
                    f"{len(info.stages)} stages ({', '.join(info.stages)}); top:N takes N in "
                    f"0..{len(info.stages)}"
                )
        sizes = sorted({self.phase_size(i) for i in range(len(self.phases))})
        for i, phase in enumerate(self.phases):
            if min(self.phase_size(i)) < info.min_size:
                where = "image_size" if phase.image_size is None else f"phases[{i}].image_size"
                raise ConfigError(
                    f"TrainConfig.{where}={self.phase_image_size(i)!r}: {self.model} takes images of "
                    f"at least {info.min_size}x{info.min_size} pixels (as Keras's {self.model} does)"
                )
        if len(sizes) > 1 and self.pooling is None:
            raise ConfigError(
                f"TrainConfig.phases of different image_size values {sizes} need a pooled head "
                "(TrainConfig.pooling 'avg' or 'max'): with pooling None the head's first kernel "
                "depends on the input size"
            )

    def _validate_head(self, info) -> None:
        """The input normalisation, the head's activations and where the model starts from."""
        from imgcls_jax.models.preprocessing import MODES, check_mode
        from imgcls_jax.models.vgg import HEAD_ACTIVATIONS, OUTPUT_ACTIVATIONS

        if self.preprocessing is not None:
            try:  # a named mode, or an affine one (a Keras model's own Rescaling/Normalization)
                check_mode(self.preprocessing)
            except ValueError:
                _choice("TrainConfig.preprocessing", self.preprocessing, MODES)
        for name, choices, default in (
            ("head_activation", sorted(HEAD_ACTIVATIONS), "relu"),
            ("output_activation", OUTPUT_ACTIVATIONS, "softmax"),
        ):
            value = getattr(self, name)
            _choice(f"TrainConfig.{name}", value, choices)
            if value != default and not info.accepts(name):
                raise ConfigError(f"TrainConfig.{name}={value!r}: {self.model} takes no {name}")
        if self.head is not None:
            from imgcls_jax.models.head import parse_head

            try:
                _set(self, "head", tuple(str(layer) for layer in parse_head(self.head)))
            except ValueError as e:  # its message quotes the value: cut as short_repr cuts
                text = str(e)
                raise ConfigError(
                    f"TrainConfig.head: {text if len(text) <= 500 else text[:495] + ' ...>'}"
                ) from None
        if self.init_from is not None:
            _check(isinstance(self.init_from, str) and bool(self.init_from), "TrainConfig.init_from",
                   "None or a run folder / Keras model file path", self.init_from)  # fmt: skip
            if self.weights is not None:
                raise ConfigError(WEIGHTS_AND_INIT_FROM)

    def _validate_start(self) -> None:
        """A base with no weights must be trained (every layer) before any phase freezes it."""
        from imgcls_jax.models.registry import model_info

        if self.weights is not None or self.init_from is not None:
            return
        info = model_info(self.model)
        for i, phase in enumerate(self.phases):
            top = phase.trainable.startswith("top:") and int(phase.trainable[4:])
            if phase.trainable == "all" or (info.stages and top and top >= len(info.stages)):
                return  # from here on the base has been trained
            raise ConfigError(
                f"TrainConfig.phases[{i}].trainable={phase.trainable!r} keeps (part of) the base frozen, but "
                "the base has no weights (weights=None, no init_from): it would stay random. Use "
                "weights='imagenet' (or a Keras weight file), init_from=<a run folder or Keras model>, "
                "trainable='all' in the first phase (training from scratch), or "
                "TrainConfig.recipe(data) (ImageNet weights when available, else from scratch); "
                "weights='random' asks for a random frozen base on purpose (tests, baselines)"
            )

    def _validate_training(self) -> None:
        _number("TrainConfig.label_smoothing", self.label_smoothing, 0, 1, high_open=True)
        if self.grad_clip is not None:
            _number("TrainConfig.grad_clip", self.grad_clip, 0, math.inf, low_open=True, high_open=True)
        if self.ema_decay is not None:
            _number("TrainConfig.ema_decay", self.ema_decay, 0, 1, low_open=True, high_open=True)
        _integer("TrainConfig.seed", self.seed, 0, MAX_SEED)
        _choice("TrainConfig.monitor", self.monitor, MONITORS)
        if self.early_stopping_patience is not None:
            _integer("TrainConfig.early_stopping_patience", self.early_stopping_patience, 1)
        _integer("TrainConfig.keep_checkpoints", self.keep_checkpoints, 1)
        if self.fsdp_min_size is not None:
            _integer("TrainConfig.fsdp_min_size", self.fsdp_min_size, 1, 2**63 - 1)

    @classmethod
    def recipe(
        cls,
        data: str,
        *,
        model: str = "vgg16",
        weights: str | None = "auto",
        epochs: int = 12,
        learning_rate: float | None = None,
        image_size: int | tuple[int, int] = 224,
        batch_size: int = 32,
        run_dir: str | None = None,
        seed: int = 0,
        dtype: str = "float32",
        init_from: str | None = None,
        steps_per_execution: int = 1,
    ) -> TrainConfig:
        """The transfer-learning recipe for an image folder (what ``imgcls-jax train --data DIR``
        and ``examples/train.py`` run).

        With weights (ImageNet, a Keras weight file, or ``init_from``'s whole model): the head on
        the frozen base with Adam for half the ``epochs`` (at least one), then the top two stages
        fine-tuned with SGD-momentum, the base at 0.1x the head's rate, cosine decay (peak
        ``learning_rate``, default 1e-3). Without them: every layer from scratch (Adam, cosine,
        default 1e-4). Both with the original experiment's head (global average pooling,
        Dense(256) + ReLU, dropout 0.5), augmentation (horizontal flip, rotation 0.05, zoom 0.1,
        translation 0.1) and ``monitor="val_accuracy"``.

        ``weights``: ``"auto"`` (ImageNet when Keras's file can be found or downloaded, else
        from scratch with a loud warning in the log), ``"imagenet"`` (an error where it cannot
        be had), ``None`` / ``"none"`` (from scratch) or a Keras weight file / ported folder.
        ``run_dir`` defaults to ``runs/<data folder name>``.
        """
        if init_from is not None and weights not in (None, "none", "auto"):
            raise ConfigError(WEIGHTS_AND_INIT_FROM)
        if init_from is not None or weights in (None, "none"):
            resolved = None
        else:
            from imgcls_jax.weights.store import resolve_weights_choice  # may look for files, or download

            resolved = resolve_weights_choice(weights, model)
        _integer("TrainConfig.recipe epochs", epochs, 1)
        if learning_rate is not None:
            _number(
                "TrainConfig.recipe learning_rate", learning_rate, 0, math.inf, low_open=True, high_open=True
            )
        return cls(
            data=str(data), run_dir=str(run_dir or Path("runs") / Path(data).expanduser().resolve().name),
            model=model, weights=resolved, image_size=image_size, batch_size=batch_size, seed=seed,
            dtype=dtype, steps_per_execution=steps_per_execution,
            pooling="avg", head_units=(256,), dropout=0.5, monitor="val_accuracy", init_from=init_from,
            augment=AugmentConfig(flip="horizontal", rotation=0.05, zoom=0.1, translation=0.1),
            phases=recipe_phases(resolved is not None or init_from is not None, epochs, learning_rate),
        )  # fmt: skip

    def phase_image_size(self, phase_index: int):
        """Phase ``phase_index``'s ``image_size`` as configured (``S`` or ``(H, W)``)."""
        return self.phases[phase_index].image_size or self.image_size

    def phase_size(self, phase_index: int) -> tuple[int, int]:
        """Input ``(height, width)`` of phase ``phase_index``."""
        return image_size_hw(self.phase_image_size(phase_index))

    def phase_of_epoch(self, epoch: int) -> int:
        """Index of the phase that trains (0-based, run-wide) ``epoch``; the last phase for
        epochs past the end."""
        end = 0
        for index, phase in enumerate(self.phases):
            end += phase.epochs
            if epoch < end:
                return index
        return len(self.phases) - 1

    def phase_epochs(self, phase_index: int) -> range:
        """The run-wide epochs phase ``phase_index`` trains."""
        start = sum(p.epochs for p in self.phases[:phase_index])
        return range(start, start + self.phases[phase_index].epochs)

    def image_size_at(self, epoch: int | None = None):
        """``image_size`` as configured (``S`` or ``(H, W)``) of the phase that trained ``epoch``
        (default: the last phase); see :meth:`size_at`."""
        phase = len(self.phases) - 1 if epoch is None else self.phase_of_epoch(epoch)
        return self.phase_image_size(phase)

    def size_at(self, epoch: int | None = None) -> tuple[int, int]:
        """Input ``(height, width)`` the model had at ``epoch`` (default: the end of the run), the
        size at which a checkpoint of that epoch is evaluated and predicts."""
        return image_size_hw(self.image_size_at(epoch))

    def to_json(self, path=None) -> str:
        text = json.dumps(asdict(self), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, path_or_text) -> TrainConfig:
        """A config from a JSON file or text; errors name the file and the offending field."""
        raw, where, is_text = read_json(path_or_text, "config")
        nested = {"phases": PhaseConfig, "augment": AugmentConfig}
        if is_text:
            return cls(**_known(cls, raw, where, nested))
        try:
            return cls(**_known(cls, raw, where, nested))
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None


#: Peak learning rates of :meth:`TrainConfig.recipe` when none is given: transfer learning, and
#: training from scratch.
TRANSFER_LR, SCRATCH_LR = 1e-3, 1e-4


def recipe_phases(
    pretrained: bool, epochs: int, learning_rate: float | None = None
) -> tuple[PhaseConfig, ...]:
    """The phases of :meth:`TrainConfig.recipe` for ``epochs`` in all: transfer learning from a
    ``pretrained`` base (half the epochs on the head, at least one each), else one phase
    training every layer."""
    if not pretrained:
        lr = learning_rate or SCRATCH_LR
        return (PhaseConfig(epochs=epochs, trainable="all", optimizer="adam", learning_rate=lr),)
    lr, head = learning_rate or TRANSFER_LR, max(epochs // 2, 1)
    return (
        PhaseConfig(epochs=head, trainable="head", optimizer="adam", learning_rate=lr),
        PhaseConfig(
            epochs=max(epochs - head, 1), trainable="top:2", optimizer="sgd", learning_rate=lr,
            base_lr_multiplier=0.1, schedule="cosine",
        ),
    )  # fmt: skip


def check_devices(config: TrainConfig, devices: int, processes: int = 1) -> None:
    """:class:`ConfigError` unless ``config``'s (global) batches divide over ``devices`` devices
    (of ``processes`` processes): each device takes an equal share."""
    where = f" of {processes} processes" if processes > 1 else ""
    for name in ("batch_size", "eval_batch_size"):
        value = getattr(config, name)
        if value is not None and value % devices:
            raise ConfigError(
                f"TrainConfig.{name}={value} does not divide over the {devices} devices{where}; "
                f"use a multiple of {devices} (it is the global batch, split over the devices)"
            )


def check_trainable(config: TrainConfig) -> None:
    """:class:`ConfigError` for a config ``fit`` cannot train (it can still be evaluated and
    predict): a model with sigmoid outputs (an imported Keras model), which ``fit``'s softmax
    cross-entropy does not train."""
    if config.output_activation != "softmax":
        raise ConfigError(
            f"TrainConfig.output_activation={config.output_activation!r}: fit trains with softmax "
            "cross-entropy; such a model can be evaluated and used to predict, not trained here"
        )


#: ``TrainConfig`` fields that do not change what a run computes: a resumed run may give other
#: values for them than its folder's ``config.json`` (the evaluation batch, how many checkpoints
#: are kept, where decoded images are cached, and, first, the run folder's own name).
RESULT_NEUTRAL_FIELDS = ("run_dir", "eval_batch_size", "keep_checkpoints", "cache")


def _plain(value):
    """A config value as JSON gives it back (dataclasses, also inside lists, as dicts; tuples as
    lists)."""
    return json.loads(json.dumps(value, default=asdict))


def appended_phases(stored: TrainConfig, given: TrainConfig) -> int:
    """How many phases ``given`` adds after all of ``stored``'s, when its first phases are
    ``stored``'s unchanged (0 otherwise). Such a config trains its first phases exactly as
    ``stored`` does (each phase's schedule, keys and inputs depend on that phase alone), so a run
    of ``stored`` resumed with ``given`` ends as a run of ``given`` from the start would: "10 more
    epochs at 96x96" after a finished run is a resume, not another run."""
    old, new = stored.phases, given.phases
    if len(new) <= len(old) or any(_plain(a) != _plain(b) for a, b in zip(old, new)):
        return 0
    return len(new) - len(old)


def resume_differences(stored: TrainConfig, given: TrainConfig) -> list[tuple[str, object, object]]:
    """The fields that change results (all but :data:`RESULT_NEUTRAL_FIELDS`) in which ``given``
    differs from ``stored``, as ``(field, stored value, given value)`` with JSON-like values
    (``phases`` compared phase by phase: ``phases[1].learning_rate``; phases appended after all of
    ``stored``'s are no difference, :func:`appended_phases`; ``data`` as the folder it resolves
    to)."""
    found = []
    for f in fields(TrainConfig):
        if f.name in RESULT_NEUTRAL_FIELDS:
            continue
        old, new = getattr(stored, f.name), getattr(given, f.name)
        if f.name == "data":
            same = old == new or Path(old).expanduser().resolve() == Path(new).expanduser().resolve()
            if not same:
                found.append((f.name, old, new))
        elif f.name == "phases" and appended_phases(stored, given):
            continue
        elif f.name == "phases" and len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new)):
                found += [
                    (f"phases[{i}].{g.name}", _plain(getattr(a, g.name)), _plain(getattr(b, g.name)))
                    for g in fields(PhaseConfig)
                    if _plain(getattr(a, g.name)) != _plain(getattr(b, g.name))
                ]
        elif _plain(old) != _plain(new):
            found.append((f.name, _plain(old), _plain(new)))
    return found


#: The options of a tune file's ``study`` (and ``imgcls-jax tune``'s flags): name -> type, as
#: :func:`imgcls_jax.hpo.search` takes them (tests/test_hpo.py checks the two agree).
STUDY_OPTIONS: dict[str, object] = {
    "n_trials": int, "study_dir": str | None, "storage": str | None, "study_name": str, "sampler": str,
    "sampler_options": dict | None, "pruner": str, "pruner_options": dict | None, "seed": int | None,
    "worker": int, "timeout_s": float | None, "heartbeat_s": int, "grace_s": int | None,
    "reset_running": bool, "plots": bool,
}  # fmt: skip
#: Allowed [low, high] of the numeric study options (others: [0, MAX_INT] for integers, [0, inf)
#: for numbers; ``timeout_s`` > 0). The sampler seed is ``seed + 7919 * worker + trials``, which
#: must stay below 2**32 (numpy's seeds).
_STUDY_RANGES = {
    "n_trials": (1, MAX_INT), "seed": (0, 2**31 - 1), "worker": (0, 100_000), "heartbeat_s": (1, 86_400),
    "grace_s": (1, MAX_INT),
}  # fmt: skip


def _conforms(value, hint) -> bool:
    """Whether a JSON value fits a type of :data:`STUDY_OPTIONS` (bools are not numbers)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(_conforms(value, h) for h in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint in (int, float):
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok and (hint is float or isinstance(value, int))
    return isinstance(value, typing.get_origin(hint) or hint)


def check_study_options(options: dict, where: str) -> None:
    """:class:`ConfigError` naming the option for an unknown one or a value of the wrong type or
    range (:data:`STUDY_OPTIONS`)."""
    for key, value in options.items():
        if key not in STUDY_OPTIONS:
            raise ConfigError(f"{where}: unknown 'study' option {key!r}; known: {sorted(STUDY_OPTIONS)}")
        if not _conforms(value, STUDY_OPTIONS[key]):
            described = str(STUDY_OPTIONS[key]).replace("NoneType", "null")
            described = described.replace("<class '", "").replace("'>", "")
            raise ConfigError(f"{where}: study option {key!r} must be {described}, got {short_repr(value)}")
        if isinstance(value, int | float) and not isinstance(value, bool):
            low, high = _STUDY_RANGES.get(key, (0, MAX_INT) if isinstance(value, int) else (0, math.inf))
            finite = not isinstance(value, float) or math.isfinite(value)  # ints: any size
            if not (finite and low <= value <= high) or (key == "timeout_s" and value == 0):
                brackets = f"({low}, {high})" if key == "timeout_s" else f"[{low}, {high}]"
                raise ConfigError(
                    f"{where}: study option {key!r} must be in {brackets}, got {short_repr(value)}"
                )


def read_json(path_or_text, what: str) -> tuple[object, str, bool]:
    """``(value, where, is_text)`` of a JSON file or of JSON text (text starts with ``{``);
    ``where`` names the file (or ``what``) for error messages.

    Raises ``FileNotFoundError`` for a missing file, :class:`ConfigError` for one that is not
    UTF-8 JSON (or nests deeper than Python's recursion limit, or holds a number of over 4300
    digits)."""
    text = str(path_or_text)
    is_text = text.lstrip().startswith("{")
    where = what if is_text else text
    try:
        is_file = is_text or Path(text).is_file()
    except OSError:  # e.g. a name too long for the file system
        is_file = False
    if not is_file:
        raise FileNotFoundError(
            f"{where if len(where) <= 200 else where[:195] + ' ...'}: no such {what} file"
        )
    try:
        return json.loads(text if is_text else Path(text).read_text(encoding="utf-8")), where, is_text
    except UnicodeDecodeError as e:
        raise ConfigError(f"{where}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError
        raise ConfigError(f"{where}: not valid JSON: {short_repr(str(e))}") from None
