import importlib.util
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Keras peers: TensorFlow's backend where TF is installed (its oneDNN kernels on CPU), else JAX's
# (the GPU machine has no TensorFlow).
os.environ.setdefault(
    "KERAS_BACKEND", "tensorflow" if importlib.util.find_spec("tensorflow") is not None else "jax"
)
# JAX would otherwise reserve 75% of a GPU's memory up front, leaving the PyTorch and Keras peers
# of the same run a quarter of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


def pytest_xdist_auto_num_workers(config):
    """Benchmarks run in one process (pytest-benchmark turns itself off under xdist, and timings
    side by side need the cores to themselves): ``-n auto`` (tests/conftest.py) means none here."""
    return 0
