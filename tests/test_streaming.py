"""The streaming path (a folder's images decoded from disk, batch by batch, in background threads)
gives exactly the in-memory path's batches, resumes mid-epoch to the same batches, and trains."""

import json
import logging

import numpy as np
import pytest

from jaxcnn.data import load_dataset
from jaxcnn.data.folder import FileSplit, decode_image, fits_in_memory
from jaxcnn.experiments import cifar10, finetune
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import EvalFeed, TrainFeed, make_mesh


@pytest.fixture(scope="module")
def both(photo_folder):
    root, _ = photo_folder
    memory = load_dataset("folder", data_dir=str(root), image_size=24, seed=3)
    stream = load_dataset("folder", data_dir=str(root), image_size=24, seed=3, stream=True)
    return memory, stream


def host(batch: dict) -> dict:
    return {k: np.asarray(v) for k, v in batch.items()}


def test_a_streamed_folder_is_the_same_dataset_on_disk(both, photo_folder, caplog):
    memory, stream = both
    assert isinstance(stream.train, FileSplit) and not isinstance(memory.train, FileSplit)
    assert stream.image_shape == memory.image_shape == (24, 24, 3) and stream.class_names == memory.class_names
    for name in ("train", "val", "test"):
        a, b = getattr(memory, name), getattr(stream, name)
        assert len(a) == len(b) and np.array_equal(a.labels, b.labels)
        np.testing.assert_array_equal(b.read(np.arange(len(b))), a.images)  # the same files, the same pixels
        assert b.read([0]).tobytes() == decode_image(b.paths[0], 24).tobytes()
    # the damaged JPEG (whose header reads fine) is dropped by both before any order is formed
    root, manifest = photo_folder
    assert not any(p.endswith("broken.jpg") for s in ("train", "val", "test") for p in getattr(stream, s).paths)
    with caplog.at_level(logging.WARNING, logger="jaxcnn"):
        load_dataset("folder", data_dir=str(root), image_size=24, seed=3, stream=True)
    assert len(caplog.records) == 1 and "broken.jpg" in caplog.records[0].getMessage()


def test_streamed_batches_are_the_in_memory_batches_and_resume_mid_epoch(both):
    memory, stream = both
    mesh = make_mesh()
    a = TrainFeed(memory.train, 8, mesh, seed=5)
    b = TrainFeed(stream.train, 8, mesh, seed=5)
    assert not a.source.streamed and b.source.streamed and a.steps_per_epoch == b.steps_per_epoch >= 3
    for epoch in (1, 2):
        for x, y in zip(a.epoch(epoch), b.epoch(epoch), strict=True):
            x, y = host(x), host(y)
            np.testing.assert_array_equal(x["image"], y["image"])
            np.testing.assert_array_equal(x["label"], y["label"])
    # a run stopped after 2 steps of epoch 2 continues with the batches it had not seen
    rest = [host(x) for x in b.epoch(2, start=2)]
    whole = [host(x) for x in a.epoch(2)][2:]
    assert len(rest) == len(whole) > 0
    for x, y in zip(rest, whole):
        np.testing.assert_array_equal(x["image"], y["image"])
    assert b.source.wait_s >= 0.0
    # evaluation: every example once, padded and masked the same way
    ea, eb = EvalFeed(memory.test, 4, mesh), EvalFeed(stream.test, 4, mesh)
    for x, y in zip(ea.batches(), eb.batches(), strict=True):
        x, y = host(x), host(y)
        np.testing.assert_array_equal(x["mask"], y["mask"])
        m = x["mask"]
        np.testing.assert_array_equal(x["image"][m], y["image"][m])
        np.testing.assert_array_equal(x["label"][m], y["label"][m])


def test_automatic_choice_streams_only_what_does_not_fit():
    assert fits_in_memory(1000, 32) and not fits_in_memory(10 ** 9, 224)


def test_a_streamed_run_trains_as_the_in_memory_run_and_reports_its_data_wait(photo_folder, tmp_path, capsys):
    root, _ = photo_folder
    common = ["--preset", "smoke", "--no_progress", "--dataset", "folder", "--data_dir", str(root), "--image_size",
              "24", "--epochs", "2"]
    assert cifar10.main(common + ["--workdir", str(tmp_path / "memory"), "--no-stream"]) == 0
    assert cifar10.main(common + ["--workdir", str(tmp_path / "stream"), "--stream"]) == 0
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s",  # noqa: E731
                                                                  "data_wait_fraction")} for r in h]
    mem, st = RunFolder(tmp_path / "memory"), RunFolder(tmp_path / "stream")
    assert strip(mem.read_history()) == strip(st.read_history())
    assert mem.read_summary()["test_accuracy"] == st.read_summary()["test_accuracy"]
    assert all(0.0 <= r["data_wait_fraction"] < 1.0 for r in st.read_history())
    assert "data_wait_fraction" not in mem.read_history()[0]
    # the choice is not part of what the run is: a streamed run resumes in memory
    assert cifar10.main(common[:-1] + ["3", "--workdir", str(tmp_path / "stream"), "--resume", "--no-stream"]) == 0
    assert [r["epoch"] for r in st.read_history()] == [1, 2, 3]
    capsys.readouterr()
    assert cifar10.main(["--preset", "smoke", "--stream", "--workdir", str(tmp_path / "x")]) == 2
    assert "--stream applies to --dataset folder" in capsys.readouterr().err


def test_a_finetune_streams_its_folder(photo_folder, tmp_path):
    root, _ = photo_folder
    assert finetune.main(["--preset", "smoke", "--no_progress", "--dataset", "folder", "--data_dir", str(root),
                          "--stream", "--phase1_epochs", "1", "--phase2_epochs", "1", "--workdir",
                          str(tmp_path / "ft")]) == 0
    for phase in (1, 2):
        history = RunFolder(tmp_path / "ft" / f"phase{phase}").read_history()
        assert len(history) == 1 and "data_wait_fraction" in history[0]
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["dataset"] == "folder"
