"""The seed's CIFAR-10 experiment (question 4): train the CifarCNN, record and checkpoint the run.

    python -m jaxcnn.experiments.cifar10                                   # real CIFAR-10, the seed's settings
    python -m jaxcnn.experiments.cifar10 --dataset offline --preset demo   # embedded data, a few minutes
    python -m jaxcnn.experiments.cifar10 --workdir runs/a --resume         # continue a run exactly
    python -m jaxcnn.experiments.cifar10 --dataset folder --data_dir ~/photos   # your own images, by class folder

Presets: ``jaxcnn/experiments/configs.py``; measured results and times:
``experiments/cifar10/README.md``. The workdir is a run folder (``jaxcnn.runfolder``):
config, history, summary, TensorBoard logs, checkpoints (latest and best) and at the end the
best weights' end-of-run report (``jaxcnn.report``: ``plots/``, per-class results and the
confusion matrix in ``summary.json``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import pathlib
import sys
from typing import Optional

from jaxcnn.cli import ArgumentParser, description
from jaxcnn.experiments.flags import (DATASETS, LR_FIND_STEPS, PRESETS, add_class_weight_flag, add_distributed_flags,
                                      add_folder_flags, add_lr_find_flags, add_max_loss_flag, add_precision_flag,
                                      add_recipe_flags, check_lr_find_flags, recipe_given, recipe_overrides)


def _parse(argv):
    p = ArgumentParser(prog="python -m jaxcnn.experiments.cifar10", description=description(__doc__),
                       allow_abbrev=False)
    p.add_argument("--preset", choices=PRESETS,
                   help="default: the seed's experiment; demo: the seed's model for a few epochs on the embedded "
                        "offline data; smoke: a tiny model, seconds (their settings: jaxcnn/experiments/configs.py; "
                        "default: default; with --resume: the run's own settings, whatever its preset)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the preset's (cifar10 for 'default')")
    p.add_argument("--epochs", type=int, help="the most epochs to train (early stopping may end the run sooner); "
                                              "default: the preset's")
    p.add_argument("--batch_size", type=int,
                   help="the training batch (a multiple of the device count); default: the preset's")
    p.add_argument("--learning_rate", type=float,
                   help="Adam's learning rate at the start (lowered when the validation loss stops improving); "
                        "default: the preset's")
    p.add_argument("--seed", type=int, help="the seed of the initial weights, the epoch order and the dropout and "
                                            "augmentation keys; default: the preset's")
    add_max_loss_flag(p)
    add_class_weight_flag(p)
    p.add_argument("--data_dir", help="cifar10: tfds data directory (CIFAR-10 without network: "
                                      "<data_dir>/downloads/manual/cifar-10-binary.tar.gz); folder: the folder of "
                                      "class subfolders of JPEG / PNG images (required)")
    p.add_argument("--val_size", type=int, help="cifar10: examples of the train split held out for validation (5000)")
    p.add_argument("--image_size", type=int, help="folder: images are resized to this square size (32)")
    add_folder_flags(p)
    p.add_argument("--conv_dropout", choices=("dropout", "spatial", "dropblock", "none"),
                   help="what drops after each conv block: dropout (single activations, the seed's), spatial "
                        "(whole feature maps), dropblock (square blocks) or none; default: the preset's")
    p.add_argument("--bn_momentum", type=float, metavar="M",
                   help="every BatchNorm's moving-average momentum, in [0, 1) (default 0.99, Keras' and the seed's)")
    p.add_argument("--warmup_epochs", type=int, metavar="N",
                   help="epochs in which early stopping and the LR plateau schedule do not count an epoch without "
                        "improvement (default 0)")
    p.add_argument("--precise_bn", type=int, metavar="N",
                   help="re-estimate the BatchNorm statistics over N training batches, weights fixed, before each "
                        "validation (precise BatchNorm), at most an epoch's (more: the epoch's, said and recorded); 0: off "
                        "(default: 20 with --dataset folder, else 0: the seed's recipe)")
    add_precision_flag(p)
    p.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None,
                   help="on-device augmentation as the seed's ImageDataGenerator (default: the preset's)")
    p.add_argument("--workdir", help="default: checkpoints/cifar10-<dataset>-<preset> (a fresh run takes the "
                                     "first of it, -2, -3, ... without checkpoints; --resume takes it as is)")
    p.add_argument("--resume", action="store_true", help="continue the run in --workdir from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --workdir that holds a run: the old run is set aside in "
                        "<workdir>/.previous/ (its disk space still taken) and deleted once the new run has saved its "
                        "first checkpoint; if the new run stops before that, the old one is put back")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_recipe_flags(p)
    add_lr_find_flags(p, "--learning_rate")
    add_distributed_flags(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load JAX (seconds)
    _parse(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcnn.experiments.cli import (check_workdir, exit_process, join_processes, max_loss_setting,  # noqa: E402
                                    path_flag, run_main, with_class_weight)
from jaxcnn.data import AugmentConfig  # noqa: E402
from jaxcnn.experiments.configs import (PRECISIONS, ExperimentConfig, bn_momentum_float32_error,  # noqa: E402
                                        check_same_folder, get_config, load_data, recorded_config, resumed_config)
from jaxcnn.models.cifar_cnn import CifarCNN  # noqa: E402
from jaxcnn.runfolder import RunFolder  # noqa: E402
from jaxcnn.train import TrainState, adam, fit, lr_find, make_mesh  # noqa: E402
from jaxcnn.train.distributed import load_in_turn  # noqa: E402
from jaxcnn.train.precise_bn import batches_in_epoch  # noqa: E402

log = logging.getLogger("jaxcnn")


def build_model(config: ExperimentConfig, num_classes: int = 10) -> CifarCNN:
    """The config's ``CifarCNN`` with ``num_classes`` outputs (the dataset's)."""
    return CifarCNN(num_classes=int(num_classes), widths=tuple(int(w) for w in config.widths),
                    dense_units=config.dense_units, conv_dropout=config.conv_dropout,
                    conv_dropout_rate=float(config.conv_dropout_rate), dense_dropout=float(config.dense_dropout),
                    bn_momentum=float(config.bn_momentum), dtype=PRECISIONS[config.precision])


def init_variables(model, seed: int, image_shape) -> dict:
    """The model's initial variables: ``model.init`` with the first split of ``key(seed)``."""
    init_key = jax.random.split(jax.random.key(seed))[0]
    return jax.jit(lambda k: model.init(k, jnp.zeros((1, *image_shape), jnp.float32), train=False))(init_key)


