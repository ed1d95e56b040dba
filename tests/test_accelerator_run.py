"""The prepared accelerator run (benchmarks/accelerator_run.py) on this CPU at tiny sizes: the
same code path as on a GPU (bfloat16, buffer donation, device placement, device augmentation, the
NumPy input pipeline), so it cannot rot before a GPU appears."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def test_accelerator_run_tiny(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, str(ROOT / "benchmarks" / "accelerator_run.py"), "--out", str(out), "--tiny",
               "--data", str(helpers.SAMPLE)]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["errors"] == {} and results["settings"]["size"] == 32
    assert results["peak"]["flops"] > 0 and results["peak"]["device"]
    rows = {(r["model"], r["mode"]): r for r in results["throughput"]}
    for arch in ("vgg16", "mobilenetv2"):  # VGG and a BatchNorm family
        for mode in ("train", "forward"):
            ours = rows[(arch, mode)]["imgcls_jax"]
            assert ours["images_per_s"] > 0 and 0 < ours["mfu"] <= 1, (arch, mode, ours)
    e2e = results["e2e"]
    assert e2e["config"]["augment_on"] == "device" and e2e["config"]["dtype"] == "bfloat16"
    assert e2e["test_count"] > 0 and e2e["test_correct"] == round(e2e["test_accuracy"] * e2e["test_count"])
    assert e2e["step_alone_images_per_s"] > 0 and e2e["epoch_images_per_s"][-1] > 0
    table = (out / "results.md").read_text()
    assert "| vgg16 | train | 8 |" in table and "e2e fit" in table and (out / "log.txt").stat().st_size > 0
