"""``python -m jaxcnn.experiments.cifar10`` end to end: offline data, tfds mock CIFAR-10, errors."""

import json
import math

import pytest

from jaxcnn.data import AugmentConfig, DatasetUnavailableError
from jaxcnn.experiments import cifar10
from jaxcnn.experiments.configs import PRESETS, get_config


def test_offline_smoke_run_then_refuse_then_resume(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cifar10.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and str(workdir / "checkpoints" / "best") in out
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dataset"] == "offline" and summary["num_train"] == 256 and summary["stop_epoch"] == 2
    assert 0.0 <= summary["test_accuracy"] <= 1.0 and math.isfinite(summary["test_loss"])
    assert len(json.loads((workdir / "history.json").read_text())) == 2

    # a second fresh run into the same workdir is refused, and nothing is touched
    before = sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir())
    assert cifar10.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress"]) == 2
    assert "already holds checkpoints" in capsys.readouterr().err
    assert sorted(p.name for p in (workdir / "checkpoints" / "latest").iterdir()) == before

    # --resume with more epochs continues from epoch 2
    assert cifar10.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress", "--resume",
                         "--epochs", "3"]) == 0
    history = json.loads((workdir / "history.json").read_text())
    assert [r["epoch"] for r in history] == [1, 2, 3]


