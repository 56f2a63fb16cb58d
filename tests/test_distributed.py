"""Several processes (``jax.distributed``, CPU collectives over gloo) on this machine, tried the
way a user runs them: the CLI with ``--distributed``, one command per process, joined over the
loopback address. The reference is always a one-process CLI run with as many devices (never a
run assembled from the processes' shares): same seed, same global batch, so the same batches in
the same order, and the same trajectory up to the order of the gradient reductions.
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.data import load_dataset
from jaxcnn.runfolder import RunFolder
from test_reliability import no_report_warning

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "jaxcnn.experiments.cifar10", "--preset", "smoke", "--no_progress"]
EPOCHS = ["--epochs", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(devices: int = 1) -> dict:
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "PYTHONPATH": str(ROOT)}


def start(n: int, argv, *, devices: int = 2, port=None, extra=lambda i: []):
    """``n`` processes of ``argv`` joined by --distributed, ``devices`` CPU devices each; the Popen objects."""
    port = port or free_port()
    return [subprocess.Popen(argv + ["--cpu_devices", str(devices), "--distributed", "--coordinator_address",
                                     f"127.0.0.1:{port}", "--num_processes", str(n), "--process_id", str(i)] + extra(i),
                             cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(n)]


def start_one(argv, *, devices: int):
    """One process with ``devices`` CPU devices (``--cpu_devices``), as a user starts it."""
    return subprocess.Popen(argv + ["--cpu_devices", str(devices)], cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


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


def wait_for_checkpoint(workdir: pathlib.Path, procs, epoch: int = 1, timeout: float = 600) -> None:
    """Return once ``epoch``'s latest checkpoint is committed (every process still running)."""
    deadline = time.time() + timeout
    while not (workdir / "checkpoints" / "latest" / str(epoch) / "commit_success.txt").exists():
        assert all(p.poll() is None for p in procs), [p.communicate()[1][-2000:] for p in procs if p.poll() is not None]
        assert time.time() < deadline
        time.sleep(0.02)


