"""Configurations of the CIFAR-10 experiment, one function per preset: ``get_config(name)``.

Measured results and times of each preset, with their hardware: ``experiments/cifar10/README.md``.

``default`` — the seed's experiment (question 4) on real CIFAR-10::

    python -m jaxcnn.experiments.cifar10                        # --preset default --dataset cifar10
    # 45,000 train / 5,000 val / 10,000 test, batch 64, Adam 1e-3, augmentation, up to 50
    # epochs with early stopping (patience 5) and LR halving (patience 3).
    # --dataset offline: the same on 10,000 / 2,000 / 2,000 embedded images.

``demo`` — the same model and loop on the embedded offline data, sized for a laptop::

    python -m jaxcnn.experiments.cifar10 --dataset offline --preset demo      # = make demo
    # 8,000 train / 1,000 val / 1,000 test offline images, the seed's model, batch 64, Adam 1e-3,
    # 5 epochs, no augmentation (--augment turns it on). A couple of minutes on a 2-core CPU.

``smoke`` — a tiny model and a few hundred images; checks the whole path in seconds::

    python -m jaxcnn.experiments.cifar10 --dataset offline --preset smoke

Any preset trains on a folder of your own images instead (one subfolder per class, JPEG / PNG,
resized to ``--image_size``, 32 by default; split ``--val_fraction`` / ``--test_fraction``, or by
its ``train/``, ``val/``, ``test/`` subfolders: ``jaxcnn.data.folder``)::

    python -m jaxcnn.experiments.cifar10 --preset demo --dataset folder --data_dir ~/photos

A folder run re-estimates the BatchNorm statistics before each validation (precise BatchNorm,
``FOLDER_DEFAULTS``, chosen by the measurement in ``experiments/small_data/README.md``);
CIFAR-10 and the offline data keep the seed's recipe.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import numpy as np

from jaxcnn.data.augment import AugmentConfig
from jaxcnn.experiments.flags import DATASETS, PRECISION_NAMES, PRESETS  # (the parser's, without JAX)
from jaxcnn.train.config import FitConfig
from jaxcnn.train.state import check_learning_rate, check_weight_decay


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """The whole configuration of ``python -m jaxcnn.experiments.cifar10``.

    The experiment's own settings (data, model, Adam's learning rate) are fields here; the
    loop's are in ``fit`` (a ``jaxcnn.train.FitConfig``). A run saves the first as
    ``config["experiment"]`` and the loop's as ``config["fit"]``.
    """

    preset: str = "default"
    dataset: str = "cifar10"
    data_dir: Optional[str] = None  # cifar10: tfds' data directory; folder: the image folder (required)
    val_size: int = 5000  # cifar10: examples moved from tfds' train split to val
    num_train: int = 10000  # offline split sizes
    num_val: int = 2000
    num_test: int = 2000
    image_size: int = 32  # folder: images are resized to image_size x image_size
    val_fraction: float = 0.1  # folder: fractions split off for val and test (without val/, test/ subfolders)
    test_fraction: float = 0.1
    stream: Optional[bool] = None  # folder: decode batches from disk (True), in memory (False), or by size
    widths: tuple = (32, 64, 128)
    dense_units: int = 128
    conv_dropout: str = "dropout"
    conv_dropout_rate: float = 0.25
    dense_dropout: float = 0.5
    bn_momentum: float = 0.99  # every BatchNorm's moving-average momentum (Keras' default, the seed's)
    learning_rate: float = 1e-3  # Adam's, built in jaxcnn.experiments.cifar10.create_state
    weight_decay: float = 0.0  # > 0: AdamW's decoupled decay (jaxcnn.train.adam); 0: Adam, the seed's
    precision: str = "float32"  # the model's compute dtype (PRECISIONS); parameters stay float32
    fit: FitConfig = FitConfig()

    def __post_init__(self):
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset={self.dataset!r}; allowed: {', '.join(DATASETS)}")
        if self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r}; allowed: {', '.join(PRESETS)}")
        for name in ("val_size", "num_train", "num_val", "num_test", "dense_units"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}; must be an int >= 1")
        check_folder_settings(self)
        check_bn_momentum(self.bn_momentum)
        check_precision(self.precision)
        check_learning_rate(self.learning_rate)
        check_weight_decay(self.weight_decay)
        if not isinstance(self.fit, FitConfig):
            raise TypeError(f"fit={self.fit!r}; must be a jaxcnn.train.FitConfig")

    def settings(self) -> dict:
        """The experiment's own settings (everything but ``fit``), JSON-ready."""
        return {f.name: (list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) if f.name != "fit" for v in [getattr(self, f.name)]}


