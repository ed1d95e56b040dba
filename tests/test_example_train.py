"""examples/train.py, the README's main job, on its embedded sample (CI-sized settings)."""

import logging

import pytest

import imgcls_jax
from tests.helpers import ROOT, load_example


def test_embedded_sample_is_small_real_and_attributed():
    sample = ROOT / "examples" / "data" / "flowers_sample"
    files = [p for p in sample.rglob("*") if p.is_file()]
    photos = [p for p in files if p.suffix == ".jpg"]
    assert len(photos) == 200 and sorted({p.parent.name for p in photos}) == [
        "daisy", "dandelion", "rose", "sunflower", "tulip",
    ]  # fmt: skip
    assert sum(p.stat().st_size for p in files) < 2_000_000
    assert "CC-BY" in (sample / "LICENSE.md").read_text()


def test_auto_weights_offline_trains_from_scratch_and_says_so(caplog, monkeypatch, tmp_path):
    from imgcls_jax import TrainConfig
    from imgcls_jax.cli.commands import describe_start
    from imgcls_jax.weights import WeightsUnavailableError

    def unavailable(model, include_top):
        raise WeightsUnavailableError("no file and no network (test)")

    monkeypatch.setattr("imgcls_jax.weights.store.resolve_imagenet", unavailable)
    with caplog.at_level(logging.WARNING):
        config = TrainConfig.recipe(tmp_path, weights="auto")
    assert config.weights is None and [p.trainable for p in config.phases] == ["all"]
    assert "FROM SCRATCH" in describe_start(config, "auto")
    assert "FROM SCRATCH" in caplog.text and "no file and no network" in caplog.text
    with pytest.raises(WeightsUnavailableError, match="no file and no network"):
        TrainConfig.recipe(tmp_path, weights="imagenet")  # insisting is an error, never a fallback


def test_example_trains_evaluates_and_prints_the_report(tmp_path, capsys):
    example = load_example()
    args = ["--weights", "none", "--epochs", "1", "--image-size", "32", "--batch-size", "8"]
    assert example.main([*args, "--run-dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "Classification Report" in out and "trained from scratch" in out
    for name in ("report.txt", "confusion_matrix.png", "learning_curves.png"):
        assert (tmp_path / "run" / "eval_val" / name).is_file()


#: one model of each registered family (the others differ only in sizes)
FAMILIES = (
    "vgg19", "efficientnetb0", "resnet50", "mobilenetv2", "convnexttiny", "efficientnetv2b0",
    "mobilenetv3small", "resnet50v2", "densenet121", "xception", "inceptionv3", "inceptionresnetv2",
    "mobilenet", "nasnetmobile",
)  # fmt: skip


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=pytest.mark.slow)  # ~15-80 s each on 2 cores
     for n in FAMILIES if n in imgcls_jax.list_models()],
)  # fmt: skip
def test_example_trains_each_family(name, tmp_path, capsys):
    """``examples/train.py --model NAME`` for each family (from scratch at 32x32, or the family's
    smallest size, one epoch): it trains, evaluates and the run records the model."""
    from imgcls_jax import TrainConfig

    example = load_example()
    size = str(max(32, imgcls_jax.models.model_info(name).min_size))
    args = ["--model", name, "--weights", "none", "--epochs", "1", "--image-size", size, "--batch-size", "8"]
    assert example.main([*args, "--run-dir", str(tmp_path / "run")]) == 0
    assert "Classification Report" in capsys.readouterr().out
    assert TrainConfig.from_json(tmp_path / "run" / "config.json").model == name
