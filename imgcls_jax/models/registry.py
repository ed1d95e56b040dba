"""Models by name: :func:`register_model`, :func:`list_models`, :func:`create_model`.

A family registers a builder ``fn(*, include_top, pooling, num_classes, ..., rngs) -> model``
taking the keyword options it understands. :func:`create_model` resolves the options every
family shares (the Keras defaults for ``include_top``, the preprocessing its weights expect),
passes each builder only the options it takes (an option a family does not take, set to a
non-default value, is an error naming both), and loads weights.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax.numpy as jnp
from flax import nnx

from imgcls_jax.models import (
    convnext,
    densenet,
    efficientnet_v2,
    inception_resnet_v2,
    inception_v3,
    mobilenet,
    mobilenet_v1,
    mobilenet_v3,
    nasnet,
    resnet,
    xception,
)
from imgcls_jax.models.efficientnet import EfficientNet
from imgcls_jax.models.efficientnet_arch import STAGES as EFFICIENTNET_STAGES
from imgcls_jax.models.efficientnet_arch import VARIANTS as EFFICIENTNET_VARIANTS
from imgcls_jax.models.vgg import BLOCKS, MIN_SIZE, VGG


@dataclass(frozen=True)
class ModelInfo:
    """A registered family member: its builder and what :func:`create_model` needs to know.

    ``preprocessing``: the input normalisation its published weights expect (the default when
    the caller sets none). ``stages``: its backbone's stage names, in order (``top:N`` takes N
    in 0..len(stages)); empty when unknown (a user's model). ``min_size``: the smallest image side
    it takes (pixels)."""

    name: str
    build: Callable[..., nnx.Module]
    preprocessing: str = "caffe"
    stages: tuple[str, ...] = ()
    min_size: int = 1

    def takes(self, option: str) -> bool:
        """Whether the family's builder takes ``option``."""
        params = inspect.signature(self.build).parameters
        return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())

    def accepts(self, option: str) -> bool:
        """Whether :func:`create_model` takes ``option`` for this family: the builder's own, or one
        of :data:`HEAD_OPTIONS` (every family's transfer head takes them)."""
        return option in HEAD_OPTIONS or self.takes(option)


_MODELS: dict[str, ModelInfo] = {}
#: Options of the transfer head :func:`create_model` applies to any family (see
#: :mod:`imgcls_jax.models.head`) when its builder does not take them itself.
HEAD_OPTIONS = {"head_activation": "relu", "output_activation": "softmax"}


def register_model(name: str, *, preprocessing: str = "caffe", stages: Sequence[str] = (), min_size: int = 1):
    """Decorator: register ``fn(**options) -> model`` under ``name`` for :func:`create_model`.

    ``preprocessing``: what the family's published weights expect; ``stages``: its stage names
    (for checking ``trainable="top:N"`` when a config is built); ``min_size``: its smallest
    image side (checked when a config is built too)."""

    def wrap(fn):
        if name in _MODELS:
            raise ValueError(f"model {name!r} is already registered")
        _MODELS[name] = ModelInfo(name, fn, preprocessing, tuple(stages), min_size)
        return fn

    return wrap


def list_models() -> list[str]:
    """Names accepted by :func:`create_model`."""
    return sorted(_MODELS)


def model_info(name: str) -> ModelInfo:
    """The registry entry of ``name``; ``ValueError`` naming the available models otherwise."""
    if name not in _MODELS:
        raise ValueError(f"unknown model {name!r}; available: {list_models()}")
    return _MODELS[name]


def _vgg_stages(arch: str) -> tuple[str, ...]:
    return tuple(f"block{b}" for b in range(1, len(BLOCKS[arch]) + 1))


def _builder(cls, *args):
    """``fn(**options) -> cls(*args, **options)`` whose signature lists the keyword options of
    ``cls.__init__``, so :func:`create_model` knows which options the family takes (one it does
    not take is its clear error, not a ``TypeError``)."""

    def build(**options):
        return cls(*args, **options)

    params = list(inspect.signature(cls.__init__).parameters.values())[1 + len(args) :]
    build.__signature__ = inspect.Signature([p for p in params if p.kind is p.KEYWORD_ONLY])
    return build


for _arch in BLOCKS:  # vgg16, vgg19
    register_model(_arch, preprocessing="caffe", stages=_vgg_stages(_arch), min_size=MIN_SIZE)(
        _builder(VGG, _arch)
    )
for _arch in EFFICIENTNET_VARIANTS:  # efficientnetb0 ... efficientnetb7: normalisation inside the model
    register_model(_arch, preprocessing="none", stages=EFFICIENTNET_STAGES, min_size=32)(
        _builder(EfficientNet, _arch)
    )
for _arch, _variant in resnet.VARIANTS.items():  # resnet50 ... resnet152v2
    register_model(
        _arch, preprocessing="tf" if _variant.v2 else "caffe", stages=resnet.STAGE_NAMES, min_size=32
    )(_builder(resnet.ResNet, _arch))
