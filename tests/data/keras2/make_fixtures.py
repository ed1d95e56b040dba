"""Regenerate the Keras 2 fixtures here from real tf.keras (not run by the tests).

Each ``*.json`` holds what ``model.save("x.h5")`` of tf_keras 2.21.0 (Keras 2) wrote for a small
transfer model: the ``model_config`` attribute and the layout of ``model_weights`` (layer
names, weight names). The weights themselves (59 MB each) are not kept: the tests write them
from a Keras 3 twin of each model. tf_keras needs the full ``tensorflow`` package as a
dependency; with ``tensorflow-cpu`` installed, install it beside it without dependencies:

    pip install --no-deps --target /tmp/tfk tf-keras==2.21.0
    TF_KERAS_PATH=/tmp/tfk python tests/data/keras2/make_fixtures.py
"""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.environ["TF_KERAS_PATH"])
import h5py  # noqa: E402
import tf_keras as keras  # noqa: E402

HERE = Path(__file__).parent


def models() -> dict:
    base = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    out = {}
    inp = keras.Input((32, 32, 3))
    x = keras.layers.GlobalAveragePooling2D()(base(inp, training=False))
    x = keras.layers.Dropout(0.5)(keras.layers.Dense(256, activation="relu")(x))
    out["nested_gap_dense_dropout"] = keras.Model(inp, keras.layers.Dense(5, activation="softmax")(x))
    out["sequential_rescaling_flatten_sigmoid"] = keras.Sequential(
        [keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 127.5, offset=-1), base,
         keras.layers.Flatten(), keras.layers.Dense(3, activation="sigmoid")]
    )  # fmt: skip
    flat = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    y = keras.layers.Dense(4)(keras.layers.GlobalMaxPooling2D()(flat.output))
    out["flat_gmp_activation"] = keras.Model(flat.input, keras.layers.Activation("softmax")(y))
    inp = keras.Input((32, 32, 3))
    z = keras.layers.GlobalAveragePooling2D()(base(keras.applications.vgg16.preprocess_input(inp)))
    out["preprocess_input_inside"] = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(z))
    return out


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models().items():
            model.save(f"{tmp}/m.h5")
            with h5py.File(f"{tmp}/m.h5") as h:
                mw = h["model_weights"]
                layout = {
                    "keras_version": h.attrs["keras_version"],
                    "backend": h.attrs["backend"],
                    "layer_names": [str(n) for n in mw.attrs["layer_names"]],
                    "weight_names": {
                        str(n): [str(w) for w in mw[n].attrs["weight_names"]] for n in mw.attrs["layer_names"]
                    },
                }
                saved = {"model_config": json.loads(h.attrs["model_config"]), "layout": layout}
            (HERE / f"{name}.json").write_text(json.dumps(saved, separators=(",", ":")) + "\n")


if __name__ == "__main__":
    main()
