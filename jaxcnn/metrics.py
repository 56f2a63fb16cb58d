"""What a run's predictions say beyond accuracy: per-class precision / recall / F1, the majority
baseline, calibration (expected calibration error, a reliability table, a fitted temperature).

Plain NumPy over host arrays (float64 inside), no plotting and no files: the end-of-run report
and ``jaxcnn.predict`` call these on values they already hold.

    probs = run.predict(images)                       # (N, K) softmax probabilities
    per_class(confusion_matrix(labels, probs.argmax(-1), K))
    expected_calibration_error(probs, labels)         # 15 equal-width confidence bins
    t = fit_temperature(logits_val, labels_val)       # on the validation split, never the test split
    choose_temperature(logits_val, labels_val)        # the fit, or why it is not used
"""

from __future__ import annotations

import math

import numpy as np

#: The bins of :func:`expected_calibration_error` (Guo et al., "On Calibration of Modern Neural
#: Networks", 2017, use 15).
ECE_BINS = 15

#: The temperatures :func:`fit_temperature` searches and a run may apply (``[lo, hi]``): far
#: from float32's limits (``logits / T`` neither overflows nor rounds to 0), and wide enough for
#: any model the report fits (a model at chance reaches ``hi``, the near-uniform answer).
TEMPERATURE_RANGE = (0.05, 20.0)

#: The fewest validation examples :func:`choose_temperature` fits a temperature on. Whether the
#: fit helped is judged by the ECE, over :data:`ECE_BINS` bins: with fewer than about 100
#: examples a bin holds a handful (100 / 15 is about 7), one image moves its accuracy by a
#: seventh, and the ECE of ``T = 1`` and of the fit differ by less than that noise; the fitted
#: ``T`` then follows those few images, and can make the test split's calibration worse.
MIN_TEMPERATURE_EXAMPLES = 100


def _labels(labels, n: int, what: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{what}: labels must be integers of shape ({n},), got {labels.dtype} {labels.shape}")
    return labels.astype(np.int64)


def _probs(probs, what: str) -> np.ndarray:
    probs = np.asarray(probs, np.float64)
    if probs.ndim != 2 or probs.shape[0] == 0:
        raise ValueError(f"{what}: probs must be (N, K) with N >= 1, got shape {probs.shape}")
    return probs


def confusion_matrix(true, pred, num_classes: int) -> np.ndarray:
    """int64 ``(K, K)`` counts: ``[i, j]`` = examples of true class ``i`` predicted as ``j``."""
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    if true.shape != pred.shape or true.ndim != 1:
        raise ValueError(f"confusion_matrix: true {true.shape} and pred {pred.shape} must be the same (N,) shape")
    for name, a in (("true", true), ("pred", pred)):
        if a.size and (a.min() < 0 or a.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} has labels outside [0, {num_classes})")
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (true, pred), 1)
    return counts


def per_class_accuracy(confusion: np.ndarray, class_names) -> dict:
    """``{class name: correct / examples of that class}`` (None for a class the split lacks)."""
    confusion = np.asarray(confusion)
    totals = confusion.sum(axis=1)
    return {str(name): (float(confusion[k, k] / totals[k]) if totals[k] else None)
            for k, name in enumerate(class_names)}


def most_confidently_wrong(true, probs, k: int) -> np.ndarray:
    """Indices of up to ``k`` wrongly predicted examples, highest predicted probability first
    (ties: the lower index first)."""
    probs = np.asarray(probs)
    pred, conf = probs.argmax(-1), probs.max(-1)
    wrong = np.flatnonzero(pred != np.asarray(true))
    order = np.argsort(-conf[wrong], kind="stable")
    return wrong[order[:k]]


