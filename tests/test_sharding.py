"""Data parallelism: the sharded step on 4 fake CPU devices == the same step on 1 device."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest

from jaxcnn.train import make_mesh
from jaxcnn.train.sharding import check_batch_size

SCRIPT = textwrap.dedent("""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jaxcnn.models.cifar_cnn import CifarCNN
    from jaxcnn.train import TrainState, adam, make_train_step, make_eval_step, make_mesh, replicate, shard_batch
    from jaxcnn.train import EvalFeed, evaluate
    from jaxcnn.data import Split
    from jaxcnn.data.augment import random_augment

    assert jax.device_count() == 4, jax.devices()
    model = CifarCNN(widths=(4, 8), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), train=False)
    rng = np.random.default_rng(0)
    batches = [{"image": rng.integers(0, 256, (8, 8, 8, 3), dtype=np.uint8),
                "label": rng.integers(0, 3, 8).astype(np.int32)} for _ in range(3)]
    step = jax.jit(make_train_step(augment_fn=random_augment))
    eval_images = rng.integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    eval_labels = rng.integers(0, 3, 10).astype(np.int32)

    def train(mesh):
        state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-2), key=jax.random.key(1))
        state = replicate(state, mesh)
        losses = []
        for b in batches:
            batch = shard_batch(b, mesh)
            state, m = step(state, batch)
            losses.append(float(m["loss"]))
        ev = evaluate(state, EvalFeed(Split(eval_images, eval_labels), 4, mesh), jax.jit(make_eval_step()))
        return state, losses, ev, batch

    try:
        shard_batch(batches[0] | {"image": batches[0]["image"][:6], "label": batches[0]["label"][:6]}, make_mesh())
        error = None
    except ValueError as e:
        error = str(e)
    s4, l4, e4, b4 = train(make_mesh())
    s1, l1, e1, _ = train(make_mesh(jax.devices()[:1]))
    diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               for a, b in zip(jax.tree.leaves((s4.params, s4.batch_stats)), jax.tree.leaves((s1.params, s1.batch_stats))))
    print(json.dumps({
        "error": error, "losses4": l4, "losses1": l1, "eval4": e4, "eval1": e1, "param_diff": diff,
        "batch_devices": len(b4["image"].sharding.device_set),
        "batch_shard_rows": b4["image"].addressable_shards[0].data.shape[0],
        "params_replicated": all(x.sharding.is_fully_replicated for x in jax.tree.leaves(s4.params)),
        "params_devices": len(jax.tree.leaves(s4.params)[0].sharding.device_set),
    }))
""")


def test_sharded_step_on_4_fake_devices_equals_1_device():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=600, cwd=root)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert "6 must be a positive multiple of the number of devices (4)" in r["error"]
    assert r["batch_devices"] == 4 and r["batch_shard_rows"] == 2  # batch 8 split 4 ways
    assert r["params_replicated"] and r["params_devices"] == 4
    assert r["losses4"] == pytest.approx(r["losses1"], rel=1e-5)
    assert r["param_diff"] < 1e-5
    assert r["eval4"]["count"] == r["eval1"]["count"] == 10
    assert r["eval4"]["loss"] == pytest.approx(r["eval1"]["loss"], rel=1e-5)
    assert r["eval4"]["accuracy"] == r["eval1"]["accuracy"]


def test_batch_size_must_be_a_positive_int():
    mesh = make_mesh(jax.devices()[:1])
    check_batch_size(64, mesh)
    for bad in (0, -8, 2.0):
        with pytest.raises(ValueError, match=f"batch_size={bad!r}"):
            check_batch_size(bad, mesh)


def test_use_cpu_devices_splits_the_cpu_before_jax_starts_and_refuses_after():
    code = ("from jaxcnn.train import use_cpu_devices; use_cpu_devices(3); import jax; "
            "print(len(jax.devices()), jax.devices()[0].platform)")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["3", "cpu"]

    from jaxcnn.train import use_cpu_devices

    jax.devices()  # this process's backend has started
    use_cpu_devices(len(jax.devices("cpu")))  # what it already has: nothing to do
    with pytest.raises(RuntimeError, match=rf"use_cpu_devices\({len(jax.devices('cpu')) + 1}\): JAX already "
                                           rf"started with {len(jax.devices('cpu'))} CPU device"):
        use_cpu_devices(len(jax.devices("cpu")) + 1)
    for bad in (0, -2, 1.5, True):
        with pytest.raises(ValueError, match=r"use_cpu_devices: count=.*must be an int >= 1"):
            use_cpu_devices(bad)


def test_the_cli_trains_on_the_cpu_devices_asked_for(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"JAX_PLATFORMS": "cpu"}
    cmd = [sys.executable, "-m", "jaxcnn.experiments.cifar10", "--preset", "smoke", "--epochs", "1", "--no_progress"]
    run = subprocess.run(cmd + ["--workdir", str(tmp_path / "run"), "--cpu_devices", "2"], capture_output=True,
                         text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["device"] == "cpu x2"
    bad = subprocess.run(cmd + ["--workdir", str(tmp_path / "bad"), "--cpu_devices", "0"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == "error: --cpu_devices 0: must be >= 1"
    assert not (tmp_path / "bad").exists()
