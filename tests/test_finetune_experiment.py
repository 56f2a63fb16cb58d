"""The two-phase fine-tuning experiment end to end on the offline data (ResNetTiny, the smoke
preset), its freezing contract checked bitwise on the checkpoints it writes, its records, and
its weight errors; and the ``Classifier(hidden=...)`` head against NumPy."""

import contextlib
import io
import json
import urllib.error

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from float64_oracle import assert_close_to_float64, fan_ins
from jaxcnn import inference
from jaxcnn.experiments import filters, finetune
from jaxcnn.models import Classifier, ResNetTiny, model_spec
from jaxcnn.runfolder import RunFolder

K = 20  # smoke preset: ResNetTiny's Keras layers[:20] frozen in phase 2 (ends at conv3_block1_1_conv)
TINY_ORDER = ResNetTiny(include_top=False, pooling="avg").layer_order()


def host(tree):
    return jax.tree.map(lambda a: np.array(a, copy=True), jax.device_get(tree))


def leaves(tree):
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def same_bits(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run: (workdir, summary, {phase: initial variables}, stdout, stderr)."""
    workdir = tmp_path_factory.mktemp("finetune")
    starts = {}

    def on_start(phase, state):  # copied now: fit donates the state's buffers
        starts[phase] = {"params": host(state.params), "batch_stats": host(state.batch_stats),
                         "step": int(state.step)}

    real_fit = finetune.fit

    def fit_returning_garbage(*args, **kwargs):
        # fit's returned state is phase 1's best weights in memory; spoil it, so that phase 2
        # can only start from the phase-1 checkpoint if it reads it back from disk.
        state, history, summary = real_fit(*args, **kwargs)
        return state.replace(params=jax.tree.map(lambda a: a + 1.0, state.params)), history, summary

    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.setattr(finetune, "fit", fit_returning_garbage)
        summary = finetune.run(finetune.get_config("smoke"), workdir, progress=False, on_phase_start=on_start)
    return workdir, summary, starts, out.getvalue(), err.getvalue()


def best_variables(workdir, phase):
    restored = finetune.restore_phase(workdir, phase)
    assert restored.config["experiment"]["phase"] == phase and restored.config["model"]["kind"] == "classifier"
    return restored.variables


# --------------------------------------------------------------------------- the run


def test_records_and_accuracies(smoke_run):
    workdir, summary, _, out, err = smoke_run
    on_disk = json.loads((workdir / "summary.json").read_text())
    assert on_disk["pretrained"] is False and on_disk["weights"] == "none"
    assert on_disk["dataset"] == "offline" and on_disk["image_size"] == 32 and on_disk["num_train"] == 64
    ds = finetune.load_data(finetune.get_config("smoke"))
    for phase in (1, 2):
        d = workdir / f"phase{phase}"
        rec = json.loads((d / "summary.json").read_text())
        history = json.loads((d / "history.json").read_text())
        assert [r["epoch"] for r in history] == [1, 2]
        assert on_disk[f"phase{phase}"]["test_accuracy"] == rec["test_accuracy"]
        assert (d / "history.csv").read_text().count("\n") == 3
        assert (d / "checkpoints" / "best").is_dir() and (d / "freeze_summary.txt").is_file()
        # The reported accuracy is what the best checkpoint scores on the test set, with the run's own
        # (caffe) preprocessing, the model rebuilt from its config.json alone.
        restored = inference.restore(d)
        assert restored.config["fit"]["preprocess"] == "caffe"
        assert restored.model == finetune.build_model(finetune.get_config("smoke"), 10)
        assert restored.config["model"] == model_spec(restored.model)
        probs = restored.predict(ds.test.images)
        assert rec["test_accuracy"] == pytest.approx(np.mean(probs.argmax(-1) == ds.test.labels), abs=1e-6)
        config = restored.config["experiment"]
        assert rec["num_test"] == 32 and config["freeze_rule"] == ("backbone('backbone')" if phase == 1
                                                                   else f"first_n_keras_layers({K})")
        lr = 1e-3 if phase == 1 else 1e-5  # recorded once, from the optimizer
        assert restored.config["optimizer"] == {"learning_rate": lr, "weight_decay": 0.0}
        assert "learning_rate" not in restored.config["fit"]
    assert on_disk["phase1"]["learning_rate"] == 1e-3 and on_disk["phase2"]["learning_rate"] == 1e-5
    # The Keras-like counts, printed at the start of each phase; phase 1: the head alone trains.
    head = 32 * 256 + 256 + 256 * 10 + 10
    assert f"Trainable params: {head:,} " in out
    assert on_disk["phase1"]["trainable_params"] == head
    assert on_disk["phase2"]["trainable_params"] > head
    assert out.count("Non-trainable params:") == 2
    assert "WITHOUT pretrained weights" in err and "WITHOUT pretrained weights" not in out


def test_phase1_moves_the_head_only(smoke_run):
    workdir, _, starts, _, _ = smoke_run
    before, after = starts[1], best_variables(workdir, 1)
    assert before["step"] == 0
    for col in ("params", "batch_stats"):
        b, a = leaves(before[col]["backbone"]), leaves(after[col]["backbone"])
        assert b.keys() == a.keys() and len(b) > 0
        for k in b:
            assert same_bits(b[k], a[k]), (col, k)
    for layer in ("head_hidden", "head"):
        for k, v in leaves(before["params"][layer]).items():
            assert not np.array_equal(v, leaves(after["params"][layer])[k]), (layer, k)


def test_phase2_starts_from_the_phase1_checkpoint_bitwise(smoke_run):
    workdir, _, starts, _, _ = smoke_run
    start, ckpt = starts[2], best_variables(workdir, 1)
    assert start["step"] == 0  # a fresh optimizer (the seed recompiles with Adam 1e-5)
    for col in ("params", "batch_stats"):
        s, c = leaves(start[col]), leaves(ckpt[col])
        assert s.keys() == c.keys()
        for k in s:
            assert same_bits(s[k], c[k]), (col, k)
    # ... and not phase 1's starting point (so the phase-1 training is carried over).
    assert not np.array_equal(start["params"]["head"]["kernel"], starts[1]["params"]["head"]["kernel"])


def test_phase2_keeps_the_first_k_keras_layers_and_moves_the_rest(smoke_run):
    workdir, _, starts, _, _ = smoke_run
    before, after = starts[2], best_variables(workdir, 2)
    frozen = set(TINY_ORDER[:K])
    assert "conv3_block1_1_conv" in frozen and "conv3_block1_1_bn" not in frozen  # stops inside a block
    n_frozen = n_moved = 0
    for col in ("params", "batch_stats"):
        for layer, vars_before in before[col]["backbone"].items():
            for name, v in vars_before.items():
                w = np.asarray(after[col]["backbone"][layer][name])
                if layer in frozen:
                    assert same_bits(np.asarray(v), w), (col, layer, name)
                    n_frozen += 1
                else:
                    assert not np.array_equal(v, w), (col, layer, name)
                    n_moved += 1
    assert n_frozen == 6 * 2 + 5 * (2 + 2)  # 6 convs (kernel, bias), 5 BNs (scale, bias; mean, var)
    assert n_moved > n_frozen
    for layer in ("head_hidden", "head"):
        assert not np.array_equal(before["params"][layer]["kernel"], after["params"][layer]["kernel"])


# --------------------------------------------------------------------------- weights and errors


def run_main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = finetune.main(argv)
    return code, out.getvalue(), err.getvalue()


def test_missing_weight_file_exits_with_a_clear_message(tmp_path):
    missing = tmp_path / "nope.h5"
    code, _, err = run_main(["--preset", "smoke", "--weights", str(missing), "--workdir", str(tmp_path / "w")])
    assert code == 2
    assert f"error: resolve_weights: weights={str(missing)!r} is neither 'imagenet' nor an existing file" in err
    assert "Traceback" not in err and not (tmp_path / "w").exists()


def test_imagenet_without_network_says_where_to_put_the_file(tmp_path, monkeypatch):
    from jaxcnn.weights import imagenet

    def offline(url, dest):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(imagenet, "_download", offline)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    code, _, err = run_main(["--preset", "smoke", "--model", "resnet50", "--weights", "imagenet",
                             "--workdir", str(tmp_path / "w")])
    want = tmp_path / "keras" / "models" / "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert code == 2 and err.startswith("error: fetch_imagenet_weights: could not download")
    assert f"copy it to {want}" in err and "Traceback" not in err
    assert not (tmp_path / "w").exists()


def test_a_used_workdir_is_refused_untouched(smoke_run):
    workdir = smoke_run[0]
    before = sorted(p.relative_to(workdir) for p in workdir.rglob("*"))
    code, _, err = run_main(["--preset", "smoke", "--workdir", str(workdir)])
    assert code == 2 and "already hold checkpoints" in err
    assert sorted(p.relative_to(workdir) for p in workdir.rglob("*")) == before


def test_config_errors():
    with pytest.raises(ValueError, match="unknown preset 'big'"):
        finetune.get_config("big")
    with pytest.raises(ValueError, match="image_size=16; ResNet50 needs >= 32"):
        finetune.get_config("smoke", image_size=16)
    with pytest.raises(ValueError, match="weights='imagenet' is a ResNet50 file"):
        finetune.get_config("smoke", weights="imagenet")
    with pytest.raises(ValueError, match=r"\['epochs'\] are set per phase; use phase1_epochs"):
        finetune.get_config("smoke", epochs=3)
    with pytest.raises(ValueError, match=r"unknown settings \['depth'\]"):
        finetune.get_config("smoke", depth=3)
    assert finetune.get_config("default").weights == "imagenet"
    c = finetune.get_config("default")
    assert (c.dataset, c.image_size, c.phase1_epochs, c.phase2_epochs, c.fit.batch_size) == ("tf_flowers", 224, 10, 20,
                                                                                              32)
    assert c.fit.augment.rotation == 0.0 and c.fit.preprocess == "caffe"
    assert finetune.get_config("smoke", augment=False).fit.augment is None
    assert (c.phase1_lr, c.phase2_lr, c.phase2_frozen_layers, c.hidden, c.dropout) == (1e-3, 1e-5, 100, 256, 0.5)


def test_weight_file_fills_the_backbone(tmp_path):
    """``--weights PATH``: a Keras legacy file of the tiny backbone lands bitwise in phase 1's start."""
    import os

    os.environ.setdefault("KERAS_BACKEND", "jax")
    pytest.importorskip("keras")
    import h5py
    from keras.src.applications import resnet as keras_resnet
    from keras.src.legacy.saving import legacy_h5_format

    def stack_fn(x):
        x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, stride1=1, name="conv2")
        x = keras_resnet.stack_residual_blocks_v1(x, 4, 1, name="conv3")
        x = keras_resnet.stack_residual_blocks_v1(x, 8, 1, name="conv4")
        return keras_resnet.stack_residual_blocks_v1(x, 8, 1, name="conv5")

    kmodel = keras_resnet.ResNet(stack_fn, preact=False, use_bias=True, include_top=False, weights=None,
                                 input_shape=(32, 32, 3), name="tiny")
    rng = np.random.default_rng(0)
    for w in kmodel.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype(np.float32))
    path = tmp_path / "tiny_notop.h5"
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, kmodel)

    config = finetune.get_config("smoke", weights=str(path))
    assert finetune.weights_path(config) == path
    model = finetune.build_model(config, num_classes=10)
    variables = finetune.initial_variables(config, model, (32, 32, 3), path)
    flax_of = {"kernel": ("params", "kernel"), "bias": ("params", "bias"), "gamma": ("params", "scale"),
               "beta": ("params", "bias"), "moving_mean": ("batch_stats", "mean"),
               "moving_variance": ("batch_stats", "var")}
    for w in kmodel.weights:
        layer, name = w.path.rsplit("/", 1)
        col, leaf = flax_of[name]
        np.testing.assert_array_equal(np.asarray(variables[col]["backbone"][layer][leaf]), np.asarray(w.numpy()))
    assert variables["params"]["head"]["kernel"].shape == (256, 10)