def create_state(config: ExperimentConfig, model, image_shape) -> TrainState:
    """A fresh ``TrainState``: ``init_variables(model, seed)``, Adam(``config.learning_rate``; AdamW with
    ``config.weight_decay`` > 0),
    step key from the second split of ``key(seed)`` (the epoch order is a third stream)."""
    state_key = jax.random.split(jax.random.key(config.fit.seed))[1]
    return TrainState.create(apply_fn=model.apply, variables=init_variables(model, config.fit.seed, image_shape),
                             tx=adam(config.learning_rate, weight_decay=config.weight_decay), key=state_key)


def run(config: ExperimentConfig, workdir, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
        dataset=None, mesh=None, steps=None):
    """Load the data, build model and state, ``fit``; returns ``(state, history, summary)``.

    ``steps``: a ``jaxcnn.train.Steps`` built once and shared by several runs (a study).
    """
    dataset = load_data(config) if dataset is None else dataset
    model = build_model(config, dataset.num_classes)
    state = create_state(config, model, dataset.image_shape)
    return fit(state, dataset, config.fit, workdir, resume=resume, overwrite=overwrite, progress=progress,
               mesh=mesh, model=model, steps=steps,
               experiment={"name": "cifar10", **config.settings()})


def default_workdir(config: ExperimentConfig, *, fresh: bool = True) -> pathlib.Path:
    """``checkpoints/cifar10-<dataset>-<preset>``; with ``fresh``, the first of it, ``-2``, ``-3``, ...
    that holds no checkpoints (so a repeated ``make demo`` neither refuses nor overwrites)."""
    base = pathlib.Path("checkpoints") / f"cifar10-{config.dataset}-{config.preset}"
    workdir, n = base, 2
    while fresh and RunFolder(workdir).has_checkpoints():
        workdir, n = base.with_name(f"{base.name}-{n}"), n + 1
    return workdir


