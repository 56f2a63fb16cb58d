"""The end-of-run report: what a finished run's predictions say, written once from values in memory.

Given the run's history and the best weights' predictions on the test split (and on the
validation split, for the temperature), :func:`write_report` draws into the run's ``plots/``

* ``curves.png`` — loss, accuracy and learning rate per epoch;
* ``confusion.png`` — the test confusion matrix, with per-class precision / recall / F1 beside it
  in the summary;
* ``wrong.png`` — the most confidently wrong test images;
* ``reliability.png`` — the reliability diagram of the test split, before and after a
  temperature fitted on the validation split;

and returns what to add to ``summary.json``: ``confusion_matrix``, ``per_class_accuracy``,
``per_class`` (precision, recall, F1, support), ``macro_f1``, the majority share of the test and
validation splits, a ``warning`` when the model predicts one class or does not beat the majority
share (also logged), ``ece`` before and after temperature scaling (``ece_after_temperature``), the
``temperature`` (None: the run applies none) and ``temperature_note``, which says why
(``jaxcnn.metrics.choose_temperature``: fitted and kept, not fitted on a small validation split,
or not kept where it made the validation split worse), and ``recipe``: the training recipe's
ingredients the run had on (:func:`recipe_of`; absent for the seed's recipe; the curves' title
lists them too). Summaries written before the note have a
``temperature`` fitted on any validation split; they read as before.

It reads nothing back from disk and scores nothing twice: the caller passes the probabilities
it computed with the weights the summary reports.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Optional

import numpy as np

from jaxcnn import metrics, viz
from jaxcnn.metrics import confusion_matrix, most_confidently_wrong, per_class_accuracy
from jaxcnn.runfolder import RunFolder

log = logging.getLogger("jaxcnn")

CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
WRONG_PNG = "wrong.png"
RELIABILITY_PNG = "reliability.png"
#: Every plot the report writes, in ``plots/``.
REPORT_PLOTS = (CURVES_PNG, CONFUSION_PNG, WRONG_PNG, RELIABILITY_PNG)


def report_missing(folder: RunFolder) -> list[str]:
    """What of the end-of-run report a run folder with a test-scored ``summary.json`` lacks (its
    plots, its per-class results); ``[]`` when it is complete, or when there is no test score to
    report on (no summary yet, or a run that diverged before its first good epoch)."""
    summary = folder.read_summary()
    if summary.get("test_accuracy") is None:
        return []
    missing = [f"plots/{name}" for name in REPORT_PLOTS if not folder.plot_path(name).is_file()]
    return missing + [f"summary.json's {k}" for k in ("per_class_accuracy", "confusion_matrix") if k not in summary]


def recipe_of(config: dict) -> list[str]:
    """The training recipe's ingredients that a run's ``config.json`` (``RunFolder.read_config()``) has
    on, as the report says them: ``["label smoothing 0.1", "mixup 0.2", "cutmix 1", "warm-up + cosine",
    "AdamW weight decay 0.05", "EMA 0.99", "flip TTA", "4 batches an update"]`` at most; ``[]``: none
    (the seed's recipe)."""
    fit = config.get("fit") or {}
    weight_decay = (config.get("optimizer") or {}).get("weight_decay") or 0.0
    k = fit.get("grad_accum_steps") or 1
    said = [(fit.get("label_smoothing"), f"label smoothing {fit.get('label_smoothing') or 0:g}"),
            (fit.get("mixup_alpha"), f"mixup {fit.get('mixup_alpha') or 0:g}"),
            (fit.get("cutmix_alpha"), f"cutmix {fit.get('cutmix_alpha') or 0:g}"),
            (fit.get("lr_schedule") == "cosine", "warm-up + cosine" if fit.get("warmup_epochs") else "cosine"),
            (weight_decay, f"AdamW weight decay {weight_decay:g}"),
            (fit.get("ema_decay"), f"EMA {fit.get('ema_decay') or 0:g}"),
            (fit.get("flip_tta"), "flip TTA"),
            (k > 1, f"{k} batches an update")]
    return [text for on, text in said if on]


def write_report(folder: RunFolder, *, history: Sequence[dict], summary: dict, class_names: Sequence[str],
                 test_labels, test_logits, test_images, val_labels=None, val_logits=None,
                 k: int = 16, check: Optional[Callable[[], None]] = None, lr_schedule: str = "plateau",
                 flip_tta: bool = False, ema_decay: float = 0.0, recipe: Sequence[str] = ()) -> dict:
    """Write the report's plots into ``folder``'s ``plots/`` and return the summary fields.

    Args:
      folder: the run folder (its ``plots/`` is created).
      history: the per-epoch rows (``history.json``).
      summary: the run's summary so far (``best_epoch``, ``stop_epoch``, ``stopped_early`` mark
        the curves); not changed.
      class_names: ``K`` names.
      test_labels, test_logits: int ``(N,)`` and float ``(N, K)``: the reported weights' logits
        on the test split.
      test_images: uint8 ``(N, H, W, C)`` (for the wrong images; only ``k`` are read when it is
        a callable ``rows -> images``).
      val_labels, val_logits: the validation split's, to fit the temperature
        (``jaxcnn.metrics.choose_temperature``; None: no temperature, and the note says so).
      k: how many wrong images to draw.
      check: called before each plot (``fit`` raises ``RunInterrupted`` from it when a signal came).
      lr_schedule: the run's ``fit.lr_schedule`` (the curves' learning-rate panel says it).
      flip_tta: the run's ``fit.flip_tta``: the logits are the log mean probabilities of each image
        and its mirror (``jaxcnn.tta``); the confusion and calibration titles say "flip TTA".
      ema_decay: the run's ``fit.ema_decay``: > 0, the logits are the weight EMA's (its weights and
        BatchNorm statistics); the confusion and calibration titles say "EMA weights (decay D)".
      recipe: :func:`recipe_of` the run's config: the curves' title lists it, and the summary gets
        it as ``"recipe"`` (absent when empty: the seed's recipe).
    """
    check = check or (lambda: None)
    names = tuple(str(n) for n in class_names)
    test_logits = np.asarray(test_logits, np.float64)
    test_labels = np.asarray(test_labels, np.int64)
    if test_logits.ndim != 2 or test_logits.shape != (len(test_labels), len(names)):
        raise ValueError(f"write_report: test_logits has shape {test_logits.shape}; expected "
                         f"({len(test_labels)}, {len(names)}) for {len(test_labels)} labels and {len(names)} classes")
    probs = metrics.softmax(test_logits)
    pred = probs.argmax(-1)
    confusion = confusion_matrix(test_labels, pred, len(names))
    accuracy = float(np.trace(confusion) / max(confusion.sum(), 1))
    prf = metrics.per_class(confusion, names)
    out = {"confusion_matrix": confusion.tolist(), "per_class_accuracy": per_class_accuracy(confusion, names),
           "per_class": prf["classes"], "macro_f1": prf["macro_f1"],
           "test_majority_share": metrics.majority_share(test_labels, len(names))}
    warning = metrics.degenerate_warning(test_labels, pred, len(names))
    out["warning"] = None if warning is None else f"test split: {warning}"
    if warning is not None:
        log.warning("warning: %s", out["warning"])

    # calibration: ECE of the test split, before and after a temperature fitted on the validation split
    table = metrics.reliability(probs, test_labels)
    out["ece"] = metrics.expected_calibration_error(probs, test_labels)
    after = None
    if val_logits is not None and len(val_logits):
        val_labels = np.asarray(val_labels, np.int64)
        out["val_majority_share"] = metrics.majority_share(val_labels, len(names))
        chosen = metrics.choose_temperature(val_logits, val_labels)
    else:
        chosen = metrics.choose_temperature(np.zeros((0, len(names))), np.zeros(0, np.int64))
    # (both keys always: a report made again over an older summary replaces its temperature)
    out["temperature"], out["temperature_note"], out["ece_after_temperature"] = None, chosen["note"], None
    if chosen["temperature"] is not None:
        scaled = metrics.softmax(test_logits, chosen["temperature"])
        after = metrics.reliability(scaled, test_labels)
        out["temperature"] = chosen["temperature"]
        out["ece_after_temperature"] = metrics.expected_calibration_error(scaled, test_labels)

    name = folder.path.name
    tta = (f", EMA weights (decay {ema_decay:g})" if ema_decay else "") + (", flip TTA" if flip_tta else "")
    check()
    if recipe:
        out["recipe"] = list(recipe)
    viz.plot_curves(list(history), path=folder.plot_path(CURVES_PNG), summary=summary,
                    title=f"{name}: training curves" + (f" ({', '.join(recipe)})" if recipe else ""),
                    lr_schedule=lr_schedule)
    check()
    viz.plot_confusion(confusion, names, path=folder.plot_path(CONFUSION_PNG),
                       title=f"{name}: test accuracy {accuracy:.4f} ({len(test_labels)} images, "
                             f"macro F1 {prf['macro_f1'] if prf['macro_f1'] is not None else float('nan'):.3f}, "
                             f"majority share {out['test_majority_share']:.3f}{tta})")
    check()
    idx = most_confidently_wrong(test_labels, probs, k)
    images = test_images(idx) if callable(test_images) else np.asarray(test_images)[idx]
    viz.plot_wrong(images, test_labels[idx], pred[idx], probs[idx, pred[idx]], names,
                   path=folder.plot_path(WRONG_PNG),
                   title=f"{name}: the {len(idx)} most confidently wrong of {len(test_labels)} test images")
    check()
    ece_text = f"ECE {out['ece']:.3f}" + (f"; temperature {out['temperature_note'].split(' (')[0]}" if after is None
                                          else f", {out['ece_after_temperature']:.3f} at T = {out['temperature']:.2f}")
    viz.plot_reliability(table, after=after, path=folder.plot_path(RELIABILITY_PNG),
                         title=f"{name}: test calibration ({ece_text}{tta})")
    check()
    return out

