"""The data layer: image folders, TFDS and arrays -> tf.data (or NumPy) batches -> devices.

Only the tf.data pipelines use TensorFlow, and they import it lazily, when they first run:
importing this package does not load it. Where TensorFlow is not importable, folders are checked
and decoded with Pillow and :class:`NumpyPipeline` feeds the device, which augments
(:mod:`imgcls_jax.data.device_augment`).
"""

from imgcls_jax.config import AugmentConfig
from imgcls_jax.data.augment import augment_image, mix_batch, save_augmentation_grid
from imgcls_jax.data.dataset_audit import AuditReport, audit
from imgcls_jax.data.decode import (
    IMAGE_EXTENSIONS,
    RESIZE_MODES,
    check_images,
    load_image,
    tensorflow_available,
)
from imgcls_jax.data.folders import (
    DatasetError,
    ImageFolder,
    Record,
    read_manifest,
    scan_folder,
    split_records,
    write_manifest,
)
from imgcls_jax.data.keras_generator import from_image_data_generator
from imgcls_jax.data.numpy_pipeline import NumpyPipeline, make_pipeline
from imgcls_jax.data.pipeline import Pipeline, Source, from_arrays, from_records, from_tfds
from imgcls_jax.data.prefetch import data_sharding, prefetch_to_device, to_device
from imgcls_jax.data.sharding import shard_records

__all__ = [
    "IMAGE_EXTENSIONS",
    "RESIZE_MODES",
    "AugmentConfig",
    "AuditReport",
    "DatasetError",
    "ImageFolder",
    "NumpyPipeline",
    "Pipeline",
    "Record",
    "Source",
    "audit",
    "augment_image",
    "check_images",
    "data_sharding",
    "from_image_data_generator",
    "from_arrays",
    "from_records",
    "from_tfds",
    "load_image",
    "make_pipeline",
    "mix_batch",
    "prefetch_to_device",
    "read_manifest",
    "save_augmentation_grid",
    "scan_folder",
    "shard_records",
    "split_records",
    "tensorflow_available",
    "to_device",
    "write_manifest",
]
