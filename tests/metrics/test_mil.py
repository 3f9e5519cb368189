"""MIL slide metrics (ACMIL's evaluation) against scikit-learn, torchmetrics' documented behaviour
and the official definitions (accuracy in percent, macro one-vs-rest AUC, micro-F1 = accuracy)."""

import warnings

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, roc_auc_score

from attnzoo.errors import InvalidInputError
from attnzoo.metrics.mil import F1_NOTE, binary_auc, mil_metrics


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def random_case(seed, n, c, ties):
    rng = np.random.default_rng(seed)
    while True:
        labels = rng.integers(0, c, n)
        if len(np.unique(labels)) == c:  # scikit-learn's OvR AUC needs every class present
            break
    logits = rng.integers(-2, 3, (n, c)).astype(float) if ties else rng.normal(size=(n, c))
    logits[np.arange(n), labels] += rng.normal(0.7, 1.0, n).round(0 if ties else 6)  # some signal
    return softmax(logits), labels


@pytest.mark.parametrize("c", [2, 3, 4])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_against_sklearn(seed, c, ties):
    probs, labels = random_case(seed, 20 + 13 * seed, c, ties)
    got = mil_metrics(probs, labels)
    pred = probs.argmax(1)
    assert got["accuracy"] == pytest.approx(100 * accuracy_score(labels, pred))
    if c == 2:
        auc = roc_auc_score(labels, probs[:, 1])
        # with rows summing to one, the official macro OvR over both columns is the same number
        assert np.mean(got["auc_per_class"]) == pytest.approx(auc)
    else:
        auc = roc_auc_score(labels, probs, multi_class="ovr", average="macro")
    assert got["auc"] == pytest.approx(auc, abs=1e-12)
    assert got["f1_micro"] == pytest.approx(f1_score(labels, pred, average="micro"))
    assert got["f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro", zero_division=0))
    assert got["f1_micro"] == pytest.approx(got["accuracy"] / 100)  # the official "F1" is accuracy
    assert got["selection_score"] == pytest.approx(got["f1_micro"] + got["auc"])
    assert got["num_samples"] == len(labels)
    assert got["note"] == F1_NOTE and "micro" in got["note"]


def test_binary_auc_is_the_positive_column_even_if_rows_do_not_sum_to_one():
    rng = np.random.default_rng(7)
    labels = np.array([0, 1] * 15)
    probs = rng.uniform(size=(30, 2))  # e.g. two independent sigmoids
    assert mil_metrics(probs, labels)["auc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert binary_auc(probs[:, 1], labels == 1) == pytest.approx(roc_auc_score(labels, probs[:, 1]))


def test_macro_f1_skips_classes_absent_from_labels_and_predictions():
    probs = softmax(np.eye(4)[[0, 1, 2, 1, 0, 2, 2]] * 3)  # class 3 never predicted
    labels = np.array([0, 1, 2, 2, 0, 1, 2])  # nor present
    with pytest.warns(UserWarning, match="count as 0"):
        got = mil_metrics(probs, labels)
    pred = probs.argmax(1)
    assert got["f1_macro"] == pytest.approx(f1_score(labels, pred, average="macro"))
    assert got["f1_micro"] == pytest.approx(f1_score(labels, pred, average="micro"))


def test_class_without_positives_counts_zero_like_torchmetrics():
    """torchmetrics' multiclass_auroc docstring example: macro 0.5333, per class [1, 1, 1/3, 1/3, 0]."""
    probs = np.array(
        [
            [0.75, 0.05, 0.05, 0.05, 0.05],
            [0.05, 0.75, 0.05, 0.05, 0.05],
            [0.05, 0.05, 0.75, 0.05, 0.05],
            [0.05, 0.05, 0.05, 0.75, 0.05],
        ]
    )
    labels = np.array([0, 1, 3, 2])
    with pytest.warns(UserWarning, match=r"class\(es\) \[4\]"):
        got = mil_metrics(probs, labels)
    assert got["auc"] == pytest.approx(0.5333, abs=1e-4)
    np.testing.assert_allclose(got["auc_per_class"][:4], [1, 1, 1 / 3, 1 / 3])
    assert np.isnan(got["auc_per_class"][4])


def test_degenerate_binary_auc_is_nan():
    with pytest.warns(UserWarning, match="binary AUC is NaN"):
        got = mil_metrics(np.array([[0.2, 0.8], [0.6, 0.4]]), np.array([1, 1]))
    assert np.isnan(got["auc"]) and got["accuracy"] == 50.0


def test_torch_inputs_and_float_labels():
    probs, labels = random_case(0, 30, 3, False)
    ref = mil_metrics(probs, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = mil_metrics(torch.tensor(probs, dtype=torch.float32), torch.tensor(labels), num_classes=3)
    assert got["accuracy"] == ref["accuracy"]
    assert got["auc"] == pytest.approx(ref["auc"], abs=1e-6)
    assert mil_metrics(probs, labels.astype(float))["f1_macro"] == ref["f1_macro"]


def test_bad_inputs():
    probs, labels = random_case(1, 10, 3, False)
    for bad_probs, bad_labels, match in [
        (probs[0], labels, r"\[N, C\]"),
        (probs, labels[:-1], "one per row"),
        (probs, labels + 3, r"\[0, 2\]"),
        (probs * 5 - 2, labels, "softmax"),
        (np.full_like(probs, np.nan), labels, "NaN"),
        (probs[:0], labels[:0], "zero bags"),
        (probs[:, :1], labels * 0, "at least 2 classes"),
        (probs, labels + 0.5, "integer"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            mil_metrics(bad_probs, bad_labels)
    with pytest.raises(InvalidInputError, match="num_classes"):
        mil_metrics(probs, labels, num_classes=4)
