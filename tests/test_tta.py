"""Horizontal-flip test-time augmentation (``FitConfig.flip_tta``, ``jaxcnn.tta``): the eval step's loss and
accuracy against float64 NumPy from the two views' logits; a run that evaluates with it (validation, test
scores, report) and resumes bit for bit; ``Restored.predict(tta=)``, ``python -m jaxcnn.predict --tta`` and
the ONNX export (one view, with a warning) against the float64 mean of the single-view predictions."""

import csv
import dataclasses
import importlib.util
import json
import logging
import os
import shutil
import signal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from float64_oracle import EPS32, float32_sum_tolerance
from jaxcnn import inference, metrics, predict, results, viz
from jaxcnn.data import Dataset, Split
from jaxcnn.models.cifar_cnn import CifarCNN
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import FitConfig, RunInterrupted, Steps, TrainState, adam, fit, make_eval_step

HAS_EXPORT = all(importlib.util.find_spec(m) is not None for m in ("jax2onnx", "onnx", "onnxruntime"))


def _softmax64(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _mean_of_flips(z, z_mirror):
    """float64 ``(N, K)``: the mean of the softmaxes of the two views' logits."""
    return (_softmax64(z) + _softmax64(z_mirror)) / 2


# --------------------------------------------------------------------------- the eval step


class _Linear(nn.Module):
    """``logits = flatten(x) @ W + b``: logits a float64 oracle computes from the parameters alone."""

    num_classes: int = 3

    @nn.compact
    def __call__(self, x, train: bool = False):
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def test_the_eval_steps_flip_tta_is_the_cross_entropy_of_the_mean_softmax_of_the_two_views():
    """6 images (2 of them padding) 4 x 5 x 3, 3 classes: the eval step's loss_sum is the sum over the real
    images of ``-log((softmax(z) + softmax(z_mirror))[label] / 2)``, ``correct`` the count of argmax of that
    mean equal to the label, both from float64 logits ``x / 255 @ W + b`` of the image and its mirror."""
    rng = np.random.default_rng(0)
    b, h, w, c, k = 6, 4, 5, 3, 3
    n = h * w * c
    images = rng.integers(0, 256, (b, h, w, c), dtype=np.uint8)
    labels = rng.integers(0, k, b).astype(np.int32)
    mask = np.array([True] * 4 + [False] * 2)
    kernel, bias = rng.normal(scale=0.4, size=(n, k)), rng.normal(size=k)
    model = _Linear(k)
    variables = {"params": {"Dense_0": {"kernel": jnp.asarray(kernel, jnp.float32),
                                        "bias": jnp.asarray(bias, jnp.float32)}}}
    state = TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(1e-3), key=jax.random.key(0))
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels), "mask": jnp.asarray(mask)}
    got = jax.device_get(jax.jit(make_eval_step(flip_tta=True))(state, batch))

    k32, b32 = np.asarray(kernel, np.float32).astype(np.float64), np.asarray(bias, np.float32).astype(np.float64)
    x = images.astype(np.float64) / 255
    views = [v.reshape(b, n) for v in (x, x[:, :, ::-1])]
    z, zm = (v @ k32 + b32 for v in views)  # (B, K) each
    # each logit: a float32 sum of n products and the bias (x / 255 rounded once more)
    tol_z = max(float(np.max(float32_sum_tolerance(n + 2, np.sqrt(v ** 2 @ k32 ** 2) + np.abs(zz))))
                for v, zz in zip(views, (z, zm)))
    p = _mean_of_flips(z, zm)
    losses = -np.log(p[np.arange(b), labels])
    want_loss = float(losses[mask].sum())
    # -log of a mean of softmaxes moves by at most 2 * (the largest logit error), per example
    tol = 4 * 2 * tol_z + 8 * EPS32 * float(np.abs(losses[mask]).sum())
    assert abs(float(got["loss_sum"]) - want_loss) <= tol, (float(got["loss_sum"]), want_loss, tol)
    top2 = np.sort(np.log(p), -1)[:, -2:]
    assert np.all(top2[:, 1] - top2[:, 0] > 8 * tol_z)  # no near tie: the argmax is the oracle's
    assert float(got["correct"]) == float(np.sum((p.argmax(-1) == labels) & mask)) and float(got["count"]) == 4
    # the test tells the flip average from what it is not: one view, the mean of the logits, the mean log-softmax
    one_view = -np.log(_softmax64(z)[np.arange(b), labels])[mask].sum()
    mean_logits = -np.log(_softmax64((z + zm) / 2)[np.arange(b), labels])[mask].sum()
    geometric = -((np.log(_softmax64(z)) + np.log(_softmax64(zm))) / 2)[np.arange(b), labels][mask].sum()
    for other in (one_view, mean_logits, geometric):
        assert abs(other - want_loss) > 100 * tol, (other, want_loss, tol)
    plain = jax.device_get(jax.jit(make_eval_step())(state, batch))  # the default is one view
    assert abs(float(plain["loss_sum"]) - one_view) <= tol


