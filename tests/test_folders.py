import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import logging
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from imgcls_jax.data.decode import check_image, load_image, sniff_format
from imgcls_jax.data.folders import (
    DatasetError,
    Record,
    read_manifest,
    scan_folder,
    split_records,
    write_manifest,
)
from tests import helpers

LOGGER = "imgcls_jax.data.folders"


def save(path: Path, seed: int = 0, size=(12, 16), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path, fmt)
    return path


def make_classes(root: Path, classes: dict[str, int], ext: str = ".png") -> Path:
    for i, (name, n) in enumerate(classes.items()):
        (root / name).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            save(root / name / f"{j}{ext}", seed=100 * i + j)
    return root


def folder_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


# --- discovery -------------------------------------------------------------------------------


def test_class_order_matches_keras(tmp_path):
    keras = pytest.importorskip("keras")
    names = ["b", "A", "a_2", "10", "9", "Zeta", "çà", "a"]
    make_classes(tmp_path, dict.fromkeys(names, 2), ext=".jpg")
    found = scan_folder(tmp_path)
    ds = keras.utils.image_dataset_from_directory(
        tmp_path, labels="inferred", image_size=(8, 8), batch_size=4, shuffle=False, verbose=False
    )
    assert found.class_names == ds.class_names == sorted(names)
    keras_labels = np.concatenate([labels.numpy() for _, labels in ds])
    assert {r.path: r.label for r in found.records} == dict(zip(ds.file_paths, keras_labels.tolist()))


def test_flat_layout(tmp_path):
    make_classes(tmp_path, {"cat": 3, "dog": 2})
    save(tmp_path / "cat" / "nested" / "deep.jpg", fmt="JPEG")  # subfolders belong to their class
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    found = scan_folder(tmp_path)
    assert not found.presplit and found.class_names == ["cat", "dog"]
    assert found.counts() == {"": Counter({"cat": 4, "dog": 2})}
    assert {r.split for r in found.records} == {""} and found.skipped == []


def test_presplit_layout_reads_validation_as_val(tmp_path):
    make_classes(tmp_path / "train", {"a": 3, "b": 2})
    make_classes(tmp_path / "validation", {"a": 1, "b": 1})
    make_classes(tmp_path / "test", {"a": 2, "b": 1})
    found = scan_folder(tmp_path)
    assert found.presplit and found.class_names == ["a", "b"]
    assert found.counts() == {
        "train": Counter({"a": 3, "b": 2}),
        "val": Counter({"a": 1, "b": 1}),
        "test": Counter({"a": 2, "b": 1}),
    }
    assert all(
        f"/validation/{found.class_names[r.label]}/" in r.path for r in found.records if r.split == "val"
    )


def test_class_names_argument_fixes_order_and_adds_missing(tmp_path):
    make_classes(tmp_path, {"a": 1, "b": 1, "c": 1})
    found = scan_folder(tmp_path, class_names=["c", "a", "z"])
    assert found.class_names == ["c", "a", "z"]
    assert sorted((Path(r.path).parent.name, r.label) for r in found.records) == [("a", 1), ("c", 0)]


# --- bad input: a counted skip in one warning, or a clear DatasetError ----------------------