register_model("mobilenetv2", preprocessing="tf", stages=mobilenet.STAGE_NAMES, min_size=32)(
    _builder(mobilenet.MobileNetV2)
)
for _arch in convnext.VARIANTS:  # convnexttiny ... convnextxlarge: ImageNet mean/std inside the model
    register_model(_arch, preprocessing="torch", stages=convnext.STAGES, min_size=convnext.MIN_SIZE)(
        _builder(convnext.ConvNeXt, _arch)
    )
for _arch, _variant in efficientnet_v2.VARIANTS.items():  # efficientnetv2b0 ... efficientnetv2l
    register_model(
        _arch, preprocessing=_variant.preprocessing, stages=efficientnet_v2.stages(_arch),
        min_size=efficientnet_v2.MIN_SIZE,
    )(_builder(efficientnet_v2.EfficientNetV2, _arch))  # fmt: skip
for _arch in mobilenet_v3.VARIANTS:  # mobilenetv3small, mobilenetv3large: Rescaling to [-1, 1] inside
    register_model(
        _arch, preprocessing="tf", stages=mobilenet_v3.stages(_arch), min_size=mobilenet_v3.MIN_SIZE
    )(_builder(mobilenet_v3.MobileNetV3, _arch))
for _arch in densenet.VARIANTS:  # densenet121, densenet169, densenet201
    register_model(_arch, preprocessing="torch", stages=densenet.STAGE_NAMES, min_size=32)(
        _builder(densenet.DenseNet, _arch)
    )
register_model("xception", preprocessing="tf", stages=xception.STAGE_NAMES, min_size=xception.MIN_SIZE)(
    _builder(xception.Xception)
)
register_model(
    "inceptionv3", preprocessing="tf", stages=inception_v3.STAGE_NAMES, min_size=inception_v3.MIN_SIZE
)(_builder(inception_v3.InceptionV3))
register_model(
    "inceptionresnetv2", preprocessing="tf", stages=inception_resnet_v2.STAGE_NAMES,
    min_size=inception_resnet_v2.MIN_SIZE,
)(_builder(inception_resnet_v2.InceptionResNetV2))  # fmt: skip
register_model("mobilenet", preprocessing="tf", stages=mobilenet_v1.STAGE_NAMES, min_size=32)(
    _builder(mobilenet_v1.MobileNet)
)
for _arch, _nasnet in nasnet.VARIANTS.items():  # nasnetmobile, nasnetlarge
    register_model(_arch, preprocessing="tf", stages=_nasnet.stage_names(), min_size=32)(
        _builder(nasnet.NASNet, _arch)
    )


#: Options of :func:`create_model` every family takes, with their defaults.
COMMON_OPTIONS = {
    "include_top": None,
    "pooling": None,
    "num_classes": None,
    "head_units": (),
    "dropout": 0.0,
    "input_shape": (224, 224, 3),
    "dtype": "float32",
}


def create_model(
    name: str,
    *,
    num_classes: int | None = None,
    weights: str | None = None,
    include_top: bool | None = None,
    pooling: str | None = None,
    head_units: Sequence[int] = (),
    dropout: float = 0.0,
    input_shape: tuple[int, int, int] = (224, 224, 3),
    dtype="float32",
    preprocessing: str | None = None,
    seed: int = 0,
    head: Sequence[str] | None = None,
    **family_options,
):
    """Build a registered model, optionally with Keras weights.

    Args:
      name: a name from :func:`list_models` (``"vgg16"``, ``"vgg19"``, ...).
      num_classes: classes of the classifier. With the default ``include_top=None`` the Keras
        ImageNet top is used when ``num_classes`` is ``None`` or 1000 (and no head is asked for);
        any other ``num_classes`` gets a transfer head on the convolutional base.
      weights: ``None`` (random init, seeded), ``"imagenet"`` (Keras's published file, see
        :func:`imgcls_jax.weights.resolve_imagenet`), a path to a Keras weight file, or a folder
        written by ``imgcls-jax port-weights``. Never falls back silently: a file that can't be
        found or loaded is an error.
      include_top, pooling, head_units, dropout, input_shape: as Keras's applications (see the
        family, e.g. :class:`~imgcls_jax.models.VGG`).
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"``; parameters stay float32.
      preprocessing: input normalisation; default: the one the family's weights were trained with
        (``"caffe"`` for Keras's VGG files, also without weights). Setting one that contradicts
        the published weights is an error.
      seed: seeds parameter init (head and random weights) and the dropout stream.
      head: the transfer head as layers (:mod:`imgcls_jax.models.head`, e.g. ``["dense 64",
        "batchnorm", "activation gelu", "dropout 0.2", "dense 5"]``), instead of ``head_units`` /
        ``dropout`` / ``head_activation``; needs ``num_classes`` (its last dense layer's units).
      family_options: options only some families take, e.g. VGG's ``conv_impl`` and
        ``kernel_init``; passing one to a family that does not take it is an error. Every family
        takes ``head_activation`` (the hidden layers' activation, default ``"relu"``) and
        ``output_activation`` (``"softmax"`` or ``"sigmoid"``, see ``model.probabilities``).

    Returns:
      The model, in inference mode (``model.train()`` turns dropout on).
    """
    info = model_info(name)
    if include_top is None:
        include_top = num_classes in (None, 1000) and not head_units and not dropout and head is None
    if weights == "imagenet" and include_top and num_classes not in (None, 1000):
        raise ValueError(
            f"the ImageNet top has 1000 classes, not {num_classes}: use include_top=False "
            "(a transfer head) for another number of classes"
        )
    if preprocessing is None:  # Keras's include_preprocessing=False: the model normalises nothing
        no_preprocessing = family_options.get("include_preprocessing") is False
        preprocessing = "none" if no_preprocessing else info.preprocessing
    generic = {k: family_options.pop(k) for k in HEAD_OPTIONS if k in family_options and not info.takes(k)}
    options = dict(
        include_top=include_top, pooling=pooling, num_classes=num_classes, head_units=head_units,
        dropout=dropout, input_shape=input_shape, dtype=jnp.dtype(dtype), preprocessing=preprocessing,
        rngs=nnx.Rngs(params=seed, dropout=seed + 1), **family_options,
    )  # fmt: skip
    model = info.build(**_options_for(info, options))
    _set_head(model, head, generic, head_units, dropout, seed)
    if weights is not None:
        from imgcls_jax.weights.load import load_weights

        load_weights(model, weights, preprocessing=preprocessing)
    return model


