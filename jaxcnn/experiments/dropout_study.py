"""The dropout study: the seed's CIFAR CNN with no dropout, the seed's dropout, spatial dropout
and DropBlock, trained on the same data subset with the same seed and budget.

    python -m jaxcnn.experiments.dropout_study                       # --preset default, offline data
    python -m jaxcnn.experiments.dropout_study --export experiments/dropout_study
    python -m jaxcnn.experiments.dropout_study --preset smoke        # seconds; what the test runs

The seed claims (question 1) that dropout shrinks the gap between training and validation
accuracy. This measures it. Every variant gets the same training subset, initial weights
(same seed; the models differ only in where they drop), batch order, epochs and
learning rate; **no early stopping, no LR reduction, no augmentation** (augmentation is a
regulariser of its own and would hide the effect), so each runs its full budget and the
numbers are those of the last epoch. For the same reason the study takes none of the training
recipe's flags (label smoothing, mixup, cutmix, EMA, weight decay, ...: each a regulariser or an
average of its own; they are on ``cifar10`` and ``finetune``). Variants
(``jaxcnn.models.cifar_cnn.CifarCNN``):

* ``none``      — no dropout anywhere;
* ``dropout``   — the seed: element-wise dropout 0.25 after each conv block, 0.5 before the last dense;
* ``spatial``   — spatial dropout 0.25 (whole feature maps) after each conv block, 0.5 dense;
* ``dropblock`` — DropBlock 0.25 (3×3 blocks) after each conv block, 0.5 dense.

Reported per variant: the final **train accuracy measured in inference mode** (final
weights, dropout off, on the whole training subset), the final validation accuracy and
their gap; also the running train accuracy of the last epoch (dropout on, as Keras'
``fit`` prints it, which understates what the model has learnt), the best validation
accuracy and its epoch, and the test accuracy of the best-validation-loss weights.

Writes ``<workdir>/study.json``, ``study.csv``, ``study.md`` (a Markdown table), and
``plots/val_curves.png``; each variant's full run record (``jaxcnn.train.fit``: history,
summary, checkpoints, ``plots/curves.png``) is in ``<workdir>/<variant>/``. ``--export DIR``
copies everything but the checkpoints and TensorBoard logs to ``DIR``.

Measured results, hardware and time: ``experiments/dropout_study/README.md``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib
import platform
import shutil
import sys
import time
from typing import Any, Optional

from jaxcnn.cli import ArgumentParser, description
from jaxcnn.experiments.flags import add_host_memory_flag, add_max_loss_flag

VARIANTS: dict[str, dict[str, Any]] = {
    "none": dict(conv_dropout="none", conv_dropout_rate=0.0, dense_dropout=0.0),
    "dropout": dict(conv_dropout="dropout", conv_dropout_rate=0.25, dense_dropout=0.5),
    "spatial": dict(conv_dropout="spatial", conv_dropout_rate=0.25, dense_dropout=0.5),
    "dropblock": dict(conv_dropout="dropblock", conv_dropout_rate=0.25, dense_dropout=0.5),
}
DESCRIPTIONS = {
    "none": "no dropout",
    "dropout": "seed: dropout 0.25 after conv blocks, 0.5 before last dense",
    "spatial": "spatial dropout 0.25 after conv blocks, 0.5 before last dense",
    "dropblock": "DropBlock 0.25 (3×3 blocks) after conv blocks, 0.5 before last dense",
}
PRESETS = ("default", "smoke")


def _parse(argv):
    p = ArgumentParser(prog="python -m jaxcnn.experiments.dropout_study", description=description(__doc__),
                       allow_abbrev=False)
    p.add_argument("--preset", default="default", choices=PRESETS,
                   help="default: the study on a subset of the embedded offline data; smoke: a tiny model, seconds "
                        "(the tests'); their settings: get_config in jaxcnn/experiments/dropout_study.py "
                        "(default: default)")
    p.add_argument("--num_train", type=int,
                   help="the training images every variant trains on; default: the preset's")
    p.add_argument("--epochs", type=int,
                   help="the epochs every variant trains (no early stopping); default: the preset's")
    p.add_argument("--seed", type=int, help="the seed every variant shares: the initial weights, the batch order, "
                                            "the dropout keys; default: the preset's")
    add_max_loss_flag(p)
    p.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="default: all four")
    p.add_argument("--workdir", help="default: runs/dropout_study-<preset>")
    p.add_argument("--export", help="copy records and plots (no checkpoints) to this folder")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_host_memory_flag(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load JAX (seconds)
    _parse(sys.argv[1:])

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxcnn import inference, viz  # noqa: E402
from jaxcnn.experiments import cifar10  # noqa: E402
from jaxcnn.experiments.cli import exit_process, max_loss_setting, path_flag, prepare_host, run_main  # noqa: E402
from jaxcnn.experiments.configs import get_config as cifar_config  # noqa: E402
from jaxcnn.experiments.configs import with_overrides  # noqa: E402
from jaxcnn.runfolder import RunFolder  # noqa: E402
from jaxcnn.train import Steps, make_mesh  # noqa: E402


@dataclasses.dataclass(frozen=True)
class StudyConfig:
    """Everything the four runs share (saved in study.json)."""

    preset: str = "default"
    dataset: str = "offline"
    num_train: int = 2000  # small enough that the no-dropout model overfits
    num_val: int = 1000
    num_test: int = 1000
    widths: tuple = (32, 64, 128)  # the seed's model
    dense_units: int = 128
    epochs: int = 25  # ~780 steps: BN running statistics settle (momentum 0.99)
    batch_size: int = 64
    eval_batch_size: int = 500
    learning_rate: float = 1e-3
    seed: int = 0
    max_loss: Optional[float] = 1e3  # FitConfig.max_loss (None: no limit)
    variants: tuple = tuple(VARIANTS)


def get_config(preset: str = "default", **overrides) -> StudyConfig:
    """``"default"``: 2,000 offline training images, 25 epochs, the seed's model (measured:
    see experiments/dropout_study/). ``"smoke"``: a tiny two-block model on 128 images, 2 epochs (tests)."""
    if preset == "default":
        base = StudyConfig()
    elif preset == "smoke":
        base = StudyConfig(preset="smoke", num_train=128, num_val=64, num_test=64, widths=(4, 8),
                           dense_units=8, epochs=2, batch_size=32, eval_batch_size=64)
    else:
        raise ValueError(f"get_config: preset={preset!r}; allowed: {', '.join(PRESETS)}")
    cfg = with_overrides(base, overrides)
    bad = [v for v in cfg.variants if v not in VARIANTS]
    if bad or not cfg.variants:
        raise ValueError(f"get_config: variants={cfg.variants!r}; allowed: a non-empty subset of {tuple(VARIANTS)}")
    return cfg


def experiment_config(study: StudyConfig, variant: str):
    """The ``jaxcnn.experiments.cifar10`` config of one variant: identical for all but the dropout fields."""
    never = study.epochs + 1  # patience longer than the run: no early stop, no LR reduction
    config = cifar_config(
        "demo", dataset=study.dataset, num_train=study.num_train, num_val=study.num_val, num_test=study.num_test,
        widths=tuple(study.widths), dense_units=study.dense_units, epochs=study.epochs,
        batch_size=study.batch_size, eval_batch_size=study.eval_batch_size, learning_rate=study.learning_rate,
        seed=study.seed, augment=False, early_stopping_patience=never, plateau_patience=never,
        **VARIANTS[variant],
    )
    return dataclasses.replace(config, fit=dataclasses.replace(config.fit, max_loss=study.max_loss))


def train_accuracy_inference(workdir: pathlib.Path, images: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """(accuracy, loss) on ``images`` of the run's **latest** (final-epoch) weights, dropout off."""
    probs = inference.restore(workdir, which="latest", temperature=False).predict(images)  # (N, K), raw softmax
    acc = float(np.mean(probs.argmax(-1) == labels))
    loss = float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], 1e-12, None))))
    return acc, loss