# --------------------------------------------------------------------------- the head


def test_classifier_hidden_head_matches_numpy():
    model = Classifier(ResNetTiny(include_top=False, pooling="avg"), num_classes=12, dropout_rate=0.5, hidden=7)
    x = jnp.asarray(np.random.default_rng(0).normal(0, 50, (3, 32, 32, 3)).astype(np.float32))
    variables = jax.jit(lambda k: model.init(k, x, train=False))(jax.random.key(0))
    p = variables["params"]
    assert sorted(p) == ["backbone", "head", "head_hidden"]
    assert p["head_hidden"]["kernel"].shape == (32, 7) and p["head"]["kernel"].shape == (7, 12)
    backbone_vars = {"params": p["backbone"], "batch_stats": variables["batch_stats"]["backbone"]}
    with jax.enable_x64(True):  # the features in float64: the backbone in float64 (float64 oracle)
        backbone64 = model.backbone.clone(dtype=jnp.float64)
        feats = np.asarray(jax.jit(lambda v: backbone64.apply(v, jnp.asarray(x, jnp.float64), train=False))(
            jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), backbone_vars)))  # (3, 32)
    assert feats.dtype == np.float64
    h = np.maximum(feats @ np.asarray(p["head_hidden"]["kernel"], np.float64) + np.asarray(p["head_hidden"]["bias"], np.float64), 0.0)
    w2, b2 = np.asarray(p["head"]["kernel"], np.float64), np.asarray(p["head"]["bias"], np.float64)
    want = h @ w2 + b2
    got = jax.jit(lambda v: model.apply(v, x, train=False))(variables)  # inference: dropout is the identity
    # the backbone's and the head's sums as a chain, at the logits' scale
    assert_close_to_float64(got, want, fan_ins(p), np.abs(want).max(), what="logits")
    # Training (every BN frozen, so the features are the same): dropout acts on the 7 hidden
    # units, each zeroed or scaled by 1 / (1 - 0.5). W2 (7, 12) has full column rank, so the
    # head's input can be solved for and checked unit by unit.
    got_t, _ = jax.jit(lambda v: model.apply(v, x, train=True, frozen_bn=frozenset(TINY_ORDER),
                                             rngs={"dropout": jax.random.key(1)}, mutable=["batch_stats"]))(variables)
    z = np.linalg.lstsq(w2.T, (np.asarray(got_t, np.float64) - b2).T, rcond=None)[0].T  # (3, 7)
    tol = 1e-4 * np.abs(h).max()
    dropped, kept = np.abs(z) <= tol, np.abs(z - 2 * h) <= tol
    assert np.all(dropped | kept)
    assert np.any(dropped & (h > tol)) and np.any(kept & (h > tol))
    # hidden=None keeps the earlier head: features -> dropout -> head.
    plain = Classifier(ResNetTiny(include_top=False, pooling="avg"), num_classes=5)
    assert sorted(jax.eval_shape(lambda: plain.init(jax.random.key(0), x, train=False))["params"]) == ["backbone", "head"]
    with pytest.raises(ValueError, match="hidden=0"):
        Classifier(ResNetTiny(include_top=False, pooling="avg"), num_classes=5, hidden=0).init(jax.random.key(0), x,
                                                                                               train=False)


