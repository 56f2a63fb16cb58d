"""config.json's format version: written by every run, formats 2, 1 (unversioned) and 0 (the early flat
config) migrated, others refused in one line; the runs recorded under experiments/ are in today's format."""

import json
import pathlib
import subprocess
import sys

import pytest

from jaxcnn.experiments import cifar10
from jaxcnn.experiments.configs import get_config
from jaxcnn.runfolder import FORMAT_VERSION, RunFolder, UnsupportedRunFormat, migrate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


#: The keys format 4 added to "fit" (and "weight_decay" to "optimizer").
FORMAT_4_FIT = ("label_smoothing", "mixup_alpha", "cutmix_alpha", "lr_schedule", "ema_decay", "flip_tta", "grad_accum_steps")


def _without_format_4(raw: dict, version) -> dict:
    return {**raw, "format_version": version, "fit": {k: v for k, v in raw["fit"].items() if k not in FORMAT_4_FIT},
            "optimizer": {k: v for k, v in raw["optimizer"].items() if k != "weight_decay"},
            "experiment": {k: v for k, v in raw["experiment"].items() if k != "weight_decay"}}


def _as_format_3(raw: dict) -> dict:
    """Today's config as a format-3 jaxcnn wrote it: without the keys format 4 added."""
    return _without_format_4(raw, 3)


def _as_format_2(raw: dict) -> dict:
    """Today's config as a format-2 jaxcnn wrote it: without the keys formats 3 and 4 added."""
    old = _without_format_4(raw, 2)
    old["fit"] = {k: v for k, v in old["fit"].items() if k not in ("warmup_epochs", "precise_bn_batches", "class_weight")}
    old["experiment"] = {k: v for k, v in old["experiment"].items() if k != "bn_momentum"}
    return old


