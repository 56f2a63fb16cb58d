"""Several processes (``jax.distributed``, CPU collectives over gloo), each with two fake CPU
devices, on this machine: the same training as one process with all the devices, each process
holding only its share of the data, process 0 alone writing the run's records, clear failures.
Every test starts real processes (subprocesses), joined over the loopback address.
"""

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.data import load_dataset
from jaxcnn.runfolder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jaxcnn.experiments.cifar10", "--preset", "smoke", "--no_progress"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": str(ROOT)}


def start(n: int, argv, *, devices: int = 2, port=None, extra=lambda i: []):
    """``n`` processes of ``argv`` joined by --distributed; returns the Popen objects."""
    port = port or free_port()
    return [subprocess.Popen(argv + ["--distributed", "--coordinator_address", f"127.0.0.1:{port}",
                                     "--num_processes", str(n), "--process_id", str(i)] + extra(i),
                             cwd=ROOT, env=env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(n)]


def finish(procs, timeout=600):
    out = []
    for p in procs:
        o, e = p.communicate(timeout=timeout)
        out.append((p.returncode, o, e))
    return out


def ours(text: str) -> list[str]:
    """The lines jaxcnn printed (not gloo's connection notes or JAX's C++ logs)."""
    return [ln for ln in text.splitlines() if ln.strip() and not ln.startswith(("[Gloo]", "I", "W", "E", "F"))
            or ln.startswith("error")]


STEPS = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp, numpy as np
    from jaxcnn.data import load_dataset
    from jaxcnn.models import CifarCNN
    from jaxcnn.train import EvalFeed, TrainFeed, TrainState, adam, evaluate, make_eval_step, make_mesh, make_train_step
    from jaxcnn.train import distributed

    out_dir = sys.argv[1]
    if "--distributed" in sys.argv:
        i = sys.argv.index("--coordinator_address")
        distributed.initialize(sys.argv[i + 1], int(sys.argv[i + 3]), int(sys.argv[i + 5]))
    procs = distributed.Processes()
    data = load_dataset("offline", num_train=64, num_val=22, num_test=8, image_size=16)
    model = CifarCNN(widths=(4, 8), dense_units=8)
    variables = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)), train=False)
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-2), key=jax.random.key(1))
    mesh = make_mesh()
    step, eval_step = jax.jit(make_train_step()), jax.jit(make_eval_step())
    from jaxcnn.train.sharding import replicate
    state = replicate(state, mesh)
    losses = []
    if procs.count > 1:  # each process: its share, its part of each global batch
        train = distributed.shard(data.train, procs.index, procs.count)
        feed = TrainFeed(train, 16, mesh, seed=3)
        batches = list(feed.epoch(1))[:3]
        ev = EvalFeed(distributed.shard(data.val, procs.index, procs.count), 8, mesh)
        held = {"train_rows": int(feed.num_local), "train_feed_rows": int(feed.host.split.images.shape[0]),
                "global_train": feed.num_examples}
    else:  # one process, four devices: the same global batches, built from both shares
        from jaxcnn.train.sharding import shard_batch
        parts = [distributed.shard(data.train, p, 2) for p in range(2)]
        # what each of two processes would take: 8 of its 32 rows per batch, in its epoch order
        orders = [TrainFeed(part, 8, make_mesh(jax.devices()[:1]), seed=3) for part in parts]
        batches = []
        for b in range(3):
            idx = [f.local_indices(1, b) for f in orders]
            batch = {k: np.concatenate([getattr(parts[p], k + "s")[idx[p]] for p in range(2)])
                     for k in ("image", "label")}
            batches.append(shard_batch(batch, mesh))
        ev = EvalFeed(data.val, 8, mesh)
        held = {}
    for batch in batches:
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    result = evaluate(state, ev, eval_step)
    if procs.primary:
        np.savez(out_dir + "/state.npz", *[np.asarray(x) for x in jax.tree.leaves((state.params, state.batch_stats))])
    print(json.dumps({"losses": losses, "eval": result, "held": held, "devices": jax.device_count(),
                      "processes": procs.count, "index": procs.index}))
