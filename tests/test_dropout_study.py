"""The dropout study end to end on the smoke budget: four runs that differ only in their dropout,
records whose numbers are the runs' own, a Markdown table, and the validation-curve figure."""

import csv
import dataclasses
import json

import matplotlib.image as mpimg
import numpy as np
import pytest

from jaxcnn.experiments import dropout_study as ds
from jaxcnn.runfolder import RunFolder, config_differences

VARIANTS = ("none", "dropout", "spatial", "dropblock")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("study")
    export = workdir.parent / (workdir.name + "_export")
    rc = ds.main(["--preset", "smoke", "--workdir", str(workdir), "--export", str(export), "--no_progress"])
    assert rc == 0
    return workdir, export


def test_variants_share_everything_but_dropout(smoke):
    workdir, _ = smoke
    configs = {v: RunFolder(workdir / v).read_config() for v in VARIANTS}
    dropout_keys = ("conv_dropout", "conv_dropout_rate", "dense_dropout")
    for v in VARIANTS:  # the model and the experiment's record differ in the dropout settings, nothing else
        differ = {d.split(" ")[0] for d in config_differences(configs["none"], configs[v], allowed=frozenset())}
        assert differ == {f"{section}.{k}" for section in ("model", "experiment") for k in dropout_keys
                          if ds.VARIANTS[v][k] != ds.VARIANTS["none"][k]}
        assert {k: configs[v]["model"][k] for k in dropout_keys} == ds.VARIANTS[v]
    fit = configs["none"]["fit"]
    assert fit["augment"] is None
    assert fit["early_stopping_patience"] > fit["epochs"] and fit["plateau_patience"] > fit["epochs"]
    study = ds.get_config("smoke")
    assert (configs["none"]["data"]["num_train"], fit["epochs"], fit["seed"]) == (study.num_train, study.epochs,
                                                                                    study.seed)
    for v in VARIANTS:  # the full budget ran, at a constant learning rate
        hist = json.loads((workdir / v / "history.json").read_text())
        assert [r["epoch"] for r in hist] == list(range(1, study.epochs + 1))
        assert len({r["lr"] for r in hist}) == 1 and hist[0]["lr"] == pytest.approx(study.learning_rate)


def test_records_hold_the_runs_numbers(smoke):
    workdir, _ = smoke
    record = json.loads((workdir / "study.json").read_text())
    rows = {r["variant"]: r for r in record["results"]}
    assert list(rows) == list(VARIANTS)
    for v, r in rows.items():
        last = json.loads((workdir / v / "history.json").read_text())[-1]
        summary = json.loads((workdir / v / "summary.json").read_text())
        assert r["val_accuracy"] == last["val_accuracy"] and r["val_loss"] == last["val_loss"]
        assert r["train_accuracy_running"] == last["train_accuracy"]
        assert r["gap"] == pytest.approx(r["train_accuracy"] - r["val_accuracy"], abs=1e-12)
        assert r["test_accuracy_best_weights"] == summary["test_accuracy"]
        # the inference-mode train accuracy is a multiple of 1 / num_train
        n = record["config"]["num_train"]
        assert r["train_accuracy"] * n == pytest.approx(round(r["train_accuracy"] * n), abs=1e-6)
    with open(workdir / "study.csv") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["variant"] for r in csv_rows] == list(VARIANTS)
    assert float(csv_rows[2]["gap"]) == pytest.approx(rows["spatial"]["gap"])
    md = (workdir / "study.md").read_text().splitlines()
    assert md[0].startswith("| variant |") and len([ln for ln in md if ln.startswith("| ")]) == 5
    assert f"{100 * rows['none']['val_accuracy']:.1f} %" in md[2]
    assert "128 training" in md[-1] and "2 epochs" in md[-1]


