"""The training commands' flags, and the names they choose from, with nothing heavy imported.

A command builds its parser from these before it imports JAX, Flax or TensorFlow (seconds), so
that ``--help`` and a mistyped flag answer at once; ``jaxcnn.experiments.cli`` reads the values
(``max_loss_setting``, ``with_class_weight``, ``join_processes``) and ``jaxcnn.experiments.configs``
builds the configs from the names (:data:`PRESETS`, :data:`DATASETS`, :data:`PRECISION_NAMES`).
"""

from __future__ import annotations

import argparse

#: ``jaxcnn.experiments.cifar10``'s presets and datasets (``jaxcnn.experiments.configs.get_config``).
PRESETS = ("default", "demo", "smoke")
DATASETS = ("cifar10", "offline", "folder")
#: ``--precision``'s values, the keys of ``jaxcnn.experiments.configs.PRECISIONS`` (their dtypes).
PRECISION_NAMES = ("float32", "bfloat16")
#: ``jaxcnn.train.FitConfig().max_loss``, said in ``--max_loss``'s help (tests/test_help.py checks it).
DEFAULT_MAX_LOSS_TEXT = "1000"


def add_precision_flag(p) -> None:
    p.add_argument("--precision", choices=PRECISION_NAMES,
                   help="the model's compute dtype (float32); bfloat16 keeps parameters, optimizer state, "
                        "BatchNorm statistics and the loss in float32 (measured: benchmarks/README.md)")


def add_folder_flags(p) -> None:
    """The flags of ``--dataset folder`` that every training command shares (``--data_dir`` and
    ``--image_size`` are the commands' own: they mean more there)."""
    p.add_argument("--val_fraction", type=float,
                   help="folder: fraction of the images for validation (0.1; a val/ subfolder takes precedence)")
    p.add_argument("--test_fraction", type=float,
                   help="folder: fraction of the images for the test (0.1; a test/ subfolder takes precedence)")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="folder: decode each batch from disk in background threads (--stream) or all images into "
                        "memory first (--no-stream); default: stream when they would not fit in a quarter of memory")


def add_class_weight_flag(p) -> None:
    """``--class_weight none|balanced`` (read by ``jaxcnn.experiments.cli.with_class_weight``)."""
    p.add_argument("--class_weight", choices=("none", "balanced"),
                   help="balanced: weight each training example's loss by n / (K * n_c) of its class, so that an "
                        "imbalanced training set's small classes count as much as its large ones (Keras' class_weight); "
                        "default none")


def add_max_loss_flag(p) -> None:
    """``--max_loss`` (read by ``jaxcnn.experiments.cli.max_loss_setting``)."""
    p.add_argument("--max_loss", metavar="LOSS|none",
                   help=f"a training step's loss above this stops the run as diverged, exit 1 (default "
                        f"{DEFAULT_MAX_LOSS_TEXT}; "
                        "the loss of a uniform guess over K classes is ln K, 2.3 for 10); none: no limit. A loss "
                        "that is not finite, training or validation, always stops it")


def add_host_memory_flag(parser) -> None:
    """``--keep_host_memory`` (on) / ``--no-keep_host_memory``; applied by ``jaxcnn.experiments.cli.prepare_host``."""
    parser.add_argument("--keep_host_memory", action=argparse.BooleanOptionalAction, default=True,
                        help="keep the memory each step frees for the next one instead of handing it back to the "
                             "kernel (glibc's malloc; on by default: it spares the page faults of every step; "
                             "measured: benchmarks/README.md); --no-keep_host_memory: glibc's default")


