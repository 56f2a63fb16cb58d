"""The recipe's ingredients (jaxcnn.train.recipe) against float64 NumPy and hand values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxcnn.train import recipe

EPS32 = float(np.finfo(np.float32).eps)


def _log_softmax64(z):
    z = np.asarray(z, np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_smoothed_targets_are_one_minus_s_of_the_one_hot_plus_s_over_k():
    labels = np.array([0, 3, 1, 3])
    got = np.asarray(recipe.smoothed_targets(jnp.asarray(labels), 4, 0.1), np.float64)
    want = np.eye(4)[labels] * 0.9 + 0.1 / 4
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * EPS32)
    np.testing.assert_array_equal(recipe.smoothed_targets(jnp.asarray(labels), 4, 0.0), np.eye(4)[labels])
    with pytest.raises(ValueError, match=r"smoothing=1\.0; must be a number in \[0, 1\)"):
        recipe.smoothed_targets(jnp.asarray(labels), 4, 1.0)


def test_the_soft_cross_entropy_of_smoothed_and_mixed_targets_against_float64():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)) * 3
    targets = 0.7 * np.eye(5)[[0, 1, 2, 3, 4, 0]] + 0.3 * np.eye(5)[[4, 3, 2, 1, 0, 1]]
    targets = 0.9 * targets + 0.1 / 5
    got = np.asarray(recipe.soft_cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32)))
    want = -(targets * _log_softmax64(logits)).sum(-1)
    # float32 over K = 5 terms of size up to |logit| ~ 10: a few ulps of that
    np.testing.assert_allclose(got, want, rtol=0, atol=5 * 16 * EPS32 * np.abs(logits).max())


def _batch(b=6, h=8, w=8, k=6, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(size=(b, h, w, 3)).astype(np.float32)
    targets = np.eye(k, dtype=np.float32)[np.arange(b) % k]  # each image its own class: lam is readable
    return images, targets


def test_mixup_mixes_each_image_and_target_with_the_reversed_batch_by_one_lam():
    images, targets = _batch()
    mixed, mixed_t = jax.jit(lambda k, x, t: recipe.mixup(k, x, t, 0.4))(jax.random.key(3), images, targets)
    lam = float(mixed_t[0, 0])  # image 0 is class 0, the reversed batch's image 0 is class 5
    assert 0 < lam < 1
    want = lam * images.astype(np.float64) + (1 - lam) * images[::-1].astype(np.float64)
    np.testing.assert_allclose(np.asarray(mixed, np.float64), want, rtol=0, atol=4 * EPS32)
    np.testing.assert_allclose(np.asarray(mixed_t), lam * targets + (1 - lam) * targets[::-1], rtol=0, atol=4 * EPS32)
    np.testing.assert_allclose(np.asarray(mixed_t).sum(-1), 1.0, atol=4 * EPS32)


def test_mixups_lam_is_beta_alpha_alpha():
    alpha, n = 0.4, 4000
    keys = jax.random.split(jax.random.key(0), n)
    images, targets = _batch(b=2, h=2, w=2, k=2)
    lams = np.asarray(jax.vmap(lambda k: recipe.mixup(k, images, targets, alpha)[1][0, 0])(keys), np.float64)
    # Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)); 4000 draws: the mean within 4 standard errors
    var = 1 / (4 * (2 * alpha + 1))
    assert abs(lams.mean() - 0.5) < 4 * math.sqrt(var / n)
    assert abs(lams.var() - var) < 0.1 * var


def test_cutmix_pastes_a_box_of_the_reversed_batch_and_mixes_targets_by_its_area():
    images, targets = _batch(h=16, w=12)
    for seed in range(8):
        mixed, mixed_t = jax.jit(lambda k, x, t: recipe.cutmix(k, x, t, 1.0))(jax.random.key(seed), images, targets)
        mixed = np.asarray(mixed)
        pasted = np.all(mixed == images[::-1], axis=(0, 3))  # (H, W): pixels taken from the reversed batch
        kept = np.all(mixed == images, axis=(0, 3))
        assert np.all(pasted ^ kept)  # every pixel is one or the other, the same in every image
        rows, cols = np.nonzero(pasted)
        if rows.size:  # a rectangle
            assert pasted[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
        lam = 1 - pasted.mean()
        np.testing.assert_allclose(np.asarray(mixed_t), lam * targets + (1 - lam) * targets[::-1], rtol=0,
                                   atol=4 * EPS32)


def test_mix_batch_is_one_of_mixup_or_cutmix_and_nothing_without_alphas():
    images, targets = _batch()
    seen = set()
    for seed in range(12):
        key = jax.random.key(seed)
        got = recipe.mix_batch(key, images, targets, mixup_alpha=0.4, cutmix_alpha=1.0)
        k_mix = jax.random.split(key)[1]
        a, b = recipe.mixup(k_mix, images, targets, 0.4), recipe.cutmix(k_mix, images, targets, 1.0)
        which = [i for i, r in enumerate((a, b)) if np.array_equal(got[0], r[0]) and np.array_equal(got[1], r[1])]
        assert which, seed
        seen.add(which[0])
    assert seen == {0, 1}
    same = recipe.mix_batch(jax.random.key(0), images, targets)
    assert same[0] is images and same[1] is targets
    with pytest.raises(ValueError, match=r"mixup: alpha=-1; must be a finite number > 0"):
        recipe.mixup(jax.random.key(0), images, targets, -1)


@pytest.mark.parametrize("step", [0, 1, 5, 10, 11, 40, 99, 100, 150])
def test_warmup_cosine_against_its_formula(step):
    peak, total, warm, end = 3e-3, 100, 10, 1e-5
    got = float(recipe.warmup_cosine(peak, total, warm, end)(step))
    if step < warm:
        want = peak * step / warm
    else:
        t = min(step, total)
        want = end + (peak - end) * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2
    assert abs(got - want) <= 4 * EPS32 * peak


def test_warmup_cosine_refuses_a_warm_up_as_long_as_the_run():
    with pytest.raises(ValueError, match=r"warmup_steps=10, total_steps=10; need 0 <= warmup_steps < total_steps"):
        recipe.warmup_cosine(1e-3, 10, 10)


def test_the_ema_after_k_steps_is_the_hand_recurrence():
    rng = np.random.default_rng(1)
    decay, k = 0.9, 7
    params = [rng.normal(size=(3, 2)) for _ in range(k)]
    ema = {"w": jnp.zeros((3, 2), jnp.float32)}
    for p in params:
        ema = recipe.ema_update(ema, {"w": jnp.asarray(p, jnp.float32)}, decay)
    want = sum((1 - decay) * decay ** (k - 1 - i) * p for i, p in enumerate(params))  # from 0
    np.testing.assert_allclose(np.asarray(ema["w"], np.float64), want, rtol=0, atol=k * 4 * EPS32)


def test_adamw_with_the_mask_decays_kernels_and_not_biases_or_batchnorm():
    params = {"conv": {"kernel": jnp.full((3, 3, 1, 2), 2.0), "bias": jnp.full((2,), 2.0)},
              "bn": {"scale": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    mask = recipe.weight_decay_mask(params)
    assert mask == {"conv": {"kernel": True, "bias": False}, "bn": {"scale": False, "bias": False}}
    tx = optax.adamw(0.1, weight_decay=0.5, mask=recipe.weight_decay_mask)
    zeros = jax.tree.map(jnp.zeros_like, params)  # Adam's own update is 0 for a zero gradient
    updates, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["conv"]["kernel"], 2.0 - 0.1 * 0.5 * 2.0, rtol=0, atol=4 * EPS32)
    for leaf in (new["conv"]["bias"], new["bn"]["scale"], new["bn"]["bias"]):
        np.testing.assert_array_equal(leaf, 2.0)


def test_flip_tta_is_the_mean_of_the_image_and_its_mirror():
    images, _ = _batch(b=3, h=4, w=5)
    weights = np.random.default_rng(2).normal(size=(4 * 5 * 3, 2))
    predict = lambda x: jnp.asarray(x).reshape(x.shape[0], -1) @ jnp.asarray(weights, jnp.float32)
    got = np.asarray(recipe.flip_tta(predict)(jnp.asarray(images)), np.float64)
    x64 = images.astype(np.float64)
    want = (x64.reshape(3, -1) @ weights + x64[:, :, ::-1].reshape(3, -1) @ weights) / 2
    np.testing.assert_allclose(got, want, rtol=0, atol=60 * 4 * EPS32 * np.abs(weights).max())


def _curve(lrs, steepest=1e-3, diverge=0.1):
    x = np.log10(lrs)
    loss = 2.0 - np.tanh(2 * (x - np.log10(steepest)))  # falls fastest (against log lr) at `steepest`
    return loss + np.where(x > np.log10(diverge), 10 ** (3 * (x - np.log10(diverge))) - 1, 0)


def test_the_lr_finder_suggests_where_a_constructed_loss_falls_fastest():
    lrs = np.logspace(-6, 0, 301)  # 50 points a decade
    lr, why = recipe.suggest_learning_rate(lrs, _curve(lrs))
    assert abs(math.log10(lr) - (-3)) <= 1 / 50 + 1e-9, (lr, why)
    assert why.startswith("the loss falls fastest at lr 0.001")
    # noise, and a tail that is not finite, do not move it by more than a few points
    noisy = _curve(lrs) + np.random.default_rng(0).normal(scale=0.02, size=lrs.shape)
    noisy[-20:] = np.nan
    lr2, _ = recipe.suggest_learning_rate(lrs, noisy)
    assert abs(math.log10(lr2) - (-3)) <= 5 / 50, lr2
    # the steepest point moved: the suggestion follows it
    lr3, _ = recipe.suggest_learning_rate(lrs, _curve(lrs, steepest=1e-4))
    assert abs(math.log10(lr3) - (-4)) <= 1 / 50 + 1e-9


def test_the_lr_finder_never_suggests_the_lowest_point_itself():
    # the loss falls faster and faster up to its lowest point, then the sweep diverges: the steepest
    # slope (one-sided) would be at the lowest point, where the loss stops falling
    lrs = np.logspace(-6, 0, 121)
    x = np.log10(lrs)
    loss = np.where(x <= -1, 2.0 - 0.05 * (x + 6) ** 2, 0.75 + 100 * (x + 1))
    lr, why = recipe.suggest_learning_rate(lrs, loss, window=1)
    lowest = lrs[np.argmin(loss)]
    assert lr < lowest and abs(math.log10(lr) - math.log10(lowest)) <= 1 / 20 + 1e-9, (lr, why)


def test_the_lr_finder_says_when_the_loss_never_fell():
    lrs = np.logspace(-6, 0, 100)
    with pytest.raises(ValueError, match="the loss did not fall over the sweep; start it at a smaller"):
        recipe.suggest_learning_rate(lrs, 1.0 + lrs * 100)
    with pytest.raises(ValueError, match="positive and increasing"):
        recipe.suggest_learning_rate(lrs[::-1], np.ones(100))


# --------------------------------------------------------------------------- in the train step

import flax.linen as nn  # noqa: E402

from jaxcnn.train import FitConfig, Steps, TrainState, adam  # noqa: E402
from jaxcnn.train.steps import MIX_STREAM, make_train_step, step_keys  # noqa: E402


class _Linear(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        return nn.Dense(4)(x.reshape(x.shape[0], -1))


def _state_and_batch():
    model = _Linear()
    variables = model.init(jax.random.key(0), jnp.zeros((1, 6, 6, 3)))
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-2), key=jax.random.key(5))
    rng = np.random.default_rng(4)
    batch = {"image": jnp.asarray(rng.integers(0, 256, (8, 6, 6, 3)), jnp.uint8),
             "label": jnp.asarray(np.arange(8) % 4, jnp.int32)}
    return state, batch


def _loss64(state, images, targets, weights=None):
    w = np.asarray(state.params["Dense_0"]["kernel"], np.float64)
    b = np.asarray(state.params["Dense_0"]["bias"], np.float64)
    logits = np.asarray(images, np.float64).reshape(len(targets), -1) @ w + b
    losses = -(targets * _log_softmax64(logits)).sum(-1)
    return float((losses if weights is None else losses * (targets @ weights)).mean())


@pytest.mark.parametrize("smoothing, mixup_alpha, cutmix_alpha", [(0.1, 0, 0), (0, 0.4, 0), (0, 0, 1.0), (0.1, 0.4, 1.0)])
def test_the_train_steps_loss_is_the_float64_loss_of_its_soft_targets(smoothing, mixup_alpha, cutmix_alpha):
    state, batch = _state_and_batch()
    weights = np.array([0.5, 1.0, 2.0, 1.5])
    step = jax.jit(make_train_step(num_classes=4, label_smoothing=smoothing, mixup_alpha=mixup_alpha,
                                   cutmix_alpha=cutmix_alpha, class_weights=weights))
    _, metrics = step(state, batch)
    images = np.asarray(batch["image"], np.float32) / 255
    targets = np.eye(4)[np.asarray(batch["label"])] * (1 - smoothing) + smoothing / 4
    if mixup_alpha or cutmix_alpha:  # the draw (lam, the box) is the recipe's, keyed as the step keys it
        key = jax.random.fold_in(step_keys(state.key, state.step)[1], MIX_STREAM)
        images, targets = (np.asarray(a, np.float64) for a in recipe.mix_batch(
            key, jnp.asarray(images), jnp.asarray(targets, jnp.float32), mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha))
        assert not np.allclose(targets, targets.round())  # mixed
    want = _loss64(state, images, targets, weights)
    # float32 logits: 108 products of size <= |w| (inputs in [0, 1]) and a log-sum-exp over 4 classes
    assert abs(float(metrics["loss"]) - want) <= 108 * 8 * EPS32 * (1 + abs(want)), (float(metrics["loss"]), want)


def test_a_step_without_soft_targets_is_the_integer_label_step_bit_for_bit():
    state, batch = _state_and_batch()
    plain = jax.jit(make_train_step())(state, batch)
    zeros = jax.jit(make_train_step(num_classes=4, label_smoothing=0.0, mixup_alpha=0.0))(state, batch)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(zeros)):
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        np.testing.assert_array_equal(a, b)


def test_fit_config_checks_the_soft_target_settings_and_steps_need_the_classes():
    with pytest.raises(ValueError, match=r"FitConfig: label_smoothing=1; must be a number in \[0, 1\)"):
        FitConfig(label_smoothing=1)
    with pytest.raises(ValueError, match=r"FitConfig: cutmix_alpha=-0.5; must be a finite number >= 0 \(0: off\)"):
        FitConfig(cutmix_alpha=-0.5)
    with pytest.raises(ValueError, match=r"Steps.build: mixup_alpha=0.2 needs num_classes="):
        Steps.build(FitConfig(mixup_alpha=0.2, augment=None))
    steps = Steps.build(FitConfig(mixup_alpha=0.2, label_smoothing=0.1, augment=None), num_classes=4)
    steps.check(FitConfig(mixup_alpha=0.2, label_smoothing=0.1, augment=None))
    with pytest.raises(ValueError, match=r"the steps apply mixup_alpha=0.2 but the FitConfig says mixup_alpha=0.0"):
        steps.check(FitConfig(label_smoothing=0.1, augment=None))


# --------------------------------------------------------------------------- AdamW and the cosine schedule in the core

from jaxcnn import freeze  # noqa: E402
from jaxcnn.train import get_learning_rate, get_weight_decay, set_learning_rate  # noqa: E402


def _adamw_tree():
    """A conv kernel and bias, a dense kernel and a BatchNorm's scale and bias, and their gradients."""
    params = {"conv": {"kernel": jnp.full((2, 2, 1, 2), 2.0), "bias": jnp.full((2,), 2.0)},
              "dense": {"kernel": jnp.full((2, 3), -4.0)},
              "bn": {"scale": jnp.full((2,), 2.0), "bias": jnp.full((2,), 2.0)}}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5), params)
    return params, grads