def run_variant(study: StudyConfig, variant: str, dataset, workdir: pathlib.Path, *, progress: bool,
                steps=None) -> dict:
    """Train one variant with ``jaxcnn.experiments.cifar10.run`` (the shared ``fit``); return its row.

    ``steps``: the study's ``jaxcnn.train.Steps``, built once for all variants.
    """
    cfg = experiment_config(study, variant)
    _, history, summary = cifar10.run(cfg, workdir, dataset=dataset, mesh=make_mesh(), progress=progress,
                                      steps=steps)  # (with the run's end-of-run report: plots/)
    last = history[-1]
    train_acc, train_loss = train_accuracy_inference(workdir, dataset.train.images, dataset.train.labels)
    best = max(history, key=lambda r: r["val_accuracy"])
    return {
        "variant": variant, "description": DESCRIPTIONS[variant], **VARIANTS[variant],
        "epochs": last["epoch"],
        "train_accuracy": train_acc, "val_accuracy": last["val_accuracy"],
        "gap": train_acc - last["val_accuracy"],
        "train_loss": train_loss, "val_loss": last["val_loss"],
        "train_accuracy_running": last["train_accuracy"],
        "best_val_accuracy": best["val_accuracy"], "best_val_accuracy_epoch": best["epoch"],
        "test_accuracy_best_weights": summary["test_accuracy"], "best_val_loss_epoch": summary["best_epoch"],
        "wall_time_s": summary["wall_time_s"],
    }