def add_distributed_flags(parser) -> None:
    """``--distributed`` and how to reach the other processes (``jax.distributed.initialize``)."""
    parser.add_argument("--cpu_devices", type=int,
                        help="split the CPU into this many XLA devices, each taking a share of every batch; on the "
                             "2-core CPUs measured (benchmarks/README.md) one device per core trained faster than one "
                             "device at batch 256, less or not at all faster at batch 64; "
                             "batch sizes must divide by it; no effect on a GPU")
    add_host_memory_flag(parser)
    g = parser.add_argument_group("several processes (one per host or per GPU; see the README)")
    g.add_argument("--distributed", action="store_true",
                   help="join the run's other processes (jax.distributed) before anything else; without the "
                        "three flags below, JAX finds them in the environment (TPU pods, SLURM, Open MPI)")
    g.add_argument("--coordinator_address", help="host:port of process 0 (or JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num_processes", type=int, help="how many processes the run has")
    g.add_argument("--process_id", type=int, help="this process's index, 0 .. num_processes - 1")
    g.add_argument("--init_timeout", type=int, default=120,
                   help="seconds to wait at the start for the coordinator and the other processes (120)")
    g.add_argument("--heartbeat_timeout", type=int, default=60,
                   help="seconds without a sign of life after which a process counts as dead and the others "
                        "stop with a message (60)")


#: ``--lr_find_steps``' default (``jaxcnn.train.lr_find``) and its least (the suggestion smooths over
#: at least 5 steps of at least 10).
LR_FIND_STEPS = 200
LR_FIND_MIN_STEPS = 10