def test_adamw_decays_the_kernels_and_not_the_biases_or_batchnorm():
    """One step of adam(0.1, weight_decay=0.5) by hand: Adam's first step is -lr * g / (|g| + eps)
    (m and v bias-corrected to g and g^2); AdamW adds -lr * wd * p to the kernels only."""
    params, grads = _adamw_tree()
    tx = adam(0.1, weight_decay=0.5)
    state = tx.init(params)
    assert (get_learning_rate(state), get_weight_decay(state)) == (pytest.approx(0.1), 0.5)
    updates, _ = tx.update(grads, state, params)
    new = optax.apply_updates(params, updates)
    adam_step = 0.1 * 0.5 / (0.5 + 1e-8)
    for path, want in ((("conv", "kernel"), 2.0 - adam_step - 0.1 * 0.5 * 2.0),
                       (("dense", "kernel"), -4.0 - adam_step - 0.1 * 0.5 * -4.0),
                       (("conv", "bias"), 2.0 - adam_step), (("bn", "scale"), 2.0 - adam_step),
                       (("bn", "bias"), 2.0 - adam_step)):
        np.testing.assert_allclose(np.asarray(new[path[0]][path[1]], np.float64), want, rtol=4 * EPS32, err_msg=path)
    # weight_decay 0: Adam, its state as it was (no weight_decay hyperparameter)
    plain = adam(0.1).init(params)
    assert get_weight_decay(plain) == 0.0 and "weight_decay" not in plain.hyperparams