def test_inference_train_accuracy_is_recomputable(smoke):
    from jaxcnn.data import make_offline_dataset
    from jaxcnn.inference import predict, restore

    workdir, _ = smoke
    study = ds.get_config("smoke")
    data = make_offline_dataset(num_train=study.num_train, num_val=study.num_val, num_test=study.num_test,
                                seed=study.seed)
    run = restore(workdir / "dropout", which="latest")
    acc = np.mean(predict(run.model, run.variables, data.train.images).argmax(-1) == data.train.labels)
    row = json.loads((workdir / "study.json").read_text())["results"][1]
    assert row["variant"] == "dropout" and row["train_accuracy"] == pytest.approx(acc, abs=1e-9)


def test_val_curves_png_and_export_without_checkpoints(smoke):
    workdir, export = smoke
    for root in (workdir, export):
        img = mpimg.imread(str(root / "plots" / "val_curves.png"))[..., :3]
        assert img.shape == (450, 1200, 3)
        assert img.var() > 1e-4
    for v in VARIANTS:
        curves = mpimg.imread(str(export / v / "plots" / "curves.png"))
        assert curves.shape[:2] == (750, 900) and curves[..., :3].var() > 1e-4
    assert not list(export.rglob("checkpoints")) and not list(export.rglob("tensorboard"))
    assert (export / "study.md").read_text() == (workdir / "study.md").read_text()


def test_refuses_a_workdir_that_holds_runs(smoke, capsys):
    workdir, _ = smoke
    before = sorted(p.name for p in (workdir / "none" / "checkpoints" / "latest").iterdir())
    assert ds.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress"]) == 2
    assert "already holds runs" in capsys.readouterr().err
    assert sorted(p.name for p in (workdir / "none" / "checkpoints" / "latest").iterdir()) == before


def test_config_errors():
    with pytest.raises(ValueError, match="preset='huge'"):
        ds.get_config("huge")
    with pytest.raises(ValueError, match="variants"):
        ds.get_config("smoke", variants=("none", "maxout"))
    with pytest.raises(ValueError, match="unknown settings"):
        ds.get_config("smoke", depth=3)
    cfg = ds.get_config("default")
    assert dataclasses.replace(cfg).widths == (32, 64, 128) and cfg.variants == VARIANTS


def test_figure_marks_the_final_inference_train_accuracy(tmp_path):
    study = ds.get_config("smoke", variants=("none", "dropout"))
    hist = [{"epoch": e, "train_accuracy": 0.5 + 0.1 * e, "val_accuracy": 0.4, "val_loss": 1.0} for e in (1, 2)]
    rows = [dict(variant=v, description=ds.DESCRIPTIONS[v], epochs=2, train_accuracy=acc, val_accuracy=0.4,
                 gap=acc - 0.4, val_loss=1.0, train_accuracy_running=0.7, best_val_accuracy=0.4,
                 best_val_accuracy_epoch=1) for v, acc in (("none", 0.95), ("dropout", 0.75))]
    meta = {"hardware": "test", "wall_time_s": 60.0, "jax_version": "x", "date_utc": "today"}
    fig = ds.write_records(tmp_path, study, rows, {"none": hist, "dropout": hist}, meta)
    stars = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in fig.axes[0].lines
             if ln.get_marker() == "*"}
    assert stars == {"none (train, final, dropout off)": ([2], [0.95]),
                     "dropout (train, final, dropout off)": ([2], [0.75])}
    md = (tmp_path / "study.md").read_text()
    assert "| 95.0 % | 40.0 % | +55.0 pt |" in md and "| 75.0 % | 40.0 % | +35.0 pt |" in md
    assert "1.0 min for all variants" in md


def test_cli_bad_setting_is_an_error_message(tmp_path, capsys):
    workdir = tmp_path / "study"
    assert ds.main(["--preset", "smoke", "--workdir", str(workdir), "--epochs", "0", "--no_progress"]) == 2
    assert "epochs=0" in capsys.readouterr().err
    assert not workdir.exists()