def test_flip_tta_is_a_bool_and_the_steps_must_apply_what_the_config_says():
    with pytest.raises(ValueError, match=r"FitConfig: flip_tta=1; must be True \(evaluate with the mean of each "
                                         r"image's and its mirror's softmax\) or False \(one view\)"):
        FitConfig(flip_tta=1)
    with pytest.raises(ValueError, match=r"FitConfig: flip_tta='yes'"):
        FitConfig(flip_tta="yes")
    on = FitConfig(flip_tta=True, augment=None)
    assert Steps.build(on).flip_tta is True and Steps.build(FitConfig(augment=None)).flip_tta is False
    with pytest.raises(ValueError, match=r"fit: the steps apply flip_tta=False but the FitConfig says flip_tta=True"):
        Steps.build(FitConfig(augment=None)).check(on)


# --------------------------------------------------------------------------- a run that evaluates with it

H = W = 8
CLASSES = ("a", "b", "c")
CONFIG = FitConfig(epochs=2, batch_size=16, eval_batch_size=8, augment=None, flip_tta=True)
TEMPERATURE = 1.7  # given to the run below (its splits are too small for the report to fit one)


def _dataset():
    rng = np.random.default_rng(0)

    def split(n):
        return Split(rng.integers(0, 256, (n, H, W, 3), dtype=np.uint8), rng.integers(0, 3, n).astype(np.int32))

    # 12 validation and test images: their last batch of 8 is padded
    return Dataset(name="synthetic", train=split(32), val=split(12), test=split(12), num_classes=3,
                   class_names=CLASSES)


def _state():
    model = CifarCNN(widths=(4,), dense_units=8, num_classes=3)
    variables = model.init(jax.random.key(0), jnp.zeros((1, H, W, 3)), train=False)
    return TrainState.create(apply_fn=model.apply, variables=variables, tx=adam(3e-3), key=jax.random.key(1))


@pytest.fixture(scope="module")
def tta_run(tmp_path_factory):
    """``(run folder, dataset, history, summary)``: a CIFAR CNN trained 2 epochs with ``flip_tta=True``, then
    given the temperature ``TEMPERATURE``; and ``"plain"``: a copy whose config.json says ``flip_tta`` False."""
    root = tmp_path_factory.mktemp("tta_run")
    data = _dataset()
    _, history, summary = fit(_state(), data, CONFIG, root / "tta", progress=False)
    folder = RunFolder(root / "tta")
    assert summary["temperature"] is None and summary["best_epoch"] >= 1
    folder.write_summary({**folder.read_summary(), "temperature": TEMPERATURE})
    shutil.copytree(root / "tta", root / "plain")
    raw = json.loads((root / "plain" / "config.json").read_text())
    raw["fit"]["flip_tta"] = False
    (root / "plain" / "config.json").write_text(json.dumps(raw, indent=1) + "\n")
    return {"tta": root / "tta", "plain": root / "plain", "data": data, "history": history, "summary": summary}


def _views(run, images):
    """The single-view float32 logits of ``images`` and of their mirrors, from ``run.predict(tta=False)``."""
    return (run.predict(images, tta=False, return_logits=True, batch_size=5),
            run.predict(images[:, :, ::-1], tta=False, return_logits=True, batch_size=5))


def _tol(*logits) -> float:
    """The float32 rounding of a softmax of these logits (two compilations of the model may round its
    logits apart by as much): 32 eps of the largest logit."""
    return 32 * EPS32 * (1 + max(float(np.abs(z).max()) for z in logits))


def test_a_flip_tta_run_validates_and_tests_on_the_mean_softmax_and_records_it(tta_run):
    run_dir, data, history, summary = tta_run["tta"], tta_run["data"], tta_run["history"], tta_run["summary"]
    assert json.loads((run_dir / "config.json").read_text())["fit"]["flip_tta"] is True
    run = inference.restore(run_dir)
    assert run.epoch == summary["best_epoch"] and run.flip_tta
    for name, split, loss, accuracy in (
            ("test", data.test, summary["test_loss"], summary["test_accuracy"]),
            ("val", data.val, *(lambda r: (r["val_loss"], r["val_accuracy"]))(history[summary["best_epoch"] - 1]))):
        z, zm = _views(run, split.images)
        p = _mean_of_flips(z, zm)
        want = float(np.mean(-np.log(p[np.arange(len(split)), split.labels])))
        tol = 2 * _tol(z, zm) + 8 * EPS32 * want
        assert abs(loss - want) <= tol, (name, loss, want, tol)
        assert accuracy == float(np.mean(p.argmax(-1) == split.labels)), name
        one_view = metrics.nll(z, split.labels)
        assert abs(one_view - want) > 100 * tol, (name, one_view, want)  # the scores are not one view's


