"""Your own images end to end: ``finetune`` and ``cifar10`` on a folder of real PNG / JPEG files
(``conftest.write_photo_folder``), the test results each run writes (confusion matrix, per-class
accuracy, the most confidently wrong images), and ``python -m jaxcnn.predict`` against
``jaxcnn.inference.restore(run).predict`` on the same decoded arrays."""

import csv
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jaxcnn import inference, predict, results, viz
from jaxcnn.data import decode_image, load_dataset, scan_folder
from jaxcnn.experiments import cifar10, finetune
from jaxcnn.runfolder import RunFolder

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLASSES = ["disk", "ring", "square"]


def cli(capsys, main, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runs(photo_folder, tmp_path_factory):
    """The smoke presets trained on the photo folder: {name: (run folder, stdout, stderr)}; names
    ``finetune/phase1``, ``finetune/phase2``, ``cifar10``; and ``"finetune"``: the fine-tuning workdir."""
    import contextlib
    import io

    root, _ = photo_folder
    work = tmp_path_factory.mktemp("folder_runs")
    out = {}
    for name, main, extra in (
        ("finetune", finetune.main, ["--test_fraction", "0.25"]),
        ("cifar10", cifar10.main, ["--batch_size", "16", "--image_size", "24"]),
    ):
        stdout, stderr = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            code = main(["--preset", "smoke", "--dataset", "folder", "--data_dir", str(root), "--no_progress",
                         "--workdir", str(work / name)] + extra)
        assert code == 0, stderr.getvalue()[-3000:]
        out[name] = (work / name, stdout.getvalue(), stderr.getvalue())
    for phase in (1, 2):
        out[f"finetune/phase{phase}"] = (work / "finetune" / f"phase{phase}",) + out["finetune"][1:]
    return out


RUN_KINDS = ["finetune/phase1", "finetune/phase2", "cifar10"]


# --------------------------------------------------------------------------- training on a folder


def test_finetune_on_a_folder_runs_both_phases_and_records_the_classes(runs, photo_folder):
    root, manifest = photo_folder
    workdir, out, err = runs["finetune"]
    assert "phase 1: test accuracy" in out and "phase 2: test accuracy" in out
    assert err.count("skipped 3 file(s) that are not usable images") == 1  # one warning, loaded once
    assert all(bad in err for bad in manifest["bad"])
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["dataset"] == "folder" and summary["num_classes"] == 3 and summary["image_size"] == 32
    for phase in (1, 2):
        config = RunFolder(workdir / f"phase{phase}").read_config()
        assert config["data"]["class_names"] == CLASSES and config["data"]["image_shape"] == [32, 32, 3]
        assert config["data"]["source"] == {"name": "folder", "data_dir": str(root), "seed": 0, "image_size": 32,
                                            "val_fraction": 0.1, "test_fraction": 0.25}
        assert config["model"]["backbone"]["kind"] == "resnet" and config["experiment"]["dataset"] == "folder"
        test_files = scan_folder(root, test_fraction=0.25).files["test"]  # 43 files pass the header check
        assert len(test_files) == round(0.25 * 43)
        assert summary[f"phase{phase}"]["num_test"] == len([f for f in test_files if not f.endswith("broken.jpg")])


def test_cifar10_on_a_folder_runs_at_the_asked_size(runs):
    workdir, out, _ = runs["cifar10"]
    config = RunFolder(workdir).read_config()
    assert config["data"]["class_names"] == CLASSES and config["data"]["image_shape"] == [24, 24, 3]
    assert config["model"]["kind"] == "cifar_cnn" and config["model"]["num_classes"] == 3
    assert "folder test accuracy" in out
    assert str(workdir / "plots" / "confusion.png") in out and str(workdir / "plots" / "wrong.png") in out


@pytest.mark.parametrize("args, message", [
    (["--dataset", "folder"], "error: dataset='folder' needs data_dir (--data_dir PATH)"),
    (["--dataset", "folder", "--data_dir", "/nonexistent/photos"], "error: data_dir='/nonexistent/photos' is not a "
                                                                   "folder"),
    (["--dataset", "folder", "--data_dir", "x", "--val_size", "5"], "error: --val_size applies to --dataset cifar10"),
    (["--image_size", "64"], "error: --image_size applies to --dataset folder, not to offline"),
    (["--val_fraction", "0.2"], "error: --val_fraction applies to --dataset folder, not to offline"),
    (["--dataset", "folder", "--data_dir", "x", "--test_fraction", "1.5"],
     "error: test_fraction=1.5; must be a fraction in (0, 1)"),
])
def test_folder_flags_are_one_line_errors_where_they_do_not_apply(tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    code, out, err = cli(capsys, cifar10.main, ["--preset", "smoke", "--no_progress", "--workdir", str(workdir)] + args)
    assert code == 2 and err.startswith(message) and len(err.splitlines()) == 1 and out == ""
    assert not workdir.exists()


def test_finetune_folder_flags_are_one_line_errors(tmp_path, capsys):
    for args, message in ((["--dataset", "folder"], "error: dataset='folder' needs data_dir"),
                          (["--test_fraction", "0.3"], "error: --test_fraction applies to --dataset folder, not to "
                                                       "offline")):
        code, _, err = cli(capsys, finetune.main, ["--preset", "smoke", "--workdir", str(tmp_path / "w")] + args)
        assert code == 2 and err.startswith(message) and len(err.splitlines()) == 1
    assert not (tmp_path / "w").exists()


# --------------------------------------------------------------------------- results you can look at


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_the_confusion_matrix_sums_to_the_test_set_and_its_diagonal_is_the_accuracy(runs, kind):
    workdir = runs[kind][0]
    summary = RunFolder(workdir).read_summary()
    config = RunFolder(workdir).read_config()
    test = load_dataset(**config["data"]["source"]).test
    confusion = np.array(summary["confusion_matrix"])
    assert confusion.shape == (3, 3) and confusion.sum() == len(test) == summary["num_test"]
    assert np.trace(confusion) / confusion.sum() == pytest.approx(summary["test_accuracy"], abs=1e-9)
    # rows are the true classes, columns the predicted ones
    assert confusion.sum(axis=1).tolist() == np.bincount(test.labels, minlength=3).tolist()
    pred = inference.restore(workdir).predict(test.images).argmax(-1)
    assert confusion.sum(axis=0).tolist() == np.bincount(pred, minlength=3).tolist()
    rows = confusion.sum(axis=1)
    assert summary["per_class_accuracy"] == {
        name: (confusion[k, k] / rows[k] if rows[k] else None) for k, name in enumerate(CLASSES)}


def _png(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("kind", RUN_KINDS)
def test_the_result_plots_are_written_and_not_blank(runs, kind):
    workdir = runs[kind][0]
    for name in ("confusion.png", "wrong.png", "curves.png"):
        pixels = _png(RunFolder(workdir).plot_path(name))
        assert min(pixels.shape[:2]) >= 100, name
        ink = (pixels.min(axis=2) < 200).mean()  # share of pixels that are not near white
        assert 0.01 < ink < 0.9 and pixels.std() > 20, (name, ink)
    assert (pixels := _png(RunFolder(workdir).plot_path("confusion.png")))[..., 2].mean() > pixels[..., 0].mean()


def test_confusion_matrix_and_the_most_confidently_wrong_by_hand():
    c = results.confusion_matrix([0, 0, 1, 2, 2], [0, 1, 1, 0, 2], 3)
    assert c.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]
    assert results.per_class_accuracy(c, "abc") == {"a": 0.5, "b": 1.0, "c": 0.5}
    assert results.per_class_accuracy(np.zeros((2, 2), int), "ab") == {"a": None, "b": None}
    probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4], [0.05, 0.95]])
    true = np.array([0, 0, 0, 1, 1])  # wrong: 1 (0.8), 2 (0.7), 3 (0.6)
    assert results.most_confidently_wrong(true, probs, 2).tolist() == [1, 2]
    assert results.most_confidently_wrong(true, probs, 9).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match=r"pred has labels outside \[0, 3\)"):
        results.confusion_matrix([0], [3], 3)


