"""Read a written experiment report and check its figures against its own confusion matrix.

The expected layout is the original experiment's ``report.txt`` (any language: only numbers
and structure are matched):

- three lines with a percent figure ("%36.60" or "36.60%"), in order training, validation and
  test accuracy, before the matrix;
- a confusion matrix printed by NumPy (``[[121 0 ...]\\n [...]]``; rows may wrap), rows = true
  class, columns = predicted;
- a scikit-learn classification table (header ``precision recall f1-score support``, one row
  per class, then ``accuracy``, ``macro avg`` and ``weighted avg``).

:func:`parse_report_text` returns a :class:`ParsedReport`; :func:`check_report_consistency`
recomputes what the matrix implies and returns :class:`Finding` s, one per check.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

from imgcls_jax.evaluate.metrics import REPORT_HEADERS, accuracy_from_cm, average_scores, per_class_scores

_PERCENT = re.compile(r"%\s*(\d+(?:[.,]\d+)?)|(\d+(?:[.,]\d+)?)\s*%")
_HEADER = re.compile(r"^\s*precision\s+recall\s+f1-score\s+support\s*$")
_NUM = r"(\d+(?:\.\d+)?)"
_ROW = re.compile(rf"^\s*(\S(?:.*?\S)?)\s+{_NUM}\s+{_NUM}\s+{_NUM}\s+(\d+)\s*$")
_ACCURACY = re.compile(rf"^\s*accuracy\s+{_NUM}\s+(\d+)\s*$")


class ReportParseError(ValueError):
    """The text does not have the expected report structure; the message says what is missing."""


@dataclass(frozen=True)
class ReportTable:
    """A classification table as printed: per-class float64[K] scores, int64[K] supports."""

    names: list[str]
    precision: np.ndarray
    recall: np.ndarray
    f1: np.ndarray
    support: np.ndarray
    accuracy: float
    total: int
    macro_avg: tuple[float, float, float]
    weighted_avg: tuple[float, float, float]
    digits: int
    text: str  # the table's lines as printed, header to "weighted avg", each ending in "\n"


@dataclass(frozen=True)
class ParsedReport:
    """A report's stated figures. Accuracies are percentages (36.6 means 36.60%)."""

    train_accuracy: float
    val_accuracy: float
    test_accuracy: float
    percent_decimals: int
    confusion: np.ndarray  # int64[K, K], rows = true class, columns = predicted
    table: ReportTable


@dataclass(frozen=True)
class Finding:
    """One check: what was compared (``subject``), whether it agrees, and a sentence saying so."""

    subject: str
    agrees: bool
    message: str

    def __str__(self) -> str:
        return self.message


def _decimals(text: str) -> int:
    return len(text.split(".")[1]) if "." in text else 0


