"""fit() over several devices of one host equals fit() on one device (same global batch)."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_fit import SCRIPT, config, tiny_data  # noqa: F401  (tiny_data is a fixture)

ROOT = Path(__file__).resolve().parents[1]


def run_fit_on(devices: int, cfg, out: Path) -> dict:
    cfg_path = out.with_suffix(".json")
    cfg.to_json(cfg_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    env.update(
        PYTHONPATH=str(ROOT),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    )
    check = f"\nassert jax.device_count() == {devices}, jax.devices()\n"
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT + check, str(cfg_path), str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(np.load(out))


def test_fit_on_four_devices_equals_one_device(tiny_data, tmp_path):  # noqa: F811
    from imgcls_jax.config import PhaseConfig

    phases = [
        PhaseConfig(epochs=1, trainable="head", learning_rate=1e-2),
        PhaseConfig(epochs=1, trainable="top:1", optimizer="sgd", learning_rate=1e-2, momentum=0.9),
    ]
    one = run_fit_on(1, config(tiny_data, tmp_path / "one", phases=phases), tmp_path / "one.npz")
    four = run_fit_on(4, config(tiny_data, tmp_path / "four", phases=phases), tmp_path / "four.npz")
    assert sorted(one) == sorted(four)
    for key in one:  # only the summation order differs (gradients are all-reduced over devices)
        np.testing.assert_allclose(four[key], one[key], rtol=1e-4, atol=1e-5, err_msg=key)
    rows = [(tmp_path / r / "metrics.csv").read_text().splitlines() for r in ("one", "four")]
    assert len(rows[0]) == len(rows[1]) == 3


def test_batch_that_does_not_divide_over_the_devices_is_a_clear_error(tmp_path):
    script = (
        "from imgcls_jax.config import TrainConfig\n"
        "from imgcls_jax.train.loop import fit\n"
        "try:\n"
        f"    fit(TrainConfig(data='unused', run_dir={str(tmp_path / 'r')!r}, batch_size=6))\n"
        "except ValueError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert "batch_size=6 does not divide over the 4 devices" in out.stdout, out.stderr[-2000:]
    assert not (tmp_path / "r").exists()  # nothing written before the check


def test_the_single_device_path_places_nothing():
    import jax

    from imgcls_jax.train.loop import _replicate

    if jax.device_count() != 1:
        pytest.skip("this process has several devices")
    tree = {"a": np.ones(3)}
    assert _replicate(tree) is tree
