"""jaxcnn.metrics against counts and values worked out by hand."""

import math
import re

import numpy as np
import pytest

from jaxcnn import metrics


def test_per_class_precision_recall_f1_by_hand():
    # true class 0: 3 right, 1 taken for class 1; true class 1: 2 taken for class 0, 2 right; class 2 absent
    c = np.array([[3, 1, 0], [2, 2, 0], [0, 0, 0]])
    out = metrics.per_class(c, ["a", "b", "c"])
    a, b, cc = out["classes"]["a"], out["classes"]["b"], out["classes"]["c"]
    assert (a["precision"], a["recall"], a["support"]) == (pytest.approx(3 / 5), pytest.approx(3 / 4), 4)
    assert a["f1"] == pytest.approx(2 * (3 / 5) * (3 / 4) / (3 / 5 + 3 / 4))
    assert (b["precision"], b["recall"], b["f1"]) == (pytest.approx(2 / 3), pytest.approx(1 / 2), pytest.approx(4 / 7))
    assert cc == {"precision": None, "recall": None, "f1": None, "support": 0}
    assert out["macro_precision"] == pytest.approx((3 / 5 + 2 / 3) / 2)
    assert out["macro_recall"] == pytest.approx((3 / 4 + 1 / 2) / 2)
    assert out["macro_f1"] == pytest.approx((2 * 0.6 * 0.75 / 1.35 + 4 / 7) / 2)
    # a class of the split never predicted, and one predicted but absent: F1 0 each (2 TP / (predicted + support))
    z = metrics.per_class(np.array([[0, 2], [0, 0]]))["classes"]
    assert z["0"] == {"precision": None, "recall": 0.0, "f1": 0.0, "support": 2}
    assert z["1"] == {"precision": 0.0, "recall": None, "f1": 0.0, "support": 0}
    # a model that answers one class of ten: macro F1 = F1 of that class / 10
    one = metrics.per_class(np.hstack([np.zeros((10, 9), int), np.full((10, 1), 10)]))
    assert one["macro_f1"] == pytest.approx((2 * 10 / (100 + 10)) / 10)
    with pytest.raises(ValueError, match=r"per_class: 2 class_names for a 3x3 confusion matrix"):
        metrics.per_class(c, ["a", "b"])


def test_expected_calibration_error_of_hand_made_probabilities():
    probs = np.array([[0.90, 0.10],   # class 0, right; confidence 0.90 -> bin 13 of 15 (0.867, 0.933]
                      [0.88, 0.12],   # class 0, right; 0.88 -> bin 13 too
                      [0.81, 0.19],   # class 0, wrong; 0.81 -> bin 12
                      [0.30, 0.70],   # class 1, right; 0.70 -> bin 10
                      [0.45, 0.55]])  # class 1, wrong; 0.55 -> bin 8
    labels = np.array([0, 0, 1, 1, 0])
    table = metrics.reliability(probs, labels)
    assert [i for i, n in enumerate(table["count"]) if n] == [8, 10, 12, 13]
    assert table["count"][13] == 2 and table["confidence"][13] == pytest.approx(0.89)
    assert table["accuracy"][13] == 1.0 and table["accuracy"][12] == 0.0 and table["accuracy"][0] is None
    # (2/5)|1 - 0.89| + (1/5)|0 - 0.81| + (1/5)|1 - 0.70| + (1/5)|0 - 0.55|
    assert metrics.expected_calibration_error(probs, labels) == pytest.approx((0.22 + 0.81 + 0.30 + 0.55) / 5)
    # perfectly calibrated: confidence 1 and always right
    assert metrics.expected_calibration_error(np.eye(3), np.arange(3)) == 0.0
    # a confidence on an edge belongs to the bin it closes: 0.5 of 2 bins is in (0, 0.5]
    assert metrics.reliability(np.array([[0.5, 0.5]]), np.array([0]), bins=2)["count"] == [1, 0]
    with pytest.raises(ValueError, match=r"reliability: bins=0; must be an int >= 1"):
        metrics.reliability(probs, labels, bins=0)


def test_the_fitted_temperature_is_the_analytic_optimum():
    # every example has logits (4, 0) and 80 % of them are class 0: the NLL is least where
    # sigmoid(4 / T) = 0.8, i.e. T = 4 / ln(4)
    logits = np.tile([4.0, 0.0], (50, 1))
    labels = np.array([0] * 40 + [1] * 10)
    t = metrics.fit_temperature(logits, labels)
    assert t == pytest.approx(4 / math.log(4), rel=1e-5)
    assert metrics.nll(logits, labels, t) < metrics.nll(logits, labels, 1.0)
    # the scaled probabilities are then exactly the class frequency
    np.testing.assert_allclose(metrics.softmax(logits, t)[0], [0.8, 0.2], rtol=1e-5)


def test_majority_share_and_the_degenerate_warning():
    labels = np.array([0] * 57 + [1] * 20 + [2] * 23)
    assert metrics.majority_share(labels, 3) == 0.57
    one_class = np.zeros(100, np.int64)
    msg = metrics.degenerate_warning(labels, one_class, 3)
    assert msg.startswith("the model predicts class 0 for 100% of the examples (accuracy 0.570, majority share 0.570)")
    learned = labels.copy()
    learned[:10] = 1  # 90 right of 100
    assert metrics.degenerate_warning(labels, learned, 3) is None
    spread = np.array([0] * 50 + [1] * 25 + [2] * 25)  # 50 + 0 + 5 right: 0.55 < 0.57
    spread_labels = np.array([0] * 50 + [0] * 7 + [2] * 18 + [1] * 20 + [2] * 5)
    assert metrics.degenerate_warning(spread_labels, spread, 3) == \
        "accuracy 0.550 does not beat the majority share 0.570 (always answering the most frequent class)"
    level = spread_labels.copy()
    level[57:59] = 1  # two more right: 0.57, level with the majority share, is not better
    assert metrics.degenerate_warning(level, spread, 3).startswith("accuracy 0.570 does not beat the majority")