def test_plot_wrong_and_plot_confusion_draw_what_they_are_given(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 8, 8, 3), dtype=np.uint8)
    fig = viz.plot_wrong(images, [0, 1, 2, 0, 1], [1, 2, 0, 2, 0], [0.9, 0.8, 0.7, 0.6, 0.5], CLASSES, ncols=3)
    assert viz.count_image_panels(fig) == 5
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles[0] == "true: disk\npred: ring 0.90" and titles[4] == "true: ring\npred: disk 0.50"
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), images[0] / 255.0)
    assert viz.count_image_panels(viz.plot_wrong(images[:0], [], [], [], CLASSES)) == 0
    fig = viz.plot_confusion(np.array([[3, 1], [0, 4]]), ["a", "b"])
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["3", "1", "0", "4"] and fig.axes[0].get_title() == "accuracy 0.8750 (8 images)"
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])
    with pytest.raises(ValueError, match=r"confusion must be a square \(K, K\) matrix"):
        viz.plot_confusion(np.zeros((2, 3), int), ["a", "b"])
    with pytest.raises(ValueError, match=r"3 class_names for a 2x2 matrix"):
        viz.plot_confusion(np.zeros((2, 2), int), CLASSES)


# --------------------------------------------------------------------------- python -m jaxcnn.predict