def final_state(workdir) -> dict:
    """The run's last checkpoint, ``{path: array}`` over every leaf (parameters, BatchNorm
    statistics, optimizer state, step, key)."""
    with RunFolder(workdir).checkpoints(read_only=True) as ckpts:
        tree, _ = ckpts.restore("latest")
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_run(run, ref, *, whole_history: bool = True) -> None:
    """``run`` trained the trajectory of ``ref`` (the one-process run): every leaf of the final state
    within rtol 1e-5 / atol 1e-6, the history's losses within 1e-5 relative, the same test accuracy."""
    a, b = final_state(run), final_state(ref)
    assert sorted(a) == sorted(b) and any("batch_stats" in k for k in a) and len(a) > 40
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-5, atol=1e-6, err_msg=k)
    ha, hb = RunFolder(run).read_history(), RunFolder(ref).read_history()
    assert [r["epoch"] for r in ha] == [r["epoch"] for r in hb] == [1, 2]
    for ra, rb in zip(ha if whole_history else ha[-1:], hb if whole_history else hb[-1:]):
        for k in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5, abs=1e-7), (ra["epoch"], k)
    sa, sb = RunFolder(run).read_summary(), RunFolder(ref).read_summary()
    assert sa["test_accuracy"] == sb["test_accuracy"]
    assert sa["test_loss"] == pytest.approx(sb["test_loss"], rel=1e-5)


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Two uninterrupted CLI runs of 2 epochs, started together: 1 process x 2 devices and
    2 processes x 1 device. ``{"1x2": workdir, "2x1": workdir, "outputs": [(code, out, err), ...]}``."""
    root = tmp_path_factory.mktemp("runs")
    one = start_one(CLI + EPOCHS + ["--workdir", str(root / "1x2")], devices=2)
    two = start(2, CLI + EPOCHS + ["--workdir", str(root / "2x1")], devices=1)
    results = finish([one] + two)
    for code, _, err in results:
        assert code == 0, err[-3000:]
    return {"1x2": root / "1x2", "2x1": root / "2x1", "outputs": results}


def test_two_processes_of_one_device_train_as_one_process_of_two(reference_runs):
    assert_same_run(reference_runs["2x1"], reference_runs["1x2"])
    (_, o1, e1), (c0, o0, e0), (c1, p1, q1) = reference_runs["outputs"]
    assert RunFolder(reference_runs["2x1"]).read_summary()["device"] == "cpu x2 (2 processes)"
    assert RunFolder(reference_runs["1x2"]).read_summary()["device"] == "cpu x2"
    # stdout holds the command's own lines only (gloo's connection notes go to stderr); process 1 is quiet
    assert "test accuracy" in o0 and not any(ln.startswith("[Gloo]") for ln in o0.splitlines())
    assert p1 == "" and ours(q1) == []


def test_two_processes_of_two_devices_train_as_one_process_of_four(tmp_path):
    """The same batches in the same order; only the 4-way sums are added in another order (gloo's ring
    across processes, XLA's loop within one). Adam turns that rounding into steps of up to the learning
    rate on parameters whose gradient is near zero (one process with 2 or with 4 devices differs just as
    much), so parameters are held to Adam's bound and the run is tried at a small learning rate, where
    what depends on the batches themselves (the BatchNorm statistics, the losses) must agree to 1e-5."""
    lr, steps = 1e-5, 2 * 256 // 32  # smoke: 256 training images, batch 32, 2 epochs
    args = CLI + EPOCHS + ["--learning_rate", str(lr)]
    one = start_one(args + ["--workdir", str(tmp_path / "1x4")], devices=4)
    two = start(2, args + ["--workdir", str(tmp_path / "2x2")], devices=2)
    for code, _, err in finish([one] + two):
        assert code == 0, err[-3000:]
    a, b = final_state(tmp_path / "2x2"), final_state(tmp_path / "1x4")
    assert sorted(a) == sorted(b)
    for k in a:
        if "batch_stats" in k:  # moving averages of activations of those parameters: with jax 0.10.1 the
            # means differ by up to 1e-5 absolute, 2.4e-5 of the leaf's largest (seen: block3_bn1, dense_bn;
            # on either convolution path; with 0.10.2 within 1e-5 of each value), while the losses, which
            # depend on the batches alone, still agree to 1e-5
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=1e-4 * np.abs(b[k]).max() + 1e-7, err_msg=k)
        elif "params" in k and "opt_state" not in k:  # Adam moves a parameter by at most ~3.2 lr a step
            np.testing.assert_allclose(a[k], b[k], rtol=0, atol=2 * 3.2 * lr * steps, err_msg=k)
    ha, hb = RunFolder(tmp_path / "2x2").read_history(), RunFolder(tmp_path / "1x4").read_history()
    for ra, rb in zip(ha, hb, strict=True):
        for k in ("train_loss", "val_loss"):
            assert ra[k] == pytest.approx(rb[k], rel=1e-5), (ra["epoch"], k)
    sa, sb = RunFolder(tmp_path / "2x2").read_summary(), RunFolder(tmp_path / "1x4").read_summary()
    assert sa["test_accuracy"] == sb["test_accuracy"] and sa["device"] == "cpu x4 (2 processes)"


def test_a_killed_two_process_run_resumes_as_one_process_on_the_same_trajectory(tmp_path, reference_runs):
    workdir = tmp_path / "run"
    args = CLI + EPOCHS + ["--workdir", str(workdir)]
    procs = start(2, args, devices=1, extra=lambda i: ["--heartbeat_timeout", "5"])
    wait_for_checkpoint(workdir, procs)
    procs[1].send_signal(signal.SIGKILL)
    t0 = time.time()
    (c0, _, e0), _ = finish(procs, timeout=120)
    waited = time.time() - t0
    assert c0 != 0 and waited < 60, (c0, waited)  # process 0 stops on its own, it does not hang
    assert "another task died" in e0 or "unhealthy" in e0 or "process 1" in e0
    assert not (workdir / "summary.json").exists()

    (code, out, err), = finish([start_one(args + ["--resume"], devices=2)])  # one process, two devices
    assert code == 0, err[-3000:]
    assert_same_run(workdir, reference_runs["2x1"])
    assert (workdir / "checkpoints" / "latest" / "1" / "state" / "ocdbt.process_1").is_dir()  # both had saved

    # restored in this process (one device): the test accuracy the run reported
    run = inference.restore(workdir)
    test = load_dataset(**run.config["data"]["source"]).test
    assert float(np.mean(run.predict(test.images).argmax(-1) == test.labels)) == \
        RunFolder(workdir).read_summary()["test_accuracy"]


def test_a_killed_one_process_run_resumes_as_two_processes_on_the_same_trajectory(tmp_path, reference_runs):
    workdir = tmp_path / "run"
    args = CLI + EPOCHS + ["--workdir", str(workdir)]
    proc = start_one(args, devices=2)
    wait_for_checkpoint(workdir, [proc])
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    results = finish(start(2, args + ["--resume"], devices=1))
    for code, _, err in results:
        assert code == 0, err[-3000:]
    assert_same_run(workdir, reference_runs["1x2"])
    assert len(list(RunFolder(workdir).tensorboard_dir.iterdir())) == 2  # one writer (process 0) per launch


@pytest.mark.parametrize("alone", [0, 1])
def test_a_process_whose_peer_never_comes_exits_in_one_line(tmp_path, alone):
    port = free_port()
    t0 = time.time()
    done = subprocess.run(CLI + ["--workdir", str(tmp_path / "run"), "--distributed", "--coordinator_address",
                                 f"127.0.0.1:{port}", "--num_processes", "2", "--process_id", str(alone),
                                 "--init_timeout", "3"], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert time.time() - t0 < 3 + 15
    assert done.returncode == 2, done.stderr[-3000:]
    lines = ours(done.stderr)
    assert len(lines) == 1 and lines[0].startswith(f"error: could not join the processes through 127.0.0.1:{port} "
                                                   f"(process {alone} of 2): "), done.stderr[-3000:]
    assert "within 3 s" in lines[0] and done.stdout == ""
    assert not (tmp_path / "run").exists()


FAILS_AFTER_TRAINING = textwrap.dedent("""
    import sys
    from jaxcnn.runfolder import RunFolder

    def broken(*args, **kwargs):  # process 0 fails after training (and its report), while it tells the result
        raise ValueError("the best checkpoint cannot be read (injected by the test)")

    RunFolder.record_paths = broken
    from jaxcnn.experiments.cifar10 import main
    sys.exit(main(sys.argv[1:]))
""")


def test_a_process_that_fails_after_training_ends_the_others_at_once(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text(FAILS_AFTER_TRAINING)
    port = free_port()
    args = ["--preset", "smoke", "--no_progress", "--epochs", "1", "--workdir", str(tmp_path / "run"),
            "--cpu_devices", "1", "--distributed", "--coordinator_address", f"127.0.0.1:{port}",
            "--num_processes", "2", "--heartbeat_timeout", "30"]
    p0 = subprocess.Popen([sys.executable, str(script)] + args + ["--process_id", "0"], cwd=ROOT, env=env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    p1 = subprocess.Popen([sys.executable, "-m", "jaxcnn.experiments.cifar10"] + args + ["--process_id", "1"],
                          cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, e0 = p0.communicate(timeout=600)
    t0 = time.time()
    _, e1 = p1.communicate(timeout=600)
    assert time.time() - t0 < 30  # within the heartbeat timeout, not JAX's shutdown deadline (minutes)
    assert p0.returncode == 2 and ours(no_report_warning(e0)) == [
        "error: the best checkpoint cannot be read (injected by the test)"]
    assert p1.returncode == 2, e1[-3000:]
    assert ours(e1) == ["error: process 0 failed, so process 1 stops too: the best checkpoint cannot be read "
                        "(injected by the test)"]


def test_processes_started_with_different_settings_are_refused(tmp_path):
    workdir = tmp_path / "run"
    results = finish(start(2, CLI + ["--workdir", str(workdir)], extra=lambda i: ["--seed", str(i)]))
    for code, _, err in results:
        assert code == 2
        assert "the processes were started with different settings: process 1 differs from process 0 in " \
               "data.source.seed (0 -> 1), fit.seed (0 -> 1). Start every process with the same settings" in err
    assert not RunFolder(workdir).has_checkpoints()


def test_a_batch_that_does_not_divide_over_the_devices_names_sizes_that_work(tmp_path):
    done = subprocess.run(CLI + ["--workdir", str(tmp_path / "run"), "--batch_size", "30"], cwd=ROOT, env=env(4),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == \
        "error: batch_size=30 must be a positive multiple of the number of devices (4); 28 or 32 would work"


def test_only_process_0_writes_records(tmp_path):
    """Any other process writes nothing but its part of the Orbax checkpoints."""
    from jaxcnn.experiments import cifar10
    from jaxcnn.experiments.configs import get_config
    from jaxcnn.train import distributed, fit

    class NotPrimary(distributed.Processes):
        def __init__(self):
            self.index, self.count = 1, 1  # alone, but not process 0

    config = get_config("smoke", epochs=1)
    dataset = cifar10.load_data(config)
    model = cifar10.build_model(config, dataset.num_classes)
    fit(cifar10.create_state(config, model, dataset.image_shape), dataset, config.fit, tmp_path / "run",
        processes=NotPrimary(), model=model, progress=False)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoints"]
