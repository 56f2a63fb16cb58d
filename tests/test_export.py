"""``python -m jaxcnn.export``: onnxruntime runs the exported file and gives what
``jaxcnn.inference.restore(run).predict`` gives, at any batch size; the class names travel in the
metadata; a wrong export is refused and leaves no file; without the extra, one line and exit 2."""

import contextlib
import dataclasses
import errno
import importlib.util
import io
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import export, inference
from jaxcnn.data import load_dataset
from jaxcnn.experiments import cifar10
from jaxcnn.models import ResNetTiny
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import FitConfig, TrainState, adam, fit

HAS_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("jax2onnx", "onnx", "onnxruntime"))
needs_extra = pytest.mark.skipif(not HAS_EXTRA, reason="the export extra (jax2onnx, onnxruntime) is not installed: "
                                                       + export.INSTALL)


def cli(capsys, argv):
    code = export.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{name: run folder}: ``cifar10`` (the smoke preset: the CIFAR CNN, "unit" preprocessing) and
    ``resnet`` (a user's ``fit`` of ResNetTiny: "caffe" preprocessing, BatchNorm, the 3x3 stride-2 max pool)."""
    if not HAS_EXTRA:
        pytest.skip("the export extra is not installed")
    root = tmp_path_factory.mktemp("export_runs")
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cifar10.main(["--dataset", "offline", "--preset", "smoke", "--epochs", "1", "--no_progress",
                             "--workdir", str(root / "cifar10")])
    assert code == 0, err.getvalue()[-3000:]
    model = ResNetTiny(classifier_activation=None)
    data = load_dataset("offline", num_train=32, num_val=32, num_test=16)
    variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(jax.random.key(0))
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(1))
    fit(state, data, FitConfig(epochs=1, batch_size=16, eval_batch_size=16, augment=None, preprocess="caffe"),
        root / "resnet", progress=False)
    # the smoke splits (64 and 32 validation images) are too small for the report to fit a temperature
    # (jaxcnn.metrics.MIN_TEMPERATURE_EXAMPLES): give each run one, as a run on a larger split has
    for name, t in (("cifar10", 3.5), ("resnet", 0.6)):
        folder = RunFolder(root / name)
        assert folder.read_summary()["temperature"] is None
        folder.write_summary({**folder.read_summary(), "temperature": t})
    return {"cifar10": root / "cifar10", "resnet": root / "resnet"}


@needs_extra
@pytest.mark.parametrize("kind", ["cifar10", "resnet"])
def test_onnxruntime_gives_the_runs_probabilities_at_any_batch_size(runs, kind, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    code, out, err = cli(capsys, ["--run", str(runs[kind]), "--out", str(tmp_path / "m.onnx")])
    assert code == 0, err
    assert out.startswith(f"wrote {tmp_path / 'm.onnx'}") and "onnxruntime matches the run within" in out
    run = inference.restore(runs[kind])
    assert run.temperature is not None  # the default output is the calibrated one, as predict's
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = session.get_inputs(), session.get_outputs()
    assert (inp.name, inp.type, inp.shape[1:]) == ("images", "tensor(uint8)", [32, 32, 3])
    assert isinstance(inp.shape[0], str) and outp.name == "probabilities"  # a dynamic batch dimension
    images = np.random.default_rng(7).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    want = run.predict(images)
    for batch in (images[:1], images[1:]):  # 1 and 5
        got = session.run(None, {"images": batch})[0]
        assert got.shape == (len(batch), 10)
        np.testing.assert_allclose(got, want[:len(batch)] if len(batch) == 1 else want[1:], rtol=0, atol=1e-4)
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "m.onnx")).metadata_props}
    assert json.loads(meta["class_names"]) == list(run.class_names) and len(run.class_names) == 10
    assert float(meta["temperature"]) == run.temperature and json.loads(meta["image_shape"]) == [32, 32, 3]
    assert meta["preprocess"] == {"cifar10": "unit", "resnet": "caffe"}[kind]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_extra
