"""The seafood layout the original experiment most likely used, on a small generated replica:
``Fish_Dataset/<species>/<species>/*.png`` photos beside ``<species>/<species> GT`` masks.
The audit flags the 9 mask folders; the ready config trains on the 9 species only."""

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.config import TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SPECIES = [
    "Black Sea Sprat", "Gilt-Head Bream", "Hourse Mackerel", "Red Mullet", "Red Sea Bream", "Sea Bass",
    "Shrimp", "Striped Red Mullet", "Trout",
]  # fmt: skip


@pytest.fixture(scope="module")
def fish(tmp_path_factory):
    root = tmp_path_factory.mktemp("fish") / "Fish_Dataset"
    rng = np.random.default_rng(0)
    for k, name in enumerate(SPECIES):
        photos, masks = root / name / name, root / name / f"{name} GT"
        photos.mkdir(parents=True)
        masks.mkdir()
        for i in range(4):
            colour = rng.uniform(0, 255, 3) * 0.5 + 20 * k
            pixels = np.clip(rng.normal(colour, 45, (36, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(photos / f"{i:05d}.png")
            mask = np.zeros((36, 48), np.uint8)
            mask[rng.integers(0, 12) : rng.integers(20, 36), rng.integers(0, 16) : rng.integers(28, 48)] = 255
            Image.fromarray(mask).save(masks / f"{i:05d}.png")
    return root


def test_audit_flags_the_nine_mask_folders(fish):
    from imgcls_jax.data import audit

    report = audit(fish)
    by_pixels = sorted(f.class_name for f in report.mask_like if f.by == "pixels")
    assert by_pixels == sorted(f"{s}/{s} GT" for s in SPECIES)
    assert all(report.mask_scores[f"{s}/{s}"] < 0.5 for s in SPECIES)  # the photos are not flagged
    assert sum("looks like segmentation masks" in w for w in report.warnings) >= 9


def test_exclude_leaves_the_masks_out(fish):
    from imgcls_jax.data import scan_folder

    found = scan_folder(fish, exclude=["* GT"])
    assert found.class_names == SPECIES
    assert len(found.records) == 9 * 4
    assert not any(" GT" in r.path for r in found.records)
    everything = scan_folder(fish)
    assert len(everything.records) == 9 * 8  # without exclude, masks would be mixed into each class


def test_fish_config_trains_on_the_nine_species(fish, tmp_path):
    from imgcls_jax.config import PhaseConfig
    from imgcls_jax.train.loop import fit

    cfg = TrainConfig.from_json(ROOT / "examples" / "configs" / "fish_dataset.json")
    assert cfg.exclude == ("* GT",) and cfg.weights == "imagenet"
    # The ready config with CI-sized settings (no ImageNet weights here: a random base on purpose,
    # tiny images, 1 epoch).
    cfg = replace(
        cfg, data=str(fish), run_dir=str(tmp_path), weights="random", image_size=32, batch_size=8,
        splits={"train": 0.75, "test": 0.25}, head_units=(8,),
        phases=[PhaseConfig(epochs=1, trainable="head")],
    )  # fmt: skip
    result = fit(cfg)
    assert result.class_names == SPECIES
    manifest = (tmp_path / "manifest.csv").read_text()
    assert manifest.count("\n") == 1 + 9 * 4 and " GT" not in manifest
