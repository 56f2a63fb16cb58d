"""A finished run's test results you can look at: the confusion matrix, per-class accuracy, and the
test images the model got most confidently wrong.

    from jaxcnn import results
    from jaxcnn.data import load_dataset
    from jaxcnn.runfolder import RunFolder

    dataset = load_dataset(**RunFolder("runs/a").read_config()["data"]["source"])
    results.write_test_results("runs/a", dataset)   # plots/confusion.png, plots/wrong.png, summary.json

``fit`` writes this report itself at the end of every run, from the scores it computed in
memory (``jaxcnn.report``). :func:`write_test_results` makes it again from the folder alone: it
restores the run's **best** checkpoint in this process and scores it on a dataset you give (the
run's own, to check a run or complete an old one; the confusion matrix's trace over its sum is
then the summary's ``test_accuracy``).
"""

from __future__ import annotations

import os
from typing import Union

import numpy as np

from jaxcnn import inference, report
from jaxcnn.data.core import Dataset
from jaxcnn.metrics import confusion_matrix, most_confidently_wrong, per_class_accuracy  # noqa: F401 (re-exported)
from jaxcnn.report import report_missing  # noqa: F401 (re-exported)
from jaxcnn.runfolder import RunFolder


def write_test_results(workdir: Union[str, os.PathLike], dataset: Dataset, k: int = 16, *,
                       which: str = "best") -> dict:
    """Score the run's best checkpoint on ``dataset.test`` (and ``dataset.val``, for the
    temperature) and write the end-of-run report (:func:`jaxcnn.report.write_report`).

    Writes ``plots/curves.png``, ``plots/confusion.png``, ``plots/wrong.png`` (the ``k`` most
    confidently wrong test images) and ``plots/reliability.png`` in the run folder, and adds the
    report's fields to its ``summary.json``: ``confusion_matrix`` (rows = true class, columns =
    predicted), ``per_class_accuracy``, ``per_class`` (precision / recall / F1 / support),
    ``macro_f1``, the majority shares, ``warning``, ``ece`` and, fitted on the validation split,
    ``temperature`` and ``ece_after_temperature``.

    The scores come from the checkpoint read back in this process: the confusion matrix's trace
    over its sum is the summary's ``test_accuracy`` (a check that the weights reported are the
    weights tested).

    Args:
      workdir: a run folder with a best checkpoint (``jaxcnn.inference.restore``).
      dataset: the run's dataset (its ``test`` and ``val`` splits are scored; its ``class_names``
        label the plots).
      k: how many wrong images to draw (>= 1).
      which: the checkpoint (``"best"``: the weights of the summary's ``test_accuracy``).

    Returns:
      The updated summary.
    """
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"write_test_results: k={k!r}; must be an int >= 1")
    folder = RunFolder(workdir)
    run = inference.restore(workdir, which=which, temperature=False)  # (logits only: a bad recorded T is replaced)
    batch_size = int(run.config.get("fit", {}).get("eval_batch_size") or 256)
    names = tuple(dataset.class_names)

    def logits(split):
        images = split.read(np.arange(len(split)))  # in memory, or decoded from disk (a streamed split)
        out = run.predict(images, batch_size=batch_size, return_logits=True)  # (N, K); the run's flip TTA, as fit's
        if out.shape[-1] != len(names):
            raise ValueError(f"write_test_results: the model of {workdir} has {out.shape[-1]} outputs but the "
                             f"dataset {dataset.name!r} has {len(names)} classes")
        return images, out

    test_images, test_logits = logits(dataset.test)
    _, val_logits = logits(dataset.val) if len(dataset.val) else (None, None)
    summary = folder.read_summary()
    try:
        history = folder.read_history()
    except FileNotFoundError:  # (a run folder made by hand, without a history: curves with nothing to draw)
        history = []
    summary.update(report.write_report(folder, history=history, summary=summary, class_names=names,
                                       test_labels=dataset.test.labels, test_logits=test_logits,
                                       test_images=test_images, k=k,
                                       val_labels=None if val_logits is None else dataset.val.labels,
                                       val_logits=val_logits,
                                       lr_schedule=run.config.get("fit", {}).get("lr_schedule", "plateau"),
                                       flip_tta=run.flip_tta,
                                       ema_decay=run.config.get("fit", {}).get("ema_decay", 0.0),
                                       recipe=report.recipe_of(run.config)))
    folder.write_summary(summary)
    return summary