def _expected(workdir, files, top_k):
    """``{path: [(class, prob), ...]}`` from ``inference.restore(run).predict`` on decode_image's arrays."""
    run = inference.restore(workdir)
    size = tuple(run.config["data"]["image_shape"][:2])
    probs = run.predict(np.stack([decode_image(f, size) for f in files]))
    return {f: [(CLASSES[k], float(p[k])) for k in np.argsort(-p, kind="stable")[:top_k]] for f, p in zip(files, probs)}


def _parse_lines(out):
    got = {}
    for line in out.splitlines():
        path, rest = line.split(": ", 1)
        got[path] = [(item.split(" ")[0], float(item.split(" ")[1])) for item in rest.split(", ")]
    return got


@pytest.mark.parametrize("kind", ["finetune/phase2", "cifar10"])
def test_predict_names_the_classes_restore_predicts_and_reports_bad_files(runs, photo_folder, capsys, kind):
    root, manifest = photo_folder
    workdir = runs[kind][0]
    single = manifest["files"][4]["path"]  # a JPEG, also named on its own
    code, out, err = cli(capsys, predict.main, ["--run", str(workdir), str(root), single, "--top_k", "2"])
    assert code == 0, err
    good = sorted(f["path"] for f in manifest["files"])
    got = _parse_lines(out)
    assert sorted(got) == good and len(out.splitlines()) == len(good) + 1  # the single file twice, one key
    want = _expected(workdir, good, 2)
    for f in good:
        assert [c for c, _ in got[f]] == [c for c, _ in want[f]], f
        np.testing.assert_allclose([p for _, p in got[f]], [p for _, p in want[f]], atol=6e-5)
    lines = err.splitlines()
    assert len(lines) == 4 and lines[-1].startswith(f"{len(good) + 1} of {len(good) + 4} file(s) classified with ")
    whys = ("unreadable (OSError: image file is truncated (", "not a JPEG or PNG image", "not a JPEG or PNG image")
    for bad, why in zip(manifest["bad"], whys):  # broken.jpg, garbage.jpg, notes.txt: one line each
        assert sum(line.startswith(f"cannot read {bad}: {why}") for line in lines[:3]) == 1, (bad, lines)


