"""Keras's ``ImageDataGenerator`` arguments as an :class:`~imgcls_jax.config.AugmentConfig`
(for a Keras user bringing an experiment over; see the README's "Coming from Keras")."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from imgcls_jax.config import AugmentConfig, _check, _is_int, _is_number

log = logging.getLogger(__name__)


def from_image_data_generator(**kwargs) -> AugmentConfig:
    """The augmentation of ``keras.preprocessing.image.ImageDataGenerator(**kwargs)``.

    Exact conversions: ``rotation_range`` (degrees, uniform in +-range) -> ``rotation`` =
    range / 360 turns; ``width_shift_range`` = ``height_shift_range`` (fractions < 1 of the
    image size, uniform in +-range) -> ``translation``; ``zoom_range`` (``z`` or ``[1 - z, 1 +
    z]``) -> ``zoom`` = z; ``horizontal_flip`` / ``vertical_flip`` -> ``flip``; ``fill_mode``
    and ``cval`` -> ``fill_mode`` and ``fill_value``. For the same rotation, shift and zoom the
    warp gives ImageDataGenerator's pixels (bilinear; tests/test_from_keras.py).

    Remaining differences, by measurement: ImageDataGenerator draws the x and y zoom
    independently, here one factor scales both axes (logged as a warning); its shift is in
    input pixels, here in output pixels (so with zoom z the shift is z times as large); its
    ``height_shift_range`` moves images sideways and ``width_shift_range`` up and down, and on
    non-square images it rotates and zooms about a transposed centre (Keras bugs,
    keras-team/keras#17398; the same ranges on square images give the same distribution);
    ``"constant"`` differs in the one-pixel band along the image's edge (blended with
    ``cval`` here); ``"wrap"`` repeats the image with period ``n - 1`` pixels there and ``n``
    here (logged as a warning).

    Raises:
      ValueError: naming the argument, for what has no equivalent (``shear_range``,
        ``channel_shift_range``, the multiplicative ``brightness_range``, unequal or pixel
        shifts, a zoom range not centred on 1, spline orders other than 1, dataset-wide
        normalisation) and for what is not augmentation here (``rescale``,
        ``preprocessing_function``: the model normalises its input, see
        ``TrainConfig.preprocessing``; ``validation_split``: ``TrainConfig.splits``).
    """
    return _convert(kwargs)


#: ImageDataGenerator's arguments and defaults (Keras 3.15, ``keras.src.legacy``).
_IDG_DEFAULTS = {
    "featurewise_center": False, "samplewise_center": False, "featurewise_std_normalization": False,
    "samplewise_std_normalization": False, "zca_whitening": False, "zca_epsilon": 1e-6,
    "rotation_range": 0, "width_shift_range": 0.0, "height_shift_range": 0.0, "brightness_range": None,
    "shear_range": 0.0, "zoom_range": 0.0, "channel_shift_range": 0.0, "fill_mode": "nearest", "cval": 0.0,
    "horizontal_flip": False, "vertical_flip": False, "rescale": None, "preprocessing_function": None,
    "data_format": None, "validation_split": 0.0, "interpolation_order": 1, "dtype": None,
}  # fmt: skip
#: ImageDataGenerator arguments without an AugmentConfig equivalent, and what to do instead.
_IDG_REFUSED = {
    "shear_range": "shear has no equivalent; leave it out",
    "channel_shift_range": "channel shift has no equivalent; leave it out",
    "brightness_range": "ImageDataGenerator's brightness multiplies (PIL ImageEnhance); "
    "AugmentConfig.brightness adds delta * 255 (Keras 3 RandomBrightness): choose that yourself",
    "rescale": "not augmentation: the model scales its input itself (TrainConfig.preprocessing, 'unit' "
    "divides by 255)",
    "preprocessing_function": "not augmentation: the model applies its preprocessing itself "
    "(TrainConfig.preprocessing; VGG's 'caffe' is keras.applications.vgg16.preprocess_input)",
    "validation_split": "not augmentation: set TrainConfig.splits (stratified per class)",
    "featurewise_center": "dataset-wide normalisation has no equivalent; the model normalises "
    "(TrainConfig.preprocessing)",
    "samplewise_center": "per-image normalisation has no equivalent",
    "featurewise_std_normalization": "dataset-wide normalisation has no equivalent",
    "samplewise_std_normalization": "per-image normalisation has no equivalent",
    "zca_whitening": "ZCA whitening has no equivalent",
    "interpolation_order": "the warp is bilinear (order 1) only",
}


def _convert(kwargs: dict) -> AugmentConfig:
    unknown = sorted(set(kwargs) - set(_IDG_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown ImageDataGenerator argument(s) {unknown}; known: {sorted(_IDG_DEFAULTS)}")
    given = {**_IDG_DEFAULTS, **kwargs}
    for name, why in _IDG_REFUSED.items():
        value, default = given[name], _IDG_DEFAULTS[name]
        if value is not None if default is None else value != default:
            raise ValueError(f"ImageDataGenerator({name}={given[name]!r}): {why}")
    _check(given["data_format"] in (None, "channels_last"), "ImageDataGenerator data_format",
           "None or 'channels_last'", given["data_format"])  # fmt: skip
    _check(given["dtype"] in (None, "float32"), "ImageDataGenerator dtype", "None or 'float32'",
           given["dtype"])  # fmt: skip
    rotation = given["rotation_range"]
    _check(_is_number(rotation) and 0 <= rotation <= 360, "ImageDataGenerator rotation_range",
           "degrees in [0, 360]", rotation)  # fmt: skip
    if given["fill_mode"] == "wrap":
        log.warning(
            "ImageDataGenerator's fill_mode='wrap' (scipy) repeats the image every n - 1 pixels, "
            "AugmentConfig's every n pixels: the wrapped-in parts are offset by one pixel"
        )
    flips = [a for a in ("horizontal", "vertical") if given[f"{a}_flip"]]
    return AugmentConfig(
        flip="horizontal_and_vertical" if len(flips) == 2 else (flips[0] if flips else None),
        rotation=rotation / 360, zoom=_idg_zoom(given["zoom_range"]),
        translation=_idg_shift(given["width_shift_range"], given["height_shift_range"]),
        fill_mode=given["fill_mode"], fill_value=given["cval"],
    )  # fmt: skip


def _idg_shift(width, height) -> float:
    """ImageDataGenerator's width and height shift ranges as one translation fraction."""
    for name, value in (("width_shift_range", width), ("height_shift_range", height)):
        if not (_is_number(value) and 0 <= value < 1) or _is_int(value) and value != 0:
            raise ValueError(
                f"ImageDataGenerator {name}={value!r}: only a fraction of the image size in [0, 1) has "
                "an equivalent (pixel shifts and lists of choices do not)"
            )
    if width != height:
        raise ValueError(
            f"ImageDataGenerator width_shift_range={width!r} != height_shift_range={height!r}: "
            "AugmentConfig.translation is one fraction for both axes; make them equal"
        )
    return float(width)


def _idg_zoom(zoom_range) -> float:
    """ImageDataGenerator's zoom range (``z``: ``[1 - z, 1 + z]``, or ``[low, high]``) as
    AugmentConfig's ``zoom``, which must be centred on 1."""
    if _is_number(zoom_range):
        zoom = float(zoom_range)
    else:
        low, high = tuple(zoom_range) if isinstance(zoom_range, Sequence) else (None, None)
        if not (_is_number(low) and _is_number(high) and math.isclose(low + high, 2, abs_tol=1e-9)):
            raise ValueError(
                f"ImageDataGenerator zoom_range={zoom_range!r}: AugmentConfig.zoom scales by "
                "[1 - z, 1 + z]; only a range centred on 1 has an equivalent"
            )
        zoom = round((high - low) / 2, 12)  # [0.8, 1.2] -> 0.2, not 0.19999999999999996
    if zoom > 0:
        log.warning(
            "ImageDataGenerator draws the x and y zoom independently; AugmentConfig.zoom=%g draws one "
            "factor for both axes (as Keras 3's RandomZoom)", zoom,
        )  # fmt: skip
    return zoom
