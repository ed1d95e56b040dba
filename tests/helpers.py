"""Test helpers shared by tests/ and benchmarks/: random VGG weights in Keras files, child
processes (several JAX processes or device counts in one test)."""

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np

from imgcls_jax.models.vgg import base_layer_specs, top_layer_specs
from imgcls_jax.weights import write_legacy_h5


def random_layers(specs, seed=0):
    """He-scaled random kernels and non-zero biases for ``specs`` (so biases are tested too)."""
    rng = np.random.default_rng(seed)
    layers = {}
    for spec in specs:
        kshape, bshape = spec.shapes
        fan_in = int(np.prod(kshape[:-1]))
        layers[spec.name] = [
            rng.normal(0, np.sqrt(2.0 / fan_in), kshape).astype(np.float32),
            rng.normal(0, 0.1, bshape).astype(np.float32),
        ]
    return layers


def vgg_specs(arch, include_top, num_classes=1000):
    specs = base_layer_specs(arch)
    return specs + top_layer_specs(num_classes) if include_top else specs


def write_random_legacy(path, arch="vgg16", include_top=False, seed=0, **kw):
    layers = random_layers(vgg_specs(arch, include_top), seed)
    write_legacy_h5(path, layers, **kw)
    return layers


# ------------------------------------------------------------------------- child processes
#: Prefixes of variables that would make a child join (or wait for) a cluster the test runner is
#: part of, or inherit its device settings: removed before a child's own settings are applied.
CLUSTER_ENV = ("SLURM_", "OMPI_", "PMI_", "JAX_", "XLA_", "IMGCLS_JAX_")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a ``jax.distributed`` coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(root, extra: dict, cache=None) -> dict:
    """This environment without :data:`CLUSTER_ENV`, on the CPU, importing from ``root``, with
    ``extra`` on top; ``cache``: a JAX compilation cache folder shared by the children."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_ENV)}
    env.update(PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    env.update(extra)
    return env


def run_children(argvs: list[list[str]], envs: list[dict], timeout: float) -> list[str]:
    """Run the commands concurrently (``argvs[i]`` with ``envs[i]``, each in its own session) and
    return their outputs (stdout and stderr). All must exit 0 within ``timeout`` s: on a failure
    or the timeout every child still running is killed and the assertion shows each one's tail
    (a failed child's peers may block on it forever)."""
    procs = [
        subprocess.Popen(
            argv, env=env, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for argv, env in zip(argvs, envs)
    ]
    deadline, timed_out = time.time() + timeout, False
    try:
        while any(p.poll() is None for p in procs):
            if any(p.poll() not in (None, 0) for p in procs):
                break
            if time.time() > deadline:
                timed_out = True
                break
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    outputs = [p.stdout.read() for p in procs]
    codes = [p.returncode for p in procs]
    tails = "\n".join(
        f"--- child {i} {argv[1:]} exited {code}:\n{out[-4000:]}"
        for i, (argv, code, out) in enumerate(zip(argvs, codes, outputs))
    )
    assert not timed_out and codes == [0] * len(procs), (
        f"{'timed out after ' + str(timeout) + ' s' if timed_out else 'a child failed'}\n{tails}"
    )
    return outputs


# ------------------------------------------------------------------------- real photos
ROOT = Path(__file__).resolve().parents[1]
#: The shared real photos beside the checkout (CI has them; a user's clone may not). Set
#: ``IMGCLS_TEST_SHARED_DATA`` to another folder (e.g. a missing one, to run as a clone without it).
SHARED_DATA = Path(os.environ.get("IMGCLS_TEST_SHARED_DATA", ROOT.parent / "shared" / "data"))
#: The embedded sample that ships with the project: the flowers5 classes, 40 photos each, 128x128.
SAMPLE = ROOT / "examples" / "data" / "flowers_sample"


def load_example():
    """examples/train.py as a module (it is a script, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("example_train", ROOT / "examples" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


FLOWER_CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def flowers() -> Path:
    """``../shared/data/flowers5`` (4,317 photos) when it is there, else the embedded sample
    (the same five classes and photo size, 200 photos)."""
    real = SHARED_DATA / "flowers5"
    return real if real.is_dir() else SAMPLE


def hymenoptera(tmp_path: Path) -> Path:
    """``../shared/data/hymenoptera`` when it is there, else a folder of the same shape made in
    ``tmp_path`` from the embedded sample: ``{train,val}/{ants,bees}/``, JPEGs, one ``.jpeg``
    and a stray GIF in ``train/ants`` (the real set's ``formica.jpeg`` and
    ``imageNotFound.gif``)."""
    real = SHARED_DATA / "hymenoptera"
    if real.is_dir():
        return real
    from PIL import Image

    root = tmp_path / "hymenoptera_like"
    for split, first in (("train", 0), ("val", 30)):
        for name, source in (("ants", "daisy"), ("bees", "sunflower")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for photo in sorted((SAMPLE / source).glob("*.jpg"))[
                first : first + (30 if split == "train" else 10)
            ]:
                shutil.copy(photo, folder / photo.name)
    ants = root / "train" / "ants"
    first = sorted(ants.glob("*.jpg"))[0]
    first.rename(ants / "formica.jpeg")
    Image.open(ants / "formica.jpeg").convert("P").save(ants / "imageNotFound.gif")
    return root