def test_predict_writes_a_csv_with_an_error_column(runs, photo_folder, capsys, tmp_path):
    root, manifest = photo_folder
    workdir = runs["finetune/phase2"][0]
    csv_path = tmp_path / "out" / "preds.csv"
    code, out, err = cli(capsys, predict.main, ["--run", str(workdir), "--out", str(csv_path), "--top_k", "5",
                                                "--batch_size", "7", str(root / "disk"), str(tmp_path / "gone.jpg")])
    assert code == 0, err
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["path", "label_1", "prob_1", "label_2", "prob_2", "label_3", "prob_3", "error"]  # 3 classes
    body = {r[0]: r[1:] for r in rows[1:]}
    files = sorted(f["path"] for f in manifest["files"] if f["class"] == "disk")
    assert list(body) == sorted(files + [str(root / "disk" / "broken.jpg")]) + [str(tmp_path / "gone.jpg")]
    want = _expected(workdir, files, 3)
    for f in files:
        labels, probs, error = body[f][0:6:2], [float(p) for p in body[f][1:6:2]], body[f][6]
        assert labels == [c for c, _ in want[f]] and error == ""
        np.testing.assert_allclose(probs, [p for _, p in want[f]], rtol=1e-5)
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)  # 3 classes: the top 3 are all of them
    assert body[str(root / "disk" / "broken.jpg")][:6] == [""] * 6
    assert body[str(root / "disk" / "broken.jpg")][6].startswith("unreadable (OSError: image file is truncated")
    assert body[str(tmp_path / "gone.jpg")] == [""] * 6 + ["no such file"]
    assert f"cannot read {tmp_path / 'gone.jpg'}: no such file" in err.splitlines()


def test_predict_runs_as_a_command_in_a_fresh_process(runs, photo_folder):
    root, manifest = photo_folder
    workdir = runs["cifar10"][0]
    files = [f["path"] for f in manifest["files"][:3]]
    done = subprocess.run([sys.executable, "-m", "jaxcnn.predict", "--run", str(workdir), *files, manifest["bad"][2]],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = _parse_lines(done.stdout)
    want = _expected(workdir, files, 3)
    assert [[c for c, _ in got[f]] for f in files] == [[c for c, _ in want[f]] for f in files]
    run = inference.restore(workdir)
    # a photo folder's few validation images support no temperature: none is fitted, the summary says why,
    # and the probabilities are the raw softmax (no temperature in the last line)
    summary, config = RunFolder(workdir).read_summary(), RunFolder(workdir).read_config()
    num_val = len(load_dataset(**config["data"]["source"]).val)
    assert run.temperature is None and summary["temperature"] is None and num_val < 100
    assert summary["temperature_note"] == f"not fitted: {num_val} validation image(s), fewer than 100"
    assert done.stderr.splitlines() == [f"cannot read {manifest['bad'][2]}: not a JPEG or PNG image",
                                        f"3 of 4 file(s) classified with {workdir} (best epoch {run.epoch})"]


def test_predict_refuses_a_missing_or_damaged_run_in_one_line(runs, photo_folder, capsys, tmp_path):
    root, manifest = photo_folder
    image = manifest["files"][0]["path"]
    code, out, err = cli(capsys, predict.main, ["--run", str(tmp_path / "nope"), image])
    assert code == 2 and out == "" and err == (f"error: {tmp_path / 'nope' / 'config.json'} not found: "
                                               f"{tmp_path / 'nope'} is not a training run folder\n")
    ft = runs["finetune"][0]
    code, _, err = cli(capsys, predict.main, ["--run", str(ft), image])
    assert code == 2 and err == (f"error: {ft} is a fine-tuning run's folder; pass one of its phases: "
                                 f"--run {ft / 'phase2'} (or {ft / 'phase1'})\n")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "config.json").write_text("{not json")
    code, _, err = cli(capsys, predict.main, ["--run", str(damaged), image])
    assert code == 2 and err.startswith(f"error: {damaged / 'config.json'} is not valid JSON") and \
        len(err.splitlines()) == 1
    no_checkpoints = tmp_path / "no_ckpt"
    no_checkpoints.mkdir()
    (no_checkpoints / "config.json").write_text((runs["cifar10"][0] / "config.json").read_text())
    code, _, err = cli(capsys, predict.main, ["--run", str(no_checkpoints), image])
    assert code == 2 and err == f"error: {no_checkpoints / 'checkpoints'} not found: {no_checkpoints} holds no " \
                                f"checkpoints\n"
    code, _, err = cli(capsys, predict.main, ["--run", str(runs["cifar10"][0]), *manifest["bad"]])
    assert code == 2 and err.splitlines()[-1] == "error: none of the 3 file(s) could be read as a JPEG or PNG image"
    code, _, err = cli(capsys, predict.main, ["--run", str(runs["cifar10"][0]), image, "--top_k", "0"])
    assert code == 2 and err == "error: --top_k=0; must be >= 1\n"


