"""``--lr_find`` (``jaxcnn.train.lr_find``): the sweep's rates are the exponential grid and each
step trains at its own, on ``fit``'s batches with ``fit``'s step; it stops where the loss
diverges; the caller's state is untouched; the commands write only the plot and print the
suggestion; bad flags are one line."""

import dataclasses
import math
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest
from PIL import Image

from jaxcnn.data import Dataset, Split
from jaxcnn.experiments import cifar10, finetune
from jaxcnn.train import FitConfig, Steps, TrainState, adam, get_learning_rate, make_mesh, state_to_tree
from jaxcnn.train.feed import train_plan
from jaxcnn.train.lr_find import PLOT, lr_find, lr_grid
from jaxcnn.train.steps import balanced_class_weights


class Linear(nn.Module):
    """Flatten + Dense from zero weights: the logits of the first step are 0, its loss ln K."""

    @nn.compact
    def __call__(self, x, *, train: bool):
        return nn.Dense(3, kernel_init=nn.initializers.zeros, name="out")(x.reshape((x.shape[0], -1)))


def _problem():
    """Random images with random, imbalanced labels (nothing to learn: a large rate overfits
    each batch and the loss of the next one explodes), a zero-initialised linear model."""
    rng = np.random.default_rng(0)
    split = lambda n: Split(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),  # noqa: E731
                            rng.choice(3, n, p=[0.6, 0.3, 0.1]).astype(np.int32))
    ds = Dataset(name="synthetic", train=split(64), val=split(16), test=split(16), num_classes=3,
                 class_names=("a", "b", "c"))
    model = Linear()
    variables = model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32), train=False)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    config = FitConfig(epochs=1, batch_size=16, eval_batch_size=16, augment=None, class_weight="balanced", seed=3)
    return ds, state, config


def test_the_grid_is_exponential_from_start_to_end():
    np.testing.assert_allclose(lr_grid(1e-7, 1e2, 10), [10.0 ** k for k in range(-7, 3)], rtol=1e-13, atol=0)
    grid = lr_grid(1e-7, 10.0, 200)
    i = np.arange(200, dtype=np.float64)
    np.testing.assert_allclose(grid, 1e-7 * (10.0 / 1e-7) ** (i / 199), rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="num_steps=5"):
        lr_grid(1e-7, 10.0, 5)


class _Recording:
    """The real jitted train step, recording the rate each call trains at, its batch's labels, the
    weights it starts from and its loss (it has ``lower``, as a jitted step has: ``Steps`` takes it
    as it is)."""

    def __init__(self, step):
        self.step, self.lower, self.rates, self.labels, self.kernels, self.losses = step, step.lower, [], [], [], []

    def __call__(self, state, batch):
        self.rates.append(get_learning_rate(state.opt_state))
        self.labels.append(np.asarray(batch["label"]))
        self.kernels.append(np.array(state.params["out"]["kernel"]))
        state, metrics = self.step(state, batch)
        self.losses.append(float(metrics["loss"]))
        return state, metrics