def check_bn_flags(args) -> None:
    """``--bn_momentum``, ``--warmup_epochs``, ``--precise_bn``: ValueError naming the flag, the value and
    what is allowed."""
    m = args.bn_momentum
    if m is not None and not 0 <= m < 1:
        raise ValueError(f"--bn_momentum {m:g}: must be a number in [0, 1) (0.99: Keras' default, the seed's)")
    why = None if m is None else bn_momentum_float32_error(m)
    if why is not None:
        raise ValueError(f"--bn_momentum {m!r} {why}")
    for flag in ("warmup_epochs", "precise_bn"):
        v = getattr(args, flag)
        if v is not None and v < 0:
            raise ValueError(f"--{flag} {v}: must be an int >= 0" + (" (0: off)" if flag == "precise_bn" else ""))


def _precise_bn_in_epoch(config: ExperimentConfig, args, num_train: int, primary: bool) -> ExperimentConfig:
    """``config`` with at most an epoch's batches of precise BatchNorm (it reads the epoch's first
    ones), said in one line naming the flag when fewer than asked: the run records what it uses."""
    n = config.fit.precise_bn_batches
    what = f"--precise_bn {n}" + ("" if args.precise_bn is not None else " (--dataset folder's default)")
    used, note = batches_in_epoch(n, num_train // config.fit.batch_size, what)
    if note is None:
        return config
    if primary:
        log.warning(note)
    return dataclasses.replace(config, fit=dataclasses.replace(config.fit, precise_bn_batches=used))


#: The settings a ``--resume`` may change (``jaxcnn.runfolder.RESUMABLE``); any other flag given must be the run's.
RESUMABLE_SETTINGS = frozenset({"epochs", "max_loss", "data_dir", "stream"})
#: The flags that set a setting of the config, as (flag, setting) where the two names differ.
_FLAG_SETTINGS = {"precise_bn": "precise_bn_batches"}


def config_of_flags(args) -> ExperimentConfig:
    """The config the flags make: the preset's, with the flags given."""
    config = get_config(args.preset or "default", dataset=args.dataset, epochs=args.epochs, batch_size=args.batch_size,
                        learning_rate=args.learning_rate, seed=args.seed, data_dir=args.data_dir,
                        val_size=args.val_size, conv_dropout=args.conv_dropout, augment=args.augment,
                        image_size=args.image_size, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
                        stream=args.stream, precision=args.precision, bn_momentum=args.bn_momentum,
                        warmup_epochs=args.warmup_epochs, precise_bn_batches=args.precise_bn, **recipe_overrides(args))
    given, max_loss = max_loss_setting(args.max_loss)
    if given:
        config = dataclasses.replace(config, fit=dataclasses.replace(config.fit, max_loss=max_loss))
    return with_class_weight(config, args.class_weight)


def given_settings(args) -> dict:
    """The settings the command line gave: ``{flag as given: (setting, value)}`` (for ``resumed_config``)."""
    given = {}
    for flag in ("preset", "dataset", "epochs", "batch_size", "learning_rate", "seed", "data_dir", "val_size",
                 "image_size", "val_fraction", "test_fraction", "stream", "conv_dropout", "bn_momentum",
                 "warmup_epochs", "precise_bn", "precision", "augment", "max_loss", "class_weight"):
        v = getattr(args, flag)
        if v is None:
            continue
        if flag == "augment":
            v = AugmentConfig() if v else None
        elif flag == "max_loss":
            v = max_loss_setting(v)[1]
        elif flag == "class_weight":
            v = None if v == "none" else v
        given[f"--no-{flag}" if v is False or (flag == "augment" and v is None) else f"--{flag}"] = \
            (_FLAG_SETTINGS.get(flag, flag), v)
    return {**given, **recipe_given(args)}


def _as_recorded_precise_bn(args, recorded: dict):
    """``args`` with ``--precise_bn N`` as the run recorded it when the run used an epoch's batches
    for it (fewer than N: ``_precise_bn_in_epoch``), so that the run's own command line resumes it."""
    fit, data = recorded.get("fit", {}), recorded.get("data", {})
    used, n = fit.get("precise_bn_batches"), args.precise_bn
    if n is None or not isinstance(used, int) or not 0 < used < n:
        return args
    if data.get("num_train") and fit.get("batch_size") and used == data["num_train"] // fit["batch_size"]:
        return argparse.Namespace(**{**vars(args), "precise_bn": used})
    return args


def _lr_find(config: ExperimentConfig, workdir: pathlib.Path, args, procs) -> int:
    """``--lr_find``: ``jaxcnn.train.lr_find.find_learning_rate`` on the state the run would start
    from; the plot goes into ``workdir`` (default: the run's), which must be new or empty."""
    procs.on_primary(lambda: lr_find.check_folder(workdir))  # before the data
    dataset = load_in_turn(lambda: load_data(config), procs)
    model = build_model(config, dataset.num_classes)
    _, line = lr_find.find_learning_rate(create_state(config, model, dataset.image_shape), dataset, config.fit,
                                         workdir, num_steps=args.lr_find_steps or LR_FIND_STEPS, mesh=make_mesh(),
                                         processes=procs, progress=not args.no_progress)
    print(line)
    if procs.primary:
        print(f"plot: {workdir / lr_find.PLOT}")
    procs.barrier("done")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = _parse(argv)
    return run_main(lambda: _main(args))


def _main(args) -> int:
    check_lr_find_flags(args)
    procs = join_processes(args)  # first: JAX must not start before the processes are joined
    check_bn_flags(args)
    workdir = path_flag("--workdir", args.workdir)
    if workdir is None:
        workdir = pathlib.Path(procs.share(str(default_workdir(config_of_flags(args), fresh=not args.resume))))
    recorded = procs.on_primary(lambda: RunFolder(workdir).config_to_resume() if args.resume else None)
    if recorded is None:
        config = config_of_flags(args)
    else:  # --resume: the run's own settings, and of the flags given those that may change
        config = resumed_config(recorded_config(ExperimentConfig, recorded, "cifar10", workdir),
                                given_settings(_as_recorded_precise_bn(args, recorded)), may_change=RESUMABLE_SETTINGS)
        procs.on_primary(lambda: check_same_folder(recorded, config, workdir))
    # a flag that would be recorded but do nothing is refused
    if config.dataset == "offline":
        for flag in ("val_size", "data_dir"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} applies to --dataset cifar10, not to the embedded offline data "
                                 f"(--dataset offline sizes its splits itself)")
    if config.dataset == "folder" and args.val_size is not None:
        raise ValueError("--val_size applies to --dataset cifar10; a folder is split by --val_fraction and "
                         "--test_fraction (or its val/ and test/ subfolders)")
    if config.dataset != "folder":
        for flag in ("image_size", "val_fraction", "test_fraction", "stream"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} applies to --dataset folder, not to {config.dataset} (its images are "
                                 f"32x32 and its splits are its own)")
    if args.lr_find:  # a sweep instead of a run: only <workdir>/lr_find.png is written
        return _lr_find(config, workdir, args, procs)
    procs.on_primary(lambda: check_workdir(workdir, resume=args.resume, overwrite=args.overwrite))  # before the data
    dataset = load_in_turn(lambda: load_data(config), procs)
    config = _precise_bn_in_epoch(config, args, len(dataset.train), procs.primary)
    _, _, summary = run(config, workdir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress,
                        dataset=dataset, mesh=make_mesh())  # (with its end-of-run report: plots, per-class results)
    if not procs.primary:  # process 0 tells the result
        procs.barrier("done")  # every process leaves together (JAX's shutdown barrier has a deadline)
        return 0
    folder = RunFolder(workdir)
    print(f"{config.dataset} test accuracy {summary['test_accuracy']:.4f} (loss {summary['test_loss']:.4f}) "
          f"with the best {'EMA ' if summary.get('weights') == 'ema' else ''}weights of epoch {summary['best_epoch']} (val loss {summary['best_val_loss']:.4f}); "
          f"{'stopped early' if summary['stopped_early'] else 'ran'} to epoch {summary['stop_epoch']}, "
          f"{summary['wall_time_s']:.0f} s on {summary['device']}")
    print(f"checkpoints: {folder.checkpoint_dir / 'best'} (best), {folder.checkpoint_dir / 'latest'} (resume)")
    print(f"records: {', '.join(str(p) for p in folder.record_paths())}, {folder.tensorboard_dir}/")
    print(f"plots: {', '.join(str(p) for p in sorted(folder.plots_dir.glob('*.png')))}")
    procs.barrier("done")
    return 0


if __name__ == "__main__":
    exit_process(main())
