"""oneDNN's convolutions and XLA's other work sharing the cores: one full training step
(``conv_impl="auto"``) under each thread setting, each in its own process (XLA reads its flags
once), the settings alternated for ``--repeats`` rounds.

imgcls_jax runs oneDNN single-threaded in each thread and splits a convolution's batch into as
many chunks as XLA's intra-op pool has threads, run by the calling thread and tasks on that pool
(``imgcls_jax/native/onednn_conv.cc``): one pool for everything. Settings (:data:`SETTINGS`):

* ``default``: that, with XLA's pool at its default size (one thread per core).
* ``onednn-1``: convolutions on the calling thread only (``IMGCLS_ONEDNN_THREADS=1``), XLA's
  other work on its pool as usual.
* ``xla-1``: XLA on one thread (``--xla_cpu_multi_thread_eigen=false``,
  ``intra_op_parallelism_threads=1``), so one chunk per convolution too.

Run from the repository root (prints a markdown table)::

    .venv/bin/python -m benchmarks.threads --models vgg16,resnet50 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "default": {},
    "onednn-1": {"IMGCLS_ONEDNN_THREADS": "1"},
    "xla-1": {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"},
}


def _child(arch: str, size: int, batch: int, rounds: int) -> None:
    from benchmarks import peers

    run = peers.jax_runner("train", size, batch, impl="auto", arch=arch)[0]
    run()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    print(json.dumps({"median_ms": 1e3 * statistics.median(times), "load": os.getloadavg()[0]}))


def measure(setting: str, arch: str, size: int, batch: int, rounds: int) -> dict:
    """One process under ``setting``: ``{"median_ms", "load"}`` of ``rounds`` warm steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.update(SETTINGS[setting])
    code = f"from benchmarks.threads import _child; _child({arch!r}, {size}, {batch}, {rounds})"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50,mobilenetv2,efficientnetb0")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    results: dict[tuple[str, str], list[float]] = {}
    loads = []
    for _ in range(args.repeats):
        for arch in args.models.split(","):
            for setting in SETTINGS:
                out = measure(setting, arch, args.size, args.batch, args.rounds)
                results.setdefault((arch, setting), []).append(out["median_ms"])
                loads.append(out["load"])
                print(arch, setting, f"{out['median_ms']:.0f} ms (load {out['load']:.1f})", flush=True)
    print(f"\nms per training step at {args.size}x{args.size} batch {args.batch}, each repeat's median; "
          f"load average {min(loads):.1f}-{max(loads):.1f}")  # fmt: skip
    print("| model | " + " | ".join(SETTINGS) + " |")
    print("|---|" + "---|" * len(SETTINGS))
    for arch in args.models.split(","):
        cells = [" / ".join(f"{v:.0f}" for v in results[(arch, s)]) for s in SETTINGS]
        print(f"| {arch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