def test_a_temperature_outside_the_fitted_range_is_refused_in_words():
    lo, hi = metrics.TEMPERATURE_RANGE
    assert (lo, hi) == (0.05, 20.0)
    for ok in (lo, hi, 1, 2.5, np.float32(0.5)):
        assert metrics.check_temperature(ok, "T") == float(ok)
    # 1e-300 is 0 in float32 (NaN probabilities), 1e300 is inf (uniform ones)
    for bad in (0, 1e-300, 1e300, -1.0, float("nan"), float("inf"), 0.049, 20.01, True, "2", None):
        with pytest.raises(ValueError, match=rf"^T={re.escape(repr(bad))}; must be a number in \[0.05, 20\] "
                                             r"\(the range fit_temperature searches\)$"):
            metrics.check_temperature(bad, "T")


def _nll_ece_two_classes(groups, t):
    """float64 NLL and ECE at temperature ``t`` of two-class logits ``(margin, 0)``, from
    ``groups`` ``[(margin, examples, of them class 0), ...]``, each group in its own ECE bin."""
    n = sum(g[1] for g in groups)
    nll = ece = 0.0
    for margin, count, right in groups:
        p = 1 / (1 + math.exp(-margin / t))  # softmax((margin, 0) / t)[0]: the top class is class 0
        nll += -(right * math.log(p) + (count - right) * math.log(1 - p)) / n
        ece += count / n * abs(right / count - p)
    return nll, ece


def _two_class(groups):
    logits = np.concatenate([np.tile([m, 0.0], (c, 1)) for m, c, _ in groups])
    labels = np.concatenate([np.r_[np.zeros(r, np.int64), np.ones(c - r, np.int64)] for _, c, r in groups])
    return logits, labels


def test_the_temperature_is_fitted_only_on_a_split_that_can_support_it():
    assert metrics.MIN_TEMPERATURE_EXAMPLES == 100
    groups = [(4.0, 100, 80)]  # every example (4, 0), 80 % class 0: the NLL is least at T = 4 / ln 4
    logits, labels = _two_class(groups)
    t = 4 / math.log(4)
    (nll_1, ece_1), (nll_t, _) = _nll_ece_two_classes(groups, 1.0), _nll_ece_two_classes(groups, t)
    got = metrics.choose_temperature(logits, labels)
    assert got["temperature"] == pytest.approx(t, rel=1e-5)
    assert got["note"] == (f"fitted on 100 validation images: T = {t:.3g} (validation NLL {nll_1:.4f} -> "
                           f"{nll_t:.4f}, ECE {ece_1:.4f} -> 0.0000)")  # calibrated: confidence 0.8, accuracy 0.8
    # the same examples, one fewer than the minimum; then a small photo folder's validation split
    assert metrics.choose_temperature(logits[:99], labels[:99]) == {
        "temperature": None, "note": "not fitted: 99 validation image(s), fewer than 100"}
    assert metrics.choose_temperature(logits[:15], labels[:15], min_examples=100)["note"] == \
        "not fitted: 15 validation image(s), fewer than 100"
    assert metrics.choose_temperature(np.zeros((0, 3)), np.zeros(0, np.int64)) == {
        "temperature": None, "note": "not fitted: no validation split"}


def test_a_temperature_that_makes_the_validation_ece_worse_is_not_kept():
    # 100 examples at confidence 0.9 of which 90 are right (calibrated at T = 1), and 10 confidently
    # wrong ones (margin 10): the NLL wants T far above 1, which drops the 100 to about 0.56
    groups = [(math.log(9), 100, 90), (10.0, 10, 0)]
    logits, labels = _two_class(groups)
    grid = np.geomspace(*metrics.TEMPERATURE_RANGE, 400_001)  # the float64 oracle's minimum, by brute force
    margins = np.array([math.log(9), 10.0])[:, None] / grid
    nll_grid = (90 * np.logaddexp(0, -margins[0]) + 10 * np.logaddexp(0, margins[0])
                + 10 * np.logaddexp(0, margins[1])) / 110
    t = float(grid[np.argmin(nll_grid)])
    (nll_1, ece_1), (nll_t, ece_t) = _nll_ece_two_classes(groups, 1.0), _nll_ece_two_classes(groups, t)
    assert t > 5 and nll_t < nll_1 and ece_t > ece_1  # the case: a better NLL, a worse ECE
    got = metrics.choose_temperature(logits, labels)
    assert got["temperature"] is None
    m = re.fullmatch(r"not kept: T = ([\d.]+), fitted on 110 validation images, makes the validation split worse "
                     r"than T = 1 \(validation NLL ([\d.]+) -> ([\d.]+), ECE ([\d.]+) -> ([\d.]+)\)", got["note"])
    assert m, got["note"]
    assert float(m.group(1)) == pytest.approx(t, rel=2e-3)
    np.testing.assert_allclose([float(v) for v in m.groups()[1:]], [nll_1, nll_t, ece_1, ece_t], atol=1e-4)
