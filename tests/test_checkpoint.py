"""Run folders and their Orbax checkpoints: exact resume, no overwriting, the resume rule, the records."""

import json

import jax
import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.experiments.cifar10 import build_model, create_state, load_data, run
from jaxcnn.experiments.configs import get_config
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import state_from_tree, state_to_tree

CONFIG = get_config("smoke", epochs=2)  # 256 offline images, tiny CifarCNN, augmentation on


@pytest.fixture(scope="module")
def data():
    return load_data(CONFIG)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory, data):
    workdir = tmp_path_factory.mktemp("two_epochs")
    state, history, summary = run(CONFIG, workdir, dataset=data, progress=False)
    return workdir, state, history, summary


def _latest(workdir, config, data):
    template = create_state(config, build_model(config, data.num_classes), data.image_shape)
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        tree, meta = c.restore("latest", target=state_to_tree(template))
    return state_from_tree(template, tree), meta


def _strip_times(history):
    return [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in history]


def test_resume_continues_exactly(tmp_path, data, two_epochs):
    """2 epochs in one go == 1 epoch, then --resume for the second: the same state, bit for bit."""
    workdir, _, history, summary = two_epochs
    run(get_config("smoke", epochs=1), tmp_path, dataset=data, progress=False)
    _, history2, summary2 = run(CONFIG, tmp_path, dataset=data, progress=False, resume=True)
    a, meta_a = _latest(workdir, CONFIG, data)
    b, meta_b = _latest(tmp_path, CONFIG, data)
    assert int(a.step) == int(b.step) == 2 * (256 // 32)
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats, a.opt_state)),
                    jax.tree.leaves((b.params, b.batch_stats, b.opt_state))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    np.testing.assert_array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))
    assert _strip_times(history2) == _strip_times(history)
    assert meta_a["early_stopping"] == meta_b["early_stopping"] and meta_a["plateau"] == meta_b["plateau"]
    assert summary2["test_accuracy"] == summary["test_accuracy"] and summary2["test_loss"] == summary["test_loss"]


def test_a_fresh_run_never_overwrites_checkpoints(two_epochs, data):
    workdir, *_ = two_epochs
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(CONFIG, workdir, dataset=data, progress=False)
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_changed_config_and_names_the_setting(two_epochs, data):
    workdir, *_ = two_epochs
    config_before = (workdir / "config.json").read_bytes()
    with pytest.raises(ValueError, match=r"optimizer.learning_rate \(0.001 -> 0.5\)"):
        run(get_config("smoke", epochs=3, learning_rate=0.5), workdir, dataset=data, progress=False, resume=True)
    with pytest.raises(ValueError, match=r"model.widths \(\[8, 16, 32\] -> \[8, 16\]\)"):
        run(get_config("smoke", epochs=3, widths=(8, 16)), workdir, dataset=data, progress=False, resume=True)
    assert (workdir / "config.json").read_bytes() == config_before


def test_run_records(two_epochs, data):
    workdir, state, history, summary = two_epochs
    folder = RunFolder(workdir)
    assert folder.read_history() == history
    header = (workdir / "history.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,epoch_time_s,images_per_s"
    config = folder.read_config()
    # the model's every constructor argument, the learning rate from the optimizer, the data to reload
    assert config["model"] == {"kind": "cifar_cnn", "num_classes": 10, "widths": [8, 16, 32], "dense_units": 32,
                               "conv_dropout": "dropout", "conv_dropout_rate": 0.25, "dense_dropout": 0.5,
                               "dropblock_size": 3, "bn_momentum": 0.99, "bn_epsilon": 0.001,
                               "dtype": {"dtype": "float32"}}
    assert config["optimizer"] == {"learning_rate": 1e-3, "weight_decay": 0.0}  # Adam: no weight decay
    assert config["fit"]["epochs"] == 2 and config["fit"]["preprocess"] == "unit"
    assert "learning_rate" not in config["fit"]  # one home: the optimizer
    assert config["experiment"]["name"] == "cifar10" and config["experiment"]["preset"] == "smoke"
    assert config["data"]["source"] == data.source and config["data"]["image_shape"] == [32, 32, 3]
    assert config["data"]["class_names"] == list(data.class_names)
    assert set(summary) >= {"best_epoch", "stopped_early", "stop_epoch", "best_val_loss", "best_val_accuracy",
                            "test_loss", "test_accuracy", "wall_time_s", "dataset", "num_train", "device"}
    assert summary["num_train"] == 256 and summary["dataset"] == "offline"
    assert any(folder.tensorboard_dir.iterdir())


def test_records_are_strict_json(tmp_path):
    folder = RunFolder(tmp_path)
    folder.path.mkdir(exist_ok=True)
    folder.write_summary({"test_loss": float("inf"), "x": [float("nan"), 1.0]})
    text = (tmp_path / "summary.json").read_text()
    assert "Infinity" not in text and "NaN" not in text
    assert json.loads(text) == {"test_loss": None, "x": [None, 1.0]}


def test_restore_errors_name_the_file_and_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        inference.restore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 2, "model": {"kind": "no_such_model"}}))
    with pytest.raises(ValueError, match="kind='no_such_model'"):
        inference.restore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 2, "model": None}))
    with pytest.raises(ValueError, match="no model spec; pass the module"):
        inference.restore(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format_version": 2, "model": {"kind": "cifar_cnn"}}))
    with pytest.raises(FileNotFoundError, match="holds no checkpoints"):
        inference.restore(tmp_path)
    with pytest.raises(ValueError, match="which='newest'"):
        inference.restore(tmp_path, which="newest")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        inference.restore(tmp_path)


def test_the_closed_loop_filter_puts_the_previous_hook_back_once_it_expires(monkeypatch):
    """After a failed read, "Event loop is closed" reports are dropped for a while, not for the rest of
    the process: once expired, the filter hands reports on and puts the previous hook back."""
    import sys
    import types

    from jaxcnn import checkpoint

    seen = []
    previous = seen.append
    monkeypatch.setattr(sys, "unraisablehook", previous)
    closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
    other = types.SimpleNamespace(exc_value=ValueError("something else"))
    clock = [100.0]
    monkeypatch.setattr(checkpoint.time, "monotonic", lambda: clock[0])
    hook = checkpoint._closed_loop_filter(previous, seconds=30.0)
    sys.unraisablehook = hook
    hook(closed)
    hook(other)
    assert seen == [other] and sys.unraisablehook is hook  # dropped while it lasts; others pass
    clock[0] = 131.0
    hook(closed)
    assert seen == [other, closed] and sys.unraisablehook is previous  # expired: handed on, hook back
    sys.unraisablehook = hook
    checkpoint._drop_expired_filter()  # (the next checkpoint read does this too)
    assert sys.unraisablehook is previous
