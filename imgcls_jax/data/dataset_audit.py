"""Dataset audit: the check to run on an image folder before training on it.

:func:`audit` scans a folder (``root/<class>/...`` or ``root/{train,val,test}/<class>/...``) and
reports images per class and split, class imbalance, unreadable files, exact duplicates (and
duplicates across splits, i.e. leakage), tiny images, empty classes, classes missing from a split,
and classes that look like segmentation masks rather than photos (by their pixels, or by a name
such as ``"fish GT"`` beside a class ``"fish"``).

TensorFlow is only used (lazily) to decode images, through :mod:`imgcls_jax.data.decode`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from imgcls_jax.data.decode import check_images, load_image
from imgcls_jax.data.folders import scan_folder

log = logging.getLogger(__name__)

#: Warn when, within a split, the largest class has more than this many times the smallest's images.
IMBALANCE_THRESHOLD = 1.5
#: A pixel counts as "one of the two most frequent values" within this many grey levels of it
#: (absorbs JPEG ringing around mask edges).
MASK_TOLERANCE = 4
#: Listings inside one warning stop after this many items (the report's fields hold them all).
MAX_LISTED = 20

_MASK_NAME = re.compile(
    r"^(?P<base>.+?)[\s_.\-]+(?:gt|ground[\s_\-]?truth|masks?|labels?|annotations?|segmentations?|seg)$",
    re.IGNORECASE,
)
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


@dataclass
class Unreadable:
    """A file with an image extension that does not decode."""

    path: str
    reason: str


@dataclass
class TinyImage:
    """An image whose height or width is below the audit's ``tiny`` size (pixels)."""

    path: str
    height: int
    width: int


@dataclass
class DuplicateGroup:
    """Files with identical bytes; ``classes``/``splits`` are per file (``""``: not split)."""

    files: list[str]
    classes: list[str]
    splits: list[str]
    across_splits: bool


@dataclass
class MaskFlag:
    """A class that looks like segmentation masks: ``by`` is ``"pixels"`` or ``"name"``."""

    class_name: str
    by: str
    detail: str


