"""Each registered model's ``keras.applications`` reference: the table tests/test_applications.py
runs over (issue 25), and how to build, name and drive the Keras models.

Keras is imported lazily (in the functions): importing this module needs no Keras.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

#: Two input sizes, ``(height, width)``: an even square (64: the training step's, maps 2x2 after
#: stride 32) and an odd non-square one (odd maps: Keras's ``correct_pad`` and SAME paddings
#: differ there, strided VALID convolutions drop a pixel).
SIZES = ((64, 64), (57, 41))
#: A heavy model's one size: Keras's smallest.
MIN_SIZE = (32, 32)


@dataclass(frozen=True)
class KerasReference:
    """The Keras application a registered model equals.

    ``app``: the ``keras.applications`` constructor (``"ResNet50"``). ``preprocess``: the
    ``imagenet_utils.preprocess_input`` mode the Keras model's inputs need (what our model applies
    to raw pixels itself), or None where the Keras model normalises raw pixels itself (a
    ``Rescaling`` / ``Normalization`` layer inside). ``options``: keyword options given to both the
    Keras constructor and ``create_model`` (e.g. ``{"alpha": 0.75}``). ``trainable``: what the
    fine-tuning step trains (``"top:N"``: enough stages to include normalisation layers in
    training mode). ``slow``: its cases run only in the slow tier (the large variants; the
    smallest model of each family stays quick). ``sizes``: the two input sizes. ``heavy``: a
    model of hundreds of MB whose Keras copies (several per case) would not fit beside the other
    processes of a shared 24 GB machine: its cases are float32 parity at Keras's smallest size
    only (logits and the map, both layouts); pooling, heads, bfloat16 and the training step are
    tested on the family's smaller variants, which run the same code. ``f32_tol``: the float32
    outputs' tolerance, relative to their size (float32's own error through a very deep model's
    random weights can exceed the default: see ``resnet152``)."""

    app: str
    preprocess: str | None
    options: dict = field(default_factory=dict)
    trainable: str = "top:2"
    slow: bool = False
    sizes: tuple = SIZES
    heavy: bool = False
    f32_tol: float = 1e-4  # tests/test_applications.py's F32_TOL

    def __post_init__(self):
        if self.heavy:
            object.__setattr__(self, "sizes", (MIN_SIZE,))

    def constructor(self):
        import keras

        return getattr(keras.applications, self.app)

    @property
    def family(self) -> str:
        """The Keras module that defines it (``"efficientnet"``): its family (VGG16 and VGG19,
        one family, have a module each)."""
        module = self.constructor().__module__.rsplit(".", 1)[-1]
        return {"vgg19": "vgg16"}.get(module, module)


# ---------------------------------------------------------------------------------------------
# THE TABLE: registry name -> its Keras reference.
#
# How a new family adds its rows (and is then tested by tests/test_applications.py):
#   1. register every model of the family (imgcls_jax/models/registry.py);
#   2. add one row per registered name below: KerasReference("<keras.applications constructor>",
#      <the preprocess_input mode its Keras model needs, or None if it normalises inside>),
#      with options=... when the registered model takes Keras options to build this variant,
#      trainable="top:N" when two stages hold no normalisation layer, and slow=True for every
#      variant but the family's smallest (the quick tier keeps one model per family: checked by
#      test_quick_tier_has_every_family);
#   3. run `pytest tests/test_applications.py -k <name> -m ""` and record the printed figures.
# A registered name without a row fails test_every_registered_model_has_a_reference, and so does
# a row without a registered name.
# ---------------------------------------------------------------------------------------------
KERAS_REFERENCES: dict[str, KerasReference] = {
    "vgg16": KerasReference("VGG16", "caffe"),
    "vgg19": KerasReference("VGG19", "caffe", slow=True),
    "resnet50": KerasReference("ResNet50", "caffe"),
    "mobilenetv2": KerasReference("MobileNetV2", "tf", trainable="top:3"),
    "efficientnetb0": KerasReference("EfficientNetB0", None, trainable="top:3"),
    **{
        f"efficientnetb{i}": KerasReference(f"EfficientNetB{i}", None, trainable="top:3", slow=True)
        for i in range(1, 8)
    },
    "convnexttiny": KerasReference("ConvNeXtTiny", None),
    **{
        f"convnext{v.lower()}": KerasReference(
            f"ConvNeXt{v}", None, slow=True, heavy=v in ("Large", "XLarge")
        )
        for v in ("Small", "Base", "Large", "XLarge")
    },
    "efficientnetv2b0": KerasReference("EfficientNetV2B0", None, trainable="top:3"),
    **{
        f"efficientnetv2{v.lower()}": KerasReference(
            f"EfficientNetV2{v}", None, trainable="top:3", slow=True, heavy=v == "L"
        )
        for v in ("B1", "B2", "B3", "S", "M", "L")
    },
    "mobilenetv3small": KerasReference("MobileNetV3Small", None, trainable="top:3"),
    "mobilenetv3large": KerasReference("MobileNetV3Large", None, trainable="top:3", slow=True),
    # The step trains conv5 only (top:1) in the deep v1 ResNets: with conv4's 23 / 36 blocks in
    # training mode (top:2) one float32 step is ill-conditioned beyond the test's outlier rule in
    # Keras itself: against Keras's float64 step (2026-12-07, resnet101), Keras's own float32 step
    # has up to 12 of 1024 (7 of 256) entries of a conv4 BatchNorm's weights beyond 3e-2 of the
    # update, ours up to 17 of 256; over all trained tensors 10,708 vs ours 11,074 of 41.2 M.
    "resnet101": KerasReference("ResNet101", "caffe", slow=True, trainable="top:1"),
    # Keras's own float32 output is 1.4e-4 / 1.8e-4 of its size off its float64 one at the two
    # sizes (ours: 1.2e-4 / 1.8e-4 off float64, 1.5e-4 off Keras's float32), measured 2026-12-07
    "resnet152": KerasReference("ResNet152", "caffe", slow=True, f32_tol=3e-4, trainable="top:1"),
    "resnet50v2": KerasReference("ResNet50V2", "tf"),
    "resnet101v2": KerasReference("ResNet101V2", "tf", slow=True),
    "resnet152v2": KerasReference("ResNet152V2", "tf", slow=True),
    "densenet121": KerasReference("DenseNet121", "torch"),
    "densenet169": KerasReference("DenseNet169", "torch", slow=True),
    "densenet201": KerasReference("DenseNet201", "torch", slow=True),
    # Xception takes 71 px and more, the Inception families 75: their own even and odd sizes
    "xception": KerasReference("Xception", "tf", sizes=((80, 80), (75, 73))),
    "inceptionv3": KerasReference("InceptionV3", "tf", sizes=((80, 80), (77, 75))),
    "inceptionresnetv2": KerasReference("InceptionResNetV2", "tf", sizes=((80, 80), (77, 75)), slow=True),
    "mobilenet": KerasReference("MobileNet", "tf"),
    "nasnetmobile": KerasReference("NASNetMobile", "tf"),
    "nasnetlarge": KerasReference("NASNetLarge", "tf", slow=True),
}
#: Families whose every model is too big to build in the quick tier (minutes of Keras and XLA
#: compile on 2 cores): tested in the slow tier only.
SLOW_FAMILIES = {"inception_resnet_v2"}


#: Registry name -> further option sets its Keras application takes, each tested as one more
#: (slow) case of tests/test_applications.py: ``create_model(name, **options)`` against
#: ``keras.applications.<App>(**options)``.
OPTION_VARIANTS: dict[str, tuple[dict, ...]] = {
    "mobilenetv3small": ({"alpha": 0.75}, {"minimalistic": True}),
    "mobilenetv3large": ({"alpha": 0.75}, {"minimalistic": True}),
}


def registry_params(also_slow=frozenset()) -> list:
    """``pytest.param`` per registered model, marked slow where its reference is (the large
    variants) or in ``also_slow``: a test parametrised with it runs the smallest model of each
    family in the quick tier. A name without a reference is quick (tests/test_applications.py
    fails for it)."""
    import pytest

    import imgcls_jax

    out = []
    for name in imgcls_jax.list_models():
        slow = (name in KERAS_REFERENCES and KERAS_REFERENCES[name].slow) or name in also_slow
        out.append(pytest.param(name, marks=[pytest.mark.slow] if slow else [], id=name))
    return out


def keras_app(name: str, include_top: bool, size, pooling=None, classes: int = 1000, options=None):
    """``keras.applications.<app>(weights=None)`` of registry ``name`` at ``size`` (int or
    ``(h, w)``): logits at the top (``classifier_activation=None``), the map or pooled features
    without it. ``options``: the Keras options of the variant (default: the reference's)."""
    ref = KERAS_REFERENCES[name]
    h, w = (size, size) if isinstance(size, int) else size
    extra = ref.options if options is None else options
    options = dict(weights=None, input_shape=(h, w, 3), include_top=include_top, **extra)
    if include_top:
        options.update(classes=classes, classifier_activation=None)
    else:
        options.update(pooling=pooling)
    return ref.constructor()(**options)


class _Asked(Exception):
    pass


def keras_download(name: str, include_top: bool, monkeypatch, **options) -> tuple[str, str, str | None]:
    """``(file name, URL, hash)`` Keras's application of ``name`` asks ``get_file`` for with
    ``weights="imagenet"`` (its download stopped there), at its default input size."""
    import warnings

    from keras.src.utils import file_utils

    def get_file(fname, origin, **kw):
        raise _Asked(fname, origin, kw.get("file_hash"))

    monkeypatch.setattr(file_utils, "get_file", get_file)
    ref = KERAS_REFERENCES[name]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # MobileNetV3's warning for an undefined size
            ref.constructor()(weights="imagenet", include_top=include_top, **{**ref.options, **options})
    except _Asked as asked:
        return asked.args
    raise AssertionError(f"{ref.app} did not ask for a file")


def keras_preprocess(name: str):
    """What the Keras model of ``name`` takes for raw float32 RGB pixels (Keras's
    ``preprocess_input`` in its mode, or the pixels themselves)."""
    mode = KERAS_REFERENCES[name].preprocess
    if mode is None:
        return lambda x: np.asarray(x, np.float32)
    from keras.applications import imagenet_utils

    return lambda x: imagenet_utils.preprocess_input(np.asarray(x, np.float32), mode=mode)


def keras_out(model, name: str, images: np.ndarray) -> np.ndarray:
    """The Keras model's inference output on raw ``images``, preprocessed as its weights expect."""
    return np.asarray(model(keras_preprocess(name)(images), training=False))


def copy_weights(source, target) -> None:
    """``target.set_weights(source.get_weights())``, and Keras's ``Normalization`` layers (an
    EfficientNet's) made to read their new variables (they do only in ``finalize_state``)."""
    target.set_weights(source.get_weights())
    for layer in target.layers:
        if hasattr(layer, "finalize_state"):
            layer.finalize_state()


def weighted_layers(model) -> list:
    """The Keras model's layers that hold weights, nested models (ConvNeXt's ``Sequential``
    stem and downsampling blocks) opened into their layers, in the model's order."""
    out = []
    for layer in model.layers:
        if hasattr(layer, "layers") and layer.layers:
            out += weighted_layers(layer)
        elif layer.weights:
            out.append(layer)
    return out


#: Keras's names for layers it was given no name for: the class's, numbered in the session.
AUTO_NAMES = (
    "conv2d", "batch_normalization", "normalization", "layer_normalization", "separable_conv2d",
    "depthwise_conv2d",
)  # fmt: skip


def _numbered(base: str, names) -> list[str]:
    """``names`` that are ``base`` or ``base_<n>``, in the order of ``n`` (the unnumbered first)."""
    pattern = re.compile(rf"{re.escape(base)}(?:_(\d+))?")
    found = [(int(m.group(1) or -1), n) for n in names if (m := pattern.fullmatch(n))]
    return [n for _, n in sorted(found)]


def match_names(keras_names, ours) -> dict[str, str]:
    """Keras layer name -> our layer name: the same name; for layers Keras named after their
    class and numbered in the session (``conv2d_97``, ``normalization_3``), ours of that class
    in the same order (Keras numbers them in creation order; ours carry a fresh session's
    numbers: ``conv2d``, ``conv2d_1``, ...), as the weight loader matches them; else the one of
    ours with the name's class name."""
    keras_names, ours = list(keras_names), set(ours)
    mapping = {k: k for k in keras_names if k in ours}
    for base in AUTO_NAMES:
        theirs, mine = _numbered(base, keras_names), _numbered(base, ours)
        if theirs and len(theirs) == len(mine):
            mapping.update(zip(theirs, mine))
    for k in keras_names:
        base = re.fullmatch(r"(.+)_\d+", k)
        if k not in mapping and base and base.group(1) in ours and base.group(1) not in mapping.values():
            mapping[k] = base.group(1)
    return mapping