def test_filters_of_a_finetune_phase(smoke_run, tmp_path, capsys):
    """``filters --run RUN/phase1`` draws the phase's backbone conv1 from its best checkpoint."""
    workdir = smoke_run[0]
    out = tmp_path / "figs"
    assert filters.main(["--run", str(workdir / "phase1"), "--resnet_weights", "none", "--out", str(out)]) == 0
    record = json.loads((out / "filters.json").read_text())["classifier"]
    kernel = np.asarray(finetune.restore_phase(workdir, 1).variables["params"]["backbone"]["conv1_conv"]["kernel"])
    assert record["layer"] == "backbone/conv1_conv" and record["kernel"]["shape"] == [7, 7, 3, 64]
    assert record["kernel"]["max"] == pytest.approx(float(kernel.max()))
    assert record["files"] == ["classifier_filters.png", "classifier_filters_per_filter.png",
                               "classifier_activations.png"]
    assert "init_skipped" in record and record["test_accuracy"] == RunFolder(workdir / "phase1").read_summary()[
        "test_accuracy"]
    for name in record["files"]:
        assert (out / name).stat().st_size > 1000


def test_a_cosine_schedule_runs_over_each_phase(tmp_path):
    """lr_schedule="cosine": each phase builds its own steps, and each gets its own warm-up + cosine
    over its epochs (2 of 64 // 16 = 4 steps, no warm-up): epoch e records base * f(4e - 1)."""
    import contextlib
    import io
    import math

    config = finetune.get_config("smoke", lr_schedule="cosine")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        finetune.run(config, tmp_path, progress=False)
    for phase, base in ((1, 1e-3), (2, 1e-5)):
        run = RunFolder(tmp_path / f"phase{phase}")
        assert run.read_config()["fit"]["lr_schedule"] == "cosine"
        for row in run.read_history():
            want = base * (1 + math.cos(math.pi * (4 * row["epoch"] - 1) / 8)) / 2
            # f in float32 (a few ulps of 1), the rate written with 7 significant digits
            assert abs(row["lr"] - want) <= base * 4 * 2.0 ** -23 + 5e-7 * want, (phase, row)