def per_class(confusion, class_names=None) -> dict:
    """Precision, recall and F1 of each class from a confusion matrix ``[true, predicted]``
    ``(K, K)``, and their macro averages.

    Returns ``{"classes": {name: {"precision", "recall", "f1", "support"}}, "macro_precision",
    "macro_recall", "macro_f1"}``. A class never predicted has precision None (0/0), one absent
    from the split recall None; F1 = 2 TP / (predicted + support), so a class of the split that is
    never predicted has F1 0 (a model that answers one class gets a macro F1 near 0), and only a
    class neither present nor predicted has F1 None. Macro averages are over the classes whose
    value is defined.
    """
    c = np.asarray(confusion, np.int64)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"per_class: confusion must be a square (K, K) matrix, got shape {c.shape}")
    k = c.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"per_class: {len(names)} class_names for a {k}x{k} confusion matrix")
    tp, predicted, support = np.diag(c), c.sum(axis=0), c.sum(axis=1)
    classes = {}
    for i, name in enumerate(names):
        p = float(tp[i] / predicted[i]) if predicted[i] else None
        r = float(tp[i] / support[i]) if support[i] else None
        f = float(2 * tp[i] / (predicted[i] + support[i])) if predicted[i] + support[i] else None
        classes[name] = {"precision": p, "recall": r, "f1": f, "support": int(support[i])}

    def macro(key):
        vals = [v[key] for v in classes.values() if v[key] is not None]
        return float(np.mean(vals)) if vals else None

    return {"classes": classes, "macro_precision": macro("precision"), "macro_recall": macro("recall"),
            "macro_f1": macro("f1")}


def majority_share(labels, num_classes: int) -> float:
    """The accuracy of always answering the split's most frequent class."""
    labels = np.asarray(labels, np.int64)
    if labels.size == 0:
        raise ValueError("majority_share: labels is empty")
    return float(np.bincount(labels, minlength=num_classes).max() / labels.size)


def degenerate_warning(labels, predictions, num_classes: int, *, one_class_share: float = 0.9) -> str | None:
    """A one-line warning when a model's predictions on a split carry no more than the class
    frequencies: one class for at least ``one_class_share`` of the examples, or an accuracy that
    does not beat :func:`majority_share`. None when the model learned something."""
    labels, predictions = np.asarray(labels, np.int64), np.asarray(predictions, np.int64)
    if labels.shape != predictions.shape or labels.ndim != 1 or labels.size == 0:
        raise ValueError(f"degenerate_warning: labels {labels.shape} and predictions {predictions.shape} "
                         f"must be the same non-empty (N,) shape")
    counts = np.bincount(predictions, minlength=num_classes)
    top, share = int(counts.argmax()), float(counts.max() / predictions.size)
    accuracy, baseline = float(np.mean(labels == predictions)), majority_share(labels, num_classes)
    if share >= one_class_share:
        return (f"the model predicts class {top} for {share:.0%} of the examples (accuracy {accuracy:.3f}, "
                f"majority share {baseline:.3f}): it has not learned to tell the classes apart")
    if accuracy <= baseline:
        return (f"accuracy {accuracy:.3f} does not beat the majority share {baseline:.3f} (always answering the "
                f"most frequent class)")
    return None


