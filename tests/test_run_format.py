"""config.json's format version: written by every run, format 1 (unversioned) migrated, others refused
in one line."""

import json
import pathlib
import subprocess
import sys

import pytest

from jaxcnn.experiments import cifar10
from jaxcnn.experiments.configs import get_config
from jaxcnn.runfolder import FORMAT_VERSION, RunFolder, UnsupportedRunFormat, migrate_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_a_run_records_its_format_and_a_format_1_run_resumes(tmp_path):
    workdir = tmp_path / "run"
    cifar10.run(get_config("smoke", epochs=1), workdir, progress=False)
    raw = json.loads((workdir / "config.json").read_text())
    assert raw["format_version"] == FORMAT_VERSION == 2
    # the same run as a jaxcnn before format versions wrote it: read as format 2, and it resumes
    del raw["format_version"]
    (workdir / "config.json").write_text(json.dumps(raw))
    assert RunFolder(workdir).read_config() == {"format_version": 2, **raw}
    _, history, _ = cifar10.run(get_config("smoke", epochs=2), workdir, resume=True, progress=False)
    assert [r["epoch"] for r in history] == [1, 2]
    assert json.loads((workdir / "config.json").read_text())["format_version"] == 2


def test_formats_it_cannot_read_are_refused_naming_the_way_out(tmp_path):
    flat = {"epochs": 5, "batch_size": 64, "model": "cifar_cnn"}  # an early jaxcnn's config
    with pytest.raises(UnsupportedRunFormat, match=r"x/config.json is in a run format this jaxcnn cannot read "
                                                   r"\(no format_version and no model / data / fit sections"):
        migrate_config(flat, "x/config.json")
    with pytest.raises(UnsupportedRunFormat, match=r"run format 3, newer than this jaxcnn reads \(2\): upgrade"):
        migrate_config({"format_version": 3, "model": {}, "data": {}, "fit": {}}, "x/config.json")
    with pytest.raises(ValueError, match=r"write_config: config has format_version=1; this jaxcnn writes 2"):
        RunFolder(tmp_path / "r").write_config({"format_version": 1, "model": {}, "data": {}, "fit": {}})
    RunFolder(tmp_path / "r").write_config({"model": {}, "data": {}, "fit": {}})  # stamped with today's format
    assert RunFolder(tmp_path / "r").read_config()["format_version"] == 2


def test_a_command_on_an_unreadable_run_says_so_in_one_line(tmp_path):
    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"epochs": 5, "model": "cifar_cnn"}))
    done = subprocess.run([sys.executable, "-m", "jaxcnn.experiments.filters", "--run", str(run)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: {run / 'config.json'} is in a run format this jaxcnn cannot read (no format_version and no model "
        f"/ data / fit sections: an early jaxcnn's; it reads format 2 and migrates format 1). Its records can "
        f"still be read as JSON; to use the run, train it again with this jaxcnn"]