def test_the_report_made_again_from_the_folder_scores_the_flip_average_and_says_so(tta_run, tmp_path, monkeypatch):
    shutil.copytree(tta_run["tta"], tmp_path / "run")
    titles = []
    for name in ("plot_confusion", "plot_reliability"):
        real = getattr(viz, name)
        monkeypatch.setattr(viz, name, lambda *a, _real=real, **kw: (titles.append(kw["title"]), _real(*a, **kw))[1])
    summary = results.write_test_results(tmp_path / "run", tta_run["data"])
    confusion = np.asarray(summary["confusion_matrix"])
    assert np.trace(confusion) / confusion.sum() == tta_run["summary"]["test_accuracy"]
    assert len(titles) == 2 and all(t.endswith(", flip TTA)") for t in titles), titles
    shutil.copytree(tta_run["plain"], tmp_path / "plain")  # the same weights, config.json says one view
    titles.clear()
    plain = results.write_test_results(tmp_path / "plain", tta_run["data"])
    assert len(titles) == 2 and not any("flip TTA" in t for t in titles), titles
    assert plain["confusion_matrix"] != summary["confusion_matrix"] or plain["ece"] != summary["ece"]


class _SignalsAt:
    """A train step that sends SIGINT to this process before global step ``at``."""

    def __init__(self, inner, at: int):
        self.inner, self.lower, self.at = inner, inner.lower, at

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(state, batch)


def test_a_flip_tta_run_resumed_is_the_uninterrupted_run_bit_for_bit_and_cannot_change_it(tta_run, tmp_path):
    data = tta_run["data"]
    steps = Steps.build(CONFIG)
    with pytest.raises(RunInterrupted, match="after epoch 1"):  # (the last step of epoch 1 of 2)
        fit(_state(), data, CONFIG, tmp_path / "b", progress=False,
            steps=dataclasses.replace(steps, train=_SignalsAt(steps.train, 1)))
    with pytest.raises(ValueError, match=r"fit.flip_tta \(True -> False\)"):
        fit(_state(), data, dataclasses.replace(CONFIG, flip_tta=False), tmp_path / "b", progress=False, resume=True)
    _, history, summary = fit(_state(), data, CONFIG, tmp_path / "b", progress=False, resume=True)
    timing = ("epoch_time_s", "images_per_s")
    assert ([{k: v for k, v in r.items() if k not in timing} for r in history]
            == [{k: v for k, v in r.items() if k not in timing} for r in tta_run["history"]])
    for key in ("best_epoch", "test_loss", "test_accuracy"):
        assert summary[key] == tta_run["summary"][key], key


# --------------------------------------------------------------------------- Restored.predict


def test_predict_with_tta_is_the_mean_of_the_single_view_predictions_of_the_image_and_its_mirror(tta_run):
    run = inference.restore(tta_run["tta"])
    assert run.temperature == TEMPERATURE
    images = np.random.default_rng(5).integers(0, 256, (7, H, W, 3), dtype=np.uint8)
    z, zm = _views(run, images)
    p = _mean_of_flips(z, zm)
    tol = _tol(z, zm)
    raw = run.predict(images, tta=True, temperature=False, batch_size=5)
    np.testing.assert_allclose(raw, p, rtol=0, atol=tol)
    np.testing.assert_allclose(run.predict(images, tta=True, return_logits=True, batch_size=5), np.log(p), rtol=0,
                               atol=2 * tol / p.min())
    # the temperature acts on log p, as the report fitted it
    np.testing.assert_allclose(run.predict(images, tta=True, batch_size=5), _softmax64(np.log(p) / TEMPERATURE),
                               rtol=0, atol=tol)
    assert np.abs(_softmax64(z) - p).max() > 100 * tol  # the two views differ: the test sees the average
    # tta=None: as the run evaluated (flip_tta True here)
    assert run.predict(images).tobytes() == run.predict(images, tta=True).tobytes()
    # tta off: one view, softmax(z / T) of the model's own logits
    variables = jax.device_get(run.variables)
    z64 = np.asarray(run.model.apply(variables, images.astype(np.float32) / 255, train=False), np.float64)
    np.testing.assert_allclose(run.predict(images, tta=False), _softmax64(z64 / TEMPERATURE), rtol=0,
                               atol=_tol(z64))
    # a run that evaluated without it predicts one view unless told
    plain = inference.restore(tta_run["plain"])
    assert not plain.flip_tta
    assert plain.predict(images).tobytes() == plain.predict(images, tta=False).tobytes()
    assert plain.predict(images, tta=True).tobytes() == run.predict(images).tobytes()
    with pytest.raises(TypeError, match=r"Restored.predict: tta must be None \(as the run evaluated\), True \(flip "
                                        r"test-time augmentation\) or False \(one view\), got 'on'"):
        run.predict(images, tta="on")