def _set_head(model, head, generic: dict, head_units, dropout: float, seed: int) -> None:
    """Give ``model`` the transfer head ``head`` (or the classic options' head with a
    ``head_activation`` its builder did not take) and ``output_activation``."""
    from imgcls_jax.models.head import OUTPUT_ACTIVATIONS, classic_head

    activation = generic.get("head_activation", "relu")
    if head is None and activation != "relu":
        head = classic_head(head_units, activation, dropout, model.num_classes or 1)
    elif head is not None and (tuple(head_units) or dropout):
        raise ValueError("head describes the whole transfer head: leave head_units and dropout unset")
    if head is not None:
        model.set_head(head, seed=seed)
    output = generic.get("output_activation", "softmax")
    if output not in OUTPUT_ACTIVATIONS:
        raise ValueError(f"output_activation must be one of {OUTPUT_ACTIVATIONS}, got {output!r}")
    if output != "softmax":
        model.output_activation = output


def _options_for(info: ModelInfo, options: dict) -> dict:
    """The options ``info``'s builder takes; an unset common option it does not take is dropped,
    a set one is an error."""
    given = {}
    for key, value in options.items():
        if info.takes(key):
            given[key] = value
        elif COMMON_OPTIONS.get(key, object()) == value or (
            key == "preprocessing" and value == info.preprocessing
        ):
            continue
        else:
            raise ValueError(f"model {info.name!r} does not take the option {key}={value!r}")
    return given


@functools.cache
def has_batchnorm(name: str) -> bool:
    """Whether registered model ``name`` is a family model (:class:`~imgcls_jax.models.base.Classifier`)
    whose base has BatchNorm layers (built abstractly, once per process: shapes only, no arrays)."""
    side = max(model_info(name).min_size, 32)
    model = nnx.eval_shape(lambda: create_model(name, num_classes=2, input_shape=(side, side, 3)))
    # a user's own registered model without the families' base class: no "base" to set
    return hasattr(model, "base_batchnorms") and bool(model.base_batchnorms())


def model_from_config(config, num_classes: int, *, weights: str | None = "config", input_size=None):
    """The model a :class:`~imgcls_jax.config.TrainConfig` describes, with ``num_classes``
    classes: what training builds (with ``config.weights``; ``"random"`` is the seeded random
    init), and evaluation and prediction
    (``weights=None``, then their checkpoint). ``input_size``: ``S`` or ``(height, width)``
    (default: the last phase's)."""
    if input_size is None:
        height, width = config.size_at()
    else:
        height, width = (input_size, input_size) if isinstance(input_size, int) else input_size
    options = {"head_units": config.head_units, "dropout": config.dropout}
    for name in ("kernel_init", "final_norm"):  # family options: None is the family's own
        if getattr(config, name, None) is not None:
            options[name] = getattr(config, name)
    for name, default in (("head_activation", "relu"), ("output_activation", "softmax")):
        if getattr(config, name) != default:
            options[name] = getattr(config, name)
    head = getattr(config, "head", None)
    if head is not None:  # the whole head: the classic options do not apply
        options.update(head=head, head_units=(), dropout=0.0)
        options.pop("head_activation", None)
    if weights == "config":
        weights = None if config.weights == "random" else config.weights  # "random": seeded init
    model = create_model(
        config.model, num_classes=num_classes, weights=weights, pooling=config.pooling, dtype=config.dtype,
        seed=config.seed, input_shape=(height, width, 3), preprocessing=config.preprocessing, **options,
    )  # fmt: skip
    if getattr(config, "bn_momentum", None) is not None:
        model.set_batchnorm_momentum(config.bn_momentum)
    return model
