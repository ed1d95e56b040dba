"""Metrics against scikit-learn and NumPy references; the report parser on synthetic reports."""

import string
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgcls_jax.evaluate import (
    ReportParseError,
    accuracy_from_cm,
    check_report_consistency,
    classification_report,
    classification_report_dict,
    confusion_matrix,
    confusion_matrix_update,
    parse_report_text,
    topk_correct,
)

sk_metrics = pytest.importorskip("sklearn.metrics", reason="scikit-learn is the reference (test extra)")

SETTINGS = settings(max_examples=60, deadline=None)
jitted_update = jax.jit(confusion_matrix_update)
jitted_topk = jax.jit(topk_correct, static_argnums=3)
NAME = st.text(alphabet=string.ascii_letters + string.digits + "_- ", min_size=1, max_size=22).filter(
    lambda s: s.strip() == s and s not in ("accuracy", "macro avg", "weighted avg")
)


@st.composite
def labelled(draw):
    """K classes, y_true/y_pred (some classes may be absent from either), unique names, digits."""
    k = draw(st.integers(1, 12))
    n = draw(st.integers(1, 80))
    # Draw from a random subset of the classes, so some are often missing from y_true or y_pred.
    true_pool = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))
    pred_pool = draw(st.lists(st.integers(0, k - 1), min_size=1, max_size=k, unique=True))
    y_true = draw(st.lists(st.sampled_from(true_pool), min_size=n, max_size=n))
    y_pred = draw(st.lists(st.sampled_from(pred_pool), min_size=n, max_size=n))
    names = draw(st.lists(NAME, min_size=k, max_size=k, unique=True))
    digits = draw(st.integers(2, 4))
    return k, np.array(y_true), np.array(y_pred), names, digits


@SETTINGS
@given(labelled())
def test_report_text_equals_sklearn(case):
    k, y_true, y_pred, names, digits = case
    cm = confusion_matrix(y_true, y_pred, k)
    expected = sk_metrics.classification_report(
        y_true, y_pred, labels=list(range(k)), target_names=names, digits=digits, zero_division=0
    )
    if np.trace(cm) == 0:
        expected = ints_for_supports(expected)
    assert classification_report(cm, names, digits=digits) == expected


def ints_for_supports(sklearn_text):
    """scikit-learn 1.9 prints supports as floats ("1.0") when no prediction is correct (its
    multilabel_confusion_matrix starts from float zeros in that case); we always print ints."""
    lines = []
    for line in sklearn_text.split("\n"):
        if line.endswith(".0"):
            assert line[-9:].strip().endswith(".0"), line
            line = line[:-9] + f"{int(float(line[-9:])):>9}"
        lines.append(line)
    return "\n".join(lines)


def test_supports_are_ints_even_when_sklearn_prints_floats():
    y_true, y_pred = np.array([0, 2]), np.array([1, 0])
    sk = sk_metrics.classification_report(y_true, y_pred, labels=[0, 1, 2], zero_division=0)
    ours = classification_report(confusion_matrix(y_true, y_pred, 3), ["0", "1", "2"])
    assert "       1.0\n" in sk and ours != sk and ours == ints_for_supports(sk)


@pytest.mark.filterwarnings("ignore:A single label was found:UserWarning")  # sklearn, for K = 1
@SETTINGS
@given(labelled())
def test_report_dict_and_matrix_equal_sklearn(case):
    k, y_true, y_pred, names, _ = case
    cm = confusion_matrix(y_true, y_pred, k)
    np.testing.assert_array_equal(cm, sk_metrics.confusion_matrix(y_true, y_pred, labels=list(range(k))))
    expected = sk_metrics.classification_report(
        y_true, y_pred, labels=list(range(k)), target_names=names, output_dict=True, zero_division=0
    )
    got = classification_report_dict(cm, names)
    assert got == expected  # same keys, same order of operations: equal floats, not just close
    assert accuracy_from_cm(cm) == sk_metrics.accuracy_score(y_true, y_pred)


def test_report_on_seed_like_numbers():
    cm = np.array([[5, 1, 0], [2, 3, 0], [0, 0, 0]])  # class 2: no support, never predicted
    text = classification_report(cm, ["cat", "dog", "a-very-long-class-name"], digits=3)
    lines = text.splitlines()
    assert lines[0].split() == ["precision", "recall", "f1-score", "support"]
    assert lines[4].split() == ["a-very-long-class-name", "0.000", "0.000", "0.000", "0"]
    assert lines[6].split() == ["accuracy", "0.727", "11"]
    assert text.endswith("\n") and len(lines[2]) == len("a-very-long-class-name") + 1 + 4 * 10


