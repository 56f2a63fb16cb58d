"""The seed's fine-tuning experiment (question 6): a pretrained ResNet50, a new head, two phases.

    python -m jaxcnn.experiments.finetune                                   # tf_flowers 224, ImageNet weights
    python -m jaxcnn.experiments.finetune --preset quick                    # a few minutes, no download
    python -m jaxcnn.experiments.finetune --preset offline --weights none   # embedded data, no download
    python -m jaxcnn.experiments.finetune --weights ~/resnet50_notop.h5     # a weight file of your own
    python -m jaxcnn.experiments.finetune --dataset folder --data_dir ~/photos   # your photos, a folder per class

Model: ``ResNet50(include_top=False)`` -> global average pooling -> Dense 256 ReLU
(``head_hidden``) -> Dropout 0.5 -> Dense N (``head``, logits); caffe preprocessing (RGB -> BGR,
ImageNet mean) runs inside the jitted step on uint8 images kept on the device; augmentation is
a random left-right flip and a shift of up to 10 % (no rotation).

* Phase 1: the whole backbone frozen (Keras ``base_model.trainable = False``), Adam 1e-3.
* Phase 2: starts from the phase-1 best checkpoint **read back from disk**; everything but the
  first 100 Keras layers trains (``base_model.layers[:100]`` frozen: up to and including
  ``conv4_block2_3_conv``), a fresh Adam 1e-5.

Frozen layers are frozen three ways from one label tree (``jaxcnn.freeze``): the gradient is
taken w.r.t. the trainable part only (a frozen layer costs its forward pass), the optimizer
is masked, and frozen BatchNorm layers run in inference mode (``frozen_bn``), as in Keras.
Each phase runs the shared ``jaxcnn.train.fit`` for a fixed number of epochs (no early stop,
no LR drop) and keeps the weights of its lowest validation loss.

``<workdir>`` (default ``checkpoints/finetune-<dataset>-<preset>``) receives ``phase1/`` and
``phase2/`` (each a run folder, ``jaxcnn.runfolder``, with its ``freeze_summary.txt``) and
``summary.json`` with the accuracy of each phase and ``pretrained: true|false``. Each phase ends with
``fit``'s end-of-run report of its best weights (``jaxcnn.report``: ``plots/``, per-class results
and the confusion matrix in its ``summary.json``).
``--overwrite`` sets the old run aside whole (both phases and the summary, one unit, in
``<workdir>/.previous/``) and deletes it once the new phase 1 has ended: a killed run leaves the
old run or the new one, never phase 1 of one and phase 2 of the other.

``--dataset folder --data_dir PATH`` fine-tunes on a folder of class subfolders of JPEG / PNG
images (``jaxcnn.data.folder``), resized to ``--image_size``; split by ``--val_fraction`` /
``--test_fraction`` or by its ``train/``, ``val/``, ``test/`` subfolders. Classify new images with
the result: ``python -m jaxcnn.predict --run <workdir>/phase2 photo.jpg``.

Presets (``get_config``); measured results and times: ``experiments/finetune/README.md``.

* ``default``: tf_flowers at 224, batch 32, 10 + 20 epochs, ``--weights imagenet``. ResNet50
  training at 224 is slow on a CPU (measured: ``benchmarks/README.md``), so this preset wants a GPU.
* ``offline``: the embedded offline dataset at 32x32 (2,000 / 500 / 500), batch 32,
  4 + 6 epochs. Needs ``--weights none`` (or a file) where ImageNet weights cannot be had.
* ``quick``: a quick look at fine-tuning without a download: ResNetSmall (ResNet50's layer names,
  one block per stage, a quarter of its widths) from random weights, the offline data at 32x32
  (2,000 / 500 / 500), 2 + 20 epochs, phase 2 trains every layer at Adam 1e-3; a few minutes on
  a 2-core CPU.
* ``smoke``: ResNetTiny, 64 images, 2 + 2 epochs; the test suite runs it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import logging
import pathlib
import sys
import time
from collections.abc import Callable
from typing import Optional

from jaxcnn.cli import ArgumentParser, description
from jaxcnn.experiments.flags import (LR_FIND_STEPS, add_class_weight_flag, add_distributed_flags, add_folder_flags,
                                      add_lr_find_flags, add_max_loss_flag, add_precision_flag, add_recipe_flags,
                                      check_lr_find_flags, recipe_given, recipe_overrides)

PRESETS = ("default", "offline", "quick", "smoke")
DATASETS = ("tf_flowers", "offline", "folder")
MODELS = ("resnet50", "small", "tiny")  # ResNet50, ResNetSmall (the quick preset's), ResNetTiny (tests)


def _parse(argv):
    p = ArgumentParser(prog="python -m jaxcnn.experiments.finetune", description=description(__doc__),
                       allow_abbrev=False)
    p.add_argument("--preset", choices=PRESETS,
                   help="default: tf_flowers at 224 from ImageNet weights (wants a GPU); offline: the embedded data "
                        "at 32x32; quick: a small ResNet from random weights, no download; smoke: a tiny one, for the "
                        "tests (their settings: get_config in jaxcnn/experiments/finetune.py; default: default; with --resume: "
                        "the run's own settings, whatever its preset)")
    p.add_argument("--dataset", choices=DATASETS, help="default: the preset's (tf_flowers for 'default')")
    p.add_argument("--weights", help="imagenet | PATH to a Keras legacy .h5 no-top file | none (random weights); "
                                     "default: the preset's (imagenet for 'default')")
    p.add_argument("--image_size", type=int, help="the square size the images are resized to (at least 32); "
                                                  "default: the preset's")
    p.add_argument("--phase1_epochs", type=int,
                   help="epochs of phase 1 (the backbone frozen, the new head trains); default: the preset's")
    p.add_argument("--phase2_epochs", type=int,
                   help="epochs of phase 2 (all but --phase2_frozen_layers train); default: the preset's")
    p.add_argument("--phase2_frozen_layers", type=int,
                   help="Keras base_model.layers[:n] frozen in phase 2, 0 .. the model's Keras layers; default: the "
                        "preset's (100 for 'default')")
    p.add_argument("--phase1_lr", type=float,
                   help="Adam's learning rate of phase 1 (the new head); default: the preset's (1e-3)")
    p.add_argument("--batch_size", type=int,
                   help="the training batch of both phases (a multiple of the device count); default: the preset's")
    p.add_argument("--seed", type=int, help="the seed of the new head's initial weights, the epoch order and the "
                                            "dropout and augmentation keys; default: the preset's")
    add_max_loss_flag(p)
    add_class_weight_flag(p)
    p.add_argument("--model", choices=MODELS,
                   help="resnet50, small (the quick preset's) or tiny (tests); default: the preset's (resnet50 for "
                        "'default'); small and tiny, where the preset's model is another, default to --weights none, "
                        "--phase2_frozen_layers 0, --image_size 32 and the quick preset's phase-2 rate (1e-3)")
    p.add_argument("--data_dir", help="tf_flowers: tfds data directory (without network: "
                                      "<data_dir>/downloads/manual/flower_photos.tgz); folder: the folder of "
                                      "class subfolders of JPEG / PNG images (required)")
    add_folder_flags(p)
    p.add_argument("--no_augment", action="store_true", help="train without flips and shifts")
    add_precision_flag(p)
    p.add_argument("--workdir", help="default: checkpoints/finetune-<dataset>-<preset>")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --workdir phase by phase (a finished phase is not repeated)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a --workdir that holds a run: the old run (both phases) is set aside in "
                        "<workdir>/.previous/ (its disk space still taken) and deleted once the new phase 1 has "
                        "ended; if the new run stops before its first checkpoint, the old one is put back")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")
    add_recipe_flags(p)
    add_lr_find_flags(p, "--phase1_lr (phase 1's setup: the backbone frozen, the new head trains)")
    add_distributed_flags(p)
    return p.parse_args(argv)


if __name__ == "__main__":  # --help and a bad flag answer here, before the imports below load JAX (seconds)
    _parse(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jaxcnn import freeze, inference  # noqa: E402
from jaxcnn.checkpoint import tree_checksum  # noqa: E402
from jaxcnn.data.augment import AugmentConfig  # noqa: E402
from jaxcnn.experiments.cli import (exit_process, join_processes, max_loss_setting, path_flag,  # noqa: E402
                                    run_main, with_class_weight)
from jaxcnn.experiments.configs import (PRECISIONS, check_folder_settings, check_precision,  # noqa: E402
                                        check_same_folder, load_data, recorded_config, resumed_config, with_overrides)
from jaxcnn.models.resnet import Classifier, ResNet50, ResNetSmall, ResNetTiny, with_backbone_variables  # noqa: E402
from jaxcnn.runfolder import PHASES, SUMMARY, FinetuneFolder, NothingToDo, SetAside  # noqa: E402, F401 (re-exported)
from jaxcnn.train import FitConfig, Steps, TrainState, adam, fit, lr_find, make_mesh  # noqa: E402
from jaxcnn.train.distributed import Processes, load_in_turn  # noqa: E402
from jaxcnn.train.state import check_learning_rate, check_weight_decay  # noqa: E402

log = logging.getLogger("jaxcnn")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``python -m jaxcnn.experiments.finetune`` reads.

    The experiment's settings are fields here (each phase saves them as ``config["experiment"]``);
    the loop's shared settings (batch sizes, seed, augmentation, caffe preprocessing) are in
    ``fit``, which each phase copies with its own epochs. ``weights``: ``"imagenet"`` (the
    official Keras no-top file, fetched into the Keras cache), a path to a Keras legacy
    ``.h5`` file of the backbone, or ``"none"`` (random init). ``phase2_frozen_layers``:
    Keras ``base_model.layers[:n]`` stay frozen in phase 2.
    """

    preset: str = "default"
    dataset: str = "tf_flowers"
    data_dir: Optional[str] = None  # tf_flowers: tfds' data directory; folder: the image folder (required)
    image_size: int = 224
    val_fraction: float = 0.1  # folder: fractions split off for val and test (without val/, test/ subfolders)
    test_fraction: float = 0.1
    stream: Optional[bool] = None  # folder: decode batches from disk (True), in memory (False), or by size
    num_train: int = 2000  # offline split sizes (tf_flowers: 80 / 10 / 10 % of its 3,670 photos)
    num_val: int = 500
    num_test: int = 500
    model: str = "resnet50"
    weights: str = "imagenet"
    hidden: int = 256
    dropout: float = 0.5
    phase1_epochs: int = 10
    phase1_lr: float = 1e-3
    phase2_epochs: int = 20
    phase2_lr: float = 1e-5
    phase2_frozen_layers: int = 100
    weight_decay: float = 0.0  # > 0: AdamW's decoupled decay in both phases (jaxcnn.train.adam); 0: Adam
    precision: str = "float32"  # the model's compute dtype (configs.PRECISIONS); parameters stay float32
    # The seed's fine-tuning augmentation: flips and shifts, no rotation; Keras' caffe preprocessing.
    fit: FitConfig = FitConfig(batch_size=32, eval_batch_size=64, augment=AugmentConfig(rotation=0.0),
                               preprocess="caffe")

    @property
    def offline_image_size(self) -> int:
        """The embedded offline set is made at the model's input size (``configs.load_data``)."""
        return self.image_size

    def __post_init__(self):
        for name, allowed in (("preset", PRESETS), ("dataset", DATASETS), ("model", MODELS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"FinetuneConfig: {name}={getattr(self, name)!r}; allowed: {', '.join(allowed)}")
        check_precision(self.precision)
        for name in ("image_size", "num_train", "num_val", "num_test", "hidden", "phase1_epochs", "phase2_epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"FinetuneConfig: {name}={v!r}; must be an int >= 1")
        for name in ("phase1_lr", "phase2_lr"):
            check_learning_rate(getattr(self, name), f"FinetuneConfig: {name}")
        check_weight_decay(self.weight_decay, "FinetuneConfig: weight_decay")
        if self.fit.lr_schedule == "cosine":  # each phase's warm-up + cosine runs over its own epochs
            for phase, epochs in ((1, self.phase1_epochs), (2, self.phase2_epochs)):
                if self.fit.warmup_epochs >= epochs:
                    raise ValueError(f"FinetuneConfig: warmup_epochs={self.fit.warmup_epochs} with "
                                     f"lr_schedule='cosine' and phase{phase}_epochs={epochs}; each phase's warm-up "
                                     f"must end before its last epoch (warmup_epochs < phase{phase}_epochs)")
        if self.image_size < 32:
            raise ValueError(f"FinetuneConfig: image_size={self.image_size}; ResNet50 needs >= 32")
        check_folder_settings(self)
        check_frozen_layers(self.phase2_frozen_layers, self.model)
        if self.model != "resnet50" and self.weights == "imagenet":
            raise ValueError(f"FinetuneConfig: weights='imagenet' is a ResNet50 file; with model={self.model!r} use "
                             "'none' or a path to a file of that model")

    def settings(self) -> dict:
        """The experiment's own settings (everything but ``fit``), JSON-ready."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "fit"}

    def phase_fit(self, phase: int) -> FitConfig:
        """Phase ``phase``'s loop: the shared ``fit`` with the phase's epochs, a fixed schedule
        (no early stop, no LR drop: the patiences are the phase's length)."""
        epochs = self.phase1_epochs if phase == 1 else self.phase2_epochs
        return dataclasses.replace(self.fit, epochs=epochs, early_stopping_patience=epochs, plateau_patience=epochs)


BACKBONES = {"resnet50": ResNet50, "small": ResNetSmall, "tiny": ResNetTiny}  # MODELS' modules


def check_frozen_layers(n, model: str) -> None:
    """``phase2_frozen_layers`` (``--phase2_frozen_layers``): Keras ``base_model.layers[:n]`` of
    ``model``'s backbone, so 0 .. its number of Keras layers. Checked when the config is made,
    before phase 1 trains, rather than when phase 2 builds its rule."""
    count = len(BACKBONES[model](include_top=False, pooling="avg").layer_order())
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= count:
        raise ValueError(f"phase2_frozen_layers={n!r} (--phase2_frozen_layers): the {model} model has {count} Keras "
                         f"layers; allowed 0 .. {count} (0: phase 2 trains every layer)")


#: What ``--model small`` / ``tiny`` brings when the preset's model is another (a flag given still
#: wins): no ImageNet file exists for them, so a random backbone (``weights`` none), trained whole in
#: phase 2 at the ``quick`` preset's rate, at the 32x32 input they were made for (the quick preset's).
MODEL_DEFAULTS = {"weights": "none", "phase2_frozen_layers": 0, "phase2_lr": 1e-3, "image_size": 32}


def get_config(name: str = "default", **overrides) -> FinetuneConfig:
    """The preset ``name`` ("default" | "offline" | "smoke") with ``overrides`` applied (None values
    ignored; ``batch_size``, ``seed``, ``augment`` ... go to ``fit``)."""
    if name == "default":
        base = FinetuneConfig(preset="default")
    elif name == "offline":
        base = FinetuneConfig(preset="offline", dataset="offline", image_size=32, phase1_epochs=4,
                              phase2_epochs=6)
        base = with_overrides(base, {"eval_batch_size": 250})
    elif name == "quick":
        # No pretrained weights: phase 1's head sees random features (chance); phase 2 trains the
        # whole small backbone at 1e-3 (1e-5 is for adjusting pretrained features), without augmentation.
        base = FinetuneConfig(preset="quick", dataset="offline", image_size=32, model="small", weights="none",
                              phase1_epochs=2, phase2_epochs=20, phase2_lr=1e-3, phase2_frozen_layers=0)
        base = with_overrides(base, {"eval_batch_size": 250, "augment": False})
    elif name == "smoke":
        base = FinetuneConfig(preset="smoke", dataset="offline", image_size=32, num_train=64, num_val=32,
                              num_test=32, model="tiny", weights="none", phase1_epochs=2, phase2_epochs=2,
                              phase2_frozen_layers=20)
        base = with_overrides(base, {"batch_size": 16, "eval_batch_size": 32})
    else:
        raise ValueError(f"get_config: unknown preset {name!r}; allowed: {', '.join(PRESETS)}")
    per_phase = sorted(k for k in ("epochs", "early_stopping_patience", "plateau_patience")
                       if overrides.get(k) is not None)
    if per_phase:  # each phase sets these itself (a fixed schedule)
        raise ValueError(f"get_config: {per_phase} are set per phase; use phase1_epochs / phase2_epochs")
    if overrides.get("augment") is True:  # --augment: the seed's flips and shifts, not the rotation
        overrides["augment"] = AugmentConfig(rotation=0.0)
    if overrides.get("model") not in (None, "resnet50", base.model) and overrides.get("weights") in (None, "none"):
        overrides = {**MODEL_DEFAULTS, **{k: v for k, v in overrides.items() if v is not None}}  # (a file: as given)
    return with_overrides(base, overrides)


# --------------------------------------------------------------------------- model and weights


def build_model(config: FinetuneConfig, num_classes: int) -> Classifier:
    """The fine-tuning ``Classifier``: backbone (no top, average pooling) + the seed's head."""
    return Classifier(BACKBONES[config.model](include_top=False, pooling="avg", dtype=PRECISIONS[config.precision]),
                      num_classes=int(num_classes),
                      dropout_rate=float(config.dropout), hidden=int(config.hidden))


class WeightsUnavailableError(RuntimeError):
    """``--weights`` names no usable file (no network and nothing in the Keras cache, or a missing
    path); the message says where to put the file."""


def weights_path(config: FinetuneConfig) -> Optional[pathlib.Path]:
    """The backbone weight file of ``config.weights`` (None for ``"none"``): ``"imagenet"`` is
    fetched into / reused from the Keras cache (``jaxcnn.weights.resolve_weights``).

    Raises:
      WeightsUnavailableError: the file cannot be had; the message says where to put it.
    """
    from jaxcnn.weights import resolve_weights

    try:
        return resolve_weights(None if config.weights == "none" else config.weights, include_top=False)
    except (RuntimeError, FileNotFoundError) as e:
        raise WeightsUnavailableError(f"{e} Or fine-tune without pretrained weights: --weights none (a random "
                                      f"backbone; what to expect: experiments/finetune/README.md), or --model small "
                                      f"(a small random one at 32x32, quick on a CPU)") from None


def initial_variables(config: FinetuneConfig, model: Classifier, image_shape,
                      path: Optional[pathlib.Path]) -> dict:
    """A fresh init from ``key(seed)``, the backbone filled from the weight file ``path``
    (a Keras legacy no-top file; None: the backbone stays random)."""
    from jaxcnn.weights import load_keras_h5

    init_key = jax.random.split(jax.random.key(config.fit.seed))[0]
    x = jnp.zeros((1, *image_shape), jnp.float32)
    variables = jax.jit(lambda k: model.init(k, x, train=False))(init_key)
    if path is not None:
        converted = load_keras_h5(path, include_top=False, model=model.backbone)
        variables = with_backbone_variables(variables, converted)
    return variables


def phase_rule(config: FinetuneConfig, phase: int, layer_order) -> freeze.Rule:
    """Phase 1: the whole backbone; phase 2: Keras' ``base_model.layers[:phase2_frozen_layers]``
    (``layer_order``: the backbone's ``layer_order()``)."""
    return freeze.backbone() if phase == 1 else freeze.first_n_keras_layers(config.phase2_frozen_layers, layer_order)


def restore_phase(workdir, phase: int, *, which: str = "best") -> inference.Restored:
    """Phase ``phase`` of a fine-tuning run, restored for inference (``jaxcnn.inference.restore``)."""
    return inference.restore(FinetuneFolder(workdir).phase(phase).path, which=which)


# --------------------------------------------------------------------------- one phase


def run_phase(config: FinetuneConfig, phase: int, model: Classifier, variables: dict, dataset, workdir, *,
              pretrained: bool, resume: bool = False, overwrite: bool = False, progress: bool = True, mesh=None,
              on_start: Optional[Callable[[int, TrainState], None]] = None) -> dict:
    """Freeze by ``phase_rule``, print the Keras-like counts, ``fit`` into ``<workdir>/phase<phase>``.

    ``variables``: the phase's starting weights (their checksum is recorded, so that a resumed
    phase 2 is refused if phase 1 was trained again since). ``resume``: continue the phase
    (a phase that already ran to its end is not repeated; its summary is returned).
    """
    run = FinetuneFolder(workdir).phase(phase)
    order = model.backbone.layer_order()
    rule = phase_rule(config, phase, order)
    labels = freeze.label_tree(variables["params"], rule)
    frozen_bn = freeze.frozen_layer_names(labels, under="backbone")
    lr = config.phase1_lr if phase == 1 else config.phase2_lr
    fit_config = config.phase_fit(phase)

    stats = variables.get("batch_stats", {})
    table = freeze.summary(variables["params"], stats, labels, layer_order=order)
    trainable, non_trainable = freeze.count_params(variables["params"], stats, labels)
    n_layers = len(variables["params"]["backbone"]) + len(variables["params"]) - 1  # backbone + head layers
    n_frozen = len(freeze.frozen_layer_names(labels))
    print(f"\n=== Phase {phase}: {rule.description}, Adam {lr:g}, {fit_config.epochs} epochs ===")
    n_bn = sum(name.endswith("_bn") for name in frozen_bn)
    print(f"{n_frozen} of {n_layers} weighted layers frozen ({n_bn} of them BatchNorm, run in inference mode)")
    print("\n".join(table.splitlines()[-3:]))

    state_key = jax.random.fold_in(jax.random.split(jax.random.key(config.fit.seed))[1], phase)
    state = TrainState.create(apply_fn=functools.partial(model.apply, frozen_bn=frozen_bn), variables=variables,
                              tx=adam(lr, labels=labels, weight_decay=config.weight_decay), key=state_key)
    if on_start is not None:
        on_start(phase, state)
    experiment = {"name": "finetune", **config.settings(), "phase": phase, "freeze_rule": rule.description,
                  "pretrained": pretrained, "trainable_params": trainable, "non_trainable_params": non_trainable,
                  "initial_weights_checksum": tree_checksum(variables)}
    try:
        _, _, summary = fit(state, dataset, fit_config, run.path, mesh=mesh,
                            steps=Steps.build(fit_config, labels, train_labels=dataset.train.labels,
                                              num_classes=dataset.num_classes,
                                              steps_per_epoch=len(dataset.train) // fit_config.batch_size),
                            progress=progress, resume=resume and (run.is_run() or run.has_checkpoints()),
                            overwrite=overwrite, model=model, experiment=experiment)  # (with its end-of-run report)
        if Processes().primary:  # once the phase ran: a refused start leaves no freeze summary
            run.freeze_summary_path.write_text(table + "\n")
    except NothingToDo:  # its folder stays as it is
        summary = run.read_summary()
        print(f"phase {phase}: already complete in {run.path}; not repeated")
    print(f"phase {phase}: test accuracy {summary['test_accuracy']:.4f} (loss {summary['test_loss']:.4f}), best "
          f"val accuracy {summary['best_val_accuracy']:.4f} at epoch {summary['best_epoch']}, "
          f"{summary['wall_time_s']:.0f} s")
    return {**summary, "freeze_rule": rule.description, "learning_rate": lr, "epochs": fit_config.epochs,
            "trainable_params": trainable, "non_trainable_params": non_trainable}


# --------------------------------------------------------------------------- both phases


NO_WEIGHTS_WARNING = ("WARNING: running WITHOUT pretrained weights (--weights none): the backbone is randomly "
                      "initialised, so phase 1 trains a head on random features and the accuracies below are "
                      "not those of fine-tuning a pretrained network.")


def set_aside(workdir: pathlib.Path) -> SetAside:
    """The two-phase run in ``workdir`` as ``--overwrite`` sets it aside (``FinetuneFolder.set_aside``)."""
    return FinetuneFolder(workdir).set_aside()


def check_workdir(workdir: pathlib.Path, *, resume: bool, overwrite: bool) -> None:
    """The checks of a fine-tuning workdir made before anything loads (``FinetuneFolder.check_start``)."""
    FinetuneFolder(workdir).check_start(resume=resume, overwrite=overwrite)


@contextlib.contextmanager
def _old_run_kept(aside: SetAside, active: bool):
    """With ``--overwrite`` (``active``): ``done()`` deletes the old run set aside (the new phase 1
    has ended); a run that ends before, however it ends, deletes it if a new phase has a
    checkpoint, else puts it back."""
    kept = {"old": active}

    def done():
        if kept["old"]:
            aside.discard()
            kept["old"] = False

    try:
        yield done
    finally:
        if kept["old"]:
            if aside.has_new_run():
                aside.discard()
            elif aside.put_back():
                log.warning(f"{aside.folder}: the new run stopped before its first checkpoint; the run it was to "
                            f"overwrite is back, unchanged")


def run(config: FinetuneConfig, workdir, *, dataset=None, resume: bool = False, overwrite: bool = False,
        progress: bool = True, mesh=None, on_phase_start: Optional[Callable[[int, TrainState], None]] = None) -> dict:
    """Both phases; phase 2 starts from phase 1's best checkpoint as read back from disk.

    ``resume``: each phase continues from its latest checkpoint; a phase that already ran to
    its end is not repeated. ``overwrite``: the old run (``phase1/``, ``phase2/``, ``summary.json``)
    is set aside as one unit in ``<workdir>/.previous/`` (still taking its disk space) and deleted
    once the new phase 1 has ended; if the new run stops before its first checkpoint, the old one
    is put back. One run at a time holds ``<workdir>``'s lock. ``on_phase_start(phase, state)``
    sees each phase's initial ``TrainState`` (for tests). Returns the summary also written to
    ``<workdir>/summary.json``.
    """
    t0 = time.perf_counter()
    workdir = pathlib.Path(workdir)
    procs = Processes()
    procs.on_primary(lambda: check_workdir(workdir, resume=resume, overwrite=overwrite))
    path = load_in_turn(lambda: weights_path(config), procs)  # fail fast, before the data (fetched once)
    dataset = load_in_turn(lambda: load_data(config), procs) if dataset is None else dataset
    model = build_model(config, dataset.num_classes)
    variables = initial_variables(config, model, dataset.image_shape, path)
    pretrained = path is not None
    if pretrained:
        print(f"backbone weights: {path}")
    elif procs.primary:
        print(NO_WEIGHTS_WARNING, file=sys.stderr)
    mesh = make_mesh() if mesh is None else mesh
    common = dict(pretrained=pretrained, resume=resume, progress=progress, mesh=mesh, on_start=on_phase_start)

    with contextlib.ExitStack() as held:
        procs.on_primary(lambda: held.enter_context(FinetuneFolder(workdir).lock()) and None)
        aside = set_aside(workdir)
        note = procs.on_primary(aside.recover)  # what an --overwrite that was killed left
        if note and procs.primary:
            log.warning(note)
        if overwrite:
            procs.on_primary(aside.set_aside)
        old_run_done = held.enter_context(_old_run_kept(aside, overwrite and procs.primary))
        try:
            s1 = run_phase(config, 1, model, variables, dataset, workdir, **common)
        except (ValueError, FileExistsError) as e:  # refused: say that the old run was put back first
            if note and "nothing was changed" in str(e):
                raise type(e)(str(e).replace("nothing was changed", f"{note}; nothing else was changed")) from None
            raise
        old_run_done()
        restored = restore_phase(workdir, 1).variables  # from disk, not the in-memory state
        s2 = run_phase(config, 2, model, restored, dataset, workdir, **common)
        summary = {"pretrained": pretrained, "weights": str(path) if pretrained else "none",
                   "dataset": dataset.name, "image_size": int(dataset.image_shape[0]), "model": config.model,
                   "num_classes": int(dataset.num_classes), "num_train": len(dataset.train.labels),
                   "phase1": s1, "phase2": s2, "wall_time_s": time.perf_counter() - t0, "device": s2["device"]}
        if procs.primary:
            FinetuneFolder(workdir).write_summary(summary)
    return summary


def _lr_find(config: FinetuneConfig, workdir: pathlib.Path, args, procs: Processes) -> int:
    """``--lr_find``: ``jaxcnn.train.lr_find.find_learning_rate`` on phase 1's start, as ``run_phase``
    builds it (the backbone frozen, its weights loaded, the new head training under Adam with
    ``phase1_lr``): phase 2 starts from phase 1's best weights, which a sweep before training cannot
    have. The plot goes into ``workdir``, which must be new or empty."""
    procs.on_primary(lambda: lr_find.check_folder(workdir))  # before the weights and the data
    path = load_in_turn(lambda: weights_path(config), procs)
    dataset = load_in_turn(lambda: load_data(config), procs)
    model = build_model(config, dataset.num_classes)
    variables = initial_variables(config, model, dataset.image_shape, path)
    if path is None and procs.primary:
        print(NO_WEIGHTS_WARNING, file=sys.stderr)
    labels = freeze.label_tree(variables["params"], phase_rule(config, 1, model.backbone.layer_order()))
    frozen_bn = freeze.frozen_layer_names(labels, under="backbone")
    state_key = jax.random.fold_in(jax.random.split(jax.random.key(config.fit.seed))[1], 1)
    state = TrainState.create(apply_fn=functools.partial(model.apply, frozen_bn=frozen_bn), variables=variables,
                              tx=adam(config.phase1_lr, labels=labels, weight_decay=config.weight_decay),
                              key=state_key)
    fit_config = lr_find.sweep_config(config.phase_fit(1))  # (a cosine schedule: its peak is swept)
    steps = Steps.build(fit_config, labels, train_labels=dataset.train.labels, num_classes=dataset.num_classes)
    _, line = lr_find.find_learning_rate(state, dataset, fit_config, workdir, flag="--phase1_lr", steps=steps,
                                         num_steps=args.lr_find_steps or LR_FIND_STEPS, mesh=make_mesh(),
                                         processes=procs, progress=not args.no_progress)
    print(line)
    if procs.primary:
        print(f"plot: {workdir / lr_find.PLOT}")
    procs.barrier("done")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = _parse(argv)
    return run_main(lambda: _main(args), user_errors=(WeightsUnavailableError,))


def config_of_flags(args) -> FinetuneConfig:
    """The config the flags make: the preset's, with the flags given."""
    config = get_config(args.preset or "default", dataset=args.dataset, weights=args.weights,
                        image_size=args.image_size, phase1_epochs=args.phase1_epochs, phase1_lr=args.phase1_lr,
                        phase2_epochs=args.phase2_epochs,
                        phase2_frozen_layers=args.phase2_frozen_layers, batch_size=args.batch_size,
                        seed=args.seed, model=args.model, data_dir=args.data_dir,
                        augment=False if args.no_augment else None, val_fraction=args.val_fraction,
                        test_fraction=args.test_fraction, stream=args.stream, precision=args.precision,
                        **recipe_overrides(args))
    given, max_loss = max_loss_setting(args.max_loss)
    if given:
        config = dataclasses.replace(config, fit=dataclasses.replace(config.fit, max_loss=max_loss))
    return with_class_weight(config, args.class_weight)


def given_settings(args) -> dict:
    """The settings the command line gave: ``{flag as given: (setting, value)}`` (for ``resumed_config``)."""
    given = {}
    for flag in ("preset", "dataset", "weights", "image_size", "phase1_epochs", "phase1_lr", "phase2_epochs",
                 "phase2_frozen_layers", "batch_size", "seed", "model", "data_dir", "val_fraction", "test_fraction",
                 "stream", "precision", "max_loss", "class_weight"):
        v = getattr(args, flag)
        if v is None:
            continue
        if flag == "max_loss":
            v = max_loss_setting(v)[1]
        elif flag == "class_weight":
            v = None if v == "none" else v
        given[f"--no-{flag}" if v is False else f"--{flag}"] = (flag, v)
    if args.no_augment:
        given["--no_augment"] = ("augment", None)
    return {**given, **recipe_given(args)}


def resumed(args, workdir: pathlib.Path, procs: Processes) -> Optional[FinetuneConfig]:
    """With ``--resume`` of a run in ``workdir``: its recorded settings, with those of the flags given
    that may change (``configs.resumed_config``); None when there is no run to take them from.
    ``--phase2_epochs`` may change, ``--phase1_epochs`` and ``--phase2_frozen_layers`` until phase 2 has started."""
    got = procs.on_primary(FinetuneFolder(workdir).config_to_resume) if args.resume else None
    if got is None:
        return None
    record, phase2_started = got
    fresh = FitConfig()  # (each phase sets its epochs and patiences: phase_fit)
    recorded = recorded_config(FinetuneConfig, record, "finetune", workdir, epochs=fresh.epochs,
                               early_stopping_patience=fresh.early_stopping_patience,
                               plateau_patience=fresh.plateau_patience)
    may_change = {"max_loss", "data_dir", "stream", "phase2_epochs"} | (
        {"phase1_epochs", "phase2_frozen_layers"} if not phase2_started else set())
    config = resumed_config(recorded, given_settings(args), may_change=may_change)
    procs.on_primary(lambda: check_same_folder(record, config, workdir))
    return config


def _main(args) -> int:
    check_lr_find_flags(args)
    procs = join_processes(args)  # first: JAX must not start before the processes are joined
    workdir = path_flag("--workdir", args.workdir)
    if workdir is None:
        flags = config_of_flags(args)
        workdir = pathlib.Path(f"checkpoints/finetune-{flags.dataset}-{flags.preset}")
    config = resumed(args, workdir, procs) or config_of_flags(args)
    if config.dataset == "offline" and args.data_dir is not None:
        raise ValueError("--data_dir applies to --dataset tf_flowers or folder, not to the embedded offline data")
    if config.dataset != "folder":
        for flag in ("val_fraction", "test_fraction", "stream"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag} applies to --dataset folder, not to {config.dataset}")
    if args.lr_find:  # a sweep of phase 1 instead of a run: only <workdir>/lr_find.png is written
        return _lr_find(config, workdir, args, procs)
    summary = run(config, workdir, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress)
    s1, s2 = summary["phase1"], summary["phase2"]
    print(f"\n{summary['dataset']} {summary['image_size']}px, "
          f"{'pretrained' if summary['pretrained'] else 'NO PRETRAINED WEIGHTS'}: test accuracy phase 1 "
          f"{s1['test_accuracy']:.4f}, phase 2 {s2['test_accuracy']:.4f}; {summary['wall_time_s']:.0f} s on "
          f"{summary['device']}")
    print(f"records: {workdir}/summary.json, {workdir}/phase1/, {workdir}/phase2/ (checkpoints/best inside each)")
    procs.barrier("done")  # every process leaves together (JAX's shutdown barrier has a deadline)
    return 0


if __name__ == "__main__":
    exit_process(main())
