"""imgcls_jax: image classification by transfer learning in JAX/Flax.

``import imgcls_jax`` never imports TensorFlow; only the data layer's pipelines do, lazily, when
they first run.
"""

from imgcls_jax import data, parallel
from imgcls_jax.config import AugmentConfig, ConfigError, PhaseConfig, TrainConfig
from imgcls_jax.data.folders import DatasetError
from imgcls_jax.evaluate import evaluate_run, load_run, predict
from imgcls_jax.evaluate.prediction import UnreadableImageError
from imgcls_jax.models import create_model, list_models, preprocess_input, register_model, summary
from imgcls_jax.train import fit
from imgcls_jax.train.rundir import RunMismatchError
from imgcls_jax.weights import WeightFileError, WeightsUnavailableError, from_keras, load_weights, to_keras

__version__ = "0.1.0"

__all__ = [
    "AugmentConfig",
    "ConfigError",
    "DatasetError",
    "PhaseConfig",
    "RunMismatchError",
    "TrainConfig",
    "UnreadableImageError",
    "WeightFileError",
    "WeightsUnavailableError",
    "__version__",
    "create_model",
    "data",
    "evaluate_run",
    "fit",
    "from_keras",
    "list_models",
    "load_run",
    "load_weights",
    "parallel",
    "predict",
    "preprocess_input",
    "register_model",
    "summary",
    "to_keras",
]