def _parse_matrix(lines: list[str]) -> tuple[np.ndarray, int, int]:
    """The first NumPy-printed 2-D integer matrix; returns (matrix, first line, last line)."""
    start = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[[")), None)
    if start is None:
        raise ReportParseError("no confusion matrix found: expected a NumPy-printed block starting with '[['")
    end = next((i for i in range(start, len(lines)) if "]]" in lines[i]), None)
    if end is None:
        raise ReportParseError(f"the confusion matrix starting on line {start + 1} is not closed by ']]'")
    block = " ".join(lines[start : end + 1]).strip()
    block = block[block.index("[[") + 1 : block.index("]]") + 1]
    rows = []
    for n, body in enumerate(re.findall(r"\[([^\[\]]*)\]", block), 1):
        tokens = body.split()
        bad = [t for t in tokens if not re.fullmatch(r"\d+", t)]
        if bad:
            raise ReportParseError(
                f"confusion matrix row {n}: {bad[0]!r} is not a non-negative integer count"
            )
        rows.append([int(t) for t in tokens])
    widths = sorted({len(r) for r in rows})
    if len(widths) != 1 or widths[0] == 0:
        counts = {w: sum(len(r) == w for r in rows) for w in widths}
        raise ReportParseError(f"confusion matrix rows have different lengths (length: rows) {counts}")
    if len(rows) != widths[0]:
        raise ReportParseError(f"confusion matrix is not square: {len(rows)} rows of {widths[0]} columns")
    return np.array(rows, dtype=np.int64), start, end


def _parse_accuracies(lines: list[str]) -> tuple[list[float], int]:
    found = []
    for n, line in enumerate(lines, 1):
        m = _PERCENT.search(line)
        if m:
            found.append((n, (m.group(1) or m.group(2)).replace(",", ".")))
    if len(found) != 3:
        listed = "; ".join(f"line {n}: {v}%" for n, v in found) or "none"
        raise ReportParseError(
            "expected three percent figures before the confusion matrix (training, validation and test "
            f"accuracy, in that order), found {len(found)}: {listed}"
        )
    return [float(v) for _, v in found], max(_decimals(v) for _, v in found)


def _parse_table(lines: list[str], offset: int) -> ReportTable:
    head = next((i for i, line in enumerate(lines) if _HEADER.match(line)), None)
    if head is None:
        raise ReportParseError(
            "no classification table found: expected a header line 'precision recall f1-score support'"
        )
    rows: dict[str, tuple] = {}
    accuracy = None
    end = None
    for i in range(head + 1, len(lines)):
        line = lines[i]
        if not line.strip():
            continue
        acc, row = _ACCURACY.match(line), _ROW.match(line)
        if acc:
            accuracy = acc.groups()
        elif row and row.group(1) not in rows:
            rows[row.group(1)] = row.groups()[1:]
        else:
            why = "a repeated row" if row else "not a table row"
            raise ReportParseError(
                f"line {offset + i + 1} of the classification table is {why}: {line.strip()!r}"
            )
        if row and row.group(1) == "weighted avg":
            end = i
            break
    missing = [k for k in ("macro avg", "weighted avg") if k not in rows] + ["accuracy"] * (accuracy is None)
    if missing:
        raise ReportParseError(f"the classification table has no {', '.join(repr(m) for m in missing)} line")
    averages = {k: rows.pop(k) for k in ("macro avg", "weighted avg")}
    if not rows:
        raise ReportParseError("the classification table has no class rows")
    names = list(rows)
    column = lambda j, dtype: np.array([rows[n][j] for n in names], dtype=dtype)  # noqa: E731
    return ReportTable(
        names=names,
        precision=column(0, np.float64),
        recall=column(1, np.float64),
        f1=column(2, np.float64),
        support=column(3, np.int64),
        accuracy=float(accuracy[0]),
        total=int(accuracy[1]),
        macro_avg=tuple(float(v) for v in averages["macro avg"][:3]),
        weighted_avg=tuple(float(v) for v in averages["weighted avg"][:3]),
        digits=_decimals(rows[names[0]][0]),
        text="".join(line.rstrip("\r") + "\n" for line in lines[head : end + 1]),
    )


def parse_report_text(text: str) -> ParsedReport:
    """Parse a report laid out like the original experiment's (see the module docstring).

    Raises:
      ReportParseError (a ValueError): no or malformed confusion matrix (non-square, ragged,
        non-integer), not exactly three percent figures before it, or no complete table after it.
    """
    if not isinstance(text, str):
        raise TypeError(f"parse_report_text expects the report's text (str), got {type(text).__name__}")
    lines = text.splitlines()
    confusion, start, end = _parse_matrix(lines)
    (train, val, test), decimals = _parse_accuracies(lines[:start])
    table = _parse_table(lines[end + 1 :], end + 1)
    return ParsedReport(train, val, test, decimals, confusion, table)


def _fmt(value: float, digits: int) -> str:
    return f"{value:.{digits}f}"


def _accuracy_findings(parsed: ParsedReport) -> list[Finding]:
    cm = parsed.confusion
    correct, total, d = int(np.trace(cm)), int(cm.sum()), parsed.percent_decimals
    matrix = _fmt(100 * accuracy_from_cm(cm), d)
    out = []
    for subject, label, stated in (
        ("val_accuracy", "validation", parsed.val_accuracy),
        ("test_accuracy", "test", parsed.test_accuracy),
    ):
        shown = _fmt(stated, d)
        if shown == matrix:
            msg = f"stated {label} accuracy {shown}% agrees with the confusion matrix ({correct}/{total})"
        else:
            msg = (
                f"stated {label} accuracy {shown}% disagrees with the confusion matrix's {matrix}% "
                f"({correct}/{total})"
            )
        out.append(Finding(subject, shown == matrix, msg))
    table = parsed.table
    digits = table.digits
    ok = _fmt(table.accuracy, digits) == _fmt(accuracy_from_cm(cm), digits) and table.total == total
    out.append(
        Finding(
            "table_accuracy",
            ok,
            f"table accuracy {_fmt(table.accuracy, digits)} over {table.total} images "
            f"{'agrees with' if ok else 'disagrees with'} the matrix's {correct}/{total}",
        )
    )
    return out


def _table_findings(parsed: ParsedReport) -> list[Finding]:
    table, cm = parsed.table, parsed.confusion
    k = cm.shape[0]
    if len(table.names) != k:
        return [
            Finding("table_rows", False, f"the table lists {len(table.names)} classes, the matrix has {k}")
        ]
    scores = per_class_scores(cm)
    stated = {"precision": table.precision, "recall": table.recall, "f1-score": table.f1}
    d = table.digits
    problems = []
    for i, name in enumerate(table.names):
        for key in REPORT_HEADERS[:3]:
            shown, expected = _fmt(stated[key][i], d), _fmt(scores[key][i], d)
            if shown != expected:
                problems.append(f"class {name!r} {key}: table {shown}, matrix gives {expected}")
        if table.support[i] != scores["support"][i]:
            problems.append(
                f"class {name!r} support: table {table.support[i]}, matrix row sum {scores['support'][i]}"
            )
    averages = average_scores(scores)
    for label, stated_avg in (("macro avg", table.macro_avg), ("weighted avg", table.weighted_avg)):
        for key, value, expected in zip(REPORT_HEADERS[:3], stated_avg, averages[label]):
            if _fmt(value, d) != _fmt(expected, d):
                problems.append(f"{label} {key}: table {_fmt(value, d)}, matrix gives {_fmt(expected, d)}")
    if problems:
        return [Finding("table_cells", False, p) for p in problems]
    return [
        Finding(
            "table_cells",
            True,
            f"classification table agrees with the matrix: {k} classes x precision/recall/f1-score/support "
            f"and the macro/weighted averages, at {d} decimals",
        )
    ]


def check_report_consistency(parsed: ParsedReport) -> list[Finding]:
    """Check a parsed report against its own confusion matrix.

    Findings, in order: the stated validation and test accuracies vs ``trace / total`` (at the
    stated number of decimals); the table's accuracy line; then either one finding that every
    table cell (per-class precision/recall/f1-score/support, macro and weighted averages) agrees
    with the matrix at the table's decimals, or one finding per disagreeing cell. The training
    accuracy is not checked: the matrix counts held-out images.
    """
    return _accuracy_findings(parsed) + _table_findings(parsed)