# --------------------------------------------------------------------------- predict --explain, the temperature


def test_predict_explain_writes_one_png_per_image(runs, photo_folder, capsys, tmp_path):
    # (the cifar10 run only: a ResNet's default layer is checked in test_explain; compiling its Grad-CAM costs 5 s)
    root, manifest = photo_folder
    workdir = runs["cifar10"][0]
    files = [f["path"] for f in manifest["files"] if f["class"] == "ring"][:2] + [str(root / "disk" / "broken.jpg")]
    files.append(str(tmp_path / "ring" / pathlib.Path(files[0]).name))  # another image of the same name
    (tmp_path / "ring").mkdir()
    (tmp_path / "ring" / pathlib.Path(files[0]).name).write_bytes(pathlib.Path(files[0]).read_bytes())
    out_dir = tmp_path / "explained"
    code, out, err = cli(capsys, predict.main, ["--run", str(workdir), "--explain", str(out_dir), *files])
    assert code == 0, err
    stems = [pathlib.Path(f).stem for f in files]
    want = sorted([f"{stems[0]}.png", f"{stems[1]}.png", f"{stems[0]}-2.png"])  # the unreadable file: none
    assert sorted(p.name for p in out_dir.iterdir()) == want
    for name in want:
        pixels = _png(out_dir / name)
        assert pixels.shape == (380, 1100, 3) and pixels.std() > 20
        assert (pixels[..., 0] > 200).mean() > 0.005  # the heat map's red and the bars' orange are there
    assert err.splitlines()[-1].endswith(f"; Grad-CAM maps in {out_dir}")


def test_predict_explain_class_and_layer_are_checked_before_any_image_is_read(runs, photo_folder, capsys, tmp_path):
    _, manifest = photo_folder
    image, workdir = manifest["files"][0]["path"], runs["cifar10"][0]
    out_dir = tmp_path / "explained"
    for args, message in (
        (["--explain_class", "cat"], "error: --explain_class='cat' is not one of the run's classes: disk, ring, "
                                     "square\n"),
        (["--explain_layer", "dense"], "error: grad_cam: layer='dense' outputs shape (1, 32); Grad-CAM needs a "
                                       "(N, h, w, C) feature map\n"),
    ):
        code, out, err = cli(capsys, predict.main, ["--run", str(workdir), "--explain", str(out_dir), image] + args)
        assert (code, out, err) == (2, "", message)
    code, out, err = cli(capsys, predict.main, ["--run", str(workdir), "--explain_class", "ring", image])
    assert (code, out, err) == (2, "", "error: --explain_class applies with --explain DIR\n")
    assert not out_dir.exists()
    code, _, err = cli(capsys, predict.main, ["--run", str(workdir), "--explain", str(out_dir), "--explain_class",
                                              "square", "--explain_layer", "block1_bn2", image])
    assert code == 0 and [p.name for p in out_dir.iterdir()] == [pathlib.Path(image).stem + ".png"], err