# --------------------------------------------------------------------------- python -m jaxcnn.predict


def _photos(folder, images):
    folder.mkdir()
    paths = []
    for i, image in enumerate(images):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def _cli(capsys, argv):
    code = predict.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_predict_command_follows_the_run_or_the_tta_flag(tta_run, tmp_path, capsys):
    images = np.random.default_rng(9).integers(0, 256, (5, H, W, 3), dtype=np.uint8)
    _photos(tmp_path / "photos", images)  # PNG: decoded back to the same arrays
    got = {}
    for run_key, mode in (("tta", "run"), ("tta", "on"), ("tta", "off"), ("plain", "run")):
        out_csv = tmp_path / f"{run_key}-{mode}.csv"
        code, out, err = _cli(capsys, ["--run", str(tta_run[run_key]), "--tta", mode, "--top_k", "3", "--out",
                                       str(out_csv), str(tmp_path / "photos")])
        assert code == 0, err
        last = err.strip().splitlines()[-1]
        assert last.startswith(f"5 of 5 file(s) classified with {tta_run[run_key]} (best epoch "), last
        said = {("tta", "run"): ", flip TTA)", ("tta", "on"): ", flip TTA)",
                ("tta", "off"): ", without the flip TTA the run evaluated with)", ("plain", "run"): ")"}[run_key, mode]
        assert f"temperature {TEMPERATURE:.3g}{said}" in last, last
        with open(out_csv, newline="") as f:
            rows = list(csv.DictReader(f))
        probs = np.zeros((5, 3))
        for i, row in enumerate(rows):
            for j in range(1, 4):
                probs[i, CLASSES.index(row[f"label_{j}"])] = float(row[f"prob_{j}"])
        got[run_key, mode] = probs
    run = inference.restore(tta_run["tta"])
    want = {True: run.predict(images, tta=True), False: run.predict(images, tta=False)}
    for key, flipped in ((("tta", "run"), True), (("tta", "on"), True), (("tta", "off"), False),
                         (("plain", "run"), False)):
        np.testing.assert_allclose(got[key], want[flipped], rtol=1e-5, atol=0, err_msg=str(key))  # 6 digits
    assert np.abs(want[True] - want[False]).max() > 1e-3  # the CSV's 6 digits tell the two apart
    with pytest.raises(SystemExit) as e:
        predict.main(["--run", str(tta_run["tta"]), "--tta", "maybe", str(tmp_path / "photos")])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: argument --tta: invalid choice: 'maybe' (choose from 'run', 'on', "
                                       "'off') (see python -m jaxcnn.predict --help)\n")


# --------------------------------------------------------------------------- python -m jaxcnn.export


@pytest.mark.skipif(not HAS_EXPORT, reason="the export extra (jax2onnx, onnxruntime) is not installed")
def test_the_export_of_a_flip_tta_run_is_one_view_and_says_so(tta_run, tmp_path, caplog):
    import onnxruntime as ort

    from jaxcnn import export

    with caplog.at_level(logging.WARNING, logger="jaxcnn"):
        run, diff = export.export(tta_run["tta"], tmp_path / "m.onnx")
    said = [r.getMessage() for r in caplog.records if r.name == "jaxcnn"]
    assert said == [f"{tta_run['tta']} was evaluated with flip test-time augmentation (fit.flip_tta), which the "
                    f"ONNX graph does not hold: the exported model predicts one view, without the flip average, so "
                    f"its outputs differ from the run's reported scores"], said
    assert diff <= export.TOLERANCE
    images = np.random.default_rng(11).integers(0, 256, (6, H, W, 3), dtype=np.uint8)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": images})[0]
    np.testing.assert_allclose(got, run.predict(images, tta=False), rtol=0, atol=export.TOLERANCE)
    assert np.abs(got - run.predict(images, tta=True)).max() > 10 * export.TOLERANCE  # not the flip average
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="jaxcnn"):
        export.export(tta_run["plain"], tmp_path / "plain.onnx")
    assert [r.getMessage() for r in caplog.records if r.name == "jaxcnn"] == []