# --------------------------------------------------------------------------- records

CSV_FIELDS = ("variant", "conv_dropout", "conv_dropout_rate", "dense_dropout", "epochs", "train_accuracy",
              "val_accuracy", "gap", "train_loss", "val_loss", "train_accuracy_running", "best_val_accuracy",
              "best_val_accuracy_epoch", "test_accuracy_best_weights", "best_val_loss_epoch", "wall_time_s")


def _pct(x: float) -> str:
    return f"{100 * x:.1f} %"


def markdown_table(study: StudyConfig, rows: list[dict], meta: dict) -> str:
    """The README table: one row per variant, and a line that says what was measured where."""
    lines = [
        "| variant | train acc. (final, dropout off) | val acc. (final) | gap | val loss (final) "
        "| train acc. while training (last epoch) | best val acc. (epoch) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['variant']}: {r['description']} | {_pct(r['train_accuracy'])} | {_pct(r['val_accuracy'])} "
            f"| {100 * r['gap']:+.1f} pt | {r['val_loss']:.3f} | {_pct(r['train_accuracy_running'])} "
            f"| {_pct(r['best_val_accuracy'])} ({r['best_val_accuracy_epoch']}) |")
    lines += [
        "",
        f"Measured with `python -m jaxcnn.experiments.dropout_study --preset {study.preset}`: dataset "
        f"`{study.dataset}`, {study.num_train:,} training / {study.num_val:,} validation images, the seed's "
        f"CNN (widths {tuple(study.widths)}, dense {study.dense_units}), {study.epochs} epochs, batch "
        f"{study.batch_size}, Adam {study.learning_rate:g}, seed {study.seed}, no augmentation, no early "
        f"stopping, no LR reduction; same subset, initial weights and batch order for every variant. "
        f"Hardware: {meta['hardware']}; {meta['wall_time_s'] / 60:.1f} min for all variants "
        f"(jax {meta['jax_version']}, {meta['date_utc']}).",
    ]
    return "\n".join(lines) + "\n"