def test_the_temperature_divides_the_logits_and_no_temperature_gives_the_raw_softmax(runs, tmp_path, capsys):
    import onnx
    import onnxruntime as ort

    run_dir = runs["cifar10"]
    for name, flags in (("t.onnx", []), ("raw.onnx", ["--no_temperature"])):
        code, _, err = cli(capsys, ["--run", str(run_dir), "--out", str(tmp_path / name)] + flags)
        assert code == 0, err
    images = np.random.default_rng(3).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    calibrated, raw = (ort.InferenceSession(str(tmp_path / n), providers=["CPUExecutionProvider"])
                       .run(None, {"images": images})[0] for n in ("t.onnx", "raw.onnx"))
    run = inference.restore(run_dir)
    # the smoke run's logits lie close together and its T is large: the raw softmax is the sensitive check
    np.testing.assert_allclose(raw, run.predict(images, temperature=False), rtol=0, atol=1e-4)
    t = run.temperature
    oracle = np.log(raw.astype(np.float64)) / t  # log softmax(z) = z - c: softmax(log(raw) / T) = softmax(z / T)
    oracle = np.exp(oracle - oracle.max(-1, keepdims=True))
    np.testing.assert_allclose(calibrated, oracle / oracle.sum(-1, keepdims=True), rtol=0, atol=1e-5)
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "raw.onnx")).metadata_props}["temperature"] == "none"


@needs_extra
def test_a_recorded_temperature_outside_the_range_is_refused_and_no_temperature_exports_the_raw_softmax(
        runs, tmp_path, capsys):
    import shutil

    import onnx

    run_dir = tmp_path / "run"
    shutil.copytree(runs["cifar10"], run_dir)
    folder = RunFolder(run_dir)
    folder.write_summary({**folder.read_summary(), "temperature": 1e-300})  # 0 in float32: NaN probabilities
    code, out, err = cli(capsys, ["--run", str(run_dir), "--out", str(tmp_path / "t.onnx")])
    assert (code, out) == (2, "") and err == (
        f"error: restore: {run_dir / 'summary.json'} has temperature=1e-300; a run's temperature is a number in "
        f"[0.05, 20]: correct or remove it, or pass --no_temperature (restore(..., temperature=False)) for the raw "
        f"softmax\n")
    assert not (tmp_path / "t.onnx").exists()
    code, _, err = cli(capsys, ["--run", str(run_dir), "--out", str(tmp_path / "raw.onnx"), "--no_temperature"])
    assert code == 0, err
    assert {p.key: p.value for p in onnx.load(str(tmp_path / "raw.onnx")).metadata_props}["temperature"] == "none"


@needs_extra
def test_a_wrong_export_is_refused_and_leaves_no_file(runs, tmp_path, capsys, monkeypatch):
    own = export.probabilities_function

    def perturbed(run, **kw):  # one weight of the exported graph off by 0.5
        params = jax.tree_util.tree_map(np.array, run.variables["params"])
        leaf = jax.tree_util.tree_leaves(params)[0]
        leaf.flat[0] += 0.5
        return own(dataclasses.replace(run, variables={**run.variables, "params": params}), **kw)

    monkeypatch.setattr(export, "probabilities_function", perturbed)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    code, stdout, err = cli(capsys, ["--run", str(runs["cifar10"]), "--out", str(out), "--no_temperature"])
    assert code == 1 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "differ from the run's by up to" in err, err
    assert out.read_bytes() == b"the previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_extra
def test_a_model_onnxruntime_cannot_run_is_refused(runs, tmp_path, capsys, monkeypatch):
    # jax2onnx's own lowering of the NHWC max pool: a 4-D MaxPool, which onnxruntime does not run
    # (the ResNet run's: its 3x3 stride-2 pool besides the 2x2 ones)
    monkeypatch.setattr(export, "_nhwc_max_pool", contextlib.nullcontext)
    code, _, err = cli(capsys, ["--run", str(runs["resnet"]), "--out", str(tmp_path / "m.onnx")])
    assert code == 1 and "onnxruntime cannot run the exported model" in err
    assert len(err.strip().splitlines()) == 1 and not list(tmp_path.iterdir())


