"""Image folders on disk: discovery, verification, stratified splits and manifests.

Layouts (class order = sorted folder names, as ``keras.utils.image_dataset_from_directory``):

* ``root/<class>/**/<image>``: one pool of images, to be split with :func:`split_records`;
* ``root/{train,val,test}/<class>/**/<image>``: pre-split folders (``validation`` is read as
  ``val``); the class list is the union over the splits.

No TensorFlow here except through :func:`imgcls_jax.data.decode.check_images`.
"""

from __future__ import annotations

import csv
import fnmatch
import logging
import os
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from imgcls_jax.data.decode import IMAGE_EXTENSIONS, check_images

log = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}


class DatasetError(ValueError):
    """A dataset that cannot be used as asked; the message says what was found and what to do."""


@dataclass(frozen=True)
class Record:
    """One image: its path, its class index and (once split) the split it belongs to."""

    path: str
    label: int
    split: str = ""


@dataclass
class ImageFolder:
    """What :func:`scan_folder` found: classes, usable images, and what was skipped and why."""

    root: Path
    class_names: list[str]
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    presplit: bool = False

    def counts(self) -> dict[str, Counter]:
        """Images per class name, per split (``""`` when not split)."""
        out: dict[str, Counter] = {}
        for r in self.records:
            out.setdefault(r.split, Counter())[self.class_names[r.label]] += 1
        return out


def _walk_images(folder: Path, extensions: Sequence[str], follow_links: bool, loops: list[str]) -> list[str]:
    """Image files under ``folder`` (recursive, sorted), never entering a directory twice.

    A link back to an ancestor of ``folder`` (e.g. ``root/cat/up -> ..``) is a loop too: following
    it would list the other classes' images under this class.
    """
    found, seen = [], set()
    ancestors = {(st.st_dev, st.st_ino) for st in map(os.stat, Path(folder).resolve().parents)}
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=follow_links):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen or (st.st_dev, st.st_ino) in ancestors:
            loops.append(dirpath)
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if not f.startswith(".") and os.path.splitext(f)[1].lower() in extensions
        ]
    return found


def _class_dirs(folder: Path, exclude: Sequence[str] = ()) -> list[str]:
    return sorted(
        d.name
        for d in folder.iterdir()
        if d.is_dir() and not d.name.startswith(".") and not _excluded(d.name, exclude)
    )


def _excluded(relpath: str, exclude: Sequence[str]) -> bool:
    """Whether a folder of ``relpath`` (relative to the class folder's parent, the file name
    excluded) matches a glob pattern of ``exclude`` (e.g. ``"* GT"``)."""
    return any(fnmatch.fnmatchcase(part, pat) for part in Path(relpath).parts for pat in exclude)


