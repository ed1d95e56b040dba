import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import json
import logging
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from imgcls_jax.data.dataset_audit import AuditReport, MaskFlag, audit, two_value_fraction
from imgcls_jax.data.decode import IMAGE_EXTENSIONS
from tests import helpers


def noise(path: Path, seed: int, size=(40, 40), fmt: str | None = None) -> Path:
    """A photo-like stand-in: random RGB noise."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, fmt)
    return path


def binary_mask(path: Path, seed: int, size=(48, 48), fmt: str | None = None) -> Path:
    """A segmentation mask: a random filled ellipse and rectangle, 255 on 0, greyscale."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[:h, :w]
    cy, cx, ry, rx = rng.uniform(10, 30), rng.uniform(10, 30), rng.uniform(5, 15), rng.uniform(5, 15)
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    top, left = rng.integers(0, h // 2, 2)
    mask[top : top + 8, left : left + 12] = True
    Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), "L").save(path, fmt)
    return path


def photo_classes(root: Path, classes: dict[str, int], seed: int = 0) -> None:
    for i, (name, n) in enumerate(classes.items()):
        for j in range(n):
            noise(root / name / f"img{j}.png", seed=seed * 10_000 + i * 100 + j)


def warnings_about(report: AuditReport, text: str) -> list[str]:
    return [w for w in report.warnings if text in w]


def test_clean_folder_reports_counts_and_no_problems(tmp_path):
    photo_classes(tmp_path, {"cat": 4, "dog": 3})
    report = audit(tmp_path)
    assert report.class_names == ["cat", "dog"]
    assert not report.presplit
    assert report.counts == {"": {"cat": 4, "dog": 3}}
    assert report.imbalance == {"": pytest.approx(4 / 3, abs=1e-3)}
    assert report.ok and report.warnings == []
    assert not (report.unreadable or report.duplicates or report.tiny or report.mask_like)
    assert all(score < 0.5 for score in report.mask_scores.values())
    text = report.to_text()
    assert "No problems found." in text
    assert "cat" in text and "dog" in text


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_class_of_binary_masks_is_flagged(tmp_path, fmt):
    photo_classes(tmp_path, {"bass": 5, "trout": 5})
    # JPEG rings around mask edges: at 128x128 (masks are usually larger) >= 98% stay near 0/255.
    ext, size = (".png", (48, 48)) if fmt == "PNG" else (".jpg", (128, 128))
    for j in range(6):
        binary_mask(tmp_path / "zander" / f"m{j}{ext}", seed=j, size=size, fmt=fmt)
    report = audit(tmp_path)
    assert [(f.class_name, f.by) for f in report.mask_like] == [("zander", "pixels")]
    assert report.mask_scores["zander"] >= 0.95
    assert report.mask_scores["bass"] < 0.5 and report.mask_scores["trout"] < 0.5
    (warning,) = warnings_about(report, "segmentation masks")
    assert "'zander'" in warning and "zander/m" in warning  # names the class and sampled files


def test_mask_threshold_and_sample_size_are_respected(tmp_path):
    photo_classes(tmp_path, {"bass": 2})
    for j in range(5):
        binary_mask(tmp_path / "zander" / f"m{j}.png", seed=j)
    assert audit(tmp_path, mask_threshold=1.01).mask_like == []
    off = audit(tmp_path, sample_per_class=0)
    assert off.mask_like == [] and off.mask_scores == {}
    report = audit(tmp_path, sample_per_class=1, seed=3)
    assert report.mask_like[0].class_name == "zander"
    assert "in 1 sampled images" in report.mask_like[0].detail


def test_two_value_fraction():
    rng = np.random.default_rng(0)
    mask = np.where(rng.random((30, 30)) < 0.3, 255, 0).astype(np.uint8)
    assert two_value_fraction(np.repeat(mask[..., None], 3, axis=-1)) == 1.0
    two_colours = np.where(mask[..., None] > 0, [200, 30, 30], [0, 0, 90]).astype(np.uint8)
    assert two_value_fraction(two_colours) == 1.0
    assert two_value_fraction(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)) < 0.3


def test_mask_folder_named_after_a_class_is_flagged(tmp_path):
    names = ["fish", "fish GT", "Sea Bass", "Sea_Bass masks", "trout_gt", "label", "gtx"]
    photo_classes(tmp_path, dict.fromkeys(names, 2))
    report = audit(tmp_path)
    flagged = {f.class_name: f for f in report.mask_like}
    assert set(flagged) == {"fish GT", "Sea_Bass masks"}  # trout_gt has no "trout" beside it
    assert flagged["fish GT"] == MaskFlag("fish GT", "name", "named like the mask folder of class 'fish'")
    assert all(f.by == "name" for f in flagged.values())
    assert len(warnings_about(report, "'fish GT' looks like segmentation masks")) == 1
    assert "'Sea Bass'" in warnings_about(report, "'Sea_Bass masks'")[0]


