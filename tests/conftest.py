import os
import shutil

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
    yield root
    shutil.rmtree(root, ignore_errors=True)  # weight files of a few hundred MB each, per test


# ``tmp_path_factory.mktemp`` prefixes of session-scoped fixtures, kept to the end (tests/killing.py)
_SESSION_TMP = ("kills",)


@pytest.fixture(autouse=True, scope="module")
def _remove_module_tmp(request, tmp_path_factory):
    """Delete the temporary folders a test module made (its ``tmp_path`` and ``mktemp`` folders:
    Keras model files, runs, weight caches) when it ends without a failure. Kept, a whole quick tier
    wrote 16 GB, more than a CI disk has; a failing module's folders stay for a look."""
    base = tmp_path_factory.getbasetemp()
    before = set(os.listdir(base))
    failed = request.session.testsfailed
    yield
    if request.session.testsfailed != failed:
        return
    for name in set(os.listdir(base)) - before:
        if not name.startswith(_SESSION_TMP):
            shutil.rmtree(base / name, ignore_errors=True)


def _memory_kb() -> tuple[int, int]:
    """``(resident, peak resident)`` of this process in kB (Linux ``/proc``; zeros elsewhere)."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
    except OSError:
        return 0, 0
    return tuple(int(fields.get(k, "0 kB").split()[0]) for k in ("VmRSS", "VmHWM"))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """``IMGCLS_TEST_MEMORY_LOG=FILE``: after each test, append ``nodeid<TAB>resident
    MB<TAB>peak MB`` to FILE (what holds memory across a suite: tests/test_memory.py, README)."""
    result = yield
    path = os.environ.get("IMGCLS_TEST_MEMORY_LOG")
    if path:
        rss, hwm = _memory_kb()
        with open(path, "a") as f:
            f.write(f"{item.nodeid}\t{rss / 1024:.0f}\t{hwm / 1024:.0f}\n")
    return result


def release_memory() -> None:
    """Drop what a test module leaves behind that no later one needs: JAX's compiled executables
    and tracing caches, Keras's global state, garbage cycles; then hand freed heap pages back to
    the system (glibc keeps them otherwise, so the suite's resident memory only grows)."""
    import gc
    import sys

    import jax

    jax.clear_caches()
    from imgcls_jax.train import steps

    steps._JIT_CACHE.clear()
    if "keras" in sys.modules:
        sys.modules["keras"].backend.clear_session()
    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@pytest.fixture(autouse=True, scope="module")
def _release_memory_after_each_module():
    yield
    if not os.environ.get("IMGCLS_TEST_KEEP_CACHES"):
        release_memory()