def scan_folder(
    root,
    *,
    class_names: Sequence[str] | None = None,
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
    verify: bool = True,
    follow_links: bool = True,
    exclude: Sequence[str] = (),
) -> ImageFolder:
    """Find the classes and images under ``root`` (see module docstring for layouts).

    Args:
      root: the folder holding the class folders, or the train/val/test folders.
      class_names: fix the class list and its order (folders not listed are ignored, listed
        ones that are missing become empty classes); default: sorted folder names.
      extensions: file extensions taken as images (lower case, with the dot).
      verify: decode every file once and skip those that fail (empty, truncated, corrupt,
        not an image despite the extension), listing them in one warning. Without it a bad
        file stops the input pipeline mid-epoch.
      follow_links: follow symbolic links to folders (loops are detected and skipped).
      exclude: glob patterns of folder names to leave out, at any depth below the split
        folder: a matching class folder is not a class, a matching subfolder of a class is not
        read (e.g. ``["* GT"]`` drops the segmentation-mask folders of the Fish dataset's
        ``<species>/<species> GT`` layout). Each excluded folder is logged.

    Raises:
      DatasetError: no such folder, no class folders, fewer than two classes, no images.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    split_dirs, presplit = _split_dirs(root, extensions)
    names = _class_names(root, split_dirs, class_names, extensions, exclude)
    records, loops = [], []
    for split, folder in split_dirs.items():
        for label, name in enumerate(names):
            if not (folder / name).is_dir():
                continue
            files = _walk_images(folder / name, extensions, follow_links, loops)
            if exclude:
                files = [
                    f for f in files if not _excluded(os.path.relpath(os.path.dirname(f), folder), exclude)
                ]
            records += [Record(p, label, split) for p in files]
    if loops:
        log.warning("%s: skipped %d symlink loop(s): %s", root, len(loops), ", ".join(loops[:10]))
    records, skipped = _verified(root, records) if verify and records else (records, [])
    if not records:
        raise DatasetError(f"{root}: no readable images in classes {names}")
    found = ImageFolder(root, names, records, skipped, presplit)
    for split, counts in found.counts().items():
        empty = [n for n in names if counts[n] == 0]
        if empty:
            where = f"split {split!r}" if split else str(root)
            log.warning("%s: class(es) with no images: %s (labels are kept, as Keras does)", where, empty)
    return found


def _split_dirs(root: Path, extensions: Sequence[str]) -> tuple[dict[str, Path], bool]:
    """``({split: folder}, presplit)``: the train/val/test folders of a pre-split ``root``, else
    ``{"": root}``. Images lying outside any class folder are warned about (they are ignored)."""
    subdirs = _class_dirs(root)
    presplit = bool(subdirs) and all(d in SPLIT_NAMES for d in subdirs)
    if presplit and {"val", "validation"} <= set(subdirs):
        raise DatasetError(f"{root}: has both val/ and validation/; keep one")
    split_dirs = {SPLIT_NAMES[d]: root / d for d in subdirs} if presplit else {"": root}
    for folder in split_dirs.values():
        loose = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
        if loose and subdirs:
            log.warning(
                "%s: %d image(s) outside any class folder are ignored: %s",
                folder,
                len(loose),
                ", ".join(loose[:10]) + (" ..." if len(loose) > 10 else ""),
            )
    return split_dirs, presplit


def _class_names(root: Path, split_dirs: dict, given, extensions, exclude) -> list[str]:
    """The class list: ``given``, else the sorted class folders of every split (at least two)."""
    per_split = {s: _class_dirs(p, exclude) for s, p in split_dirs.items()}
    if exclude:
        dropped = sorted(
            {str(d.relative_to(root)) for f in split_dirs.values() for d in f.rglob("*") if d.is_dir()
             if _excluded(d.name, exclude)}
        )  # fmt: skip
        if dropped:
            log.info("%s: excluded %d folder(s) matching %s: %s", root, len(dropped), list(exclude), dropped)
    names = list(given) if given is not None else sorted(set().union(*per_split.values()))
    if not names:
        loose = [p for p in root.iterdir() if p.suffix.lower() in extensions]
        hint = f" ({len(loose)} images lie directly in it)" if loose else ""
        raise DatasetError(f"{root}: no class folders found{hint}; expected root/<class>/<images>")
    if len(names) < 2:
        raise DatasetError(
            f"{root}: found only one class ({names[0]!r}); classification needs at least two. "
            "Point at the folder that holds the class folders."
        )
    return names


def _verified(root: Path, records: list[Record]) -> tuple[list[Record], list[tuple[str, str]]]:
    """The records whose file decodes, and ``(path, reason)`` of the others (one warning)."""
    checks = check_images([r.path for r in records])
    skipped = [(c.path, c.reason) for c in checks if c.reason]
    bad = {p for p, _ in skipped}
    if skipped:
        listing = "; ".join(f"{p}: {why}" for p, why in skipped[:20])
        more = f"; ... and {len(skipped) - 20} more" if len(skipped) > 20 else ""
        log.warning("%s: skipped %d unreadable file(s): %s%s", root, len(skipped), listing, more)
    return [r for r in records if r.path not in bad], skipped


def split_records(records: Sequence[Record], fractions: Mapping[str, float], seed: int = 0) -> list[Record]:
    """Assign each record to a split, stratified by class, reproducibly.

    Args:
      records: images (their current ``split`` is ignored).
      fractions: split name -> fraction, summing to 1, e.g. ``{"train": 0.75, "test": 0.25}``.
      seed: the same seed and files give the same assignment on any machine (files are
        sorted by path before a seeded shuffle per class).

    Within each class the counts are the largest-remainder rounding of ``n * fraction``, so the
    split sizes are as close to the fractions as whole images allow, and every image is in
    exactly one split.
    """
    if not fractions or not all(f > 0 for f in fractions.values()):  # `not f > 0` also catches NaN
        raise ValueError(f"split fractions must be positive, got {dict(fractions)}")
    total = sum(fractions.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {dict(fractions)} (sum {total:g})")
    names, fracs = list(fractions), np.asarray(list(fractions.values()))
    by_class: dict[int, list[Record]] = {}
    for r in sorted(records, key=lambda r: r.path):
        by_class.setdefault(r.label, []).append(r)
    out = []
    for label, members in sorted(by_class.items()):
        rng = np.random.default_rng([seed, label])
        order = rng.permutation(len(members))
        exact = fracs * len(members)
        counts = np.floor(exact).astype(int)
        for i in np.argsort(-(exact - counts), kind="stable")[: len(members) - counts.sum()]:
            counts[i] += 1
        bounds = np.concatenate([[0], np.cumsum(counts)])
        for s, name in enumerate(names):
            out += [replace(members[i], split=name) for i in order[bounds[s] : bounds[s + 1]]]
    return sorted(out, key=lambda r: (names.index(r.split), r.path))


def write_manifest(path, records: Sequence[Record], class_names: Sequence[str], root=None) -> Path:
    """Write ``path,label,class_name,split`` rows (paths relative to ``root`` when given).

    A class without records gets one row with an empty path, so that its label survives.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "class_name", "split"])
        for r in records:
            p = os.path.relpath(r.path, root) if root is not None else r.path
            writer.writerow([p, r.label, class_names[r.label], r.split])
        for label in sorted(set(range(len(class_names))) - {r.label for r in records}):
            writer.writerow(["", label, class_names[label], ""])
    return path