def test_plot_explanation_draws_the_map_it_is_given_over_the_image():
    rng = np.random.default_rng(0)
    image, cam = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), rng.random((8, 8))
    fig = viz.plot_explanation(image, cam, [("ring", 0.7), ("disk", 0.2)], explained="disk", layer="block3_bn2")
    ax_img, ax_cam, ax_bar = fig.axes[:3]
    np.testing.assert_allclose(ax_img.images[0].get_array(), image / 255.0)
    np.testing.assert_allclose(ax_cam.images[1].get_array(), cam)
    assert ax_cam.get_title() == "Grad-CAM: disk" and ax_cam.get_xlabel() == "on block3_bn2"
    assert [t.get_text() for t in ax_bar.get_yticklabels()] == ["ring", "disk"]
    assert [round(p.get_width(), 6) for p in ax_bar.patches] == [0.7, 0.2]
    with pytest.raises(ValueError, match=r"cam has shape \(4, 4\); expected the image's \(8, 8\)"):
        viz.plot_explanation(image, cam[:4, :4], [("ring", 1.0)], explained="ring")


def _softmax64(logits, t=1.0):
    z = np.asarray(logits, np.float64) / t
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_scales_by_the_runs_temperature_unless_told_not_to(runs, photo_folder, capsys, tmp_path):
    import shutil

    _, manifest = photo_folder
    workdir = tmp_path / "run"
    shutil.copytree(runs["cifar10"][0], workdir)
    folder = RunFolder(workdir)
    summary = folder.read_summary()
    folder.write_summary({**summary, "temperature": 2.0})
    files = [f["path"] for f in manifest["files"][:6]]
    run = inference.restore(workdir)
    assert run.temperature == 2.0 and run.epoch == summary["best_epoch"]
    images = np.stack([decode_image(f, (24, 24)) for f in files])
    logits = run.predict(images, return_logits=True)
    np.testing.assert_allclose(run.predict(images), _softmax64(logits, 2.0), atol=1e-6)
    np.testing.assert_allclose(run.predict(images, temperature=False), _softmax64(logits), atol=1e-6)
    for extra, t in (([], 2.0), (["--no_temperature"], 1.0)):
        csv_path = tmp_path / f"preds{len(extra)}.csv"
        code, _, err = cli(capsys, predict.main, ["--run", str(workdir), "--out", str(csv_path), *files] + extra)
        assert code == 0, err
        assert (", temperature 2)" in err) == (t == 2.0)
        with open(csv_path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        want = _softmax64(logits, t)
        for row, p in zip(rows, want):
            got = {row[i]: float(row[i + 1]) for i in (1, 3, 5)}
            np.testing.assert_allclose([got[c] for c in CLASSES], p, rtol=1e-5)
    folder.write_summary({**summary, "temperature": 2.0, "best_epoch": summary["best_epoch"] + 1})
    assert inference.restore(workdir).temperature is None  # fitted for other weights than these


# --------------------------------------------------------------------------- nothing of the user's is replaced


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def _read_only_dir(tmp_path) -> pathlib.Path:
    if os.geteuid() == 0:  # root writes through permission bits: use a filesystem that takes no files
        return pathlib.Path("/sys/jaxcnn-test")
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


def test_predict_explain_into_the_photos_own_folder_refuses_before_classifying(runs, photo_folder, capsys, tmp_path,
                                                                               monkeypatch):
    import shutil

    _, manifest = photo_folder
    photos = tmp_path / "photos"
    photos.mkdir()
    for f in manifest["files"][:6]:  # 4 PNGs, 2 JPEGs
        shutil.copy(f["path"], photos)
    (photos / "notes.txt").write_text("mine")
    before = _snapshot(photos)
    workdir = str(runs["cifar10"][0])
    monkeypatch.setattr(predict, "classify", lambda *a, **k: pytest.fail("an image was classified"))
    first_png = sorted(p for p in photos.iterdir() if p.suffix == ".png")[0]
    code, out, err = cli(capsys, predict.main, ["--run", workdir, "--explain", str(photos), str(photos)])
    assert (code, out) == (2, "") and len(err.splitlines()) == 1, err
    assert err == (f"error: --explain {photos}: the figure of {first_png} would replace {first_png}, one of the "
                   f"images to classify; name a folder of its own for the figures\n")
    # a folder that holds a file of the user's with a figure's name: refused as well
    theirs = tmp_path / "figures"
    theirs.mkdir()
    jpeg = next(p for p in sorted(photos.iterdir()) if p.suffix == ".jpg")
    (theirs / f"{jpeg.stem}.png").write_bytes(first_png.read_bytes())
    code, out, err = cli(capsys, predict.main, ["--run", workdir, "--explain", str(theirs), str(jpeg)])
    assert (code, out) == (2, "") and err == (
        f"error: --explain {theirs}: the figure of {jpeg} would replace {theirs / (jpeg.stem + '.png')}, a file "
        f"--explain did not make; name another folder, or move it away\n")
    # --out onto an image, or onto a file that is not a prediction CSV
    for target in (first_png, photos / "notes.txt"):
        code, out, err = cli(capsys, predict.main, ["--run", workdir, "--out", str(target), str(jpeg)])
        assert (code, out) == (2, "") and err == (
            f"error: --out {target} exists and is not a prediction CSV (its first line is not "
            f"path,label_1,prob_1,...): name another file, or move it away\n")
    assert _snapshot(photos) == before and _snapshot(theirs) == {theirs / f"{jpeg.stem}.png": first_png.read_bytes()}


def test_predict_replaces_only_its_own_figures_and_csv_on_a_second_call(runs, photo_folder, capsys, tmp_path):
    _, manifest = photo_folder
    workdir = str(runs["cifar10"][0])
    image = manifest["files"][0]["path"]
    figures, csv_path = tmp_path / "figures", tmp_path / "preds.csv"
    for _ in range(2):
        code, _, err = cli(capsys, predict.main, ["--run", workdir, "--explain", str(figures), "--out", str(csv_path),
                                                  image])
        assert code == 0, err
    assert [p.name for p in figures.iterdir()] == [pathlib.Path(image).stem + ".png"]
    assert predict._is_explain_figure(figures / (pathlib.Path(image).stem + ".png"))
    assert csv_path.read_text().startswith("path,label_1,prob_1,") and len(csv_path.read_text().splitlines()) == 2


def test_predict_refuses_a_folder_it_cannot_write_before_classifying(runs, photo_folder, capsys, tmp_path,
                                                                     monkeypatch):
    _, manifest = photo_folder
    image, workdir = manifest["files"][0]["path"], str(runs["cifar10"][0])
    monkeypatch.setattr(predict, "classify", lambda *a, **k: pytest.fail("an image was classified"))
    read_only = _read_only_dir(tmp_path)
    where = read_only if read_only.exists() else read_only.parent
    for flag, target in (("--explain", read_only / "figures"), ("--out", read_only / "preds.csv")):
        code, out, err = cli(capsys, predict.main, ["--run", workdir, flag, str(target), image])
        assert (code, out) == (2, "") and len(err.splitlines()) == 1, err
        assert err.startswith(f"error: {flag} {target}: cannot write into {where} ("), err
        assert err.endswith("); name a folder you can write to\n")
        assert not target.exists()


def test_a_huge_image_is_named_in_one_line_and_classified(runs, capsys, tmp_path, recwarn):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("L", (10_000, 10_000), 128).save(big)  # 1e8 pixels, more than Pillow's 89,478,485; small on disk
    workdir = runs["cifar10"][0]
    code, out, err = cli(capsys, predict.main, ["--run", str(workdir), "--out", str(tmp_path / "p.csv"),
                                                "--explain", str(tmp_path / "figures"), str(big)])
    assert code == 0, err
    assert err.splitlines()[0] == (f"warning: {big} is 10000x10000 pixels (100,000,000), more than "
                                   f"PIL.Image.MAX_IMAGE_PIXELS (89,478,485), Pillow's guard against decompression "
                                   f"bombs: decoded anyway, as a file you chose")
    assert len(err.splitlines()) == 2 and "DecompressionBomb" not in err  # once, though --explain decodes it again
    assert not [w for w in recwarn if "decompression bomb" in str(w.message)]  # Pillow's own warning: silenced
    with open(tmp_path / "p.csv", newline="") as f:
        row = list(csv.reader(f))[1]
    want = inference.restore(workdir).predict(np.full((1, 24, 24, 3), 128, np.uint8))[0]  # one grey, any size
    got = {row[i]: float(row[i + 1]) for i in (1, 3, 5)}
    np.testing.assert_allclose([got[c] for c in CLASSES], want, rtol=1e-5)
    assert (tmp_path / "figures" / "big.png").is_file()


def test_an_image_pillow_will_not_open_is_named_with_its_size(runs, capsys, tmp_path, monkeypatch):
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # twice that, 2000, is the most Pillow opens
    Image.new("RGB", (50, 50), (200, 10, 10)).save(tmp_path / "huge.png")
    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "large.png")
    code, out, err = cli(capsys, predict.main, ["--run", str(runs["cifar10"][0]), str(tmp_path / "huge.png"),
                                                str(tmp_path / "large.png")])
    assert code == 0 and out.startswith(f"{tmp_path / 'large.png'}: "), err
    lines = err.splitlines()
    assert lines[0] == (f"warning: {tmp_path / 'large.png'} is 40x40 pixels (1,600), more than "
                        f"PIL.Image.MAX_IMAGE_PIXELS (1,000), Pillow's guard against decompression bombs: decoded "
                        f"anyway, as a file you chose")
    assert lines[1] == (f"cannot read {tmp_path / 'huge.png'}: too large: 2,500 pixels, more than twice "
                        f"PIL.Image.MAX_IMAGE_PIXELS, the most Pillow opens; shrink it first (or raise "
                        f"PIL.Image.MAX_IMAGE_PIXELS in a script of your own)")


