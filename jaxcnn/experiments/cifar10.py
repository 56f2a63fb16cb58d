"""The seed's CIFAR-10 experiment (question 4): train the CifarCNN, record and checkpoint the run.

    python -m jaxcnn.experiments.cifar10                                   # real CIFAR-10, the seed's settings
    python -m jaxcnn.experiments.cifar10 --dataset offline --preset demo   # embedded data, a few minutes
    python -m jaxcnn.experiments.cifar10 --workdir runs/a --resume         # continue a run exactly

Presets, their expected results and times: ``jaxcnn/experiments/configs.py``. The workdir
receives config.json, history.json/.csv, summary.json, tensorboard/, checkpoints/{latest,best}
and plots/ (when ``jaxcnn.viz`` is installed).
"""

from __future__ import annotations

import os

# tfds imports TensorFlow, which only reads and decodes data here: keep its start-up logs out of the CLI
# (TF 2.21 prints its oneDNN notice whatever TF_CPP_MIN_LOG_LEVEL says, unless oneDNN is off).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import argparse
import dataclasses
import functools
import pathlib
import shutil
import sys
from typing import Optional

import jax

from jaxcnn.experiments.configs import DATASETS, PRESETS, ExperimentConfig, get_config
from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.train import TrainState, adam, fit, make_mesh

RECORD_FILES = ("config.json", "history.json", "history.csv", "summary.json")


def build_model(config: ExperimentConfig) -> CifarCNN:
    """The config's ``CifarCNN`` (the same object for the same settings, so compiled steps are reused)."""
    return _model(config.num_classes, tuple(int(w) for w in config.widths), config.dense_units,
                  config.conv_dropout, float(config.conv_dropout_rate), float(config.dense_dropout))


@functools.lru_cache(maxsize=32)
def _model(num_classes, widths, dense_units, conv_dropout, conv_dropout_rate, dense_dropout) -> CifarCNN:
    return CifarCNN(num_classes=num_classes, widths=widths, dense_units=dense_units, conv_dropout=conv_dropout,
                    conv_dropout_rate=conv_dropout_rate, dense_dropout=dense_dropout)


def create_state(config: ExperimentConfig, model, image_shape) -> TrainState:
    """A fresh ``TrainState``: params from ``key(seed)``'s first split, Adam(``learning_rate``),
    step key from its second split (``jaxcnn.train.loop.shuffle_key`` is a third stream)."""
    init_key, state_key = jax.random.split(jax.random.key(config.seed))
    x = jax.numpy.zeros((1, *image_shape), jax.numpy.float32)
    variables = model.init(init_key, x, train=False)  # eager: its small compiled ops are cached per process
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(config.learning_rate),
                             key=state_key)


def load_data(config: ExperimentConfig):
    """The config's dataset (``jaxcnn.data.load_dataset``); raises DatasetUnavailableError for CIFAR-10 offline."""
    from jaxcnn.data import load_dataset

    if config.dataset == "offline":
        return load_dataset("offline", seed=config.seed, num_train=config.num_train, num_val=config.num_val,
                            num_test=config.num_test)
    return load_dataset("cifar10", data_dir=config.data_dir, seed=config.seed, val_size=config.val_size)


def run(config: ExperimentConfig, workdir, *, resume: bool = False, progress: bool = True,
        dataset=None, mesh=None):
    """Load the data, build model and state, ``fit``; returns ``(state, history, summary)``."""
    dataset = load_data(config) if dataset is None else dataset
    if dataset.num_classes != config.num_classes:
        config = dataclasses.replace(config, num_classes=dataset.num_classes)
    model = build_model(config)
    state = create_state(config, model, dataset.image_shape)
    return fit(state, dataset, config, workdir, resume=resume, progress=progress, mesh=mesh)