def test_resume_takes_the_runs_own_settings_and_refuses_a_changed_one_in_one_line(tmp_path, capsys):
    """Issue 26: ``--workdir W --phase2_epochs 2 --resume`` and no other flag continues a smoke run
    with its recorded settings, bitwise the run trained with 2 phase-2 epochs at once; a flag
    that differs from the run and may not change is one line (--phase1_epochs, once phase 2 ran)."""
    from test_reliability import assert_same_run, snapshot

    ft = ["--preset", "smoke", "--no_progress", "--phase1_epochs", "1"]
    cut, whole = tmp_path / "cut", tmp_path / "whole"
    assert finetune.main(ft + ["--phase2_epochs", "2", "--workdir", str(whole)]) == 0
    assert finetune.main(ft + ["--phase2_epochs", "1", "--workdir", str(cut)]) == 0
    capsys.readouterr()
    assert finetune.main(["--workdir", str(cut), "--phase2_epochs", "2", "--resume", "--no_progress"]) == 0, \
        capsys.readouterr().err
    assert_same_run(cut / "phase1", whole / "phase1", 1)
    assert_same_run(cut / "phase2", whole / "phase2", 2)
    capsys.readouterr()
    before = snapshot(cut)
    assert finetune.main(["--workdir", str(cut), "--resume", "--seed", "1", "--phase1_epochs", "2",
                          "--model", "tiny"]) == 2
    assert capsys.readouterr().err == (
        "error: --resume: --phase1_epochs 2 (the run's: 1), --seed 1 (the run's: 0): a run continues with its own "
        "settings and these cannot change (what can: --data_dir, --max_loss, --phase2_epochs, --stream); leave them "
        "out, or start a new run with another --workdir (nothing was changed)\n")
    assert snapshot(cut) == before


