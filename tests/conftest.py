import os
import shutil
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
# TensorFlow's oneDNN build hands large CPU buffers to a caching allocator that never returns them:
# one Keras VGG16 with its top, built, run and freed (clear_session, gc, malloc_trim), leaves the
# process 1.4 GB larger than before it was built (measured 2026-12-07; 0.03 GB with this off), and
# Keras is the tests' reference in one module after another. Keras here runs TensorFlow's own
# (Eigen) kernels; the benchmarks keep oneDNN, Keras's default, since there Keras's speed is what
# is measured.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

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


# Modules that go to one xdist worker together (by file name): those sharing a session fixture
# (tests/killing.py), and those holding VGG16's 224 px top (138 M parameters) in both frameworks
# (the quick tier's largest per-test peaks, 2026-12-07), so the two workers never hold two at once.
# Every other module is a group of its own.
MODULE_GROUPS = {
    "killing": ("test_kill_moments.py", "test_run_faults.py", "test_full_disk.py"),
    "vgg_top": ("test_parity_keras.py", "test_models.py", "test_weight_files.py"),
}


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under pytest-xdist (``-n``, README), each test module goes to one worker whole, so that its
    module fixtures are built once, and the modules of a :data:`MODULE_GROUPS` group go to the
    same one: xdist's ``--dist loadfile`` with those groups as files. (``--dist loadgroup`` with
    ``xdist_group`` marks, used until 2026-12-07, grouped nothing under pytest 9: xdist 3.8 writes
    the group into ``item._nodeid``, which pytest 9 no longer reads; tests/test_metrics.py's cases
    ran on both workers.)"""
    if config.option.dist != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    group_of = {name: group for group, names in MODULE_GROUPS.items() for name in names}

    class ModuleGroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = super()._split_scope(nodeid)
            return group_of.get(path.rsplit("/", 1)[-1], path)

    return ModuleGroupScheduling(config, log)


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The quick tier runs in 2 processes where pytest-xdist is installed (the ``test`` extra) and
    ``-n`` is not given: one process kept 1.24 of the 2 cores busy (``time -v``, 2026-12-07); six
    heavy modules took 5 min 32 s in 2 workers, 9 min 30 s within a one-process run of the same day.
    ``-n 0`` runs in this process; without xdist nothing changes. With workers (``-n auto`` or
    ``-n N``) and no ``--dist`` given, modules are kept whole (:func:`pytest_xdist_make_scheduler`)."""
    if getattr(config.option, "numprocesses", "absent") is None and not os.environ.get("PYTEST_XDIST_WORKER"):
        config.option.numprocesses = "auto"
    if getattr(config.option, "numprocesses", None) and config.option.dist == "no":  # -n N too
        config.option.dist = "loadfile"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: 2 workers where there are 2 cores and 20 GB of memory (each worker of the quick
    tier peaks at a few GB: README), else none; none either for tests of one file (``pytest
    tests/test_x.py``, ``tests/test_x.py::test_y``), where starting workers costs more than it saves."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        memory_gb = 0
    files = {arg.split("::")[0] for arg in config.args}
    if len(files) == 1 and next(iter(files)).endswith(".py"):
        return 0
    return 2 if cores >= 2 and memory_gb >= 20 else 0


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
    MB<TAB>peak MB<TAB>seconds<TAB>process`` to FILE (what holds memory across a suite and what
    takes the time, even of a run cut short: tests/test_memory.py, README). The seconds count the
    test's setup, call and teardown, module fixtures included; the process is the xdist worker
    (``gw0``, ``gw1``) or ``main``, whose memory the two MB columns are."""
    start = time.monotonic()
    result = yield
    path = os.environ.get("IMGCLS_TEST_MEMORY_LOG")
    if path:
        rss, hwm = _memory_kb()
        seconds, worker = time.monotonic() - start, os.environ.get("PYTEST_XDIST_WORKER", "main")
        with open(path, "a") as f:
            f.write(f"{item.nodeid}\t{rss / 1024:.0f}\t{hwm / 1024:.0f}\t{seconds:.1f}\t{worker}\n")
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
