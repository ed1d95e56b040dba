"""A Keras user's round trip from the command line: import-keras -> predict (Keras's
probabilities) -> train --init-from (fine-tune the imported model, head included) -> export-keras
-> Keras loads it and predicts what imgcls_jax predicts."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import cli
from tests import keras_builders as kb

keras = pytest.importorskip("keras")
CLASSES = ["blue", "green", "red"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("kcli_data")
    rng = np.random.default_rng(4)
    for name, color in zip(CLASSES, ((30, 30, 200), (30, 200, 30), (200, 30, 30))):
        (root / name).mkdir()
        for i in range(8):
            pixels = np.clip(rng.normal(color, 50, (kb.SIZE, kb.SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def keras_file(tmp_path_factory, folder):
    """VGG16 base (nested) + GAP + Dense(8, relu) + Dropout + Dense(3, softmax), random weights;
    users feed it caffe-preprocessed pixels."""
    inputs = keras.Input((kb.SIZE, kb.SIZE, 3))
    base = kb.vgg_base()
    x = keras.layers.GlobalAveragePooling2D()(base(inputs))
    x = keras.layers.Dense(8, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    model = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(x))
    kb.randomize(model, 3)
    kb.spread_output(model, kb.caffe(images(folder)))
    path = tmp_path_factory.mktemp("kcli_model") / "flowers.keras"
    model.save(path)
    return path


def images(folder):
    files = sorted(folder.rglob("*.png"))
    return np.stack([np.asarray(Image.open(f)) for f in files])


def predicted(run, folder, capsys) -> dict[str, list]:
    """``imgcls-jax predict --json``: file -> probabilities in class order."""
    assert cli.main(["predict", str(run), str(folder), "--top-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    return {r["source"]: [dict(r["top_k"])[c] for c in CLASSES] for r in rows}


def test_import_predict_finetune_export_round_trip(keras_file, folder, tmp_path, capsys):
    files = sorted(str(p) for p in folder.rglob("*.png"))
    theirs = kb.keras_out(keras.saving.load_model(keras_file), kb.caffe(images(folder)))
    run = tmp_path / "imported"
    args = [str(keras_file), str(run), "--class-names", ",".join(CLASSES), "--data", str(folder)]
    assert cli.main(["import-keras", *args]) == 0
    assert "3 classes" in capsys.readouterr().out
    ours = predicted(run, folder, capsys)
    assert np.abs(np.array([ours[f] for f in files]) - theirs).max() <= 1e-5

    # fine-tune it (head and base) for one epoch at a tiny rate: the model starts from the import
    # (a fresh model would predict something else entirely) and the weights move
    tuned = tmp_path / "tuned"
    config = json.loads((run / "config.json").read_text())
    phase = {"epochs": 1, "trainable": "all", "optimizer": "sgd", "learning_rate": 1e-7}
    config.update(data=str(folder), splits={"train": 1.0}, batch_size=6, augment={}, phases=[phase])
    (tmp_path / "tune.json").write_text(json.dumps(config))
    train = [
        "train",
        "--config",
        str(tmp_path / "tune.json"),
        "--init-from",
        str(run),
        "--run-dir",
        str(tuned),
    ]
    assert cli.main(train) == 0
    assert "the whole model of" in capsys.readouterr().out
    after = predicted(tuned, folder, capsys)
    moved = np.abs(np.array([after[f] for f in files]) - theirs).max()
    assert 0 < moved < 0.02  # trained a little (measured 1.2e-3), starting from the imported weights

    out = tmp_path / "tuned.keras"
    # no --checkpoint: as evaluate and predict, the best one, else (no validation split) the latest
    assert cli.main(["export-keras", str(tuned), str(out)]) == 0
    assert "(latest checkpoint" in capsys.readouterr().out
    back = kb.keras_out(keras.saving.load_model(out), kb.caffe(images(folder)))
    latest = predicted_latest(tuned, folder)
    assert np.abs(back - np.array([latest[f] for f in files])).max() <= 1e-5


def predicted_latest(run, folder) -> dict[str, list]:
    from imgcls_jax import load_run, predict

    loaded = load_run(run, "latest")
    return {p.source: [dict(p.top_k)[c] for c in CLASSES] for p in predict(loaded, folder, top_k=3)}


def test_init_from_refuses_another_architecture_or_other_classes(keras_file, folder, tmp_path):
    from imgcls_jax import TrainConfig, fit

    base = dict(data=str(folder), run_dir=str(tmp_path / "r"), image_size=kb.SIZE, batch_size=6, augment={},
                init_from=str(keras_file), phases=[{"epochs": 1}])  # fmt: skip
    with pytest.raises(ValueError, match="not this config's"):
        fit(TrainConfig(**base, head_units=(16,)))  # the Keras head has 8 units
    with pytest.raises(ValueError, match="preprocessing is 'caffe', the config's 'tf'"):
        fit(TrainConfig(**base, head_units=(8,), preprocessing="tf"))
    with pytest.raises(ValueError, match="weights .* or init_from .*, not both"):
        TrainConfig(**base, weights="imagenet")
    run = tmp_path / "imported"
    assert cli.main(["import-keras", str(keras_file), str(run), "--class-names", ",".join(CLASSES)]) == 0
    with pytest.raises(ValueError, match=r"head_units \(8,\) there, \(16,\) here"):
        fit(TrainConfig(**{**base, "init_from": str(run)}, head_units=(16,)))
    other = tmp_path / "other"  # the same images under other class names
    for old, new in zip(CLASSES, ("cyan", "lime", "pink")):
        shutil.copytree(folder / old, other / new)
    with pytest.raises(ValueError, match="its classes"):
        fit(TrainConfig(**{**base, "init_from": str(run), "data": str(other)}, head_units=(8,)))
