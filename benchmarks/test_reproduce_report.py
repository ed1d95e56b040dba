"""Reproduce the original experiment's report (../shared/seed/report.txt) from its confusion matrix.

Run with ``.venv/bin/python -m pytest benchmarks/test_reproduce_report.py -s`` to see the
findings. The classification table must follow number for number from the printed matrix; the
stated accuracies are checked against it (the 81.46% "test accuracy" is not supported by it).
"""

from pathlib import Path

import numpy as np
import pytest

from imgcls_jax.evaluate import (
    check_report_consistency,
    classification_report,
    classification_report_dict,
    parse_report_text,
)

REPORT = Path(__file__).resolve().parents[2] / "shared" / "seed" / "report.txt"
NAMES = [str(i) for i in range(18)]


@pytest.fixture(scope="module")
def parsed():
    if not REPORT.is_file():
        pytest.skip(f"the original report is not at {REPORT} (it lives in ../shared beside the checkout)")
    return parse_report_text(REPORT.read_text(encoding="utf-8"))


def test_parsed_figures(parsed):
    assert (parsed.train_accuracy, parsed.val_accuracy, parsed.test_accuracy) == (36.60, 49.78, 81.46)
    assert parsed.confusion.shape == (18, 18) and parsed.confusion.dtype == np.int64
    assert int(parsed.confusion.sum()) == 4500 and int(np.trace(parsed.confusion)) == 2240
    assert parsed.table.names == NAMES and parsed.table.digits == 2


def test_table_recomputed_number_for_number(parsed):
    report = classification_report_dict(parsed.confusion, NAMES)
    table = parsed.table
    two = lambda x: f"{x:.2f}"  # noqa: E731 -- the table's precision
    for i, name in enumerate(NAMES):
        row = report[name]
        assert [two(row["precision"]), two(row["recall"]), two(row["f1-score"])] == [
            two(table.precision[i]),
            two(table.recall[i]),
            two(table.f1[i]),
        ], f"class {name}"
        assert row["support"] == table.support[i], f"class {name}"
    assert two(report["accuracy"]) == two(table.accuracy) == "0.50"
    assert report["macro avg"]["support"] == report["weighted avg"]["support"] == table.total == 4500
    for key, stated in (("macro avg", table.macro_avg), ("weighted avg", table.weighted_avg)):
        got = report[key]
        assert [two(got["precision"]), two(got["recall"]), two(got["f1-score"])] == [
            two(v) for v in stated
        ], key


def test_table_text_reproduced_exactly(parsed):
    text = classification_report(parsed.confusion, NAMES, digits=2)
    assert text == parsed.table.text  # byte for byte, including the column widths and blank lines
    assert text.splitlines()[-1] == "weighted avg       0.53      0.50      0.48      4500"


def test_consistency_findings(parsed):
    findings = check_report_consistency(parsed)
    print("\nFindings on", REPORT)
    for finding in findings:
        print(f"  [{'agrees' if finding.agrees else 'DISAGREES'}] {finding}")
    by_subject = {f.subject: f for f in findings}
    assert not by_subject["test_accuracy"].agrees
    assert str(by_subject["test_accuracy"]) == (
        "stated test accuracy 81.46% disagrees with the confusion matrix's 49.78% (2240/4500)"
    )
    assert by_subject["val_accuracy"].agrees
    assert "49.78%" in str(by_subject["val_accuracy"])
    assert by_subject["table_accuracy"].agrees and by_subject["table_cells"].agrees
    assert [f.subject for f in findings if not f.agrees] == ["test_accuracy"]
