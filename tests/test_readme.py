"""The README's data snippet runs as written, on the shared real photos."""

import os
import re
from pathlib import Path

import numpy as np

from tests import helpers

ROOT = Path(__file__).resolve().parents[1]


def test_readme_data_snippet_runs(tmp_path, monkeypatch):
    data = helpers.hymenoptera(tmp_path)  # the shared photos, else a folder like it from the sample
    readme = (ROOT / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from imgcls_jax import data" in b
    )
    code = block.replace('"path/to/images"', repr(str(data)))
    monkeypatch.chdir(tmp_path)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    exec(compile(code, "README.md", "exec"), {})
    assert (tmp_path / "run" / "manifest.csv").is_file()
    assert (tmp_path / "run" / "augment.png").stat().st_size > 1000


def test_readme_coming_from_keras_block_runs(tmp_path, monkeypatch):
    """The imgcls_jax side of "Coming from Keras", on the embedded sample (200 photos) at 32x32,
    random weights (no ImageNet file here), 2 epochs: it trains, stops or not, and reports."""
    readme = (ROOT / "README.md").read_text()
    block = next(
        b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "from_image_data_generator" in b
    )
    code = (
        block.replace('"path/to/images"', repr(str(helpers.SAMPLE)))
        .replace('weights="imagenet"', 'weights="random"')
        .replace("image_size=224", "image_size=32")
        .replace("epochs=20", "epochs=2")
    )
    assert code.count("image_size=32") == 1 and 'weights="random"' in code and "epochs=2" in code
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    report = scope["report"]
    manifest = (tmp_path / "runs" / "from_keras_recipe" / "manifest.csv").read_text().splitlines()
    tests = sum(line.split(",")[-1] == "test" for line in manifest[1:])
    assert report.count == report.confusion.sum() == tests > 0
    assert abs(report.top1 - np.trace(report.confusion) / tests) < 1e-9
    assert (tmp_path / "runs" / "from_keras_recipe" / "best").is_dir()
