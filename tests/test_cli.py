"""The imgcls-jax CLI end to end on tiny data: train -> evaluate -> predict; audit; port-weights."""

import json

import numpy as np
import pytest
from PIL import Image

from imgcls_jax import cli
from imgcls_jax.config import PhaseConfig, TrainConfig


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_cli")
    rng = np.random.default_rng(1)
    for name, color in (("blue", (30, 30, 200)), ("green", (30, 200, 30)), ("red", (200, 30, 30))):
        (root / name).mkdir()
        for i in range(10):
            pixels = np.clip(rng.normal(color, 40, (36, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def trained_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli_run")
    cfg = TrainConfig(
        data=str(tiny_data), run_dir=str(out / "run"), splits={"train": 0.6, "val": 0.2, "test": 0.2},
        weights="random", image_size=32, batch_size=6, head_units=(8,), seed=0,
        augment={"flip": "horizontal"},
        phases=[PhaseConfig(epochs=2, trainable="head", learning_rate=1e-2)],
    )  # fmt: skip
    cfg.to_json(out / "config.json")
    assert cli.main(["train", "--config", str(out / "config.json")]) == 0
    return out / "run"


def test_train_recipe_from_scratch_trains_every_layer_and_reports(tiny_data, tmp_path, capsys):
    """`imgcls-jax train --data DIR --weights none`: the recipe's from-scratch phase trains every
    layer (all parameters move from their seeded start) and the report is printed."""
    import jax
    from flax import nnx

    from imgcls_jax import load_run
    from imgcls_jax.models import model_from_config

    run = tmp_path / "scratch"
    args = ["--data", str(tiny_data), "--run-dir", str(run), "--weights", "none", "--image-size", "32"]
    assert cli.main(["train", *args, "--epochs", "1", "--batch-size", "8", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert "Classification Report" in out and "trained from scratch" in out
    config = TrainConfig.from_json(run / "config.json")
    assert [(p.trainable, p.epochs, p.learning_rate) for p in config.phases] == [("all", 1, 1e-3)]
    assert config.weights is None and config.augment.translation == 0.1
    start = model_from_config(config, 3, weights=None)
    trained = load_run(run, "latest").model
    pairs = zip(*(jax.tree.leaves(nnx.state(m, nnx.Param)) for m in (start, trained)))
    assert all(not np.array_equal(a, b) for a, b in pairs)  # every layer trained
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    helptext = capsys.readouterr().out
    assert all(flag in helptext for flag in ("--epochs", "--lr", "--weights", "--image-size", "--data"))


def test_train_flags_that_do_not_apply_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err.startswith("imgcls-jax: error: no data: pass --data DIR")
    config = tmp_path / "c.json"
    TrainConfig(data="x", weights="random").to_json(config)
    assert cli.main(["train", "--config", str(config), "--epochs", "3"]) == 2
    assert "--epochs and --lr shape the recipe's phases" in capsys.readouterr().err


def test_evaluate_and_predict_use_the_documented_defaults(trained_run, monkeypatch, capsys):
    """``--split`` (test, else val) and ``--checkpoint`` (best) as their help says
    (tests/test_cli_help.py walks the help), the same defaults as ``evaluate_run``'s."""
    import imgcls_jax.evaluate

    used = {}
    real_evaluate, real_load = imgcls_jax.evaluate.evaluate_run, imgcls_jax.evaluate.load_run

    def evaluate(run_dir, split=None, which=None):
        used["evaluate"] = (split, which)
        return real_evaluate(run_dir, split=split, which=which)

    def load(run_dir, which=None):
        used["predict"] = which
        return real_load(run_dir, which)

    monkeypatch.setattr(imgcls_jax.evaluate, "evaluate_run", evaluate)
    monkeypatch.setattr(imgcls_jax.evaluate, "load_run", load)
    assert cli.main(["evaluate", str(trained_run)]) == 0
    assert (
        cli.main(["predict", str(trained_run), str(trained_run / "eval_test" / "confusion_matrix.png")]) == 0
    )
    assert used == {"evaluate": ("test", "best"), "predict": "best"}
    capsys.readouterr()


def test_train_writes_report_consistent_with_the_confusion_matrix(trained_run, capsys):
    assert (trained_run / "config.json").is_file() and (trained_run / "metrics.csv").is_file()
    out = trained_run / "eval_test"  # a test split exists, so train evaluates it
    for name in ("report.txt", "metrics.json", "confusion_matrix.png", "learning_curves.png"):
        assert (out / name).is_file(), name
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = json.loads((out / "metrics.json").read_text())
    cm = np.asarray(metrics["confusion_matrix"])
    assert cm.sum() == metrics["count"] == 6  # 20% of 30 images, each counted once
    assert metrics["top1"] == pytest.approx(np.trace(cm) / cm.sum())
    assert "Classification Report" in (out / "report.txt").read_text()


def test_evaluate_command_on_another_split(trained_run, capsys):
    assert cli.main(["evaluate", str(trained_run), "--split", "val", "--checkpoint", "latest"]) == 0
    assert "Confusion Matrix" in capsys.readouterr().out
    metrics = json.loads((trained_run / "eval_val" / "metrics.json").read_text())
    assert metrics["count"] == 6 and metrics["checkpoint"] == "latest" and metrics["epoch"] == 1


def test_predict_files_folders_and_arrays_agree(trained_run, tiny_data, capsys):
    from imgcls_jax import load_run, predict

    assert cli.main(["predict", str(trained_run), str(tiny_data / "red"), "--top-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 10 and all(len(p["top_k"]) == 2 for p in printed)
    for p in printed:
        probs = [prob for _, prob in p["top_k"]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    loaded = load_run(trained_run, "best")
    files = sorted(str(p) for p in (tiny_data / "red").iterdir())
    from_files = predict(loaded, files, top_k=3, batch_size=4)
    pixels = np.stack([np.asarray(Image.open(f)) for f in files])
    from_arrays = predict(loaded, pixels, top_k=3, batch_size=4)
    assert [p.source for p in from_files] == files
    for a, b in zip(from_files, from_arrays):
        assert [n for n, _ in a.top_k] == [n for n, _ in b.top_k]
        np.testing.assert_allclose([v for _, v in a.top_k], [v for _, v in b.top_k], rtol=1e-5, atol=1e-6)
    assert {n for n, _ in from_files[0].top_k} <= {"blue", "green", "red"}


def test_predict_bad_inputs_are_clear_errors(trained_run, tmp_path):
    from imgcls_jax import load_run, predict

    loaded = load_run(trained_run, "latest")
    with pytest.raises(FileNotFoundError, match="no such file"):
        predict(loaded, tmp_path / "missing.jpg")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        predict(loaded, tmp_path / "empty")
    (tmp_path / "bad.jpg").write_text("not an image")
    with pytest.raises(ValueError, match="bad.jpg"):
        predict(loaded, tmp_path / "bad.jpg")
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        predict(loaded, np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(tmp_path)
    with pytest.raises(ValueError, match="which"):
        load_run(trained_run, "newest")


def test_audit_command(tiny_data, tmp_path, capsys):
    assert cli.main(["audit", str(tiny_data), "--json", str(tmp_path / "a.json")]) == 0
    assert "red" in capsys.readouterr().out
    report = json.loads((tmp_path / "a.json").read_text())
    assert report["class_names"] == ["blue", "green", "red"] and report["presplit"] is False
    assert report["counts"] == {"": {"blue": 10, "green": 10, "red": 10}}  # the fixture's files
    assert report["imbalance"] == {"": 1.0} and report["unreadable"] == [] and report["warnings"] == []
    messy = tmp_path / "messy"
    for name in ("a", "b"):
        (messy / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((40, 40, 3), 40 * i + (name == "b") * 5, np.uint8)).save(
                messy / name / f"{i}.png"
            )
    (messy / "a" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert cli.main(["audit", str(messy)]) == 0
    assert "broken.jpg" in capsys.readouterr().out
    assert cli.main(["audit", str(messy), "--strict"]) == 1


def test_port_weights_round_trip(tmp_path, capsys):
    from flax import nnx

    from imgcls_jax import create_model
    from imgcls_jax.weights import WeightFileError
    from tests.helpers import write_random_legacy

    h5 = tmp_path / "vgg16_notop.h5"
    write_random_legacy(h5, "vgg16", include_top=False, seed=5)
    assert cli.main(["port-weights", str(h5), str(tmp_path / "ported")]) == 0
    assert "ported" in capsys.readouterr().out
    kw = dict(num_classes=3, head_units=(4,), input_shape=(32, 32, 3))
    direct = create_model("vgg16", weights=str(h5), **kw)
    ported = create_model("vgg16", weights=str(tmp_path / "ported"), **kw)
    for name in direct.base_layers:
        a, b = nnx.state(getattr(direct, name)), nnx.state(getattr(ported, name))
        for x, y in zip(nnx.to_flat_state(a), nnx.to_flat_state(b)):
            np.testing.assert_array_equal(np.asarray(x[1].get_value()), np.asarray(y[1].get_value()))
    with pytest.raises(WeightFileError, match="vgg16"):
        create_model("vgg19", weights=str(tmp_path / "ported"), **kw)
    assert cli.main(["port-weights", str(h5), str(tmp_path / "ported")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_restart_moves_the_earlier_run_aside_and_resume_false_refuses_a_used_folder(trained_run, tmp_path):
    """``fit(resume=False)`` into a folder with checkpoints is a ``FileExistsError`` before any
    training (the earlier run is neither mixed in nor deleted); ``train --restart`` renames the
    folder to ``RUN_DIR.replaced-<time>`` and trains from scratch."""
    import dataclasses
    import shutil

    from imgcls_jax.train import fit

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = dataclasses.replace(TrainConfig.from_json(run / "config.json"), run_dir=str(run))
    before = (run / "metrics.csv").read_text()
    with pytest.raises(FileExistsError, match=r"holds checkpoints of an earlier run \(checkpoints, best/\)"):
        fit(config, resume=False)
    assert (run / "metrics.csv").read_text() == before  # nothing written

    config.to_json(tmp_path / "config.json")
    assert cli.main(["train", "--config", str(tmp_path / "config.json"), "--restart", "--no-eval"]) == 0
    (moved,) = tmp_path.glob("run.replaced-*")
    assert (moved / "metrics.csv").read_text() == before and (moved / "best").is_dir()
    rows = (run / "metrics.csv").read_text().splitlines()
    assert len(rows) == 1 + config.phases[0].epochs  # a fresh run: its own epochs only


def test_tensorflow_start_up_notices_stay_out_of_the_terminal_unless_verbose(trained_run, tiny_data):
    """`imgcls-jax predict` prints its answer, not TensorFlow's C++ start-up lines (oneDNN, CPU
    features), which it writes before its logging is set up; `-v` shows them (as debug log)."""
    import subprocess
    import sys

    image = str(sorted((tiny_data / "red").iterdir())[0])
    command = [sys.executable, "-m", "imgcls_jax.cli", "predict", str(trained_run), image, "--top-k", "1"]
    # TensorFlow's log level as a user has it (tests/conftest.py raises it); its oneDNN operations
    # asked for by name: by default TensorFlow turns them on (and prints its notice) only on some
    # CPUs (on an AVX2-only AMD EPYC it prints only the CPU-features line), so the notice is there
    # to hide on every machine.
    env = {k: v for k, v in __import__("os").environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["TF_ENABLE_ONEDNN_OPTS"] = "1"
    quiet = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.startswith(image) and "oneDNN" not in quiet.stdout + quiet.stderr
    assert "This TensorFlow binary" not in quiet.stdout + quiet.stderr
    assert "absl::InitializeLog" not in quiet.stderr
    loud = subprocess.run([*command, "-v"], capture_output=True, text=True, timeout=600, env=env)
    assert loud.returncode == 0 and "oneDNN custom operations" in loud.stderr