def test_each_step_trains_at_its_rate_on_fits_batches_and_the_sweep_stops_where_the_loss_diverges():
    ds, state, config = _problem()
    steps = Steps.build(config, train_labels=ds.train.labels, num_classes=3)
    recording = _Recording(steps.train)
    lrs, losses = lr_find(state, ds, config, start=1e-5, end=10.0, num_steps=60, mesh=make_mesh(),
                          steps=dataclasses.replace(steps, train=recording), progress=False)
    k = len(lrs)
    assert 10 < k < 60, k  # it diverged before the end of the grid
    np.testing.assert_array_equal(lrs, lr_grid(1e-5, 10.0, 60)[:k])
    np.testing.assert_array_equal(recording.rates, lrs.astype(np.float32))  # step i at rate i (float32)
    # fit's batches: epoch 1's, then epoch 2's, ... (4 batches an epoch)
    plan = np.concatenate([train_plan(config.seed, e, 64, 16) for e in range(1, k // 4 + 2)])[:k]
    np.testing.assert_array_equal(np.stack(recording.labels), ds.train.labels[plan])
    # fit's step (balanced class weights): zero weights give ln 3 a row, times its class's weight
    weights = balanced_class_weights(ds.train.labels, 3)
    assert losses[0] == pytest.approx(math.log(3) * weights[ds.train.labels[plan[0]]].mean(), rel=1e-6)
    # it stops at the first loss that is not finite or above 4x the lowest before it
    for i in range(1, k - 1):
        assert np.isfinite(losses[i]) and losses[i] <= 4 * losses[:i].min(), i
    assert not np.isfinite(losses[-1]) or losses[-1] > 4 * losses[:-1].min()


def test_with_gradient_accumulation_each_rate_is_one_update_of_k_steps_and_its_loss_their_mean():
    ds, state, config = _problem()
    config = dataclasses.replace(config, grad_accum_steps=2)
    steps = Steps.build(config, train_labels=ds.train.labels, num_classes=3)
    recording = _Recording(steps.train)
    lrs, losses = lr_find(state, ds, config, start=1e-4, end=1e-1, num_steps=12, mesh=make_mesh(),
                          steps=dataclasses.replace(steps, train=recording), progress=False)
    assert len(lrs) == 12 and len(recording.rates) == 24  # 12 updates of 2 train steps
    np.testing.assert_array_equal(recording.rates, np.repeat(lrs, 2).astype(np.float32))  # one rate an update
    np.testing.assert_array_equal(losses, np.asarray(recording.losses).reshape(12, 2).mean(axis=1))
    for i in range(0, 22, 2):  # the weights change at the second step of each pair only, as fit's do
        np.testing.assert_array_equal(recording.kernels[i], recording.kernels[i + 1])
        assert not np.array_equal(recording.kernels[i + 1], recording.kernels[i + 2]), i
    # fit's batches in fit's order: the 24 train steps take epoch 1's 4 batches, then epoch 2's, ...
    plan = np.concatenate([train_plan(config.seed, e, 64, 16) for e in range(1, 7)])
    np.testing.assert_array_equal(np.stack(recording.labels), ds.train.labels[plan])


def test_a_cosine_runs_sweep_is_the_plateau_sweep_at_the_peak_rate():
    """The sweep sets the rate itself: a warm-up + cosine config sweeps as reduce-on-plateau does
    (bit for bit), and the command runs (it once failed for want of the run's steps per epoch)."""
    ds, state, config = _problem()
    cosine = dataclasses.replace(config, epochs=3, lr_schedule="cosine", warmup_epochs=1)
    plateau = dataclasses.replace(config, epochs=3, warmup_epochs=1)
    a = lr_find(state, ds, cosine, num_steps=20, mesh=make_mesh(), progress=False)
    b = lr_find(state, ds, plateau, num_steps=20, mesh=make_mesh(), progress=False)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_the_commands_sweep_a_cosine_and_an_accumulating_run(tmp_path, capsys):
    for i, (main, more) in enumerate(((cifar10.main, ["--warmup_epochs", "1"]), (finetune.main, []))):
        assert main(["--preset", "smoke", "--lr_find", "--lr_find_steps", "30", "--lr_schedule", "cosine", *more,
                     "--grad_accum_steps", "2", "--no_progress", "--workdir", str(tmp_path / f"sweep{i}")]) == 0, \
            capsys.readouterr().err
        assert sorted(p.name for p in (tmp_path / f"sweep{i}").iterdir()) == [PLOT]
        assert "suggested " in capsys.readouterr().out


def test_the_state_passed_in_is_unchanged_bitwise():
    ds, state, config = _problem()
    before = jax.device_get(state_to_tree(_problem()[1]))  # a twin (device_get keeps a host copy in the array)
    lr_find(state, ds, config, num_steps=20, mesh=make_mesh(), progress=False)
    assert not any(a.is_deleted() for a in jax.tree.leaves(state))  # the step donates: it must get a copy
    after = jax.device_get(state_to_tree(state))
    assert jax.tree.structure(after) == jax.tree.structure(before)
    for a, b in zip(jax.tree.leaves(after), jax.tree.leaves(before)):
        assert np.asarray(a).dtype == np.asarray(b).dtype and np.array_equal(a, b)


def _suggestion(out: str, flag: str) -> float:
    lines = [ln for ln in out.splitlines() if ln.startswith("suggested ")]
    assert len(lines) == 1, out
    head, why = lines[0].split(": ", 1)
    assert head.startswith(f"suggested {flag} ") and why.startswith("the loss falls fastest at lr "), lines[0]
    return float(head.rsplit(" ", 1)[1])


def test_cifar10_lr_find_writes_only_the_plot_prints_the_suggestion_and_the_run_can_follow(tmp_path, capsys):
    workdir = tmp_path / "run"
    assert cifar10.main(["--preset", "smoke", "--dataset", "offline", "--workdir", str(workdir), "--no_progress",
                         "--lr_find", "--lr_find_steps", "100"]) == 0
    out = capsys.readouterr().out
    assert 1e-7 <= _suggestion(out, "--learning_rate") <= 10
    assert f"plot: {workdir / PLOT}" in out
    assert sorted(p.name for p in workdir.rglob("*")) == [PLOT]
    with Image.open(workdir / PLOT) as im:
        assert im.format == "PNG" and im.size == (600, 400)
    plot = (workdir / PLOT).read_bytes()
    # the run the sweep was for trains into the same folder; the plot stays
    assert cifar10.main(["--preset", "smoke", "--dataset", "offline", "--workdir", str(workdir), "--no_progress",
                         "--epochs", "1"]) == 0
    assert (workdir / "config.json").is_file() and (workdir / PLOT).read_bytes() == plot


def test_lr_find_refuses_a_folder_that_holds_a_run_and_changes_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "config.json").write_bytes(b'{"a run": 1}')
    assert cifar10.main(["--preset", "smoke", "--dataset", "offline", "--workdir", str(workdir), "--no_progress",
                         "--lr_find"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--lr_find" in err and "holds config.json" in err, err
    assert sorted(p.name for p in workdir.iterdir()) == ["config.json"]
    assert (workdir / "config.json").read_bytes() == b'{"a run": 1}'


def test_finetune_lr_find_sweeps_phase_1_and_writes_only_the_plot(tmp_path, capsys):
    workdir = tmp_path / "ft"
    assert finetune.main(["--preset", "smoke", "--workdir", str(workdir), "--no_progress", "--lr_find",
                          "--lr_find_steps", "100"]) == 0
    assert 1e-7 <= _suggestion(capsys.readouterr().out, "--phase1_lr") <= 10
    assert sorted(p.name for p in workdir.rglob("*")) == [PLOT]


def test_finetune_lr_find_starts_from_phase_1s_state_and_steps(tmp_path, monkeypatch):
    """The sweep's state (Adam at ``--phase1_lr`` included), steps and loop settings are those ``run``
    gives phase 1's ``fit``."""
    seen = {}

    class Stop(Exception):
        pass

    def capture(name):
        def fake(state, dataset, config, *args, steps=None, **kwargs):
            seen[name] = (jax.device_get(state_to_tree(state)), state.apply_fn.keywords, steps.labels, config)
            raise Stop
        return fake

    config = finetune.get_config("smoke", phase1_lr=0.003)
    monkeypatch.setattr(finetune, "fit", capture("fit"))
    with pytest.raises(Stop):
        finetune.run(config, tmp_path / "a", progress=False)
    monkeypatch.setattr(finetune.lr_find, "find_learning_rate", capture("lr_find"))
    with pytest.raises(Stop):
        finetune._main(finetune._parse(["--preset", "smoke", "--workdir", str(tmp_path / "b"), "--lr_find",
                                        "--phase1_lr", "0.003"]))
    (tree_a, kw_a, labels_a, fit_a), (tree_b, kw_b, labels_b, fit_b) = seen["fit"], seen["lr_find"]
    assert kw_a == kw_b and labels_a == labels_b and fit_a == fit_b
    rates = [float(v) for p, v in jax.tree_util.tree_leaves_with_path(tree_b["opt_state"])
             if "learning_rate" in jax.tree_util.keystr(p)]
    assert rates and set(rates) == {np.float32(0.003)}
    assert jax.tree.structure(tree_a) == jax.tree.structure(tree_b)
    for a, b in zip(jax.tree.leaves(tree_a), jax.tree.leaves(tree_b)):
        assert np.array_equal(a, b)


@pytest.mark.parametrize("module", ["jaxcnn.experiments.cifar10", "jaxcnn.experiments.finetune"])
def test_a_bad_lr_find_steps_is_one_line_before_anything_loads(module):
    proc = subprocess.run([sys.executable, "-m", module, "--lr_find", "--lr_find_steps", "0"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: argument --lr_find_steps: '0': must be an int >= 10 (the sweep's "
                                        f"training steps; default 200) (see python -m {module} --help)"]


@pytest.mark.parametrize("args, message", [
    (["--lr_find_steps", "50"], "--lr_find_steps 50 applies with --lr_find"),
    (["--lr_find", "--resume"], "--lr_find with --resume: the sweep writes no run"),
    (["--lr_find", "--overwrite"], "--lr_find with --overwrite: the sweep writes no run"),
])
def test_lr_find_flags_that_do_not_go_together_are_one_line(tmp_path, capsys, args, message):
    for main in (cifar10.main, finetune.main):
        assert main(["--preset", "smoke", "--workdir", str(tmp_path / "run"), *args]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
        assert not (tmp_path / "run").exists()


def test_phase1_lr_is_a_setting_a_resume_checks():
    """``--phase1_lr`` given with ``--resume`` is held to the run's (``configs.resumed_config``)."""
    args = finetune._parse(["--phase1_lr", "0.003", "--resume"])
    assert finetune.given_settings(args)["--phase1_lr"] == ("phase1_lr", 0.003)
    assert finetune.config_of_flags(args).phase1_lr == 0.003