@SETTINGS
@given(
    k=st.integers(1, 9),
    batches=st.lists(st.sampled_from([0, 1, 8, 17]), min_size=1, max_size=4),
    seed=st.integers(0, 2**31 - 1),
)
def test_jitted_confusion_update_equals_bincount(k, batches, seed):
    rng = np.random.default_rng(seed)
    update = jitted_update
    cm = jnp.zeros((k, k), jnp.int32)
    expected = np.zeros(k * k, np.int64)
    for b in batches:
        labels = rng.integers(0, k, b).astype(np.int32)
        preds = rng.integers(0, k, b).astype(np.int32)
        mask = rng.random(b) < 0.7
        # Padding rows may hold anything, even out-of-range classes: they must be ignored.
        labels[~mask] = rng.integers(-3, k + 3, int((~mask).sum()))
        cm = update(cm, labels, preds, mask)
        expected += np.bincount(labels[mask] * k + preds[mask], minlength=k * k)
    assert cm.dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(cm), expected.reshape(k, k))


def reference_topk(logits, labels, mask, k):
    """Stable sort by descending logit: equal logits keep index order (the documented tie rule)."""
    order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return int(sum(m and lab in row for row, lab, m in zip(order, labels, mask)))


@SETTINGS
@given(
    b=st.sampled_from([1, 6, 16]),
    num_classes=st.sampled_from([1, 2, 5, 10]),  # few shapes: each new one compiles
    k=st.sampled_from([1, 2, 5, 12]),
    ties=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_correct_matches_numpy_reference(b, num_classes, k, ties, seed):
    rng = np.random.default_rng(seed)
    # Few distinct values when `ties`, so equal logits straddle the top-k boundary often.
    logits = (rng.integers(0, 3, (b, num_classes)) if ties else rng.normal(size=(b, num_classes))).astype(
        np.float32
    )
    labels = rng.integers(0, num_classes, b).astype(np.int32)
    mask = rng.random(b) < 0.8
    expected = reference_topk(logits, labels, mask, min(k, num_classes))
    eager = topk_correct(logits, labels, mask, k)
    jitted = jitted_topk(logits, labels, mask, k)
    assert int(eager) == int(jitted) == expected
    # The same rule as jax.lax.top_k (equal values: lower index first).
    top = np.asarray(jax.lax.top_k(logits, min(k, num_classes))[1])
    assert sum(m and lab in row for row, lab, m in zip(top, labels, mask)) == expected
    # Top-1 equals the trace of the argmax confusion matrix (same tie rule as jnp.argmax).
    cm = confusion_matrix_update(
        jnp.zeros((num_classes, num_classes), jnp.int32), labels, jnp.argmax(logits, -1), mask
    )
    assert int(topk_correct(logits, labels, mask, 1)) == int(jnp.trace(cm))


def test_topk_k_at_least_num_classes_counts_every_unmasked_example():
    logits = np.zeros((5, 3), np.float32)
    mask = np.array([True, True, False, True, True])
    assert int(topk_correct(logits, np.array([0, 1, 2, 2, 1]), mask, 5)) == 4
    assert int(topk_correct(logits, np.array([0, 1, 2, 2, 1]), mask, 1)) == 1  # ties go to class 0


def test_bad_inputs_raise_with_the_offending_value():
    cm = jnp.zeros((3, 3), jnp.int32)
    with pytest.raises(ValueError, match=r"labels\[1\] = 7 is outside \[0, 3\)"):
        confusion_matrix_update(cm, jnp.array([0, 7]), jnp.array([0, 1]), jnp.array([True, True]))
    with pytest.raises(ValueError, match=r"predictions\[0\] = -1"):
        confusion_matrix_update(cm, jnp.array([0, 1]), jnp.array([-1, 1]), jnp.array([True, True]))
    with pytest.raises(ValueError, match="shapes disagree"):
        confusion_matrix_update(cm, jnp.array([0, 1]), jnp.array([0]), jnp.array([True, True]))
    with pytest.raises(ValueError, match="square"):
        confusion_matrix_update(
            jnp.zeros((3, 2), jnp.int32), jnp.array([0]), jnp.array([0]), jnp.array([True])
        )
    with pytest.raises(ValueError, match="must be integers"):
        confusion_matrix_update(cm, jnp.array([0.0]), jnp.array([0]), jnp.array([True]))
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        topk_correct(jnp.zeros((2, 3)), jnp.array([0, 1]), jnp.array([True, True]), 0)
    with pytest.raises(ValueError, match=r"labels\[0\] = 3"):
        topk_correct(jnp.zeros((1, 3)), jnp.array([3]), jnp.array([True]), 1)
    with pytest.raises(ValueError, match=r"labels\[1\] = 4 is outside \[0, 3\)"):
        confusion_matrix([0, 4], [0, 0], 3)


def test_out_of_range_under_jit_is_visible_in_the_totals():
    cm = jitted_update(
        jnp.zeros((3, 3), jnp.int32), jnp.array([0, 5, 2]), jnp.array([0, 0, -1]), jnp.array([True] * 3)
    )
    assert int(cm.sum()) == 1  # the two invalid entries are not counted (cm.sum() < mask.sum())
    # Invalid labels never count as top-k correct under jit.
    assert int(jitted_topk(jnp.zeros((2, 3)), jnp.array([9, -1]), jnp.ones(2, bool), 3)) == 0


@pytest.mark.parametrize(
    "cm, names, digits, match",
    [
        (np.zeros((2, 3), int), ["a", "b"], 2, r"square \[K, K\].*\(2, 3\)"),
        (np.array([[1, -2], [0, 1]]), ["a", "b"], 2, r"cm\[0, 1\] = -2"),
        (np.array([[1.5, 0], [0, 1]]), ["a", "b"], 2, "whole counts"),
        (np.eye(2, dtype=int), ["a"], 2, "1 class names for a 2x2"),
        (np.eye(2, dtype=int), ["a", "a"], 2, "unique"),
        (np.eye(2, dtype=int), ["a", "b"], -1, "digits must be an int >= 0, got -1"),
    ],
)
def test_report_rejects_bad_input(cm, names, digits, match):
    with pytest.raises(ValueError, match=match):
        classification_report(cm, names, digits=digits)


def test_report_dict_rejects_reserved_names():
    with pytest.raises(ValueError, match="'accuracy' collides"):
        classification_report_dict(np.eye(2, dtype=int), ["accuracy", "b"])


def test_library_imports_neither_tensorflow_sklearn_nor_matplotlib():
    code = (
        "import sys, imgcls_jax.evaluate; "
        "print(sorted(m for m in ('tensorflow', 'sklearn', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --- the report parser, on reports written with this module's own functions ---------------------


def make_report(cm, percents=("36.60", "49.78", "81.46"), table=None):
    names = [str(i) for i in range(cm.shape[0])]
    return "\n".join(
        [
            "Özet: bir deney.",  # non-ASCII prose is ignored
            f"Eğitim Doğruluğu: %{percents[0]} (son epoch)",
            f"Doğrulama Doğruluğu: {percents[1]}%",
            f"Test Doğruluğu: %{percents[2]}",
            "Confusion Matrix:",
            np.array2string(cm, max_line_width=40),  # narrow: rows wrap over several lines
            "",
            "Classification Report:",
            table if table is not None else classification_report(cm, names),
        ]
    )


@SETTINGS
@given(labelled())
def test_parse_round_trip_and_consistency(case):
    k, y_true, y_pred, _, _ = case
    cm = confusion_matrix(y_true, y_pred, k)
    acc = f"{100 * np.trace(cm) / cm.sum():.2f}"
    parsed = parse_report_text(make_report(cm, ("12.34", acc, acc)))
    np.testing.assert_array_equal(parsed.confusion, cm)
    assert (parsed.train_accuracy, parsed.val_accuracy) == (12.34, float(acc))
    assert parsed.table.text == classification_report(cm, [str(i) for i in range(k)])
    assert parsed.table.support.tolist() == cm.sum(axis=1).tolist()
    findings = check_report_consistency(parsed)
    assert all(f.agrees for f in findings), [str(f) for f in findings]


def test_consistency_names_disagreements():
    cm = np.array([[8, 2], [1, 9]])
    table = classification_report(cm, ["0", "1"]).replace("0.89      0.80", "0.91      0.80")
    findings = check_report_consistency(
        parse_report_text(make_report(cm, ("50.00", "85.00", "90.00"), table))
    )
    messages = [str(f) for f in findings if not f.agrees]
    assert messages == [
        "stated test accuracy 90.00% disagrees with the confusion matrix's 85.00% (17/20)",
        "class '0' precision: table 0.91, matrix gives 0.89",
    ]


@pytest.mark.parametrize(
    "text, match",
    [
        ("Test: %50.00\nno matrix here", "no confusion matrix found"),
        ("%1\n%2\n%3\n[[1 2]\n [3 4]]\n", "no classification table found"),
        ("%1\n%2\n%3\n[[1 2 3]\n [3 4 5]]\n", "not square: 2 rows of 3 columns"),
        ("%1\n%2\n%3\n[[1 2]\n [3]]\n", "different lengths"),
        ("%1\n%2\n%3\n[[1 x]\n [3 4]]\n", "row 1: 'x'"),
        ("%1\n%2\n[[1 0]\n [0 1]]\n", "expected three percent figures .* found 2: line 1: 1%; line 2: 2%"),
        (
            "%1\n%2\n%3\n[[1 0]\n [0 1]]\n precision recall f1-score support\n a 1.00 1.00 1.00 1\n",
            "no 'macro avg'",
        ),
        (
            "%1\n%2\n%3\n[[1 0]\n [0 1]]\n precision recall f1-score support\n a 1.00 oops\n",
            "line 7 .* not a table row",
        ),
    ],
)
def test_parse_errors_are_clear(text, match):
    with pytest.raises(ReportParseError, match=match):
        parse_report_text(text)
