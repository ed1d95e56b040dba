"""Plots: valid PNG files for ordinary and edge-case inputs; clear errors for bad ones."""

import csv

import numpy as np
import pytest

from imgcls_jax.evaluate import plot_confusion_matrix, plot_learning_curves

Image = pytest.importorskip("PIL.Image", reason="Pillow reads the PNGs back (test extra)")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def assert_png(path, min_side=200):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) >= min_side
        pixels = np.asarray(image.convert("L"))
    assert pixels.std() > 5  # something was drawn, not a blank canvas
    return pixels.shape


@pytest.mark.parametrize("normalize", [False, True])
def test_confusion_matrix_png_grows_with_classes(tmp_path, normalize):
    rng = np.random.default_rng(0)
    small = plot_confusion_matrix(rng.integers(0, 50, (3, 3)), ["a", "b", "c"], tmp_path / "s.png", normalize)
    names = [f"class_{i:02d}_long_name" for i in range(20)]
    big = plot_confusion_matrix(rng.integers(0, 300, (20, 20)), names, tmp_path / "deep/b.png", normalize)
    assert big == tmp_path / "deep" / "b.png"
    h_small, w_small = assert_png(small)
    h_big, w_big = assert_png(big)
    assert h_big > 2 * h_small and w_big > 2 * w_small  # cells keep a readable size


def test_confusion_matrix_edge_cases(tmp_path):
    assert_png(plot_confusion_matrix(np.array([[7]]), ["only"], tmp_path / "one.png"), min_side=100)
    zero_row = np.array([[0, 0], [3, 4]])  # a class without images: normalised row stays 0
    assert_png(plot_confusion_matrix(zero_row, ["none", "some"], tmp_path / "z.png", normalize=True))


def test_confusion_matrix_bad_input(tmp_path):
    with pytest.raises(ValueError, match="2 class names for a 3x3"):
        plot_confusion_matrix(np.eye(3, dtype=int), ["a", "b"], tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"ending in \.png.*x\.jpg"):
        plot_confusion_matrix(np.eye(2, dtype=int), ["a", "b"], tmp_path / "x.jpg")
    assert not list(tmp_path.iterdir())


def history_rows(tmp_path, with_val=True):
    """Rows as csv.DictReader gives them back from a metrics.csv: strings, "" for no value."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    fields = ["epoch", "phase", "step", "train_loss", "train_accuracy", "val_loss", "val_accuracy",
              "learning_rate", "images_per_s"]  # fmt: skip
    path = tmp_path / "metrics.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        for epoch in range(6):
            writer.writerow({
                "epoch": epoch, "phase": 0 if epoch < 3 else 1, "step": 10 * (epoch + 1),
                "train_loss": 2.0 / (epoch + 1), "train_accuracy": 0.3 + 0.1 * epoch,
                "val_loss": 2.2 / (epoch + 1) if with_val else "",
                "val_accuracy": 0.25 + 0.1 * epoch if with_val else "",
                "learning_rate": 1e-3 if epoch < 3 else 1e-4, "images_per_s": 100.0,
            })  # fmt: skip
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_learning_curves_from_csv_rows(tmp_path):
    """Rows as metrics.csv gives them back (strings, "" where there was no validation); the
    validation curves, when there are some, are drawn (the picture changes)."""
    with_val, without = history_rows(tmp_path / "a", True), history_rows(tmp_path / "b", False)
    assert isinstance(with_val[0]["train_loss"], str) and float(with_val[0]["val_loss"]) == pytest.approx(2.2)
    assert without[0]["val_loss"] == "" and without[0]["train_loss"] == with_val[0]["train_loss"]
    shapes = [assert_png(plot_learning_curves(rows, tmp_path / f"{name}.png"))
              for rows, name in ((with_val, "val"), (without, "train"))]  # fmt: skip
    assert shapes[0] == shapes[1]
    drawn = [
        np.asarray(Image.open(tmp_path / f"{name}.png").convert("RGB")).astype(int)
        for name in ("val", "train")
    ]
    assert np.abs(drawn[0] - drawn[1]).sum(axis=-1).astype(bool).mean() > 0.002  # the val curves


def test_learning_curves_floats_single_epoch_no_lr(tmp_path):
    rows = [{"epoch": 0.0, "train_loss": 1.5, "train_accuracy": 0.4, "val_loss": "", "val_accuracy": ""}]
    assert_png(plot_learning_curves(rows, tmp_path / "one.png"))


def test_learning_curves_bad_input(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        plot_learning_curves([], tmp_path / "e.png")
    with pytest.raises(ValueError, match=r"history row 1 has no \['train_accuracy'\]"):
        plot_learning_curves(
            [{"epoch": 0, "train_loss": 1, "train_accuracy": 0.5}, {"epoch": 1, "train_loss": 1}],
            tmp_path / "m.png",
        )
    with pytest.raises(ValueError, match="history row 0: train_loss='nan-ish' is not a number"):
        plot_learning_curves(
            [{"epoch": 0, "train_loss": "nan-ish", "train_accuracy": 0.5}], tmp_path / "n.png"
        )