def write_records(workdir: pathlib.Path, study: StudyConfig, rows: list[dict], histories: dict, meta: dict):
    """study.json, study.csv, study.md and plots/val_curves.png in ``workdir``; returns the figure."""
    (workdir / "study.json").write_text(json.dumps(
        {"config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(study).items()},
         "variants": VARIANTS, "meta": meta, "results": rows}, indent=1) + "\n")
    with open(workdir / "study.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    (workdir / "study.md").write_text(markdown_table(study, rows, meta))
    fig = viz.plot_histories(histories, title=f"dropout study: {study.dataset}, {study.num_train:,} training "
                                              f"images, {study.epochs} epochs, same seed, data and budget")
    ax_acc = fig.axes[0]
    for i, r in enumerate(rows):  # the final train accuracy with dropout off: the number the gap uses
        ax_acc.plot([r["epochs"]], [r["train_accuracy"]], marker="*", markersize=12, color=f"C{i % 10}",
                    linestyle="none", label=f"{r['variant']} (train, final, dropout off)")
    ax_acc.legend(fontsize=7, loc="best")
    viz.save_figure(fig, workdir / "plots" / "val_curves.png")
    return fig


def export(workdir: pathlib.Path, dest: pathlib.Path, variants) -> None:
    """Copy the study's records and plots, and each variant's run record, to ``dest`` (no checkpoints)."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("study.json", "study.csv", "study.md"):
        shutil.copy2(workdir / name, dest / name)
    (dest / "plots").mkdir(exist_ok=True)
    shutil.copy2(workdir / "plots" / "val_curves.png", dest / "plots" / "val_curves.png")
    for v in variants:
        src, dst = RunFolder(workdir / v), RunFolder(dest / v)
        dst.plots_dir.mkdir(parents=True, exist_ok=True)
        for path in src.record_paths():
            shutil.copy2(path, dst.path / path.name)
        shutil.copy2(src.plot_path("curves.png"), dst.plot_path("curves.png"))


def _hardware() -> str:
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU, {os.cpu_count()} cores ({cpu}), {jax.device_count()} JAX device(s)"
    return f"{jax.device_count()}x {d.device_kind} ({d.platform})"


def run_study(study: StudyConfig, workdir, *, progress: bool = True, dataset=None) -> list[dict]:
    """Train every variant into ``<workdir>/<variant>`` and write the study's records; returns the rows."""
    workdir = pathlib.Path(workdir)
    taken = [v for v in study.variants if RunFolder(workdir / v).has_checkpoints()]
    if taken:
        raise FileExistsError(f"run_study: {workdir} already holds runs of {taken}; choose another --workdir "
                              f"(nothing was changed)")
    if dataset is None:
        dataset = cifar10.load_data(experiment_config(study, study.variants[0]))  # one subset for all
    t0 = time.perf_counter()
    # One pair of steps for every variant (their fit settings are the same): built, and jitted, once here.
    steps = Steps.build(experiment_config(study, study.variants[0]).fit)
    rows, histories = [], {}
    for v in study.variants:
        rows.append(run_variant(study, v, dataset, workdir / v, progress=progress, steps=steps))
        histories[v] = RunFolder(workdir / v).read_history()
    meta = {"hardware": _hardware(), "wall_time_s": time.perf_counter() - t0, "jax_version": jax.__version__,
            "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "num_train": int(len(dataset.train.labels)), "num_val": int(len(dataset.val.labels))}
    write_records(workdir, study, rows, histories, meta)
    return rows


def main(argv: Optional[list] = None) -> int:
    args = _parse(argv)
    return run_main(lambda: _main(args))


def _main(args) -> int:
    prepare_host(args)
    study = get_config(args.preset, num_train=args.num_train, epochs=args.epochs, seed=args.seed,
                       variants=tuple(args.variants) if args.variants else None)
    given, max_loss = max_loss_setting(args.max_loss)
    if given:
        study = dataclasses.replace(study, max_loss=max_loss)
    workdir = path_flag("--workdir", args.workdir) or pathlib.Path(f"runs/dropout_study-{study.preset}")
    export_to = path_flag("--export", args.export)
    for v in study.variants:
        RunFolder(workdir / v).check_writable()
    rows = run_study(study, workdir, progress=not args.no_progress)
    print((workdir / "study.md").read_text())
    print(f"records: {workdir}/study.json, study.csv, study.md, plots/val_curves.png")
    if export_to is not None:
        export(workdir, export_to, study.variants)
        print(f"exported to {args.export}")
    return 0 if rows else 1


if __name__ == "__main__":
    exit_process(main())
