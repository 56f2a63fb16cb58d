"""Precise BatchNorm against statistics computed by hand in float64 NumPy over the same batches."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import reference
from jaxcnn.models import CifarCNN
from jaxcnn.train import TrainState, adam
from jaxcnn.train.precise_bn import precise_batch_stats

EPS32 = float(np.finfo(np.float32).eps)
BN_EPSILON = 1e-3  # CifarCNN's (Keras')


def _state(momentum: float, seed: int = 0):
    model = CifarCNN(num_classes=3, widths=(4,), dense_units=4, conv_dropout="none", dense_dropout=0.0,
                     bn_momentum=momentum)
    variables = model.init(jax.random.key(seed), jnp.zeros((1, 8, 8, 3)), train=False)
    # moving statistics far from the data's, so an estimate that leaned on them would show
    stats = jax.tree.map(lambda a: jnp.full_like(a, 7.0), variables["batch_stats"])
    state = TrainState.create(apply_fn=model.apply, variables={**variables, "batch_stats": stats},
                              tx=adam(1e-3), key=jax.random.key(1))
    return state


def _np_block1(params, images):
    """float64: the inputs of block1_bn1 and block1_bn2 in train mode (each BN normalises by its
    batch's own statistics), ``(N, H, W, 4)`` each."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    x = images.astype(np.float64) / 255.0
    pad = ((1, 1), (1, 1))
    a1 = np.maximum(reference.conv2d_forward(x, p["block1_conv1"]["kernel"], p["block1_conv1"]["bias"],
                                             padding=pad)[0], 0.0)
    m, v = a1.mean(axis=(0, 1, 2)), a1.var(axis=(0, 1, 2))
    y = (a1 - m) / np.sqrt(v + BN_EPSILON) * p["block1_bn1"]["scale"] + p["block1_bn1"]["bias"]
    a2 = np.maximum(reference.conv2d_forward(y, p["block1_conv2"]["kernel"], p["block1_conv2"]["bias"],
                                             padding=pad)[0], 0.0)
    return a1, a2


@pytest.mark.parametrize("momentum", [0.99, 0.9])
def test_precise_statistics_are_the_average_of_the_batches_statistics(momentum):
    state = _state(momentum)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8), "label": np.zeros(6, np.int32)}
               for _ in range(4)]
    got = precise_batch_stats(state, iter(batches), momentum=momentum, num_batches=3)  # the first 3 only
    want = {}
    for name in ("block1_bn1", "block1_bn2"):
        means, vars_ = [], []
        for b in batches[:3]:
            a = _np_block1(state.params, b["image"])[0 if name.endswith("1") else 1]
            means.append(a.mean(axis=(0, 1, 2)))
            vars_.append(a.var(axis=(0, 1, 2)))
        want[name] = {"mean": np.mean(means, 0), "var": np.mean(vars_, 0)}
    # float32: the forward (sums of 27 / 36 terms), the variance as E[x^2] - E[x]^2 over 384 values,
    # and solving new = m old + (1 - m) batch for batch, which scales rounding by (1 + m) / (1 - m)
    amplify = (1 + momentum) / (1 - momentum)
    for name, w in want.items():
        for k in ("mean", "var"):
            g = np.asarray(got[name][k], np.float64)
            scale = np.abs(w[k]) + np.abs(w["mean"]) ** (2 if k == "var" else 1) + 1e-3
            tol = 64 * EPS32 * amplify * scale
            assert np.all(np.abs(g - w[k]) <= tol), (name, k, np.abs(g - w[k]).max(), tol.min())
            assert not np.allclose(g, 7.0)
    # the dense layer's statistics moved too (re-estimated, not the 7s)
    assert not np.allclose(np.asarray(got["dense_bn"]["mean"]), 7.0)