def test_adamw_with_frozen_layers_decays_the_trainable_kernels_only():
    params, grads = _adamw_tree()
    labels = freeze.label_tree(params, freeze.by_prefix("conv"))
    tx = adam(0.1, weight_decay=0.5, labels=labels)
    state = tx.init(params)
    assert get_weight_decay(state) == 0.5
    new = freeze.apply_trainable_updates(params, tx.update(grads, state, params)[0], labels)
    adam_step = 0.1 * 0.5 / (0.5 + 1e-8)
    np.testing.assert_array_equal(new["conv"]["kernel"], params["conv"]["kernel"])  # frozen: not decayed
    np.testing.assert_allclose(np.asarray(new["dense"]["kernel"], np.float64), -4.0 - adam_step + 0.1 * 0.5 * 4.0,
                               rtol=4 * EPS32)
    np.testing.assert_allclose(np.asarray(new["bn"]["bias"], np.float64), 2.0 - adam_step, rtol=4 * EPS32)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), True, "0.1"])
def test_adam_refuses_a_weight_decay_that_is_not_a_number_at_least_0(bad):
    with pytest.raises(ValueError, match=r"adam: weight_decay=.*; must be a finite number >= 0 \(0: Adam, no decay\)"):
        adam(1e-3, weight_decay=bad)