@dataclass
class AuditReport:
    """What :func:`audit` found. ``counts``: split -> class -> readable images (split ``""``:
    a folder that is not pre-split); ``imbalance``: split -> max/min class count (``None`` with
    fewer than two non-empty classes); ``mask_scores``: class -> median fraction of pixels on the
    two most frequent grey levels in the sampled images; ``warnings``: one line per problem,
    naming the files or classes concerned."""

    root: str
    class_names: list[str]
    presplit: bool
    counts: dict[str, dict[str, int]]
    imbalance: dict[str, float | None]
    unreadable: list[Unreadable] = field(default_factory=list)
    duplicates: list[DuplicateGroup] = field(default_factory=list)
    tiny: list[TinyImage] = field(default_factory=list)
    mask_like: list[MaskFlag] = field(default_factory=list)
    mask_scores: dict[str, float] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the audit found nothing to warn about."""
        return not self.warnings

    def to_dict(self) -> dict:
        """The report as plain dicts, lists, strings and numbers (JSON-serialisable)."""
        return asdict(self)

    def to_text(self) -> str:
        """A readable report: a table of images per class and split, then every warning."""
        splits = list(self.counts)
        heads = [s or "images" for s in splits] + (["total"] if len(splits) > 1 else [])
        width = max([len("imbalance (max/min)")] + [len(n) for n in self.class_names])

        def row(name: str, cells: list) -> str:
            return f"{name:<{width}}" + "".join(f"{c:>9}" for c in cells)

        lines = [f"Dataset audit of {self.root}" + (" (pre-split folders)" if self.presplit else ""), ""]
        lines.append(row("class", heads))
        for name in self.class_names:
            cells = [self.counts[s].get(name, 0) for s in splits]
            lines.append(row(name, cells + ([sum(cells)] if len(splits) > 1 else [])))
        totals = [sum(self.counts[s].values()) for s in splits]
        lines.append(row("total", totals + ([sum(totals)] if len(splits) > 1 else [])))
        ratios = ["-" if r is None else f"{r:.2f}" for r in self.imbalance.values()]
        lines.append(row("imbalance (max/min)", ratios))
        lines.append("")
        if not self.warnings:
            lines.append("No problems found.")
        else:
            lines.append(f"{len(self.warnings)} warning(s):")
            lines += [f"- {w}" for w in self.warnings]
        return "\n".join(lines)


def _listing(items: list[str]) -> str:
    more = f"; ... and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    return "; ".join(items[:MAX_LISTED]) + more


def _duplicate_groups(paths: list[str]) -> list[list[str]]:
    """Groups (sorted, size >= 2) of files with identical bytes: by size first, then blake2b."""
    by_size: dict[int, list[str]] = defaultdict(list)
    for p in paths:
        by_size[os.path.getsize(p)].append(p)
    groups = []
    for same_size in by_size.values():
        if len(same_size) < 2:
            continue
        by_hash: dict[str, list[str]] = defaultdict(list)
        for p in same_size:
            with open(p, "rb") as f:
                by_hash[hashlib.file_digest(f, "blake2b").hexdigest()].append(p)
        groups += [sorted(g) for g in by_hash.values() if len(g) > 1]
    return sorted(groups)


def two_value_fraction(image: np.ndarray) -> float:
    """Fraction of pixels on (within :data:`MASK_TOLERANCE` of) the two most frequent grey levels.

    ``image``: ``uint8[H, W, 3]``; channels are combined to luminance (identical channels give
    the grey value itself). About 1.0 for a binary mask, a few percent for a photo.
    """
    step = max(1, max(image.shape[:2]) // 256)  # subsample large images: the histogram is enough
    rgb = image[::step, ::step].astype(np.uint32)
    grey = (299 * rgb[..., 0] + 587 * rgb[..., 1] + 114 * rgb[..., 2] + 500) // 1000
    hist = np.bincount(grey.ravel(), minlength=256)
    near = np.zeros(256, bool)
    for mode in np.argsort(hist, kind="stable")[-2:]:
        near[max(0, mode - MASK_TOLERANCE) : mode + MASK_TOLERANCE + 1] = True
    return float(hist[near].sum() / max(1, hist.sum()))


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name).strip().lower()


def audit(
    root,
    *,
    tiny: int = 32,
    mask_threshold: float = 0.95,
    sample_per_class: int = 20,
    seed: int = 0,
    exclude: Sequence[str] = (),
) -> AuditReport:
    """Audit the image folder ``root`` (every file is decoded once) and log each warning.

    Args:
      root: ``root/<class>/**/<image>`` or ``root/{train,val,test}/<class>/**/<image>``.
      tiny: images with height or width below this (pixels) are listed.
      mask_threshold: a class whose sampled images have a median :func:`two_value_fraction` of
        at least this is flagged as segmentation masks.
      sample_per_class: images decoded per class (a seeded random sample) for the mask check;
        0 skips it (the check by class name still runs).
      seed: seed of that sample.
      exclude: folder-name glob patterns left out, as in
        :func:`~imgcls_jax.data.folders.scan_folder`.

    A class whose images lie in several subfolders (e.g. the Fish dataset's
    ``<species>/<species>`` photos beside ``<species>/<species> GT`` masks) is also checked
    subfolder by subfolder, and a subfolder of masks is flagged as ``"<class>/<subfolder>"``.

    Raises:
      DatasetError: from :func:`~imgcls_jax.data.folders.scan_folder` (no such folder, fewer
        than two classes, no image files at all).
    """
    found = scan_folder(root, verify=False, exclude=exclude)
    checks = {c.path: c for c in check_images([r.path for r in found.records])}
    good = [r for r in found.records if checks[r.path].reason is None]
    splits = sorted({r.split for r in found.records}, key=lambda s: (_SPLIT_ORDER.get(s, 9), s))
    counts = {s: dict.fromkeys(found.class_names, 0) for s in splits}
    for r in good:
        counts[r.split][found.class_names[r.label]] += 1
    imbalance = {}
    for s, per_class in counts.items():
        nonzero = [n for n in per_class.values() if n]
        imbalance[s] = round(max(nonzero) / min(nonzero), 4) if len(nonzero) > 1 else None
    report = AuditReport(
        str(found.root), list(found.class_names), found.presplit, counts, imbalance,
        thresholds={"tiny": tiny, "mask_threshold": mask_threshold, "imbalance": IMBALANCE_THRESHOLD},
    )  # fmt: skip
    _check_classes(report, splits)
    _check_files(report, checks, good, tiny)
    _check_masks(report, good, sample_per_class, seed, mask_threshold)
    for w in report.warnings:
        log.warning("%s: %s", report.root, w)
    return report


def _check_classes(report: AuditReport, splits: list[str]) -> None:
    """Warnings for empty classes, classes missing from some splits, class imbalance."""
    warn, counts = report.warnings.append, report.counts
    for name in report.class_names:
        missing = [s for s in splits if counts[s][name] == 0]
        if len(missing) == len(splits):
            warn(f"empty class {name!r}: no readable images (its label is kept)")
        elif missing:
            warn(f"class {name!r} is missing from split(s) {missing}: it has no readable images there")
    for s, ratio in report.imbalance.items():
        if ratio is not None and ratio > IMBALANCE_THRESHOLD:
            per = {n: c for n, c in counts[s].items() if c}
            big, small = max(per, key=per.get), min(per, key=per.get)
            in_split = f"split {s!r}" if s else "the dataset"
            warn(
                f"class imbalance in {in_split}: {big!r} has {per[big]} images, {small!r} has "
                f"{per[small]} (ratio {ratio:.2f} > {IMBALANCE_THRESHOLD}); consider class weights"
            )


def _check_files(report: AuditReport, checks: dict, good: list, tiny: int) -> None:
    """Unreadable files, identical files (within and across splits) and tiny images."""
    warn, names = report.warnings.append, report.class_names

    def rel(path: str) -> str:
        return os.path.relpath(path, report.root)

    report.unreadable = [Unreadable(c.path, c.reason) for c in checks.values() if c.reason]
    if report.unreadable:
        listing = _listing([f"{rel(u.path)} ({u.reason})" for u in report.unreadable])
        warn(f"{len(report.unreadable)} unreadable file(s), skipped by scan_folder: {listing}")
    label_of = {r.path: (names[r.label], r.split) for r in good}
    for files in _duplicate_groups([r.path for r in good]):
        classes, in_splits = [label_of[p][0] for p in files], [label_of[p][1] for p in files]
        report.duplicates.append(DuplicateGroup(files, classes, in_splits, len(set(in_splits)) > 1))
    for across in (True, False):
        groups = [g for g in report.duplicates if g.across_splits == across]
        if not groups:
            continue
        items = []
        for g in groups:
            conflict = " (in different classes: conflicting labels)" if len(set(g.classes)) > 1 else ""
            where_f = [f"{rel(p)} [{s}]" if across else rel(p) for p, s in zip(g.files, g.splits)]
            items.append(" == ".join(where_f) + conflict)
        what = "across splits (leakage: trained and evaluated on)" if across else "within a split"
        what = what if report.presplit else "in the dataset"
        warn(f"{len(groups)} group(s) of identical files {what}: {_listing(items)}")
    report.tiny = [
        TinyImage(r.path, checks[r.path].height, checks[r.path].width)
        for r in good
        if min(checks[r.path].height, checks[r.path].width) < tiny
    ]
    if report.tiny:
        listing = _listing([f"{rel(t.path)} ({t.height}x{t.width})" for t in report.tiny])
        warn(f"{len(report.tiny)} tiny image(s) (height or width < {tiny} px): {listing}")


def _check_masks(report: AuditReport, good: list, sample_per_class: int, seed: int, threshold: float) -> None:
    """Classes (and class subfolders) that look like segmentation masks, by pixels and by name."""
    names = report.class_names
    by_class: dict[int, list[str]] = defaultdict(list)
    for r in sorted(good, key=lambda r: r.path):
        by_class[r.label].append(r.path)
    groups: list[tuple[str, list[str], int]] = []  # (name, paths, sample seed)
    for label, paths in sorted(by_class.items()):
        groups.append((names[label], paths, label))
        subfolders = _by_subfolder(paths, names[label], report.root, report.presplit)
        if len(subfolders) > 1:  # photos and masks side by side inside one class folder
            groups += [(f"{names[label]}/{sub}", ps, 1000 + 100 * label + i) for i, (sub, ps) in
                       enumerate(sorted(subfolders.items())) if sub]  # fmt: skip
    for name, paths, sample_seed in groups:
        rng = np.random.default_rng([seed, sample_seed])  # each class's sample is independent
        picked = [paths[i] for i in sorted(rng.choice(len(paths), min(len(paths), sample_per_class), False))]
        if not picked:  # sample_per_class=0 turns the pixel check off
            continue
        score = float(np.median([two_value_fraction(load_image(p)) for p in picked]))
        report.mask_scores[name] = round(score, 4)
        if score >= threshold:
            examples = _listing([os.path.relpath(p, report.root) for p in picked[:3]])
            detail = (
                f"median {score:.1%} of pixels on its 2 most frequent grey levels (>= {threshold:.0%}) "
                f"in {len(picked)} sampled images, e.g. {examples}"
            )
            report.mask_like.append(MaskFlag(name, "pixels", detail))
    group_names = [g[0] for g in groups]
    normalised = {_norm(n.rsplit("/", 1)[-1]): n for n in group_names}
    for name in group_names:
        match = _MASK_NAME.match(name.rsplit("/", 1)[-1])
        partner = normalised.get(_norm(match["base"])) if match else None
        if partner is not None and partner != name:
            what = "folder" if "/" in partner else "class"
            report.mask_like.append(
                MaskFlag(name, "name", f"named like the mask folder of {what} {partner!r}")
            )
    for flag in report.mask_like:
        report.warnings.append(
            f"class {flag.class_name!r} looks like segmentation masks, not photos ({flag.detail}); "
            "masks are labels of the images, not a class: remove the folder or train a segmentation model"
        )


def _by_subfolder(paths: list[str], class_name: str, root: str, presplit: bool) -> dict[str, list[str]]:
    """A class's images grouped by their first subfolder inside the class folder (``""``: the
    class folder itself)."""
    out: dict[str, list[str]] = defaultdict(list)
    depth = 2 if presplit else 1  # root/[split/]class/...
    for p in paths:
        parts = Path(os.path.relpath(p, root)).parts
        out[parts[depth] if len(parts) > depth + 1 else ""].append(p)
    return dict(out)