def test_a_layer_whose_statistics_do_not_move_keeps_them_exactly():
    state = _state(0.99)
    model = CifarCNN(num_classes=3, widths=(4,), dense_units=4, conv_dropout="none", dense_dropout=0.0)

    def apply_fn(variables, x, *, train, rngs=None, mutable=False):  # dense_bn frozen: its statistics kept
        out = model.apply(variables, x, train=train, rngs=rngs, mutable=mutable)
        if mutable:
            logits, new = out
            stats = dict(new["batch_stats"])
            stats["dense_bn"] = variables["batch_stats"]["dense_bn"]
            return logits, {"batch_stats": stats}
        return out

    state = state.replace(apply_fn=apply_fn)
    batch = {"image": np.random.default_rng(1).integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)}
    got = precise_batch_stats(state, [batch], momentum=0.99, num_batches=1)
    for k in ("mean", "var"):
        np.testing.assert_array_equal(np.asarray(got["dense_bn"][k]), np.asarray(state.batch_stats["dense_bn"][k]))
    assert not np.allclose(np.asarray(got["block1_bn1"]["mean"]), 7.0)


def test_bad_arguments_are_named():
    state = _state(0.99)
    with pytest.raises(ValueError, match=r"num_batches=0; must be an int >= 1"):
        precise_batch_stats(state, [], momentum=0.99, num_batches=0)
    with pytest.raises(ValueError, match=r"batches is empty"):
        precise_batch_stats(state, [], momentum=0.99, num_batches=2)
    with pytest.raises(ValueError, match=r"momentum=1.0; must be in \[0, 1\)"):
        precise_batch_stats(state, [], momentum=1.0, num_batches=2)


def test_fit_writes_the_statistics_of_the_epochs_first_batches_into_its_checkpoint(tmp_path):
    """FitConfig.precise_bn_batches=2: the checkpoint of epoch 1 holds, for the weights it holds, the mean of
    the NumPy (float64) means and variances over epoch 1's first 2 training batches (in the epoch's order)."""
    from jaxcnn.data import Dataset, Split
    from jaxcnn.runfolder import RunFolder
    from jaxcnn.train import FitConfig, fit, state_from_tree, state_to_tree
    from jaxcnn.train.feed import train_plan

    momentum = 0.9
    rng = np.random.default_rng(2)

    def split(n):
        return Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))

    data = Dataset(name="synthetic", train=split(48), val=split(8), test=split(8), num_classes=3,
                   class_names=("a", "b", "c"))
    config = FitConfig(epochs=1, batch_size=16, eval_batch_size=8, augment=None, precise_bn_batches=2, seed=3)
    state = _state(momentum)
    template = jax.tree.map(jnp.copy, state)  # fit donates the state it is given
    fit(state, data, config, tmp_path, progress=False)
    with RunFolder(tmp_path).checkpoints(read_only=True) as ckpts:
        tree, _ = ckpts.restore("latest", target=state_to_tree(template))
    saved = state_from_tree(template, tree)
    assert int(saved.step) == 3  # 48 / 16 steps: the statistics were estimated after the last one
    rows = train_plan(3, 1, 48, 16)[:2]
    for k, name in enumerate(("block1_bn1", "block1_bn2")):
        acts = [_np_block1(saved.params, data.train.images[r])[k] for r in rows]
        want_mean = np.mean([a.mean(axis=(0, 1, 2)) for a in acts], 0)
        want_var = np.mean([a.var(axis=(0, 1, 2)) for a in acts], 0)
        amplify = (1 + momentum) / (1 - momentum)
        for got, want in ((saved.batch_stats[name]["mean"], want_mean), (saved.batch_stats[name]["var"], want_var)):
            got = np.asarray(got, np.float64)
            tol = 64 * EPS32 * amplify * (np.abs(want) + want_mean ** 2 + np.abs(want_mean) + 1e-3)
            assert np.all(np.abs(got - want) <= tol), (name, np.abs(got - want).max())


