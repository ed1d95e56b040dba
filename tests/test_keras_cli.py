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


def fine_tune(config: dict, run, tuned) -> int:
    """``imgcls-jax train --config FILE --init-from RUN --run-dir TUNED`` (FILE: ``config`` beside
    TUNED); its exit status."""
    path = tuned.parent / f"{tuned.name}.json"
    path.write_text(json.dumps(config))
    return cli.main(["train", "--config", str(path), "--init-from", str(run), "--run-dir", str(tuned)])


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
    assert fine_tune(config, run, tuned) == 0
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


@pytest.mark.slow
def test_efficientnet_round_trip_a_user_makes(folder, tmp_path_factory, tmp_path, capsys):
    """The round trip a Keras user makes with an EfficientNetB0 transfer model (half its base
    frozen): import-keras (predicts Keras's probabilities), train --init-from with the run's own
    config for a few steps (the frozen layers stay frozen: trainable 'keras'), export-keras, and
    Keras's predictions equal imgcls_jax's on held-out images."""
    k_model, fed = kb.transfer("efficientnetb0", kb.SIZE, nested=True, preprocessing="none",
                               head=("gap", 16, "relu", 0.2))  # fmt: skip
    kb.randomize_all(k_model, seed=4, preprocess=fed, batch=images(folder)[::3])
    kb.spread_output(k_model, fed(images(folder)), std=0.25)
    base = k_model.get_layer("efficientnetb0")
    frozen = [layer.name for layer in base.layers[: len(base.layers) // 2] if layer.weights]
    for name in frozen:
        base.get_layer(name).trainable = False
    keras_file = tmp_path / "effnet.keras"
    k_model.save(keras_file)
    heldout = tmp_path_factory.mktemp("heldout")
    rng = np.random.default_rng(9)
    for name, color in zip(CLASSES, ((30, 30, 200), (30, 200, 30), (200, 30, 30))):
        (heldout / name).mkdir()
        for i in range(3):
            pixels = np.clip(rng.normal(color, 50, (kb.SIZE, kb.SIZE, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(heldout / name / f"{i}.png")
    files = sorted(str(p) for p in heldout.rglob("*.png"))
    run = tmp_path / "imported"
    assert cli.main(["import-keras", str(keras_file), str(run), "--class-names", ",".join(CLASSES)]) == 0
    out = capsys.readouterr().out
    assert (
        "efficientnetb0, 3 classes" in out and "preprocessing: the Keras model's users feed it 'none'" in out
    )
    theirs = kb.keras_out(k_model, fed(images(heldout)))
    ours = predicted(run, heldout, capsys)
    assert np.abs(np.array([ours[f] for f in files]) - theirs).max() <= 1e-5

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "efficientnetb0" and config["phases"][0]["trainable"] == "keras"
    config.update(data=str(folder), splits={"train": 0.75, "val": 0.25}, batch_size=6, augment={})
    config["phases"][0].update(epochs=1, optimizer="sgd", learning_rate=0.05, warmup_epochs=0)
    tuned = tmp_path / "tuned"
    assert fine_tune(config, run, tuned) == 0
    capsys.readouterr()
    from imgcls_jax import load_run

    before, after = load_run(run).model, load_run(tuned, "latest").model
    for name in (frozen[0], frozen[-1]):  # frozen in Keras: not trained here
        for a, b in zip(before.keras_variables(name), after.keras_variables(name), strict=True):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()))

    def changed(name):
        return not np.array_equal(
            before.keras_variables(name)[0].get_value(), after.keras_variables(name)[0].get_value()
        )

    assert all(changed(n) for n in ("top_conv", "head_fc1", "head_logits"))  # trainable in Keras: trained

    exported = tmp_path / "tuned.keras"
    assert cli.main(["export-keras", str(tuned), str(exported), "--checkpoint", "latest"]) == 0
    capsys.readouterr()
    back = kb.keras_out(keras.saving.load_model(exported), images(heldout).astype("float32"))
    latest = predicted_latest(tuned, heldout)
    assert np.abs(back - np.array([latest[f] for f in files])).max() <= 1e-5
    assert np.abs(back - theirs).max() > 1e-3  # it was trained
