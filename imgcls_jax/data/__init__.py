"""The data layer: image folders, TFDS and arrays -> tf.data (or NumPy) batches -> devices.

This is the only part of imgcls_jax that uses TensorFlow, and it imports it lazily (on first
use); where TensorFlow is not importable, folders are checked and decoded with Pillow and
:class:`NumpyPipeline` feeds the device, which augments (``imgcls_jax.data.device_augment``).
Names are resolved on first access, so ``import imgcls_jax.data`` stays cheap.
"""

import importlib

_EXPORTS = {
    "dataset_audit": ["AuditReport", "audit"],
    "augment": ["AugmentConfig", "augment_image", "mix_batch", "save_augmentation_grid"],
    "decode": ["IMAGE_EXTENSIONS", "RESIZE_MODES", "check_images", "load_image", "tensorflow_available"],
    "folders": [
        "DatasetError",
        "ImageFolder",
        "Record",
        "read_manifest",
        "scan_folder",
        "split_records",
        "write_manifest",
    ],
    "numpy_pipeline": ["NumpyPipeline", "make_pipeline"],
    "pipeline": ["Pipeline", "Source", "from_arrays", "from_records", "from_tfds"],
    "prefetch": ["data_sharding", "prefetch_to_device", "to_device"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