def _lr_find_steps(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = None
    if n is None or n < LR_FIND_MIN_STEPS:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= {LR_FIND_MIN_STEPS} (the sweep's training "
                                         f"steps; default {LR_FIND_STEPS})")
    return n


def add_lr_find_flags(p, rate_flag: str) -> None:
    """``--lr_find`` and ``--lr_find_steps`` (read by ``check_lr_find_flags``); ``rate_flag``: the
    flag the suggestion is for."""
    p.add_argument("--lr_find", action="store_true",
                   help=f"instead of training: sweep the learning rate from 1e-7 up over --lr_find_steps steps on a "
                        f"fresh model (nothing of a run is recorded), plot the loss against it into "
                        f"<workdir>/lr_find.png and print the suggested {rate_flag} and why (fastai's lr_find); the "
                        f"workdir must be new or empty")
    p.add_argument("--lr_find_steps", type=_lr_find_steps, metavar="N",
                   help=f"--lr_find: the sweep's training steps, at least {LR_FIND_MIN_STEPS} (default "
                        f"{LR_FIND_STEPS}; it stops sooner where the loss diverges)")


def check_lr_find_flags(args) -> None:
    """ValueError for ``--lr_find_steps`` without ``--lr_find``, or ``--lr_find`` with ``--resume`` /
    ``--overwrite`` (the sweep writes no run)."""
    if args.lr_find_steps is not None and not args.lr_find:
        raise ValueError(f"--lr_find_steps {args.lr_find_steps} applies with --lr_find (add it, or leave the flag out)")
    if args.lr_find:
        for flag in ("resume", "overwrite"):
            if getattr(args, flag):
                raise ValueError(f"--lr_find with --{flag}: the sweep writes no run, only <workdir>/lr_find.png into "
                                 f"a new or empty folder; leave --{flag} out")


#: ``--lr_schedule``'s values: ``jaxcnn.train.config.LR_SCHEDULES`` (tests/test_help.py checks it).
LR_SCHEDULE_NAMES = ("plateau", "cosine")


def _number(flag: str, low: float, *, high=None, allowed: str):
    """An argparse type: a finite float >= ``low`` (and < ``high``), else one line naming ``flag``."""
    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            v = float("nan")
        if not (v >= low and (high is None or v < high)) or v == float("inf"):
            raise argparse.ArgumentTypeError(f"{text!r}: must be {allowed}")
        return v
    parse.__name__ = flag  # (argparse names the type in some messages)
    return parse


def _count(flag: str):
    """An argparse type: an int >= 1, else one line naming ``flag``."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            v = 0
        if v < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: must be an int >= 1 (1: off)")
        return v
    parse.__name__ = flag
    return parse


#: The training recipe's flags, each off by default: ``(flag, setting, argparse keywords)``; the
#: setting is a field of the experiment's config or of its ``fit`` (``jaxcnn.train.FitConfig``).
RECIPE_FLAGS = (
    ("label_smoothing", "label_smoothing",
     dict(type=_number("label_smoothing", 0.0, high=1.0, allowed="a number in [0, 1) (0: off)"), metavar="S",
          help="train on the targets (1 - S) one_hot + S / K (label smoothing; the validation and test losses stay "
               "plain cross-entropy); default 0: off")),
    ("mixup", "mixup_alpha",
     dict(type=_number("mixup", 0.0, allowed="a finite number >= 0 (0: off)"), metavar="ALPHA",
          help="mixup: blend each training batch, after augmentation, with itself in reverse order, "
               "lam ~ Beta(ALPHA, ALPHA), images and one-hot labels alike; with --class_weight an example weighs "
               "its mixed label's mix of the class weights; with --cutmix one of the two per batch; default 0: off")),
    ("cutmix", "cutmix_alpha",
     dict(type=_number("cutmix", 0.0, allowed="a finite number >= 0 (0: off)"), metavar="ALPHA",
          help="cutmix: paste a box of the reversed batch into each training image, the labels mixed by the box's "
               "area, lam ~ Beta(ALPHA, ALPHA); default 0: off")),
    ("lr_schedule", "lr_schedule",
     dict(choices=LR_SCHEDULE_NAMES,
          help="plateau: the seed's (the rate halves after 3 epochs without a better validation loss); cosine: a "
               "linear warm-up over the warm-up epochs (cifar10's --warmup_epochs; 0: none), then a half cosine "
               "to 0 at the last epoch, step by step; default plateau")),
    ("ema", "ema_decay",
     dict(type=_number("ema", 0.0, high=1.0, allowed="0 (off) or a number in (0, 1)"), metavar="DECAY",
          help="keep an exponential moving average of the weights and BatchNorm statistics (ema = DECAY * ema + "
               "(1 - DECAY) * weights after each optimizer update): validation, the best checkpoint, the test, "
               "predict and export use it; a decay of about 1 - 1 / (a few epochs' steps) suits a short run; "
               "default 0: off")),
    ("tta", "flip_tta",
     dict(action=argparse.BooleanOptionalAction, default=None,
          help="flip test-time augmentation: every evaluation (validation, so the best epoch; the test; predict's "
               "default) scores the mean of the softmaxes of each image and its mirror; for images whose mirror is "
               "the same class (photos, not digits or text); export keeps one view; default off")),
    ("grad_accum_steps", "grad_accum_steps",
     dict(type=_count("grad_accum_steps"), metavar="K",
          help="gradient accumulation: one optimizer update from the mean gradient of every K batches of "
               "--batch_size (an update sees K * batch_size examples; memory of one batch); default 1: off")),
    ("weight_decay", "weight_decay",
     dict(type=_number("weight_decay", 0.0, allowed="a finite number >= 0 (0: Adam)"), metavar="WD",
          help="AdamW: decay the kernels by lr * WD each step (not the biases or BatchNorm's scale and bias); "
               "default 0: Adam")),
)


def add_recipe_flags(p) -> None:
    """The training recipe's flags (:data:`RECIPE_FLAGS`; read by :func:`recipe_overrides`)."""
    g = p.add_argument_group("training recipe (each off by default; measured: experiments/recipe/README.md)")
    for flag, _, kwargs in RECIPE_FLAGS:
        g.add_argument(f"--{flag}", **kwargs)


def recipe_overrides(args) -> dict:
    """``{setting: value}`` of the recipe flags given (for ``get_config``)."""
    return {setting: getattr(args, flag) for flag, setting, _ in RECIPE_FLAGS if getattr(args, flag) is not None}


def recipe_given(args) -> dict:
    """``{"--flag": (setting, value)}`` of the recipe flags given (for ``configs.resumed_config``)."""
    return {f"--{'no-' if getattr(args, flag) is False else ''}{flag}": (setting, getattr(args, flag))
            for flag, setting, _ in RECIPE_FLAGS if getattr(args, flag) is not None}