@needs_extra
@pytest.mark.parametrize("window, stride, padding, pads", [
    (2, None, "VALID", ((0, 0), (0, 0))),
    (3, 2, "SAME", ((0, 1), (1, 1))),                        # 8 x 7 at stride 2: 4 x 4 out, by hand
    ((2, 3), (1, 2), ((1, 0), (2, 1)), ((1, 0), (2, 1))),
])
def test_max_pooling_runs_in_onnxruntime_as_the_numpy_loop_pools(window, stride, padding, pads):
    import jax2onnx
    import onnxruntime as ort

    from jaxcnn import layers, reference

    with export._nhwc_max_pool():
        proto = jax2onnx.to_onnx(lambda x: layers.max_pool2d(x, window, stride=stride, padding=padding),
                                 [jax.ShapeDtypeStruct(("N", 8, 7, 3), jnp.float32)], input_names=["x"])
    assert [n.op_type for n in proto.graph.node] == ["Transpose", "MaxPool", "Transpose"]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).normal(size=(2, 8, 7, 3)).astype(np.float32) - 1  # mostly < 0: a zero pad would win
    win = (window, window) if isinstance(window, int) else window
    step = win if stride is None else (stride, stride) if isinstance(stride, int) else stride
    for batch in (x[:1], x):
        want, _ = reference.max_pool2d_forward(batch.astype(np.float64), win, step, pads)
        np.testing.assert_array_equal(session.run(None, {"x": batch})[0], want.astype(np.float32))


def test_without_the_extra_one_line_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # `import jax2onnx` raises ImportError
    code, out, err = cli(capsys, ["--run", str(tmp_path / "run"), "--out", str(tmp_path / "m.onnx")])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
    assert "jax2onnx" in err and "pip install" in err and "--no-deps jax2onnx==0.17.1" in err
    assert not (tmp_path / "m.onnx").exists()


def test_an_empty_out_is_refused_without_offering_a_default_it_does_not_have(tmp_path, capsys):
    code, out, err = cli(capsys, ["--run", str(tmp_path / "run"), "--out", ""])
    assert (code, out, err) == (2, "", "error: --out '': empty; name a path\n")


# --------------------------------------------------------------------------- --out, a full disk, a killed export


def _no_restore(monkeypatch):
    monkeypatch.setattr(inference, "restore", lambda *a, **k: pytest.fail("the run was restored"))


@needs_extra
def test_an_out_under_a_file_is_one_line_before_the_run_is_restored(tmp_path, capsys, monkeypatch):
    _no_restore(monkeypatch)
    a_file = tmp_path / "somefile.txt"
    a_file.write_text("mine")
    for out in (a_file / "m.onnx", a_file / "deeper" / "m.onnx"):
        code, stdout, err = cli(capsys, ["--run", str(tmp_path / "run"), "--out", str(out)])
        assert (code, stdout) == (2, "")
        assert err == f"error: --out {out}: {a_file} is a file, not a folder; name a .onnx file in a folder\n"
    assert a_file.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["somefile.txt"]


@needs_extra
def test_an_out_in_a_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    _no_restore(monkeypatch)
    if os.geteuid() == 0:  # root writes through permission bits: a filesystem that takes no files
        folder = pathlib.Path("/sys")
    else:
        folder = tmp_path / "read_only"
        folder.mkdir()
        folder.chmod(0o555)
    out = folder / "m.onnx"
    code, stdout, err = cli(capsys, ["--run", str(tmp_path / "run"), "--out", str(out)])
    assert (code, stdout) == (2, "") and len(err.splitlines()) == 1, err
    assert err.startswith(f"error: --out {out}: cannot write in {folder} (") and ".jaxcnn" not in err, err
    assert err.endswith("); choose a folder you can write in\n") and not out.exists()


