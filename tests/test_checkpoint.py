"""Orbax checkpoints: exact resume, restore in a fresh process, no overwriting, latest vs best."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from jaxcnn import checkpoint
from jaxcnn.experiments.cifar10 import build_model, create_state, load_data, run
from jaxcnn.experiments.configs import get_config

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
    template = create_state(config, build_model(config), data.image_shape)
    with checkpoint.Checkpoints(workdir) as c:
        return c.restore(template, "latest")


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


def test_restore_in_a_fresh_process_gives_the_same_test_metrics(two_epochs):
    workdir, _, _, summary = two_epochs
    script = textwrap.dedent(f"""
        import json, numpy as np
        from jaxcnn import checkpoint
        from jaxcnn.experiments.cifar10 import load_data
        from jaxcnn.experiments.configs import get_config
        model, variables, config = checkpoint.restore_for_inference({str(workdir)!r})
        test = load_data(get_config(config["preset"], dataset=config["dataset"], seed=config["seed"])).test
        probs = checkpoint.predict(model, variables, test.images, batch_size=64)
        loss = float(np.mean(-np.log(probs[np.arange(len(test)), test.labels])))
        acc = float(np.mean(probs.argmax(-1) == test.labels))
        print(json.dumps({{"loss": loss, "accuracy": acc, "n": len(probs), "rows": float(probs.sum(-1).mean())}}))
    """)
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["n"] == summary["num_test"] == 100
    assert got["rows"] == pytest.approx(1.0, abs=1e-5)
    assert got["accuracy"] == summary["test_accuracy"]
    assert got["loss"] == pytest.approx(summary["test_loss"], rel=1e-5)


def test_a_fresh_run_never_overwrites_checkpoints(two_epochs, data):
    workdir, *_ = two_epochs
    before = {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="already holds checkpoints"):
        run(CONFIG, workdir, dataset=data, progress=False)
    assert {p: p.stat().st_mtime_ns for p in workdir.rglob("*") if p.is_file()} == before


def test_resume_refuses_a_changed_config(two_epochs, data):
    workdir, *_ = two_epochs
    with pytest.raises(ValueError, match="learning_rate"):
        run(get_config("smoke", epochs=3, learning_rate=0.5), workdir, dataset=data, progress=False, resume=True)


def test_run_records(two_epochs):
    workdir, state, history, summary = two_epochs
    assert json.loads((workdir / "history.json").read_text()) == history
    header = (workdir / "history.csv").read_text().splitlines()[0]
    assert header == "epoch,train_loss,train_accuracy,val_loss,val_accuracy,lr,epoch_time_s,images_per_s"
    config = json.loads((workdir / "config.json").read_text())
    assert config["preset"] == "smoke" and config["widths"] == [8, 16, 32] and config["model"] == "cifar_cnn"
    assert set(summary) >= {"best_epoch", "stopped_early", "stop_epoch", "best_val_loss", "best_val_accuracy",
                            "test_loss", "test_accuracy", "wall_time_s", "dataset", "num_train", "device"}
    assert summary["num_train"] == 256 and summary["dataset"] == "offline"
    assert any((workdir / "tensorboard").iterdir())


def test_restore_for_inference_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        checkpoint.restore_for_inference(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model": "no_such_model"}))
    with pytest.raises(ValueError, match="no_such_model"):
        checkpoint.restore_for_inference(tmp_path)


def test_restore_for_inference_without_checkpoints(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(get_config("smoke").to_dict()))
    with pytest.raises(FileNotFoundError, match="no 'best' checkpoints"):
        checkpoint.restore_for_inference(tmp_path)
    with pytest.raises(ValueError, match="which='newest'"):
        checkpoint.restore_for_inference(tmp_path, which="newest")