#: ``--precision``: the models' compute dtype. ``bfloat16`` computes convolutions and dense layers
#: in bfloat16; parameters, optimizer state, BatchNorm statistics and the loss stay float32.
PRECISIONS = {name: getattr(jnp, name) for name in PRECISION_NAMES}  # {"float32": jnp.float32, ...}


def check_precision(precision) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; allowed: {', '.join(PRECISIONS)}")


#: The largest BatchNorm momentum taken: float32's largest number below 1 (0.99999994). BatchNorm's
#: statistics update in float32, where a momentum closer to 1 is 1 (0.99999999 froze every variance at 1).
MAX_BN_MOMENTUM = float(np.nextafter(np.float32(1), np.float32(0)))


def bn_momentum_float32_error(momentum) -> Optional[str]:
    """Why a momentum in [0, 1) is not one in float32, where the statistics update (``"is 1 in
    float32 ..."``: one that rounds to 1, or to 0 from above 0); None when float32 keeps it."""
    f32 = float(np.float32(momentum))
    if f32 < 1 and (momentum == 0 or f32 > 0):
        return None
    allowed = (f"at most {MAX_BN_MOMENTUM:.8g} (float32's largest number below 1)" if f32 else
               f"0 or at least {float(np.finfo(np.float32).smallest_subnormal):.2g} (float32's smallest number above 0)")
    return f"is {f32:g} in float32, where BatchNorm's statistics update; must be {allowed}"


def check_bn_momentum(momentum, name: str = "bn_momentum") -> None:
    """A BatchNorm momentum: a number in [0, 1) (1 would freeze the moving statistics), and still one in
    float32 (:func:`bn_momentum_float32_error`)."""
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
        raise ValueError(f"{name}={momentum!r}; must be a number in [0, 1) (0.99: Keras' default, the seed's)")
    why = bn_momentum_float32_error(momentum)
    if why is not None:
        raise ValueError(f"{name}={momentum!r} {why}")


def check_folder_settings(config) -> None:
    """The folder-dataset settings of a config (``dataset``, ``data_dir``, ``image_size``,
    ``val_fraction``, ``test_fraction``): ValueError naming the bad one."""
    if config.dataset == "folder" and not config.data_dir:
        raise ValueError("dataset='folder' needs data_dir (--data_dir PATH): a folder with one subfolder of "
                         "images per class")
    size = config.image_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 8:
        raise ValueError(f"image_size={size!r}; must be an int >= 8")
    for name in ("val_fraction", "test_fraction"):
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise ValueError(f"{name}={v!r}; must be a fraction in (0, 1)")
    if config.val_fraction + config.test_fraction >= 1:
        raise ValueError(f"val_fraction + test_fraction = {config.val_fraction + config.test_fraction:g}; "
                         f"must be < 1 to leave images to train on")


#: What ``--dataset folder`` changes in any preset (a flag given still wins): chosen from the
#: measurement on real small data in ``experiments/small_data/README.md``, where the seed's
#: recipe (BatchNorm momentum 0.99, no warm-up, no precise BatchNorm) can end a run at the
#: majority class. The seed's recipe stays the default for CIFAR-10 and the offline data. The
#: training recipe's ingredients (label smoothing, mixup, cutmix, warm-up + cosine, AdamW, EMA, flip
#: TTA) stay off here too: none of them beat these defaults alone in the ablation of
#: ``experiments/recipe/README.md``.
FOLDER_DEFAULTS = {"precise_bn_batches": 20}


