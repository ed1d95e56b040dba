"""Write the Keras graphs whole-model import and export go by (``imgcls_jax/weights/keras_graphs``).

Each is Keras's own config of a registered family's base,
``keras.applications.<builder>(include_top=False, weights=None, input_shape=(None, None, 3),
**kwargs)`` as the family's row of ``KERAS_APPLICATIONS`` says, gzipped. Run from the repository
root after adding a family's row (Keras needed)::

    .venv/bin/python -m tests.keras_graphs efficientnetv2b0     # or no name: every family
"""

import gzip
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def keras_base_config(name: str) -> dict:
    """Keras's config of ``name``'s base (built in a fresh Keras session, so that layers Keras
    names after their class get their plain names)."""
    import keras

    from imgcls_jax.weights.keras_families import application

    row = application(name)
    keras.backend.clear_session()
    builder = getattr(keras.applications, row.builder)
    model = builder(**{"include_top": False, "weights": None, "input_shape": (None, None, 3), **row.kwargs})
    return json.loads(model.to_json())


def write(name: str) -> None:
    from imgcls_jax.weights.keras_families import graph_path

    path = graph_path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(keras_base_config(name), sort_keys=True, separators=(",", ":"))
    path.write_bytes(gzip.compress(text.encode(), mtime=0))
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    from imgcls_jax.weights.keras_families import KERAS_APPLICATIONS

    for family in sys.argv[1:] or list(KERAS_APPLICATIONS):
        write(family)