def default_workdir(config: ExperimentConfig, *, fresh: bool = True) -> pathlib.Path:
    """``checkpoints/cifar10-<dataset>-<preset>``; with ``fresh``, the first of it, ``-2``, ``-3``, ...
    that holds no checkpoints (so a repeated ``make demo`` neither refuses nor overwrites)."""
    from jaxcnn.checkpoint import has_checkpoints

    base = pathlib.Path("checkpoints") / f"cifar10-{config.dataset}-{config.preset}"
    workdir, n = base, 2
    while fresh and has_checkpoints(workdir):
        workdir, n = base.with_name(f"{base.name}-{n}"), n + 1
    return workdir


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m jaxcnn.experiments.cifar10", description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="default", choices=PRESETS)
    p.add_argument("--dataset", choices=DATASETS, help="default: the preset's (cifar10 for 'default')")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch_size", type=int)
    p.add_argument("--learning_rate", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--data_dir", help="tfds data directory (CIFAR-10 without network: "
                                      "<data_dir>/downloads/manual/cifar-10-binary.tar.gz)")
    p.add_argument("--val_size", type=int, help="cifar10: examples of the train split held out for validation (5000)")
    p.add_argument("--conv_dropout", choices=("dropout", "spatial", "dropblock", "none"))
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="on-device augmentation as the seed's ImageDataGenerator (default: the preset's)")
    p.add_argument("--workdir", help="default: checkpoints/cifar10-<dataset>-<preset> (a fresh run takes the "
                                     "first of it, -2, -3, ... without checkpoints; --resume takes it as is)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="delete the checkpoints and records already in --workdir, then start afresh")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


def main(argv: Optional[list] = None) -> int:
    args = _parse(argv)
    if args.resume and args.overwrite:
        print("error: --resume and --overwrite exclude each other", file=sys.stderr)
        return 2
    try:
        config = get_config(args.preset, dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                            learning_rate=args.learning_rate, seed=args.seed, data_dir=args.data_dir,
                            val_size=args.val_size, conv_dropout=args.conv_dropout, augment=args.augment)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    workdir = pathlib.Path(args.workdir) if args.workdir else default_workdir(config, fresh=not args.resume)
    from jaxcnn.data import DatasetUnavailableError
    from jaxcnn.checkpoint import has_checkpoints

    if has_checkpoints(workdir) and not (args.resume or args.overwrite):
        print(f"error: {workdir} already holds checkpoints of a run. Continue it with --resume, start afresh "
              f"with --overwrite (deletes them), or pass another --workdir. Nothing was changed.", file=sys.stderr)
        return 2
    try:
        dataset = load_data(config)
    except DatasetUnavailableError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.overwrite:  # only after the data loaded: a failure never costs the old run
        shutil.rmtree(workdir / "checkpoints", ignore_errors=True)
        shutil.rmtree(workdir / "tensorboard", ignore_errors=True)
        for name in RECORD_FILES:
            (workdir / name).unlink(missing_ok=True)

    try:
        state, history, summary = run(config, workdir, resume=args.resume, progress=not args.no_progress,
                                      dataset=dataset, mesh=make_mesh())
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    plots = None
    try:
        from jaxcnn.viz import plot_curves
    except ImportError:
        plot_curves = None
    if plot_curves is not None:
        plot_curves(workdir)  # writes <workdir>/plots/curves.png (a bare Figure: nothing to close)
        plots = sorted(str(p) for p in (workdir / "plots").glob("*.png"))

    print(f"{config.dataset} test accuracy {summary['test_accuracy']:.4f} (loss {summary['test_loss']:.4f}) "
          f"with the best weights of epoch {summary['best_epoch']} (val loss {summary['best_val_loss']:.4f}); "
          f"{'stopped early' if summary['stopped_early'] else 'ran'} to epoch {summary['stop_epoch']}, "
          f"{summary['wall_time_s']:.0f} s on {summary['device']}")
    print(f"checkpoints: {workdir / 'checkpoints' / 'best'} (best), {workdir / 'checkpoints' / 'latest'} (resume)")
    print(f"records: {workdir}/config.json, history.csv, summary.json, tensorboard/")
    print(f"plots: {', '.join(plots)}" if plots else "plots: none (jaxcnn.viz.plot_curves not available)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