#: The columns of a manifest, in the order :func:`write_manifest` writes them.
MANIFEST_COLUMNS = ("path", "label", "class_name", "split")


def read_manifest(path, root=None, *, check_splits: Collection[str] = ()) -> tuple[list[Record], list[str]]:
    """Read a manifest written by :func:`write_manifest`: ``(records, class_names)``.

    Paths are joined to ``root`` when given; the images of the splits in ``check_splits`` must
    exist (what evaluating a split needs; prediction only needs the class names).

    Raises:
      DatasetError: naming the file and line, for a manifest edited into something else: no
        such file, missing columns, a row of the wrong length, a label that is not an integer
        >= 0, a label named two ways or a name given two labels, a duplicate path, a split name
        other than letters, digits, ``_`` and ``-``, labels that are not 0..K-1; with
        ``check_splits``, no image at all, or images of those splits that do not exist (the first
        few listed).
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such manifest file")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            records, names = _manifest_rows(path, csv.reader(f), root)
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not a UTF-8 text file ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise DatasetError(f"{path}: not a readable CSV file: {e}") from None
    if sorted(names) != list(range(len(names))):
        missing = sorted(set(range(max(names, default=-1) + 1)) - set(names))
        raise DatasetError(
            f"{path}: labels {sorted(names)} are not 0..K-1 (no line for label(s) {missing}; a class "
            "without images keeps a line with an empty path)"
        )
    if not records and check_splits:  # a manifest of class names alone (an imported model) is fine
        raise DatasetError(f"{path}: lists no images")
    if check_splits:
        _check_manifest_files(path, [(r, line) for r, line in records if r.split in check_splits], root)
    return [r for r, _ in records], [names[i][0] for i in range(len(names))]


def _manifest_rows(path: Path, reader, root) -> tuple[list[tuple[Record, int]], dict[int, tuple[str, int]]]:
    """``([(record, line)], {label: (class name, first line)})`` of a manifest's rows."""
    from imgcls_jax.config import SPLIT_NAME

    header = next(reader, None)
    if header is None or [h.strip() for h in header] != list(MANIFEST_COLUMNS):
        raise DatasetError(f"{path}, line 1: the header must be {','.join(MANIFEST_COLUMNS)}, got {header!r}")
    records, names, labels_of, seen = [], {}, {}, {}
    for row in reader:
        line = reader.line_num
        where = f"{path}, line {line}"
        if not row:
            continue  # a blank line
        if len(row) != len(MANIFEST_COLUMNS):
            raise DatasetError(f"{where}: expected {len(MANIFEST_COLUMNS)} fields, got {len(row)}: {row!r}")
        rel, label_text, name, split = row
        label = int(label_text) if label_text.strip().isdecimal() and label_text.isascii() else None
        if label is None:
            raise DatasetError(f"{where}: label {label_text!r} is not an integer >= 0")
        if not name:
            raise DatasetError(f"{where}: empty class name for label {label}")
        if label in names and names[label][0] != name:
            first = names[label]
            raise DatasetError(f"{where}: label {label} is {name!r} here but {first[0]!r} on line {first[1]}")
        if name in labels_of and labels_of[name][0] != label:
            first = labels_of[name]
            raise DatasetError(
                f"{where}: class {name!r} has label {label} here but {first[0]} on line {first[1]}"
            )
        names.setdefault(label, (name, line))
        labels_of.setdefault(name, (label, line))
        if not rel:  # a class without images (see write_manifest)
            continue
        if split and not SPLIT_NAME.fullmatch(split):
            raise DatasetError(f"{where}: split {split!r} must be letters, digits, '_' and '-'")
        full = os.path.join(root, rel) if root is not None else rel
        key = os.path.normpath(full)
        if key in seen:
            raise DatasetError(f"{where}: {rel!r} is listed again (first on line {seen[key]})")
        seen[key] = line
        records.append((Record(full, label, split), line))
    return records, names


def _check_manifest_files(path: Path, records: list[tuple[Record, int]], root) -> None:
    missing = [(r, line) for r, line in records if not os.path.isfile(r.path)]
    if not missing:
        return
    listing = "; ".join(f"line {line}: {r.path}" for r, line in missing[:5])
    more = f"; and {len(missing) - 5} more" if len(missing) > 5 else ""
    hint = (
        f" (paths are relative to the run's data folder {root}; if the images moved, set 'data' in "
        "the run's config.json)"
        if root is not None
        else ""
    )
    raise DatasetError(f"{path}: {len(missing)} listed image(s) not found: {listing}{more}{hint}")