def get_config(name: str = "default", **overrides) -> ExperimentConfig:
    """The preset ``name`` ("default" | "demo" | "smoke") with ``overrides`` applied (None values
    ignored); an override may name a field of the config or of its ``fit`` (``epochs=3``). With
    ``dataset="folder"``, :data:`FOLDER_DEFAULTS` apply first."""
    if name == "default":
        base = ExperimentConfig(preset="default")
    elif name == "demo":
        # No augmentation: in a budget of a few epochs it slows learning (measured:
        # experiments/cifar10/README.md); turn it on with --augment.
        base = ExperimentConfig(preset="demo", dataset="offline", num_train=8000, num_val=1000, num_test=1000,
                                fit=FitConfig(epochs=5, augment=None))
    elif name == "smoke":
        base = ExperimentConfig(preset="smoke", dataset="offline", num_train=256, num_val=64, num_test=100,
                                widths=(8, 16, 32), dense_units=32,
                                fit=FitConfig(epochs=2, batch_size=32, eval_batch_size=64))
    else:
        raise ValueError(f"get_config: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    if overrides.get("widths") is not None:
        overrides["widths"] = tuple(overrides["widths"])
    if (overrides.get("dataset") or base.dataset) == "folder":
        base = with_overrides(base, FOLDER_DEFAULTS)
    return with_overrides(base, overrides)


def with_overrides(base, overrides: dict):
    """``base`` (a config dataclass, possibly holding a ``fit: FitConfig``) with ``overrides``
    applied to whichever of the two has the field. None values are ignored (an unset
    command-line flag); ``augment=True/False`` means the default ``AugmentConfig()`` / none;
    unknown names raise ``ValueError`` listing them."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if isinstance(overrides.get("augment"), bool):
        overrides["augment"] = AugmentConfig() if overrides["augment"] else None
    top = {f.name for f in dataclasses.fields(base)}
    fit = getattr(base, "fit", None)
    nested = {f.name for f in dataclasses.fields(fit)} if isinstance(fit, FitConfig) else set()
    unknown = set(overrides) - top - nested
    if unknown:
        raise ValueError(f"get_config: unknown settings {sorted(unknown)}")
    to_fit = {k: v for k, v in overrides.items() if k not in top}
    if to_fit:
        overrides = {**{k: v for k, v in overrides.items() if k in top},
                     "fit": dataclasses.replace(fit, **to_fit)}
    return dataclasses.replace(base, **overrides)


def load_data(config):
    """The dataset of an experiment's config (``cifar10``'s ``ExperimentConfig`` or ``finetune``'s
    ``FinetuneConfig``: the same data fields) through ``jaxcnn.data.load_dataset``; raises
    ``jaxcnn.data.DatasetUnavailableError`` when CIFAR-10 or tf_flowers cannot be had here."""
    from jaxcnn.data import load_dataset

    kind, seed = config.dataset, config.fit.seed
    if kind == "folder":
        return load_dataset("folder", data_dir=config.data_dir, seed=seed, image_size=config.image_size,
                            val_fraction=config.val_fraction, test_fraction=config.test_fraction,
                            **({} if config.stream is None else {"stream": config.stream}))
    if kind == "offline":
        size = getattr(config, "offline_image_size", None)
        return load_dataset("offline", seed=seed, num_train=config.num_train, num_val=config.num_val,
                            num_test=config.num_test, **({} if size is None else {"image_size": size}))
    if kind == "cifar10":
        return load_dataset("cifar10", data_dir=config.data_dir, seed=seed, val_size=config.val_size)
    return load_dataset(kind, data_dir=config.data_dir, seed=seed, image_size=config.image_size)



def recorded_config(cls, record: dict, experiment: str, path, **fit_fields):
    """The experiment config (``cls``: ``ExperimentConfig`` or ``FinetuneConfig``) that a run of
    ``experiment`` recorded in its ``config.json`` (``record``, read by
    :meth:`jaxcnn.runfolder.RunFolder.read_config` from the run ``path``): its ``experiment``
    settings and its ``fit``, with ``fit_fields`` replacing some of the latter (a fine-tuning
    phase's own epochs). ValueError when the run is not one of ``experiment``."""
    name = (record.get("experiment") or {}).get("name")
    if name != experiment:
        raise ValueError(f"--resume: {path} is not a run of the {experiment} experiment ("
                         + (f"it is one of {name}: resume it with python -m jaxcnn.experiments.{name}" if name else
                            "its config.json names no experiment") + ")")
    names = {f.name for f in dataclasses.fields(cls)} - {"fit"}
    own = {k: tuple(v) if isinstance(v, list) else v for k, v in (record.get("experiment") or {}).items() if k in names}
    fit_names = {f.name for f in dataclasses.fields(FitConfig)}
    fit = {k: v for k, v in (record.get("fit") or {}).items() if k in fit_names}
    if fit.get("augment") is not None:
        fit["augment"] = AugmentConfig(**fit["augment"])
    return cls(**own, fit=FitConfig(**{**fit, **fit_fields}))


def _setting(config, name: str):
    return getattr(config, name) if name in {f.name for f in dataclasses.fields(config)} else getattr(config.fit, name)


def _shown(value) -> str:
    if isinstance(value, (AugmentConfig, bool)):
        return "on" if value else "off"
    return "off" if value is None else str(value)


def resumed_config(recorded, given: dict, *, may_change=frozenset()):
    """What a ``--resume`` trains with: the run's own settings (``recorded``, from
    :func:`recorded_config`) with those the command line gave (``given``: flag -> (setting
    name, value); ``augment`` an ``AugmentConfig`` or None) that are in ``may_change``. A given
    setting outside ``may_change`` whose value is not the run's raises one ValueError naming
    every such flag, its value and the run's."""
    changed = [f"{flag if isinstance(value, (AugmentConfig, bool)) or flag.startswith('--no-') else f'{flag} {_shown(value)}'}"
               f" (the run's: {_shown(_setting(recorded, name))})"
               for flag, (name, value) in given.items()
               if name not in may_change and value != _setting(recorded, name)]
    if changed:
        these = len(changed) > 1
        raise ValueError(f"--resume: {', '.join(changed)}: a run continues with its own settings and "
                         f"{'these' if these else 'this'} cannot change (what can: "
                         f"{', '.join(sorted(f'--{n}' for n in may_change))}); leave {'them' if these else 'it'} "
                         f"out, or start a new run with another --workdir (nothing was changed)")
    top = {f.name for f in dataclasses.fields(recorded)}
    keep = {name: value for name, value in given.values() if name in may_change}
    fit = {k: v for k, v in keep.items() if k not in top}
    return dataclasses.replace(recorded, **{k: v for k, v in keep.items() if k in top},
                               **({"fit": dataclasses.replace(recorded.fit, **fit)} if fit else {}))


def check_same_folder(recorded: dict, config, path) -> None:
    """A ``--resume`` of the run ``path`` (its ``config.json``: ``recorded``) on ``--dataset folder``:
    ValueError in one line, before anything is loaded, when the folder's images are not those the
    run trained on (``jaxcnn.data.folder.fingerprint``: classes, file count, names and sizes)."""
    from jaxcnn.data.folder import changes, fingerprint, scan_folder

    old = (recorded.get("data") or {}).get("fingerprint")
    if config.dataset != "folder" or not old:
        return
    listing = scan_folder(config.data_dir, seed=config.fit.seed, val_fraction=config.val_fraction,
                          test_fraction=config.test_fraction)
    what = changes(old, fingerprint(listing, config.data_dir))
    if what:
        raise ValueError(f"--resume: the images in {config.data_dir} are not those {path} trained on ({what}); a run "
                         f"resumes on its own data: put the folder back as it was, or train on it as it is now with "
                         f"another --workdir (nothing was changed)")