@needs_extra
def test_a_full_disk_names_outs_folder_and_offers_no_resume(runs, tmp_path, capsys, monkeypatch):
    own = pathlib.Path.write_bytes

    def full(self, data):  # the write of the export's temporary file: a disk that is full
        if export.TMP_SUFFIX in self.name:
            with open(self, "wb") as f:
                f.write(data[:100])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return own(self, data)

    monkeypatch.setattr(pathlib.Path, "write_bytes", full)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous export")
    code, stdout, err = cli(capsys, ["--run", str(runs["cifar10"]), "--out", str(out)])
    assert (code, stdout) == (2, "")
    assert err == (f"error: cannot write in {tmp_path}: No space left on device (ENOSPC). Free some space or "
                   f"choose another folder\n")
    assert out.read_bytes() == b"the previous export" and sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


@needs_extra
def test_the_next_export_removes_a_killed_exports_temporary_file_and_no_other(runs, tmp_path, capsys):
    import onnxruntime as ort

    gone = subprocess.Popen(["true"])  # a pid whose process has ended
    gone.wait()
    dead, alive = gone.pid, os.getppid()
    stale = [tmp_path / f".m.onnx.jaxcnn-tmp-{dead}"]
    kept = [tmp_path / f".m.onnx.jaxcnn-tmp-{alive}",      # its process is alive: an export under way
            tmp_path / f".m.onnx.jaxcnn-tmp-{dead}.bak",   # names that only look like ours
            tmp_path / f".m.onnx.jaxcnn-tmp-x{dead}",
            tmp_path / f"m.onnx.jaxcnn-tmp-{dead}",
            tmp_path / f".n.onnx.jaxcnn-tmp-{dead}",       # another --out's
            tmp_path / "sub" / f".m.onnx.jaxcnn-tmp-{dead}"]
    for p in stale + kept:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"x" * 1000)
    code, stdout, err = cli(capsys, ["--run", str(runs["cifar10"]), "--out", str(tmp_path / "m.onnx")])
    assert code == 0, err
    assert err == (f"removed 1 temporary file(s) of an export to {tmp_path / 'm.onnx'} that was killed: "
                   f"{stale[0].name}\n")
    assert not any(p.exists() for p in stale) and all(p.read_bytes() == b"x" * 1000 for p in kept)
    images = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": images})[0]
    np.testing.assert_allclose(got, inference.restore(runs["cifar10"]).predict(images), rtol=0, atol=1e-4)


@needs_extra
def test_a_bfloat16_run_is_exported_in_float32_and_says_so(tmp_path, capsys):
    import onnxruntime as ort

    run_dir = tmp_path / "bf16"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = cifar10.main(["--dataset", "offline", "--preset", "smoke", "--epochs", "1", "--no_progress",
                             "--precision", "bfloat16", "--workdir", str(run_dir)])
    assert code == 0, err.getvalue()[-3000:]
    code, stdout, err = cli(capsys, ["--run", str(run_dir), "--out", str(tmp_path / "m.onnx"), "--no_temperature"])
    assert code == 0, err
    assert err == (f"{run_dir} computes in bfloat16, which onnxruntime's CPU convolutions do not take: exporting "
                   f"it in float32 (the same weights), checked against the run's model computed in float32\n")
    assert stdout.startswith(f"wrote {tmp_path / 'm.onnx'}")
    run = inference.restore(run_dir)
    assert run.model.dtype == jnp.bfloat16  # the run itself is left as it was
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"images": images})[0]
    # the oracle: the run's module and weights with its compute dtype set to float32 by hand
    f32 = dataclasses.replace(run, model=run.model.clone(dtype=jnp.float32))
    with jax.default_matmul_precision("float32"):
        np.testing.assert_allclose(got, f32.predict(images, temperature=False), rtol=0, atol=1e-4)
    np.testing.assert_allclose(got, run.predict(images, temperature=False), rtol=0, atol=0.05)  # bfloat16's own