def _cosine(t, total, warm):
    """float64: the rate's factor at optimizer step t (0-based)."""
    return t / warm if t < warm else (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2


@pytest.mark.parametrize("t", [0, 3, 8, 12, 15])
def test_a_cosine_step_is_the_optimizer_step_at_the_scheduled_rate(t):
    """Steps.build(lr_schedule="cosine") over 2 epochs of 8 steps, 1 of warm-up: step t's update is
    that of the plain step with the rate set to lr * f(t) (Adam's update is linear in the rate)."""
    config = FitConfig(lr_schedule="cosine", epochs=2, warmup_epochs=1, augment=None)
    steps = Steps.build(config, steps_per_epoch=8)
    assert steps.schedule_steps == (16, 8)
    assert abs(steps.lr_scale(t) - _cosine(t, 16, 8)) <= 4 * EPS32
    state, batch = _state_and_batch()
    state = state.replace(step=jnp.asarray(t, jnp.int32))
    before = jax.device_get(state.params)  # (the step donates the state)
    base = get_learning_rate(state.opt_state)
    plain = jax.jit(make_train_step())(set_learning_rate(state, base * _cosine(t, 16, 8)), batch)[0]
    scheduled = steps.train(state, batch)[0]
    for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(scheduled.params)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=8 * EPS32, atol=8 * EPS32 * 1e-2)
    if t == 0:  # the warm-up starts from 0: the first step leaves the weights as they are
        jax.tree.map(np.testing.assert_array_equal, scheduled.params, before)
    assert get_learning_rate(scheduled.opt_state) == base  # the optimizer's own rate is not changed