def test_a_phase_2_setting_out_of_the_models_range_is_refused_before_phase_1_trains(tmp_path, capsys):
    """Issue 26: ``--phase2_frozen_layers`` beyond the chosen model's Keras layers used to fail after phase 1."""
    workdir = tmp_path / "ft"
    assert finetune.main(["--preset", "smoke", "--model", "small", "--phase2_frozen_layers", "57", "--no_progress",
                          "--workdir", str(workdir)]) == 2
    assert capsys.readouterr().err == ("error: phase2_frozen_layers=57 (--phase2_frozen_layers): the small model has "
                                       "56 Keras layers; allowed 0 .. 56 (0: phase 2 trains every layer)\n")
    assert not workdir.exists()
    small = finetune.get_config("default", model="small")  # what --model small alone brings: no ImageNet file
    assert (small.weights, small.phase2_frozen_layers, small.phase2_lr, small.image_size) == ("none", 0, 1e-3, 32)
    given = finetune.get_config("default", model="small", phase2_frozen_layers=8, image_size=48)  # a flag wins
    assert (given.phase2_frozen_layers, given.image_size) == (8, 48)


def test_the_small_model_fine_tunes_on_a_photo_folder_offline_and_resumes_with_phase_2_changed(tmp_path, capsys):
    """The one offline command that fine-tunes on a folder of photos (README): ``--dataset folder
    --data_dir D --model small`` (here with one epoch per phase). A run whose phase 2 has not
    started resumes with another --phase2_frozen_layers."""
    import shutil

    from conftest import write_photo_folder

    write_photo_folder(tmp_path / "photos", bad_files=False)
    workdir = tmp_path / "ft"
    argv = ["--dataset", "folder", "--data_dir", str(tmp_path / "photos"), "--model", "small", "--phase1_epochs", "1",
            "--phase2_epochs", "1", "--no_progress", "--workdir", str(workdir)]
    assert finetune.main(argv) == 0, capsys.readouterr().err
    config = RunFolder(workdir / "phase2").read_config()
    assert (config["experiment"]["weights"], config["experiment"]["phase2_frozen_layers"]) == ("none", 0)
    assert config["data"]["image_shape"] == [32, 32, 3] and config["data"]["num_classes"] == 3
    assert json.loads((workdir / "summary.json").read_text())["phase2"]["stop_epoch"] == 1
    # phase 1 done, phase 2 not started (what the old late failure left): the phase-2 setting may change
    shutil.rmtree(workdir / "phase2")
    (workdir / "summary.json").unlink()
    capsys.readouterr()
    assert finetune.main(["--workdir", str(workdir), "--resume", "--phase2_frozen_layers", "10", "--no_progress"]) == 0, \
        capsys.readouterr().err
    assert "phase 1: already complete" in capsys.readouterr().out
    assert RunFolder(workdir / "phase2").read_config()["experiment"]["freeze_rule"] == "first_n_keras_layers(10)"