# --------------------------------------------------------------------------- a temperature that cannot be applied


@pytest.mark.parametrize("bad", [1e-300, 1e300, 0.0, -2.0, "2.0"])
def test_a_recorded_temperature_outside_the_range_is_refused_and_no_temperature_gets_past_it(
        runs, photo_folder, capsys, tmp_path, bad):
    import dataclasses
    import shutil

    _, manifest = photo_folder
    workdir = tmp_path / "run"
    shutil.copytree(runs["cifar10"][0], workdir)
    folder = RunFolder(workdir)
    folder.write_summary({**folder.read_summary(), "temperature": bad})  # a hand-edited summary.json
    files = [f["path"] for f in manifest["files"][:4]]
    message = (f"restore: {workdir / 'summary.json'} has temperature={bad!r}; a run's temperature is a number in "
               f"[0.05, 20]: correct or remove it, or pass --no_temperature (restore(..., temperature=False)) for "
               f"the raw softmax")
    code, out, err = cli(capsys, predict.main, ["--run", str(workdir), *files])
    assert (code, out, err) == (2, "", f"error: {message}\n")
    with pytest.raises(ValueError) as e:
        inference.restore(workdir)
    assert str(e.value) == message
    run = inference.restore(workdir, temperature=False)
    assert run.temperature is None
    if bad != 1e-300:
        return  # (one value is enough for what follows)
    csv_path = tmp_path / "raw.csv"
    code, _, err = cli(capsys, predict.main, ["--run", str(workdir), "--no_temperature", "--out", str(csv_path),
                                              *files])
    assert code == 0 and ", temperature" not in err, err
    images = np.stack([decode_image(f, (24, 24)) for f in files])
    want = _softmax64(run.predict(images, return_logits=True))
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))[1:]
    for row, p in zip(rows, want):
        got = {row[i]: float(row[i + 1]) for i in (1, 3, 5)}
        assert np.isfinite(list(got.values())).all()
        np.testing.assert_allclose([got[c] for c in CLASSES], p, rtol=1e-5)
    # the library's own door: a temperature that float32 makes 0 or inf is refused, never NaN or uniform
    for t in (1e-300, 1e300):
        refused = rf"^predict: temperature={re.escape(repr(t))}; must be a number in \[0.05, 20\]"
        with pytest.raises(ValueError, match=refused):
            dataclasses.replace(run, temperature=t).predict(images)
        with pytest.raises(ValueError, match=refused):
            inference.predict(run.model, run.variables, images, preprocess=run.preprocess, temperature=t)
