"""Where TensorFlow is not installed (the GPU machine), a folder still trains, evaluates and
predicts: the command line end to end in a child process where importing TensorFlow fails."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
# As if not installed: `import tensorflow` raises ImportError and importlib.util.find_spec gives None
# (what orbax's path library asks before touching TensorFlow).
NO_TF = """
import sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None
from imgcls_jax import cli
code = cli.main(sys.argv[1:])
loaded = sorted(m for m, v in sys.modules.items() if v is not None and m.split(".")[0] in
                ("tensorflow", "tensorflow_datasets", "keras"))
assert not loaded, loaded
sys.exit(code)
"""


def imgcls(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", NO_TF, *args], env=env, capture_output=True, text=True, timeout=900
    )


def test_train_evaluate_predict_without_tensorflow(tmp_path):
    data = tmp_path / "data"
    rng = np.random.default_rng(2)
    for name, color in (("red", (200, 30, 30)), ("blue", (30, 30, 200))):
        (data / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(color, 40, (40, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(data / name / f"{i}.jpg", quality=90)
    (data / "red" / "notes.jpg").write_text("not an image")  # skipped with a warning, as with TF
    run = tmp_path / "run"
    train = imgcls(
        "train", "--data", str(data), "--run-dir", str(run), "--weights", "none", "--image-size", "32",
        "--epochs", "2", "--batch-size", "6",
    )  # fmt: skip
    assert train.returncode == 0, train.stderr[-4000:]
    assert "input: numpy pipeline, augmentation on the device" in train.stderr
    assert "notes.jpg" in train.stderr and "Classification Report" in train.stdout
    metrics = json.loads((run / "eval_val" / "metrics.json").read_text())
    assert metrics["count"] == 6 and np.trace(metrics["confusion_matrix"]) == round(metrics["top1"] * 6)
    evaluate = imgcls("evaluate", str(run), "--split", "train", "--checkpoint", "latest")
    assert evaluate.returncode == 0 and "Confusion Matrix" in evaluate.stdout, evaluate.stderr[-3000:]
    predict = imgcls("predict", str(run), str(data / "blue"), "--top-k", "1", "--json")
    assert predict.returncode == 0, predict.stderr[-3000:]
    rows = json.loads(predict.stdout)
    assert len(rows) == 12 and all(r["top_k"][0][0] in ("red", "blue") for r in rows)
