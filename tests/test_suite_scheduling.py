"""The quick tier's own machinery (tests/conftest.py): under pytest-xdist each test module runs
whole on one worker, and the modules of a ``MODULE_GROUPS`` group on the same one. Until
2026-12-07 the ``loadgroup`` marks meant for this grouped nothing (pytest 9 ignores what xdist 3.8
writes), so module fixtures were built again and again and nothing said so: this runs a real
2-worker session and reads which worker ran each test."""

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tests import conftest
from tests.helpers import ROOT

pytest.importorskip("xdist")


def test_two_workers_keep_each_module_whole():
    modules = ["tests/test_folders.py", "tests/test_optim.py"]  # quick ones (15-20 s), 10 tests or more
    # not this worker's xdist variables, nor the memory log (the inner tests would write into it)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")}
    env.pop("IMGCLS_TEST_MEMORY_LOG", None)
    done = subprocess.run(  # -n 2 given: -n auto picks no workers for a small machine
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-n", "2", "-v", *modules],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    workers: dict[str, set[str]] = {}
    for worker, module in re.findall(r"\[(gw\d)\].*? PASSED (tests/\w+\.py)::", done.stdout):
        workers.setdefault(module, set()).add(worker)
    assert set(workers) == set(modules), done.stdout[-3000:]
    assert all(len(w) == 1 for w in workers.values()), f"a module ran on several workers: {workers}"


def test_a_group_of_modules_is_one_unit_of_work():
    """The kill-and-resume modules (their session fixture is one training run) are one unit of
    xdist's scheduler; any other module is its own (their tests are all slow, so the real run
    above cannot show it within the quick tier)."""

    class Config:  # what xdist's scheduler reads of a pytest config
        option = SimpleNamespace(dist="loadfile", tx=["popen", "popen"], numprocesses=2, maxschedchunk=None)

        def getvalue(self, name):
            return getattr(self.option, name)

    config = Config()
    scheduler = conftest.pytest_xdist_make_scheduler(config, None)
    scope = scheduler._split_scope
    first, *others = (scope(f"tests/{name}::test_x[1]") for name in conftest.MODULE_GROUPS["killing"])
    assert others and all(other == first for other in others)
    assert scope("tests/test_metrics.py::test_x") == "tests/test_metrics.py" != first
    config.option.dist = "load"  # a --dist the user chose: xdist's own scheduler
    assert conftest.pytest_xdist_make_scheduler(config, None) is None