def test_a_run_records_its_format_and_a_format_2_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    cifar10.run(get_config("smoke", epochs=1), workdir, progress=False)
    raw = json.loads((workdir / "config.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 4
    assert (raw["fit"]["warmup_epochs"], raw["fit"]["precise_bn_batches"], raw["fit"]["class_weight"],
            raw["experiment"]["bn_momentum"]) == (0, 0, None, 0.99)
    assert [raw["fit"][k] for k in FORMAT_4_FIT] == [0.0, 0.0, 0.0, "plateau", 0.0, False, 1]
    assert raw["optimizer"] == {"learning_rate": 1e-3, "weight_decay": 0.0} and raw["experiment"]["weight_decay"] == 0.0
    assert migrate_config(_as_format_3(raw), "x") == raw
    # a format-4 config written before lr_schedule and weight_decay were added to the format: what it ran with
    early_4 = _without_format_4(raw, 4)
    early_4["fit"].update({k: raw["fit"][k] for k in FORMAT_4_FIT[:3]})
    assert migrate_config(early_4, "x") == raw
    # the same run as format 2 wrote it (no warm-up, precise BN or momentum keys): migrated to what ran, and it resumes
    (workdir / "config.json").write_text(json.dumps(_as_format_2(raw)))
    assert RunFolder(workdir).read_config() == raw
    _, history, _ = cifar10.run(get_config("smoke", epochs=2), workdir, resume=True, progress=False)
    assert [r["epoch"] for r in history] == [1, 2]
    assert json.loads((workdir / "config.json").read_text())["format_version"] == 4
    # format 1: format 2 without its version
    format_1 = {k: v for k, v in _as_format_2(raw).items() if k != "format_version"}
    assert migrate_config(format_1, "x") == raw


def test_the_migration_from_format_2_keeps_what_the_run_ran_with():
    old = {"format_version": 2, "model": {"kind": "cifar_cnn", "bn_momentum": 0.9}, "data": {},
           "fit": {"epochs": 3}, "experiment": {"name": "cifar10", "widths": [8]}}
    assert migrate_config(old, "x") == {
        "format_version": 4, "model": {"kind": "cifar_cnn", "bn_momentum": 0.9}, "data": {},
        "fit": {"epochs": 3, "warmup_epochs": 0, "precise_bn_batches": 0, "class_weight": None,
                "label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "lr_schedule": "plateau",
                "ema_decay": 0.0, "flip_tta": False, "grad_accum_steps": 1},
        "experiment": {"name": "cifar10", "widths": [8], "bn_momentum": 0.9, "weight_decay": 0.0}}
    finetune = {**old, "experiment": {"name": "finetune"}}  # its own settings have no momentum
    assert migrate_config(finetune, "x")["experiment"] == {"name": "finetune", "weight_decay": 0.0}
    other = {**old, "experiment": {"name": "another"}}  # only the cifar10 and finetune experiments record it
    assert migrate_config(other, "x")["experiment"] == {"name": "another"}


def test_formats_it_cannot_read_are_refused_naming_the_way_out(tmp_path):
    with pytest.raises(UnsupportedRunFormat, match=r"x/config.json is in a run format this jaxcnn cannot read "
                                                   r"\(no format_version and no model / data / fit sections"):
        migrate_config({"epochs": 5, "batch_size": 64}, "x/config.json")
    flat = {**FLAT_DEMO, "dataset": "cifar10"}  # format 0, but data it was never migrated for
    with pytest.raises(UnsupportedRunFormat, match=r"x/config.json is in run format 0 \(the early flat config\), "
                                                   r"but its dataset is 'cifar10': this jaxcnn migrates format 0 only"):
        migrate_config(flat, "x/config.json")
    with pytest.raises(UnsupportedRunFormat, match=r"format 0 \(the early flat config\), but it lacks dense_units, "
                                                   r"widths:"):
        migrate_config({k: v for k, v in FLAT_DEMO.items() if k not in ("widths", "dense_units")}, "x/config.json")
    with pytest.raises(UnsupportedRunFormat, match=r"run format 5, newer than this jaxcnn reads \(4\): upgrade"):
        migrate_config({"format_version": 5, "model": {}, "data": {}, "fit": {}}, "x/config.json")
    with pytest.raises(ValueError, match=r"write_config: config has format_version=1; this jaxcnn writes 4"):
        RunFolder(tmp_path / "r").write_config({"format_version": 1, "model": {}, "data": {}, "fit": {}})
    RunFolder(tmp_path / "r").write_config({"model": {}, "data": {}, "fit": {}})  # stamped with today's format
    assert RunFolder(tmp_path / "r").read_config()["format_version"] == 4


def test_a_command_on_an_unreadable_run_says_so_in_one_line(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 5, "batch_size": 64}))
    done = subprocess.run([sys.executable, "-m", "jaxcnn.experiments.filters", "--run", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {run / 'config.json'} is in a run format this jaxcnn cannot read (no format_version and no model "
        f"/ data / fit sections; it reads format 4 and migrates formats 0 to 3). Its records can still be read "
        f"as JSON; to use the run, train it again with this jaxcnn"]


# The demo run's config as the early flat format wrote it (experiments/cifar10/demo-xeon, before migration).
FLAT_DEMO = {"epochs": 5, "batch_size": 64, "eval_batch_size": 500, "learning_rate": 0.001, "seed": 0,
             "augment": False, "rotation": 15.0, "width_shift": 0.1, "height_shift": 0.1, "horizontal_flip": True,
             "early_stopping_patience": 5, "plateau_factor": 0.5, "plateau_patience": 3, "plateau_min_delta": 0.0001,
             "min_lr": 0.0, "keep_checkpoints": 3, "preset": "demo", "dataset": "offline", "data_dir": None,
             "val_size": 5000, "num_train": 8000, "num_val": 1000, "num_test": 1000, "model": "cifar_cnn",
             "num_classes": 10, "widths": [32, 64, 128], "dense_units": 128, "conv_dropout": "dropout",
             "conv_dropout_rate": 0.25, "dense_dropout": 0.5}


def test_a_format_0_config_is_migrated_key_by_key():
    from jaxcnn.models.cifar_cnn import CifarCNN
    from jaxcnn.models.spec import build_model

    new = migrate_config(FLAT_DEMO, "x/config.json")
    assert new["format_version"] == 4 and new["optimizer"] == {"learning_rate": 0.001, "weight_decay": 0.0}
    assert new["model"] == {"kind": "cifar_cnn", "num_classes": 10, "widths": [32, 64, 128], "dense_units": 128,
                            "conv_dropout": "dropout", "conv_dropout_rate": 0.25, "dense_dropout": 0.5,
                            "dropblock_size": 3, "bn_momentum": 0.99, "bn_epsilon": 1e-3, "dtype": {"dtype": "float32"}}
    model = build_model(new["model"])
    assert isinstance(model, CifarCNN) and model.widths == (32, 64, 128) and model.bn_momentum == 0.99
    assert new["data"]["source"] == {"name": "offline", "data_dir": None, "seed": 0, "num_train": 8000,
                                     "num_val": 1000, "num_test": 1000}
    assert new["data"]["image_shape"] == [32, 32, 3] and new["data"]["class_names"][-1] == "dots"
    assert new["fit"] == {"epochs": 5, "batch_size": 64, "eval_batch_size": 500, "seed": 0, "augment": None,
                          "preprocess": "unit", "early_stopping_patience": 5, "plateau_factor": 0.5,
                          "plateau_patience": 3, "plateau_min_delta": 0.0001, "min_lr": 0.0, "keep_checkpoints": 3,
                          "max_loss": None, "warmup_epochs": 0, "precise_bn_batches": 0, "class_weight": None,
                          "label_smoothing": 0.0, "mixup_alpha": 0.0, "cutmix_alpha": 0.0, "lr_schedule": "plateau",
                          "ema_decay": 0.0, "flip_tta": False, "grad_accum_steps": 1}
    # augmentation off: its unused ranges stay with the experiment's settings, as every other unmapped key
    assert new["experiment"] == {"name": "cifar10", "learning_rate": 0.001, "rotation": 15.0, "width_shift": 0.1,
                                 "height_shift": 0.1, "horizontal_flip": True, "preset": "demo", "dataset": "offline",
                                 "data_dir": None, "val_size": 5000, "num_train": 8000, "num_val": 1000,
                                 "num_test": 1000, "widths": [32, 64, 128], "dense_units": 128,
                                 "conv_dropout": "dropout", "conv_dropout_rate": 0.25, "dense_dropout": 0.5,
                                 "migrated_from": "format 0", "bn_momentum": 0.99, "weight_decay": 0.0}
    on = migrate_config({**FLAT_DEMO, "augment": True}, "x")["fit"]["augment"]
    assert on == {"rotation": 15.0, "width_shift": 0.1, "height_shift": 0.1, "horizontal_flip": True,
                  "interpolation": "nearest"}


def test_a_format_0_finetune_phase_is_migrated():
    from jaxcnn.models.resnet import Classifier, ResNet
    from jaxcnn.models.spec import build_model

    flat = {**{k: v for k, v in FLAT_DEMO.items() if k not in ("widths", "dense_units", "conv_dropout",
                                                                "conv_dropout_rate", "dense_dropout", "val_size")},
            "learning_rate": 1e-05, "augment": True, "rotation": 0.0, "image_size": 32,
            "model": "finetune_classifier", "weights": "none", "hidden": 256, "dropout": 0.5, "phase": 2,
            "phase1_lr": 0.001, "phase2_lr": 1e-05, "backbone": "resnet50", "freeze_rule": "first_n_keras_layers(100)"}
    new = migrate_config(flat, "x/config.json")
    model = build_model(new["model"])
    assert isinstance(model, Classifier) and isinstance(model.backbone, ResNet)
    assert (model.backbone.stage_sizes, model.backbone.include_top, model.backbone.pooling) == ((3, 4, 6, 3), False,
                                                                                              "avg")
    assert (model.hidden, model.dropout_rate, model.num_classes) == (256, 0.5, 10)
    assert new["optimizer"] == {"learning_rate": 1e-05, "weight_decay": 0.0} and new["fit"]["preprocess"] == "caffe"
    assert new["data"]["source"]["image_size"] == 32
    ex = new["experiment"]
    assert (ex["name"], ex["model"], ex["phase"], ex["phase1_lr"], ex["freeze_rule"]) == (
        "finetune", "resnet50", 2, 0.001, "first_n_keras_layers(100)")
    assert "learning_rate" not in ex and "backbone" not in ex and ex["weight_decay"] == 0.0


def test_every_recorded_run_under_experiments_is_in_todays_format():
    paths = sorted(ROOT.glob("experiments/**/config.json"))
    assert len(paths) >= 8
    for path in paths:
        raw = json.loads(path.read_text())
        assert raw.get("format_version") == FORMAT_VERSION, path  # rewritten, not only readable
        assert RunFolder(path.parent).read_config() == raw, path
