import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import pytest

# Session fixtures of the kill-and-resume tests (a data folder, uninterrupted runs to compare with)
from tests.killing import kill_setup, straight_augmented_run, straight_run  # noqa: F401, E402


@pytest.fixture(autouse=True)
def isolated_weight_dirs(tmp_path_factory, monkeypatch):
    """Keep every test's weight caches out of the user's home and of each other."""
    root = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("IMGCLS_JAX_CACHE", str(root / "imgcls_cache"))
    monkeypatch.setenv("KERAS_HOME", str(root / "keras"))
    monkeypatch.delenv("IMGCLS_JAX_WEIGHTS_DIR", raising=False)
    return root
