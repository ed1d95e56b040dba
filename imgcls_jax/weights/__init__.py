"""Keras weight files -> Flax parameters: reading, validation, resolution and caching."""

from imgcls_jax.weights.keras import (
    FileLayers,
    WeightFileError,
    read_keras_weights,
    validate,
    write_legacy_h5,
)
from imgcls_jax.weights.keras_arch import KerasModelInfo
from imgcls_jax.weights.keras_export import to_keras
from imgcls_jax.weights.keras_models import from_keras
from imgcls_jax.weights.load import LoadedWeights, load_weights
from imgcls_jax.weights.ported import is_ported_dir, read_ported, save_ported
from imgcls_jax.weights.store import (
    IMAGENET,
    ChecksumError,
    PublishedWeights,
    WeightsUnavailableError,
    cache_path,
    check_hash,
    check_md5,
    load_converted,
    resolve_imagenet,
    save_converted,
)

__all__ = [
    "IMAGENET",
    "ChecksumError",
    "FileLayers",
    "KerasModelInfo",
    "LoadedWeights",
    "PublishedWeights",
    "WeightFileError",
    "WeightsUnavailableError",
    "cache_path",
    "check_hash",
    "check_md5",
    "from_keras",
    "is_ported_dir",
    "load_converted",
    "load_weights",
    "read_keras_weights",
    "read_ported",
    "resolve_imagenet",
    "save_converted",
    "save_ported",
    "to_keras",
    "validate",
    "write_legacy_h5",
]