def test_the_18_class_mistake_is_flagged_by_pixels_and_by_name(tmp_path):
    photo_classes(tmp_path, {"Red Mullet": 3, "Shrimp": 3})
    for name in ["Red Mullet GT", "Shrimp GT"]:
        for j in range(3):
            binary_mask(tmp_path / name / f"{j}.png", seed=j)
    report = audit(tmp_path)
    flags = Counter((f.class_name, f.by) for f in report.mask_like)
    assert flags == Counter({(n, by): 1 for n in ["Red Mullet GT", "Shrimp GT"] for by in ["pixels", "name"]})


def test_duplicates_within_and_across_splits(tmp_path):
    for split in ["train", "test"]:
        photo_classes(tmp_path / split, {"a": 3, "b": 3}, seed=1 if split == "train" else 2)
    # Same bytes within train (different names), and across train/test (leakage).
    shutil.copy(tmp_path / "train/a/img0.png", tmp_path / "train/a/copy.png")
    shutil.copy(tmp_path / "train/b/img1.png", tmp_path / "test/b/leaked.png")
    # Not duplicates: same size in bytes but different pixels (BMP size depends on shape only),
    # and the same pixels in another encoding.
    for name, seed in [("x.bmp", 7), ("y.bmp", 8)]:
        noise(tmp_path / "train/a" / name, seed=seed)
    assert (tmp_path / "train/a/x.bmp").stat().st_size == (tmp_path / "train/a/y.bmp").stat().st_size
    Image.open(tmp_path / "train/b/img2.png").save(tmp_path / "train/b/img2.bmp")

    report = audit(tmp_path)
    groups = {tuple(Path(p).relative_to(tmp_path).as_posix() for p in g.files): g for g in report.duplicates}
    assert set(groups) == {
        ("train/a/copy.png", "train/a/img0.png"),
        ("test/b/leaked.png", "train/b/img1.png"),
    }
    within = groups["train/a/copy.png", "train/a/img0.png"]
    across = groups["test/b/leaked.png", "train/b/img1.png"]
    assert not within.across_splits and within.splits == ["train", "train"] and within.classes == ["a", "a"]
    assert across.across_splits and across.splits == ["test", "train"] and across.classes == ["b", "b"]
    (leak,) = warnings_about(report, "leakage")
    assert "test/b/leaked.png [test]" in leak and "train/b/img1.png [train]" in leak
    (dup,) = warnings_about(report, "within a split")
    assert "train/a/copy.png" in dup and "train/a/img0.png" in dup and "leaked" not in dup


def test_duplicate_in_two_classes_is_called_a_label_conflict(tmp_path):
    photo_classes(tmp_path, {"a": 2, "b": 2})
    shutil.copy(tmp_path / "a/img0.png", tmp_path / "b/same.png")
    report = audit(tmp_path)
    (group,) = report.duplicates
    assert group.classes == ["a", "b"] and not group.across_splits
    (warning,) = warnings_about(report, "identical files")
    assert "a/img0.png == b/same.png" in warning and "conflicting labels" in warning


def test_tiny_images_are_listed(tmp_path):
    photo_classes(tmp_path, {"a": 2, "b": 2})
    for name, size in {
        "thin.png": (10, 50),
        "short.png": (50, 10),
        "31.png": (31, 31),
        "32.png": (32, 32),
    }.items():
        noise(tmp_path / "a" / name, seed=len(name), size=size)
    report = audit(tmp_path, tiny=32)
    tiny = {Path(t.path).name: (t.height, t.width) for t in report.tiny}
    assert tiny == {"thin.png": (10, 50), "short.png": (50, 10), "31.png": (31, 31)}
    (warning,) = warnings_about(report, "tiny image")
    assert "a/thin.png (10x50)" in warning and "a/short.png (50x10)" in warning
    assert "a/32.png" not in warning
    assert audit(tmp_path, tiny=8).tiny == []


