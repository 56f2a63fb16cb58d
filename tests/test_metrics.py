"""jaxcnn.metrics against counts and values worked out by hand."""

import math

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