def test_fit_config_checks_the_schedule_and_steps_need_the_steps_per_epoch():
    with pytest.raises(ValueError, match=r"FitConfig: lr_schedule='step'; allowed: 'plateau', 'cosine'"):
        FitConfig(lr_schedule="step")
    with pytest.raises(ValueError, match=r"FitConfig: warmup_epochs=3 with lr_schedule='cosine' and epochs=3; the "
                                         r"learning rate's warm-up must end before the last epoch"):
        FitConfig(lr_schedule="cosine", epochs=3, warmup_epochs=3)
    FitConfig(lr_schedule="plateau", epochs=3, warmup_epochs=3)  # (the plateau's warm-up may last the run)
    cosine = FitConfig(lr_schedule="cosine", epochs=3, warmup_epochs=1, augment=None)
    with pytest.raises(ValueError, match=r"Steps.build: lr_schedule='cosine' needs steps_per_epoch= \(an int >= 1"):
        Steps.build(cosine)
    steps = Steps.build(cosine, steps_per_epoch=4)
    steps.check(cosine, steps_per_epoch=4)
    with pytest.raises(ValueError, match=r"the steps apply lr_schedule='cosine' but the FitConfig says "
                                         r"lr_schedule='plateau'"):
        steps.check(FitConfig(augment=None, epochs=3, warmup_epochs=1))
    with pytest.raises(ValueError, match=r"the steps apply lr_schedule='plateau' but the FitConfig says "
                                         r"lr_schedule='cosine'"):
        Steps.build(FitConfig(augment=None)).check(cosine, steps_per_epoch=4)
    with pytest.raises(ValueError, match=r"the steps' warm-up \+ cosine runs over 12 steps with 4 of warm-up, but the "
                                         r"FitConfig's 3 epochs \(1 of warm-up\) of 5 steps make 15 with 5"):
        steps.check(cosine, steps_per_epoch=5)
    assert Steps.build(FitConfig(augment=None)).lr_scale(123) == 1.0
