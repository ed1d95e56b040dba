"""Test helpers shared by tests/ and benchmarks/: random VGG weights in Keras files, child
processes (several JAX processes or device counts in one test)."""

import os
import signal
import socket
import subprocess
import time

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