def test_unreadable_files_are_listed_with_reasons(tmp_path, caplog):
    photo_classes(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "a/empty.jpg").write_bytes(b"")
    (tmp_path / "a/notes.jpg").write_text("this is not a JPEG\n")
    data = noise(tmp_path / "b/whole.jpg", seed=5, size=(64, 64), fmt="JPEG").read_bytes()
    (tmp_path / "b/whole.jpg").unlink()
    (tmp_path / "b/cut.jpg").write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="imgcls_jax.data.dataset_audit"):
        report = audit(tmp_path)
    reasons = {Path(u.path).name: u.reason for u in report.unreadable}
    assert set(reasons) == {"empty.jpg", "notes.jpg", "cut.jpg"}
    assert "empty" in reasons["empty.jpg"]
    assert "not a supported image" in reasons["notes.jpg"]
    assert "truncated" in reasons["cut.jpg"]
    assert report.counts == {"": {"a": 2, "b": 2}}  # counts are of readable images
    assert report.duplicates == []  # unreadable files are not compared
    (warning,) = warnings_about(report, "unreadable")
    for name in ["a/empty.jpg", "a/notes.jpg", "b/cut.jpg"]:
        assert name in warning
    assert any("3 unreadable file(s)" in r.getMessage() for r in caplog.records)


def test_imbalance_warning(tmp_path):
    photo_classes(tmp_path, {"many": 6, "few": 3, "mid": 4})
    report = audit(tmp_path)
    assert report.imbalance[""] == 2.0
    (warning,) = warnings_about(report, "imbalance")
    assert "'many' has 6" in warning and "'few' has 3" in warning and "1.5" in warning


def test_empty_class_and_class_missing_from_a_split(tmp_path):
    photo_classes(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    photo_classes(tmp_path / "val", {"a": 2, "b": 2, "c": 2}, seed=1)
    photo_classes(tmp_path / "test", {"a": 2, "b": 2}, seed=2)
    (tmp_path / "train/d").mkdir()
    report = audit(tmp_path)
    assert report.presplit and list(report.counts) == ["train", "val", "test"]
    assert report.counts["test"] == {"a": 2, "b": 2, "c": 0, "d": 0}
    assert warnings_about(report, "class 'c' is missing from split(s) ['test']")
    assert warnings_about(report, "empty class 'd'")
    assert not warnings_about(report, "class 'a'")
    assert "train" in report.to_text() and "test" in report.to_text()


def test_to_dict_round_trips_through_json_and_text_names_everything(tmp_path):
    photo_classes(tmp_path / "train", {"fish": 3, "fish GT": 1})
    photo_classes(tmp_path / "val", {"fish": 1}, seed=1)
    (tmp_path / "train/fish/zero.png").write_bytes(b"")
    noise(tmp_path / "train/fish/small.png", seed=9, size=(4, 4))
    shutil.copy(tmp_path / "train/fish/img0.png", tmp_path / "val/fish/img0.png")
    report = audit(tmp_path)
    d = report.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["counts"]["train"] == {"fish": 4, "fish GT": 1}
    assert d["unreadable"][0]["reason"].startswith("empty")
    assert d["duplicates"][0]["across_splits"] is True
    assert d["thresholds"]["imbalance"] == 1.5
    assert len(d["warnings"]) == len(report.warnings) >= 5
    text = report.to_text()
    for w in report.warnings:
        assert w in text


def test_missing_root_is_a_dataset_error(tmp_path):
    from imgcls_jax.data.folders import DatasetError

    with pytest.raises(DatasetError, match="no such folder"):
        audit(tmp_path / "nope")


def _count_by_walk(root: Path) -> Counter:
    counts = Counter()
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        counts[rel] += sum(os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS for f in files)
    return counts


def test_real_hymenoptera(tmp_path):
    root = helpers.hymenoptera(tmp_path)  # the shared photos, else a folder like it from the sample
    expected = {
        split: {c: _count_by_walk(root)[split, c] for c in ["ants", "bees"]} for split in ["train", "val"]
    }
    report = audit(root)
    assert report.class_names == ["ants", "bees"] and report.presplit
    assert report.counts == expected
    total = 398 if root.parent == helpers.SHARED_DATA else 81  # the sample-made folder: 80 + the GIF
    assert sum(sum(c.values()) for c in report.counts.values()) == total
    assert report.unreadable == []  # the stray imageNotFound.gif is a valid GIF
    assert report.mask_like == []


def test_real_flowers5():
    root = helpers.flowers()  # the shared photos, else the embedded sample of them
    report = audit(root)
    assert report.class_names == helpers.FLOWER_CLASSES
    assert report.mask_like == [] and report.unreadable == [] and report.tiny == []
    assert not warnings_about(report, "imbalance")  # 1052 / 733 = 1.44 (the sample: 40 each)
    if root == helpers.SAMPLE:
        assert report.counts == {"": dict.fromkeys(report.class_names, 40)} and report.duplicates == []
        return
    assert report.counts == {"": dict(zip(report.class_names, [764, 1052, 784, 733, 984]))}
    # The flower photos are known to hold a few identical files, some under both rose and tulip.
    assert any(set(g.classes) == {"rose", "tulip"} for g in report.duplicates)
