"""The end-of-run report from values in memory: its summary fields against hand counts, its plots."""

import logging

import numpy as np
import pytest
from PIL import Image

from jaxcnn import report
from jaxcnn.runfolder import RunFolder

HISTORY = [{"epoch": e, "train_loss": 2.0 / e, "val_loss": 2.2 / e, "train_accuracy": 0.3 * e,
            "val_accuracy": 0.28 * e, "lr": 1e-3} for e in (1, 2, 3)]
SUMMARY = {"best_epoch": 3, "stop_epoch": 3, "stopped_early": False}
NAMES = ("cat", "dog", "owl")


def _logits(pred, confidence):
    """Logits whose softmax gives ``pred`` probability ``confidence`` and splits the rest evenly."""
    n = len(pred)
    probs = np.full((n, 3), 0.0)
    probs[:] = ((1 - np.asarray(confidence)) / 2)[:, None]
    probs[np.arange(n), pred] = confidence
    return np.log(probs)


def _not_blank(path):
    a = np.asarray(Image.open(path).convert("L"), np.float64)
    return a.std() > 5


def test_the_report_counts_what_was_predicted_and_draws_it(tmp_path):
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])  # right: 3 + 2 + 2 = 7
    logits = _logits(pred, np.full(10, 0.9))
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    val_labels = np.array([0, 1, 2, 0])
    val_logits = _logits(np.array([0, 1, 2, 1]), np.full(4, 0.9))  # 3 of 4 right, all at 0.9: overconfident
    folder = RunFolder(tmp_path / "run")
    out = report.write_report(folder, history=HISTORY, summary=SUMMARY, class_names=NAMES, test_labels=labels,
                              test_logits=logits, test_images=images, val_labels=val_labels, val_logits=val_logits)
    assert out["confusion_matrix"] == [[3, 1, 0], [1, 2, 0], [0, 1, 2]]
    assert out["per_class"]["cat"] == {"precision": 0.75, "recall": 0.75, "f1": 0.75, "support": 4}
    assert out["per_class"]["dog"]["precision"] == pytest.approx(2 / 4)
    assert out["per_class"]["owl"] == {"precision": 1.0, "recall": pytest.approx(2 / 3), "f1": pytest.approx(0.8),
                                       "support": 3}
    assert out["macro_f1"] == pytest.approx((0.75 + 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3) + 0.8) / 3)
    assert out["test_majority_share"] == 0.4 and out["val_majority_share"] == 0.5 and out["warning"] is None
    assert out["ece"] == pytest.approx(abs(0.7 - 0.9))  # one bin: accuracy 0.7, confidence 0.9
    # 4 validation images are too few to fit a temperature on: none, and the summary says why
    assert (out["temperature"], out["ece_after_temperature"]) == (None, None)
    assert out["temperature_note"] == "not fitted: 4 validation image(s), fewer than 100"
    for name in report.REPORT_PLOTS:
        assert _not_blank(folder.plot_path(name)), name


def test_a_model_that_answers_one_class_is_reported_as_such(tmp_path, caplog):
    labels = np.array([0] * 6 + [1] * 2 + [2] * 2)
    logits = _logits(np.zeros(10, np.int64), np.full(10, 0.5))
    with caplog.at_level(logging.WARNING, logger="jaxcnn"):
        out = report.write_report(RunFolder(tmp_path / "run"), history=HISTORY, summary=SUMMARY, class_names=NAMES,
                                  test_labels=labels, test_logits=logits,
                                  test_images=np.zeros((10, 8, 8, 3), np.uint8))
    assert out["warning"] == ("test split: the model predicts class 0 for 100% of the examples (accuracy 0.600, "
                              "majority share 0.600): it has not learned to tell the classes apart")
    assert [r.getMessage() for r in caplog.records] == [f"warning: {out['warning']}"]
    assert out["per_class"]["dog"]["precision"] is None
    assert (out["temperature"], out["temperature_note"]) == (None, "not fitted: no validation split")


def test_logits_that_do_not_fit_the_labels_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"write_report: test_logits has shape \(4, 2\); expected \(4, 3\)"):
        report.write_report(RunFolder(tmp_path), history=HISTORY, summary=SUMMARY, class_names=NAMES,
                            test_labels=np.zeros(4, np.int64), test_logits=np.zeros((4, 2)),
                            test_images=np.zeros((4, 8, 8, 3), np.uint8))


def test_a_temperature_fitted_on_enough_validation_images_is_kept_and_applied_to_the_test_ece(tmp_path):
    # validation: 120 images, each at confidence 0.9 for its predicted class, 90 of them right
    val_labels = np.arange(120) % 3
    val_pred = np.where(np.arange(120) < 90, val_labels, (val_labels + 1) % 3)
    val_logits = _logits(val_pred, np.full(120, 0.9))  # overconfident: T > 1 cools it to about 0.75
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    pred = np.array([0, 0, 0, 1, 1, 1, 0, 2, 2, 1])
    logits = _logits(pred, np.full(10, 0.9))
    out = report.write_report(RunFolder(tmp_path / "run"), history=HISTORY, summary=SUMMARY, class_names=NAMES,
                              test_labels=labels, test_logits=logits, test_images=np.zeros((10, 8, 8, 3), np.uint8),
                              val_labels=val_labels, val_logits=val_logits)
    t = out["temperature"]
    # the float64 oracle: every validation image has logits log(0.9), log(0.05), log(0.05); at T its top
    # probability is 1 / (1 + 2 (0.05 / 0.9) ** (1 / T)), and the NLL is least where that equals 0.75
    top = lambda t: 1 / (1 + 2 * (0.05 / 0.9) ** (1 / t))  # noqa: E731
    assert top(t) == pytest.approx(0.75, abs=1e-5)
    assert out["temperature_note"].startswith(f"fitted on 120 validation images: T = {t:.3g} (validation NLL ")
    assert out["temperature_note"].endswith(f"ECE {0.9 - 0.75:.4f} -> 0.0000)")
    assert out["ece"] == pytest.approx(0.9 - 0.7)  # the test split: 7 of 10 right, all at 0.9
    assert out["ece_after_temperature"] == pytest.approx(abs(0.7 - top(t)), abs=1e-6)
