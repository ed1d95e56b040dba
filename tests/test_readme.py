"""The README's data snippet runs as written, on the shared real photos."""

import os
import re
from pathlib import Path

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
