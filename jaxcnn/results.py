"""A finished run's test results you can look at: the confusion matrix, per-class accuracy, and the
test images the model got most confidently wrong.

    from jaxcnn import results
    from jaxcnn.data import load_dataset
    from jaxcnn.runfolder import RunFolder

    dataset = load_dataset(**RunFolder("runs/a").read_config()["data"]["source"])
    results.write_test_results("runs/a", dataset)   # plots/confusion.png, plots/wrong.png, summary.json

The ``cifar10`` and ``finetune`` commands call :func:`write_test_results` at the end of every
run (each fine-tuning phase). It scores the run's **best** checkpoint, as ``fit`` does for the
summary's ``test_accuracy``, so the confusion matrix's trace over its sum is that accuracy.
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from jaxcnn import inference, viz
from jaxcnn.data.core import Dataset
from jaxcnn.runfolder import RunFolder

CURVES_PNG = "curves.png"  # (jaxcnn.viz.plot_curves)
CONFUSION_PNG = "confusion.png"
WRONG_PNG = "wrong.png"


def report_missing(workdir: Union[str, os.PathLike]) -> list[str]:
    """What of the end-of-run report (``plots/curves.png`` and :func:`write_test_results`' plots and
    per-class results) a run folder with a test-scored ``summary.json`` lacks; ``[]`` when it is
    complete, or when there is no test score to report on (no summary yet, or a run that
    diverged before its first good epoch)."""
    folder = RunFolder(workdir)
    summary = folder.read_summary()
    if summary.get("test_accuracy") is None:
        return []
    missing = [f"plots/{name}" for name in (CURVES_PNG, CONFUSION_PNG, WRONG_PNG)
               if not folder.plot_path(name).is_file()]
    return missing + [f"summary.json's {k}" for k in ("per_class_accuracy", "confusion_matrix") if k not in summary]


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


def write_test_results(workdir: Union[str, os.PathLike], dataset: Dataset, k: int = 16, *,
                       which: str = "best") -> dict:
    """Score the run's best checkpoint on ``dataset.test`` and record what it got wrong.

    Writes ``plots/confusion.png`` (:func:`jaxcnn.viz.plot_confusion`) and ``plots/wrong.png``
    (:func:`jaxcnn.viz.plot_wrong`, the ``k`` most confidently wrong test images) in the run
    folder, and adds to its ``summary.json``: ``per_class_accuracy`` ({class name: accuracy})
    and ``confusion_matrix`` (K lists of K counts, rows = true class, columns = predicted).

    Args:
      workdir: a run folder with a best checkpoint (``jaxcnn.inference.restore``).
      dataset: the run's dataset (its ``test`` split is scored; its ``class_names`` label the plots).
      k: how many wrong images to draw (>= 1).
      which: the checkpoint (``"best"``: the weights of the summary's ``test_accuracy``).

    Returns:
      The updated summary.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"write_test_results: k={k!r}; must be an int >= 1")
    folder = RunFolder(workdir)
    run = inference.restore(workdir, which=which)
    batch_size = int(run.config.get("fit", {}).get("eval_batch_size") or 256)
    test = dataset.test
    images = test.read(np.arange(len(test)))  # in memory, or decoded from disk (a streamed split)
    probs = run.predict(images, batch_size=batch_size)  # (N, K)
    names = tuple(dataset.class_names)
    if probs.shape[-1] != len(names):
        raise ValueError(f"write_test_results: the model of {workdir} has {probs.shape[-1]} outputs but the "
                         f"dataset {dataset.name!r} has {len(names)} classes")
    pred = probs.argmax(-1)
    confusion = confusion_matrix(test.labels, pred, len(names))
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    viz.plot_confusion(confusion, names, path=folder.plot_path(CONFUSION_PNG),
                       title=f"{folder.path.name}: test accuracy {accuracy:.4f} ({len(test)} images, "
                             f"{run.which} epoch {run.epoch})")
    idx = most_confidently_wrong(test.labels, probs, k)
    viz.plot_wrong(images[idx], test.labels[idx], pred[idx], probs[idx, pred[idx]], names,
                   path=folder.plot_path(WRONG_PNG),
                   title=f"{folder.path.name}: the {len(idx)} most confidently wrong of {len(test)} test images")
    summary = folder.read_summary()
    summary["per_class_accuracy"] = per_class_accuracy(confusion, names)
    summary["confusion_matrix"] = confusion.tolist()
    folder.write_summary(summary)
    return summary