def test_cifar10_path_on_tfds_mock_data(tmp_path, capsys):
    tfds = pytest.importorskip("tensorflow_datasets")
    workdir = tmp_path / "run"
    with tfds.testing.mock_data(num_examples=40):
        rc = cifar10.main(["--dataset", "cifar10", "--preset", "smoke", "--data_dir", str(tmp_path / "tfds"),
                           "--val_size", "8", "--workdir", str(workdir), "--no_progress", "--epochs", "1"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dataset"] == "cifar10" and summary["num_train"] == 32 and summary["num_test"] == 40
    config = json.loads((workdir / "config.json").read_text())
    assert config["experiment"]["dataset"] == "cifar10" and config["experiment"]["val_size"] == 8
    assert config["data"]["source"] == {"name": "cifar10", "data_dir": str(tmp_path / "tfds"), "seed": 0,
                                        "val_size": 8}


def test_unavailable_cifar10_exits_with_the_message_and_no_traceback(tmp_path, capsys, monkeypatch):
    def unavailable(config):
        raise DatasetUnavailableError("CIFAR-10 is not here: place cifar-10-binary.tar.gz ... or --dataset offline")

    monkeypatch.setattr(cifar10, "load_data", unavailable)
    assert cifar10.main(["--workdir", str(tmp_path / "run"), "--no_progress"]) == 2
    err = capsys.readouterr().err
    assert "--dataset offline" in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_presets_and_overrides():
    assert set(PRESETS) == {"default", "demo", "smoke"}
    default = get_config("default")
    fit = default.fit
    assert (default.dataset, fit.epochs, fit.batch_size, default.learning_rate) == ("cifar10", 50, 64, 1e-3)
    assert (fit.early_stopping_patience, fit.plateau_patience, fit.plateau_factor) == (5, 3, 0.5)
    assert default.widths == (32, 64, 128) and fit.augment == AugmentConfig() and fit.preprocess == "unit"
    assert get_config("demo").dataset == "offline" and get_config("demo").fit.augment is None
    assert get_config("demo", augment=True).fit.augment == AugmentConfig()
    assert get_config("smoke", epochs=7, seed=None).fit.epochs == 7  # a loop setting, routed to fit
    assert get_config("smoke", epochs=7).fit.seed == 0
    with pytest.raises(ValueError, match="no_such"):
        get_config("smoke", no_such=1)
    with pytest.raises(ValueError, match="preset"):
        get_config("huge")
    with pytest.raises(ValueError, match="dataset='mnist'"):
        get_config("default", dataset="mnist")
    with pytest.raises(ValueError, match="batch_size=0"):
        get_config("default", batch_size=0)


def test_a_folder_run_gets_the_folder_defaults_and_the_seeds_presets_keep_the_seeds_recipe():
    for preset in PRESETS:
        seed = get_config(preset)
        assert (seed.bn_momentum, seed.fit.warmup_epochs, seed.fit.precise_bn_batches) == (0.99, 0, 0)
        folder = get_config(preset, dataset="folder", data_dir="photos")
        assert (folder.bn_momentum, folder.fit.warmup_epochs, folder.fit.precise_bn_batches) == (0.99, 0, 20)
        assert folder.fit.epochs == seed.fit.epochs and folder.widths == seed.widths  # the rest: the preset's
    given = get_config("default", dataset="folder", data_dir="p", bn_momentum=0.9, warmup_epochs=2,
                       precise_bn_batches=0)  # a flag given wins
    assert (given.bn_momentum, given.fit.warmup_epochs, given.fit.precise_bn_batches) == (0.9, 2, 0)
    assert cifar10.build_model(given).bn_momentum == 0.9


def test_default_workdir_never_refuses_or_overwrites(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["--preset", "smoke", "--epochs", "1", "--no_progress"]
    assert cifar10.main(args) == 0 and cifar10.main(args) == 0
    out = capsys.readouterr().out
    first, second = tmp_path / "checkpoints" / "cifar10-offline-smoke", tmp_path / "checkpoints" / "cifar10-offline-smoke-2"
    assert (first / "summary.json").is_file() and (second / "summary.json").is_file()
    assert "cifar10-offline-smoke-2" in out
    # --resume without --workdir continues the base workdir
    assert cifar10.main(args[:2] + ["--epochs", "2", "--no_progress", "--resume"]) == 0
    assert len(json.loads((first / "history.json").read_text())) == 2


@pytest.mark.parametrize("flag, value, message", [("--epochs", "-1", "epochs=-1"),
                                                   ("--learning_rate", "0", "learning_rate=0.0")])
def test_cli_bad_setting_is_an_error_message_not_a_traceback(tmp_path, capsys, flag, value, message):
    workdir = tmp_path / "run"
    assert cifar10.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress", flag, value]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not workdir.exists()


@pytest.mark.parametrize("value, f32, allowed", [
    ("0.99999999", "1", "at most 0.99999994 (float32's largest number below 1)"),
    ("1e-50", "0", "0 or at least 1.4e-45 (float32's smallest number above 0)"),
])
def test_a_bn_momentum_that_float32_cannot_hold_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch,
                                                                                 value, f32, allowed):
    # 0.99999999 is 1.0 in float32, where BatchNorm's statistics update: every variance stayed at 1
    monkeypatch.setattr(cifar10, "load_data", lambda config: pytest.fail("the data was loaded"))
    workdir = tmp_path / "run"
    code = cifar10.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress", "--bn_momentum", value])
    err = capsys.readouterr().err
    assert code == 2 and not workdir.exists()
    assert err == (f"error: --bn_momentum {float(value)!r} is {f32} in float32, where BatchNorm's statistics update; "
                   f"must be {allowed}\n")
    with pytest.raises(ValueError, match=rf"^bn_momentum={float(value)!r} is {f32} in float32"):
        get_config("smoke", bn_momentum=float(value))
    for fine in (0.0, 0.99, 0.99999994, 1.5e-45):  # float32's largest below 1, its smallest above 0
        assert get_config("smoke", bn_momentum=fine).bn_momentum == fine


def test_the_folder_default_of_precise_bn_beyond_an_epoch_is_named_as_the_default(monkeypatch):
    import argparse

    notes = []
    monkeypatch.setattr(cifar10.log, "warning", notes.append)
    folder = get_config("smoke", dataset="folder", data_dir="photos")  # FOLDER_DEFAULTS: 20 batches
    used = cifar10._precise_bn_in_epoch(folder, argparse.Namespace(precise_bn=None), 7 * 32 + 5, True)
    assert used.fit.precise_bn_batches == 7 and used.fit.epochs == folder.fit.epochs
    assert notes == ["--precise_bn 20 (--dataset folder's default): an epoch has only 7 batches; using 7"]
    assert cifar10._precise_bn_in_epoch(folder, argparse.Namespace(precise_bn=None), 20 * 32, False) == folder
    assert len(notes) == 1


def test_resume_takes_the_runs_own_settings_and_refuses_a_changed_one_in_one_line(tmp_path, capsys):
    """Issue 26: the README's ``--workdir W --epochs N --resume`` with no other flag continues the
    run with its recorded settings (a smoke run: no preset or dataset given), bitwise the
    uninterrupted run; a flag that differs from the run and may not change is one line."""
    from test_reliability import assert_same_run, snapshot

    cut, whole = tmp_path / "cut", tmp_path / "whole"
    assert cifar10.main(["--preset", "smoke", "--no_progress", "--workdir", str(whole)]) == 0
    assert cifar10.main(["--preset", "smoke", "--no_progress", "--workdir", str(cut), "--epochs", "1"]) == 0
    capsys.readouterr()
    assert cifar10.main(["--workdir", str(cut), "--epochs", "2", "--resume", "--no_progress"]) == 0, \
        capsys.readouterr().err
    assert_same_run(cut, whole, 2)
    capsys.readouterr()
    before = snapshot(cut)
    assert cifar10.main(["--workdir", str(cut), "--epochs", "3", "--resume", "--dataset", "offline", "--seed", "1",
                         "--no-augment", "--learning_rate", "0.001"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --resume: --seed 1 (the run's: 0), --no-augment (the run's: on): a run continues with its "
                   "own settings and these cannot change (what can: --data_dir, --epochs, --max_loss, --stream); leave "
                   "them out, or start a new run with another --workdir (nothing was changed)\n")
    assert snapshot(cut) == before


def test_a_resume_on_another_device_count_warns_that_it_is_not_bitwise(tmp_path, capsys):
    """Issue 26: the run records its devices; a resume on another count says so in one line."""
    import os
    import pathlib
    import subprocess
    import sys

    import jax

    from jaxcnn.runfolder import RunFolder

    workdir, n = tmp_path / "run", jax.device_count() + 1
    done = subprocess.run([sys.executable, "-m", "jaxcnn.experiments.cifar10", "--preset", "smoke", "--epochs", "1",
                           "--no_progress", "--cpu_devices", str(n), "--workdir", str(workdir)],
                          cwd=pathlib.Path(__file__).resolve().parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"},
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert RunFolder(workdir).read_config()["devices"] == f"cpu x{n}"
    assert cifar10.main(["--workdir", str(workdir), "--epochs", "2", "--resume", "--no_progress"]) == 0
    here = f"{jax.devices()[0].platform} x{jax.device_count()}"
    assert [line for line in capsys.readouterr().err.splitlines() if "resumes on" in line] == [
        f"{workdir}: the run trained on cpu x{n} and resumes on {here}: the same data order, but not bitwise what it "
        f"would have been on cpu x{n} (a batch's sums are split differently); resume on cpu x{n} for that (on a CPU: "
        f"--cpu_devices)"]
    assert RunFolder(workdir).read_config()["devices"] == here  # the layout of the last start