def _truncated(fmt: str):
    def write(path: Path):
        data = save(path, size=(64, 64), fmt=fmt).read_bytes()
        path.write_bytes(data[: len(data) // 2])

    return write


BAD_FILES = {
    "corrupt_jpeg": ("bad.jpg", lambda p: p.write_bytes(b"\xff\xd8\xff" + bytes(range(256)) * 4), "JPEG"),
    "truncated_jpeg": ("bad.jpg", _truncated("JPEG"), "truncated JPEG"),
    "truncated_png": ("bad.png", _truncated("PNG"), "truncated PNG"),
    "zero_bytes": ("bad.jpg", lambda p: p.write_bytes(b""), "empty file"),
    "text_as_jpg": ("bad.jpg", lambda p: p.write_text("hello, I am text\n"), "not a supported image"),
    "text_as_bmp": ("bad.bmp", lambda p: p.write_text("BM but still text\n"), "BMP"),
    "tiff_as_png": ("bad.png", lambda p: save(p, fmt="TIFF"), "not a supported image"),
    "webp_as_png": ("bad.png", lambda p: save(p, fmt="WEBP"), "not a supported image"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_file_is_skipped_and_listed_in_one_warning(tmp_path, caplog, case):
    name, write, reason = BAD_FILES[case]
    make_classes(tmp_path, {"a": 2, "b": 2})
    bad = tmp_path / "a" / name
    write(bad)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = scan_folder(tmp_path)
    assert [p for p, _ in found.skipped] == [str(bad)]
    assert reason in found.skipped[0][1]
    assert str(bad) not in {r.path for r in found.records}
    assert found.counts() == {"": Counter({"a": 2, "b": 2})}
    (warning,) = folder_warnings(caplog)
    assert "skipped 1 unreadable file(s)" in warning and str(bad) in warning
    with pytest.raises(ValueError, match=reason):
        load_image(str(bad))


def test_all_bad_files_are_counted_in_one_warning(tmp_path, caplog):
    make_classes(tmp_path, {"a": 1, "b": 1})
    for i, (name, write, _) in enumerate(BAD_FILES.values()):
        write(tmp_path / ("a" if i % 2 else "b") / f"{i}_{name}")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = scan_folder(tmp_path)
    assert len(found.skipped) == len(BAD_FILES) and len(found.records) == 2
    (warning,) = folder_warnings(caplog)
    assert f"skipped {len(BAD_FILES)} unreadable file(s)" in warning
    assert all(path in warning for path, _ in found.skipped)


def test_verify_false_keeps_bad_files(tmp_path):
    make_classes(tmp_path, {"a": 1, "b": 1})
    (tmp_path / "a" / "empty.jpg").write_bytes(b"")
    found = scan_folder(tmp_path, verify=False)
    assert len(found.records) == 3 and found.skipped == []


def test_unicode_and_quotes_in_names(tmp_path):
    weird = tmp_path / "çà" / 'été\'s "best".jpg'
    save(weird, fmt="JPEG")
    make_classes(tmp_path, {"plain": 1})
    found = scan_folder(tmp_path)
    assert found.class_names == ["plain", "çà"] and found.skipped == []
    assert Record(str(weird), 1, "") in found.records
    assert load_image(str(weird)).shape == (12, 16, 3)
    manifest = write_manifest(tmp_path / "m.csv", found.records, found.class_names, root=tmp_path)
    assert read_manifest(manifest, root=str(tmp_path)) == (found.records, found.class_names)


def test_empty_class_folder_is_kept_with_a_warning(tmp_path, caplog):
    make_classes(tmp_path, {"a": 2, "b": 2})
    (tmp_path / "c").mkdir()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = scan_folder(tmp_path)
    assert found.class_names == ["a", "b", "c"]
    assert found.counts()[""]["c"] == 0
    (warning,) = folder_warnings(caplog)
    assert "no images" in warning and "'c'" in warning


def test_one_class_only_is_an_error(tmp_path):
    make_classes(tmp_path, {"only": 3})
    with pytest.raises(DatasetError, match="only one class.*'only'"):
        scan_folder(tmp_path)


def test_images_directly_in_root_is_an_error_with_a_hint(tmp_path):
    for i in range(3):
        save(tmp_path / f"{i}.png", seed=i)
    with pytest.raises(DatasetError, match=r"no class folders.*3 images lie directly in it.*root/<class>"):
        scan_folder(tmp_path)


def test_empty_root_and_missing_root_are_errors(tmp_path):
    with pytest.raises(DatasetError, match="no class folders"):
        scan_folder(tmp_path)
    with pytest.raises(DatasetError, match="no such folder"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="no such folder"):
        scan_folder(tmp_path / "file.txt")


def test_classes_without_any_image_file_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match="no readable images"):
        scan_folder(tmp_path)


def test_only_unreadable_files_is_an_error(tmp_path):
    for name in ["a", "b"]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "x.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="no readable images"):
        scan_folder(tmp_path)


def test_class_missing_from_a_split_is_named_in_a_warning(tmp_path, caplog):
    make_classes(tmp_path / "train", {"a": 2, "b": 2})
    make_classes(tmp_path / "test", {"a": 2})
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = scan_folder(tmp_path)
    assert found.class_names == ["a", "b"]
    (warning,) = folder_warnings(caplog)
    assert "split 'test'" in warning and "'b'" in warning


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symlinks on this platform")
@pytest.mark.parametrize("target", [".", ".."], ids=["to_itself", "to_its_parent"])
def test_symlink_loop_terminates_and_warns(tmp_path, caplog, target):
    make_classes(tmp_path, {"a": 2, "b": 3})
    os.symlink(target, tmp_path / "a" / "loop")
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        found = scan_folder(tmp_path)
    # Following a link to the root would list b's images as class a: they are not.
    assert found.counts() == {"": Counter({"a": 2, "b": 3})}
    assert all(Path(r.path).parent.name == found.class_names[r.label] for r in found.records)
    (warning,) = folder_warnings(caplog)
    assert "symlink loop" in warning and str(tmp_path / "a" / "loop") in warning


def test_symlinked_class_folder_is_followed(tmp_path):
    make_classes(tmp_path / "elsewhere", {"real": 2})
    make_classes(tmp_path / "root", {"a": 1})
    os.symlink(tmp_path / "elsewhere" / "real", tmp_path / "root" / "b")
    found = scan_folder(tmp_path / "root")
    assert found.counts() == {"": Counter({"a": 1, "b": 2})}


# --- decoding ---------------------------------------------------------------------------------


def test_real_stray_gif_in_hymenoptera_decodes(tmp_path):
    root = helpers.hymenoptera(tmp_path)  # the shared photos, else a folder like it from the sample
    gif = root / "train" / "ants" / "imageNotFound.gif"
    check = check_image(str(gif))
    assert check.reason is None and check.format == "gif"
    image = load_image(str(gif))
    assert image.dtype == np.uint8 and image.shape == (check.height, check.width, 3)
    found = scan_folder(root)
    assert found.skipped == [] and str(gif) in {r.path for r in found.records}
    assert str(root / "train" / "ants" / "formica.jpeg") in {r.path for r in found.records}


RGB = np.random.default_rng(1).integers(0, 256, (10, 14, 3), dtype=np.uint8)
GREY = RGB[..., 0]
FORMATS = {  # name: (PIL image, PIL format, extension, expected uint8[H, W, 3], max abs difference)
    "jpeg": (Image.fromarray(RGB), "JPEG", ".jpg", None, 4),  # None: compare with PIL's decoding
    "png8": (Image.fromarray(RGB), "PNG", ".png", RGB, 0),
    "bmp": (Image.fromarray(RGB), "BMP", ".bmp", RGB, 0),
    "bmp_grey": (Image.fromarray(GREY), "BMP", ".bmp", np.dstack([GREY] * 3), 0),
    "gif": (
        Image.fromarray(RGB).quantize(64),
        "GIF",
        ".gif",
        np.asarray(Image.fromarray(RGB).quantize(64).convert("RGB")),
        0,
    ),
    "grey": (Image.fromarray(GREY), "PNG", ".png", np.dstack([GREY] * 3), 0),
    "grey_alpha": (Image.fromarray(GREY).convert("LA"), "PNG", ".png", np.dstack([GREY] * 3), 0),
    "rgba": (Image.fromarray(np.dstack([RGB, GREY])), "PNG", ".png", RGB, 0),
    "palette_png": (
        Image.fromarray(RGB).quantize(16),
        "PNG",
        ".png",
        np.asarray(Image.fromarray(RGB).quantize(16).convert("RGB")),
        0,
    ),
}


@pytest.mark.parametrize("name", list(FORMATS))
def test_formats_decode_to_uint8_rgb(tmp_path, name):
    image, fmt, ext, expected, tolerance = FORMATS[name]
    path = tmp_path / f"img{ext}"
    image.save(path, fmt)
    out = load_image(str(path))
    assert out.dtype == np.uint8 and out.shape == (10, 14, 3)
    if expected is None:
        expected = np.asarray(Image.open(path).convert("RGB"))
    assert np.abs(out.astype(int) - expected).max() <= tolerance


def test_16bit_png_is_scaled_to_8_bits(tmp_path):
    values = np.linspace(0, 65535, 10 * 14).reshape(10, 14).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert path.read_bytes()[24] == 16  # IHDR bit depth: really a 16-bit PNG
    assert check_image(str(path)).reason is None
    out = load_image(str(path))
    assert out.dtype == np.uint8 and out.shape == (10, 14, 3)
    assert np.abs(out[..., 0].astype(float) - values / 257).max() <= 1.0
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_sniff_format():
    assert sniff_format(b"\xff\xd8\xff\xe0") == "jpeg"
    assert sniff_format(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_format(b"GIF89a") == "gif" and sniff_format(b"GIF87a") == "gif"
    assert sniff_format(b"BM\x00\x00") == "bmp"
    assert sniff_format(b"II*\x00") is None and sniff_format(b"") is None


# --- splits -----------------------------------------------------------------------------------


def records_for(sizes: list[int]) -> list[Record]:
    return [Record(f"/data/c{label}/{i:03d}.jpg", label) for label, n in enumerate(sizes) for i in range(n)]


def check_split(records: list[Record], out: list[Record], fractions: dict[str, float]) -> None:
    assert sorted(r.path for r in out) == sorted(r.path for r in records)  # each exactly once
    assert {r.split for r in out} <= set(fractions)
    assert {(r.path, r.label) for r in out} == {(r.path, r.label) for r in records}
    per_class = Counter(r.label for r in records)
    got = Counter((r.label, r.split) for r in out)
    for label, n in per_class.items():
        for split, fraction in fractions.items():
            assert abs(got[label, split] - n * fraction) < 1, (label, split, got[label, split], n * fraction)


def test_split_is_stratified_and_complete():
    records = records_for([100, 37, 8, 1])
    fractions = {"train": 0.7, "val": 0.15, "test": 0.15}
    out = split_records(records, fractions, seed=0)
    check_split(records, out, fractions)
    assert Counter((r.label, r.split) for r in out)[0, "train"] == 70


def test_split_is_deterministic_and_seeded():
    records = records_for([40, 30])
    fractions = {"train": 0.5, "test": 0.5}
    first = split_records(records, fractions, seed=3)
    assert split_records(list(reversed(records)), fractions, seed=3) == first  # input order is irrelevant
    assert split_records(records, fractions, seed=4) != first
    assert [r.split for r in records] == [""] * len(records)  # inputs are not modified


@pytest.mark.parametrize(
    "fractions",
    [
        {},
        {"train": 0.8, "test": 0.3},
        {"train": 1.2, "test": -0.2},
        {"train": 1.0, "test": 0.0},
        {"train": math.nan, "test": 1.0},
    ],
    ids=["empty", "sum_above_1", "negative", "zero", "nan"],
)
def test_invalid_fractions_raise(fractions):
    with pytest.raises(ValueError, match="fractions"):
        split_records(records_for([4, 4]), fractions)


@settings(max_examples=50, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=5),
    weights=st.lists(st.integers(1, 20), min_size=2, max_size=3),
    seed=st.integers(0, 2**32 - 1),
)
def test_split_property(sizes, weights, seed):
    fractions = {name: w / sum(weights) for name, w in zip(["train", "val", "test"], weights)}
    records = records_for(sizes)
    out = split_records(records, fractions, seed=seed)
    check_split(records, out, fractions)
    assert split_records(records, fractions, seed=seed) == out


# --- manifests --------------------------------------------------------------------------------


def test_manifest_round_trip_with_relative_paths(tmp_path):
    root = make_classes(tmp_path / "data", {"a": 3, "b": 2})
    found = scan_folder(root)
    records = split_records(found.records, {"train": 0.6, "test": 0.4})
    manifest = write_manifest(tmp_path / "out" / "manifest.csv", records, found.class_names, root=root)
    text = manifest.read_text()
    assert str(root) not in text and "a/0.png" in text.replace(os.sep, "/")
    assert read_manifest(manifest, root=str(root)) == (records, found.class_names)
    # Moved data: the same manifest read against another root.
    moved, _ = read_manifest(manifest, root="/mnt/elsewhere")
    assert [r.path for r in moved] == [
        os.path.join("/mnt/elsewhere", os.path.relpath(r.path, root)) for r in records
    ]


def test_manifest_round_trip_absolute_paths_and_empty_classes(tmp_path):
    root = make_classes(tmp_path, {"a": 2, "b": 2})
    (root / "c").mkdir()
    found = scan_folder(root)
    manifest = write_manifest(tmp_path / "m.csv", found.records, found.class_names)
    assert read_manifest(manifest) == (found.records, ["a", "b", "c"])  # empty class 'c' is kept


def test_manifest_with_missing_labels_is_an_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,label,class_name,split\nx.jpg,0,a,train\ny.jpg,2,c,train\n")
    with pytest.raises(DatasetError, match="not 0..K-1"):
        read_manifest(path)


def test_loose_images_next_to_class_folders_are_warned_about(tmp_path, caplog):
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / c / "x.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "stray.png")
    with caplog.at_level(logging.WARNING):
        found = scan_folder(tmp_path)
    assert len(found.records) == 2
    assert "outside any class folder are ignored: stray.png" in caplog.text


def test_both_val_and_validation_is_an_error(tmp_path):
    from PIL import Image

    for split in ("train", "val", "validation"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(tmp_path / split / c / "x.png")
    with pytest.raises(DatasetError, match="both val/ and validation/"):
        scan_folder(tmp_path)
