"""Mixed precision (``--precision bfloat16``): the convolutions and dense layers compute in
bfloat16, while parameters, optimizer state, BatchNorm statistics, logits and loss stay float32;
a bfloat16 run learns as a float32 one does; the run records its precision and restores with it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.experiments import cifar10
from jaxcnn.experiments.configs import get_config
from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.data import load_dataset
from jaxcnn.train import FitConfig, TrainState, adam, fit, make_train_step


#: The convolutions' primitives on either path (XLA's; the oneDNN kernels' three directions).
CONVS = ("conv_general_dilated", "jaxcnn_onednn_conv", "jaxcnn_onednn_conv_bwd_data", "jaxcnn_onednn_conv_bwd_weights")


def _primitives(jaxpr, name):
    """Every equation named ``name`` (or one of a tuple of names) in ``jaxpr`` and the jaxprs nested in
    its equations' parameters."""
    names = (name,) if isinstance(name, str) else tuple(name)
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in names:
            yield eqn
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                sub = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr's jaxpr, or a Jaxpr
                if hasattr(sub, "eqns"):
                    yield from _primitives(sub, names)


def _state(dtype):
    model = CifarCNN(widths=(4, 8), dense_units=8, num_classes=3, dtype=dtype)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-2), key=jax.random.key(1))


def _batch(n=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"image": jnp.asarray(rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)),
            "label": jnp.asarray(rng.integers(0, 3, n).astype(np.int32))}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_train_step_computes_convolutions_in_the_model_dtype_and_keeps_the_rest_float32(dtype):
    state, batch = _state(dtype), _batch()
    jaxpr = jax.make_jaxpr(make_train_step())(state, batch).jaxpr
    convs = list(_primitives(jaxpr, CONVS))
    assert len(convs) == 4 + 3 + 4  # forward; input gradients (none for the images); weight gradients
    for eqn in convs:
        assert {v.aval.dtype for v in eqn.invars} == {jnp.dtype(dtype)}, eqn
    dots = list(_primitives(jaxpr, "dot_general"))
    assert dots and all(v.aval.dtype == jnp.dtype(dtype) for eqn in dots for v in eqn.invars)

    new, metrics = jax.jit(make_train_step())(state, batch)
    for tree in (new.params, new.batch_stats, new.opt_state):
        assert {a.dtype for a in jax.tree.leaves(tree) if jnp.issubdtype(a.dtype, jnp.floating)} == {jnp.dtype("float32")}
    assert metrics["loss"].dtype == jnp.float32
    logits = state.apply_fn({"params": new.params, "batch_stats": new.batch_stats}, jnp.zeros((2, 8, 8, 3)),
                            train=False)
    assert logits.dtype == jnp.float32


def test_bfloat16_logits_are_the_float32_logits_to_bfloat16_precision():
    f32, b16 = _state(jnp.float32), _state(jnp.bfloat16)
    x = jnp.asarray(np.random.default_rng(1).uniform(size=(8, 8, 8, 3)), jnp.float32)
    variables = {"params": f32.params, "batch_stats": f32.batch_stats}
    a = np.asarray(f32.apply_fn(variables, x, train=False))
    b = np.asarray(b16.apply_fn(variables, x, train=False))
    assert not np.array_equal(a, b)  # it did compute in bfloat16 (8 bits of mantissa)
    np.testing.assert_allclose(b, a, atol=0.05 * np.abs(a).max())


def test_a_bfloat16_run_learns_as_float32_does(tmp_path):
    """The embedded data (1,024 training images, 1,024 test images), a small CifarCNN, 160 steps,
    three seeds: both precisions reach the same mean test accuracy within a few points, far above
    chance (1/10). One seed is not enough: float32 runs whose gradients differ by 1e-6 (the
    kernel gradient's summation order) ended 0.08 apart. BatchNorm momentum 0.9 so that the
    moving statistics, which the test accuracy uses, are settled after so few steps."""
    data = load_dataset("offline", seed=0, num_train=1024, num_val=256, num_test=1024)
    accuracy = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        model = CifarCNN(widths=(8, 16, 32), dense_units=32, conv_dropout="none", dense_dropout=0.0,
                         bn_momentum=0.9, dtype=dtype)
        runs = []
        for seed in range(3):
            variables = model.init(jax.random.key(seed), jnp.zeros((1, 32, 32, 3)), train=False)
            state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(3e-3),
                                      key=jax.random.key(100 + seed))
            _, _, summary = fit(state, data, FitConfig(epochs=5, batch_size=32, augment=None, seed=seed),
                                tmp_path / f"{jnp.dtype(dtype).name}-{seed}", progress=False)
            runs.append(summary["test_accuracy"])
        accuracy[jnp.dtype(dtype).name] = float(np.mean(runs))
    assert accuracy["float32"] > 0.3, accuracy
    assert abs(accuracy["bfloat16"] - accuracy["float32"]) < 0.06, accuracy


def test_precision_is_recorded_and_a_bfloat16_run_restores_in_bfloat16(tmp_path):
    config = get_config("smoke", precision="bfloat16", epochs=1)
    cifar10.run(config, tmp_path, progress=False)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["model"]["dtype"] == {"dtype": "bfloat16"} and record["experiment"]["precision"] == "bfloat16"
    run = inference.restore(tmp_path)
    assert run.model.dtype == jnp.bfloat16
    assert {a.dtype for a in jax.tree.leaves(run.variables)} == {jnp.dtype("float32")}
    assert run.predict(np.zeros((2, 32, 32, 3), np.uint8)).dtype == np.float32


def test_an_unknown_precision_is_refused_by_name():
    with pytest.raises(ValueError, match=r"precision='float16'; allowed: float32, bfloat16"):
        get_config("smoke", precision="float16")