def reliability(probs, labels, bins: int = ECE_BINS) -> dict:
    """The reliability table of ``probs`` ``(N, K)`` against ``labels`` ``(N,)``: the top-class
    confidence cut into ``bins`` equal-width bins of (0, 1] (bin ``b`` holds confidences in
    ``(b/bins, (b+1)/bins]``), each with ``count``, mean ``confidence`` and ``accuracy`` (None
    when empty). ``{"edges": (bins+1,), "count", "confidence", "accuracy"}`` as lists."""
    probs = _probs(probs, "reliability")
    labels = _labels(labels, probs.shape[0], "reliability")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"reliability: bins={bins!r}; must be an int >= 1")
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    which = np.clip(np.ceil(conf * bins).astype(np.int64) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    conf_sum = np.bincount(which, weights=conf, minlength=bins)
    acc_sum = np.bincount(which, weights=correct.astype(np.float64), minlength=bins)
    return {"edges": [i / bins for i in range(bins + 1)], "count": [int(c) for c in count],
            "confidence": [float(s / c) if c else None for s, c in zip(conf_sum, count)],
            "accuracy": [float(s / c) if c else None for s, c in zip(acc_sum, count)]}


def expected_calibration_error(probs, labels, bins: int = ECE_BINS) -> float:
    """ECE: ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over :func:`reliability`'s bins."""
    table = reliability(probs, labels, bins)
    n = sum(table["count"])
    return float(sum(c / n * abs(a - f) for c, a, f in zip(table["count"], table["accuracy"], table["confidence"])
                     if c))


def softmax(logits, temperature: float = 1.0) -> np.ndarray:
    """``softmax(logits / temperature)`` in float64, ``(N, K)``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def nll(logits, labels, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``labels`` under ``softmax(logits / temperature)``."""
    z = np.asarray(logits, np.float64) / float(temperature)
    labels = _labels(labels, z.shape[0], "nll")
    m = z.max(axis=-1, keepdims=True)
    log_norm = (m + np.log(np.exp(z - m).sum(axis=-1, keepdims=True)))[:, 0]
    return float(np.mean(log_norm - z[np.arange(z.shape[0]), labels]))


def check_temperature(t, what: str) -> float:
    """``t`` as a float when it is a real number in :data:`TEMPERATURE_RANGE`; ValueError naming
    ``what`` and the value otherwise (0, ``1e-300`` or ``1e300`` would give NaN or uniform
    probabilities in float32)."""
    lo, hi = TEMPERATURE_RANGE
    ok = not isinstance(t, bool) and isinstance(t, (int, float, np.floating, np.integer)) and lo <= t <= hi
    if not ok:
        raise ValueError(f"{what}={t!r}; must be a number in [{lo:g}, {hi:g}] (the range fit_temperature searches)")
    return float(t)


def fit_temperature(logits, labels, *, lo: float = TEMPERATURE_RANGE[0], hi: float = TEMPERATURE_RANGE[1],
                    tol: float = 1e-6) -> float:
    """The temperature ``T`` in ``[lo, hi]`` that minimises :func:`nll` of ``logits / T`` (Guo et
    al.'s temperature scaling), by golden-section search on ``log T`` (the NLL is unimodal in T).

    Fit it on the validation split, never on the split it is judged on. A model at chance wants
    ``T -> inf`` (the uniform answer): the search then returns ``hi``.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2 or logits.shape[0] == 0:
        raise ValueError(f"fit_temperature: logits must be (N, K) with N >= 1, got shape {logits.shape}")
    labels = _labels(labels, logits.shape[0], "fit_temperature")
    if not 0 < lo < hi:
        raise ValueError(f"fit_temperature: need 0 < lo < hi, got lo={lo!r}, hi={hi!r}")
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    f = lambda u: nll(logits, labels, math.exp(u))  # noqa: E731
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(c), f(d)
    while b - a > tol:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(d)
    return float(math.exp((a + b) / 2))


def choose_temperature(logits, labels, *, min_examples: int = MIN_TEMPERATURE_EXAMPLES) -> dict:
    """The temperature a run applies, fitted on its validation split ``logits`` ``(N, K)`` / ``labels``
    ``(N,)``, or why it applies none: ``{"temperature": T or None, "note": one sentence}``.

    * not fitted: fewer than ``min_examples`` examples (:data:`MIN_TEMPERATURE_EXAMPLES`);
    * not kept: the fit makes the validation split worse than ``T = 1``. The fit minimises the
      validation NLL over a range holding 1, so its NLL is never higher (checked all the same);
      "worse" is then a higher validation ECE: the fit traded the calibration the report shows for
      a lower NLL (a few confidently wrong examples pull the NLL);
    * kept otherwise (an equal ECE included), with the validation NLL and ECE before and after.

    The test split never enters the decision.
    """
    logits = np.asarray(logits, np.float64)
    if logits.ndim != 2:
        raise ValueError(f"choose_temperature: logits must be (N, K), got shape {logits.shape}")
    n = logits.shape[0]
    if n < min_examples:
        why = "no validation split" if n == 0 else f"{n} validation image(s), fewer than {min_examples}"
        return {"temperature": None, "note": f"not fitted: {why}"}
    labels = _labels(labels, n, "choose_temperature")
    t = fit_temperature(logits, labels)
    nll_1, nll_t = nll(logits, labels), nll(logits, labels, t)
    ece_1 = expected_calibration_error(softmax(logits), labels)
    ece_t = expected_calibration_error(softmax(logits, t), labels)
    change = f"validation NLL {nll_1:.4f} -> {nll_t:.4f}, ECE {ece_1:.4f} -> {ece_t:.4f}"
    if nll_t > nll_1 or ece_t > ece_1:
        return {"temperature": None, "note": f"not kept: T = {t:.3g}, fitted on {n} validation images, makes "
                                             f"the validation split worse than T = 1 ({change})"}
    return {"temperature": t, "note": f"fitted on {n} validation images: T = {t:.3g} ({change})"}