""")


def test_two_processes_train_and_evaluate_as_one_process_with_all_the_devices(tmp_path):
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    script = tmp_path / "steps.py"
    script.write_text(STEPS)
    pair = start(2, [sys.executable, str(script), str(tmp_path / "two")])
    one = subprocess.run([sys.executable, str(script), str(tmp_path / "one")], cwd=ROOT, env=env(4),
                         capture_output=True, text=True, timeout=600)  # meanwhile
    two = finish(pair)
    assert one.returncode == 0, one.stderr[-2000:]
    for code, _, err in two:
        assert code == 0, err[-2000:]
    r0, r1 = (json.loads(o.strip().splitlines()[-1]) for _, o, _ in two)
    ref = json.loads(one.stdout.strip().splitlines()[-1])
    assert (r0["devices"], r0["processes"], ref["devices"], ref["processes"]) == (4, 2, 4, 1)
    # each process held only its half of the 64 training images
    assert r0["held"] == r1["held"] == {"train_rows": 32, "train_feed_rows": 32, "global_train": 64}
    np.testing.assert_allclose(r0["losses"], ref["losses"], rtol=1e-5)
    assert r0["losses"] == r1["losses"]
    a, b = np.load(tmp_path / "two" / "state.npz"), np.load(tmp_path / "one" / "state.npz")
    assert len(a.files) == len(b.files) > 0
    for k in a.files:  # every parameter and BatchNorm statistic
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6)
    # 22 validation images: not a multiple of 2 processes x 2 devices x batch 8; each counted once
    assert r0["eval"]["count"] == ref["eval"]["count"] == 22
    assert r0["eval"]["accuracy"] == ref["eval"]["accuracy"]
    assert r0["eval"]["loss"] == pytest.approx(ref["eval"]["loss"], rel=1e-6)
    assert r0["eval"] == r1["eval"]


def test_a_two_process_run_survives_a_dead_process_resumes_and_restores_on_one_device(tmp_path):
    workdir = tmp_path / "run"
    args = CLI + ["--workdir", str(workdir), "--epochs", "2"]
    procs = start(2, args, extra=lambda i: ["--heartbeat_timeout", "5"])
    deadline = time.time() + 600
    while not (workdir / "checkpoints" / "latest" / "1" / "commit_success.txt").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline
        time.sleep(0.02)
    procs[1].send_signal(signal.SIGKILL)  # in epoch 2
    t0 = time.time()
    (c0, _, e0), _ = finish(procs, timeout=120)
    waited = time.time() - t0
    assert c0 != 0 and waited < 60, (c0, waited)  # process 0 stops on its own, it does not hang
    assert "another task died" in e0 or "unhealthy" in e0
    assert not (workdir / "summary.json").exists()

    # resumed as two processes from the last epoch checkpoint
    (c0, o0, e0), (c1, o1, e1) = finish(start(2, args + ["--resume"]))
    assert c0 == 0 and c1 == 0, e0[-2000:] + e1[-2000:]
    assert "test accuracy" in o0 and ours(o1) == [] and ours(e1) == []  # process 1 is quiet
    folder = RunFolder(workdir)
    summary = folder.read_summary()
    assert [r["epoch"] for r in folder.read_history()] == [1, 2]
    assert summary["num_train"] == 256 and summary["device"] == "cpu x4 (2 processes)"
    assert len(list(folder.tensorboard_dir.iterdir())) == 2  # one writer, process 0, in each of the two launches
    assert (workdir / "checkpoints" / "latest" / "2" / "state" / "ocdbt.process_1").is_dir()  # both saved

    # restored in this process (one device): the test accuracy the two processes reported
    run = inference.restore(workdir)
    test = load_dataset(**run.config["data"]["source"]).test
    assert float(np.mean(run.predict(test.images).argmax(-1) == test.labels)) == summary["test_accuracy"]

    # and resumed on one device: a checkpoint moves between device counts
    done = subprocess.run(CLI + ["--workdir", str(workdir), "--epochs", "3", "--resume"], cwd=ROOT, env=env(1),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["epoch"] for r in folder.read_history()] == [1, 2, 3]


def test_processes_started_with_different_settings_are_refused(tmp_path):
    workdir = tmp_path / "run"
    results = finish(start(2, CLI + ["--workdir", str(workdir)], extra=lambda i: ["--seed", str(i)]))
    for code, _, err in results:
        assert code == 2
        assert "the processes were started with different settings: process 1 differs from process 0 in " \
               "data.source.seed (0 -> 1), fit.seed (0 -> 1). Start every process with the same settings" in err
    assert not RunFolder(workdir).has_checkpoints()


def test_a_coordinator_that_cannot_be_reached_is_one_line(tmp_path):
    done = subprocess.run(CLI + ["--workdir", str(tmp_path / "run"), "--distributed", "--coordinator_address",
                                 f"127.0.0.1:{free_port()}", "--num_processes", "2", "--process_id", "1",
                                 "--init_timeout", "3"], cwd=ROOT, env=env(2), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 2
    assert [ln for ln in done.stderr.splitlines() if ln.startswith("error:")] == [ln for ln in ours(done.stderr)]
    assert "error: could not join the processes through 127.0.0.1:" in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_batch_that_does_not_divide_over_the_devices_names_sizes_that_work(tmp_path):
    done = subprocess.run(CLI + ["--workdir", str(tmp_path / "run"), "--batch_size", "30"], cwd=ROOT, env=env(4),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "error: batch_size=30 must be a positive multiple of the number of devices (4); 28 or 32 would work"


def test_only_process_0_writes_records(tmp_path, monkeypatch):
    """Any other process writes nothing but its part of the Orbax checkpoints."""
    from jaxcnn.experiments import cifar10
    from jaxcnn.experiments.configs import get_config
    from jaxcnn.train import distributed, loop

    class NotPrimary(distributed.Processes):
        def __init__(self):
            self.index, self.count = 1, 1  # alone, but not process 0

    monkeypatch.setattr(loop, "Processes", NotPrimary)
    cifar10.run(get_config("smoke", epochs=1), tmp_path / "run", progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