def test_a_run_with_precise_bn_stopped_mid_epoch_and_resumed_is_the_uninterrupted_one(tmp_path, capsys,
                                                                                        monkeypatch):
    """The smoke preset with --precise_bn 3 for 2 epochs, whole and stopped by SIGTERM in epoch 2 then resumed:
    bitwise the same checkpoint (BatchNorm statistics included), history and test scores."""
    import signal

    from jaxcnn.experiments import cifar10
    from test_reliability import SMOKE, SignalsItself, assert_same_run, cli, run_with_steps

    args = SMOKE + ["--precise_bn", "3", "--epochs", "2"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert cli(capsys, args + ["--workdir", str(whole)])[0] == 0
    monkeypatch.setattr(cifar10, "run", run_with_steps(cifar10.run, train=SignalsItself(11, signal.SIGTERM)))
    code, _, err = cli(capsys, args + ["--workdir", str(cut)])
    monkeypatch.undo()
    assert code == 143 and "stopped by SIGTERM in epoch 2 at step 4 of 8" in err
    assert cli(capsys, args + ["--workdir", str(cut), "--resume"])[0] == 0
    assert_same_run(cut, whole, 2)
    a, b = (json.loads((p / "summary.json").read_text()) for p in (whole, cut))
    assert (a["test_loss"], a["test_accuracy"], a["best_epoch"]) == (b["test_loss"], b["test_accuracy"],
                                                                     b["best_epoch"])


def test_precise_bn_beyond_an_epoch_says_so_and_records_the_epochs_batches(tmp_path, capsys):
    """The smoke preset's epoch has 8 batches (256 / 32): --precise_bn 100 says it uses 8 (one line, before
    training) and records 8 in config.json (fit then runs 8: the next test); --resume with the same flag
    continues it (the same config, not a changed one)."""
    from jaxcnn.runfolder import RunFolder
    from test_reliability import SMOKE, cli

    workdir = tmp_path / "run"
    code, _, err = cli(capsys, SMOKE + ["--precise_bn", "100", "--epochs", "1", "--workdir", str(workdir)])
    assert code == 0, err
    assert err.splitlines()[0] == "--precise_bn 100: an epoch has only 8 batches; using 8", err
    assert err.count("an epoch has only") == 1
    assert RunFolder(workdir).read_config()["fit"]["precise_bn_batches"] == 8
    code, _, err = cli(capsys, SMOKE + ["--precise_bn", "100", "--epochs", "2", "--workdir", str(workdir), "--resume"])
    assert code == 0, err
    assert len(RunFolder(workdir).read_history()) == 2 and RunFolder(workdir).read_config()["fit"]["epochs"] == 2


def test_fit_uses_and_records_at_most_an_epochs_batches_of_precise_bn(tmp_path, monkeypatch):
    """FitConfig(precise_bn_batches=5) over 3 batches an epoch (48 / 16): one note, config.json records 3, and
    the checkpoint is bitwise the one of precise_bn_batches=3."""
    from jaxcnn.data import Dataset, Split
    from jaxcnn.runfolder import RunFolder
    from jaxcnn.train import FitConfig, fit, loop

    notes = []
    monkeypatch.setattr(loop.log, "warning", lambda msg, *args: notes.append(msg % args))
    rng = np.random.default_rng(4)

    def split(n):
        return Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))

    data = Dataset(name="synthetic", train=split(48), val=split(8), test=split(8), num_classes=3,
                   class_names=("a", "b", "c"))
    leaves = {}
    for n in (5, 3):
        config = FitConfig(epochs=1, batch_size=16, eval_batch_size=8, augment=None, precise_bn_batches=n, seed=3)
        fit(_state(0.9), data, config, tmp_path / str(n), progress=False)
        assert RunFolder(tmp_path / str(n)).read_config()["fit"]["precise_bn_batches"] == 3
        with RunFolder(tmp_path / str(n)).checkpoints(read_only=True) as ckpts:
            tree, _ = ckpts.restore("latest")
        leaves[n] = [np.asarray(a).tobytes() for a in jax.tree.leaves(tree["batch_stats"])]
    assert [n for n in notes if "precise_bn" in n] == ["precise_bn_batches=5: an epoch has only 3 batches; using 3"]
    assert leaves[5] == leaves[3]
