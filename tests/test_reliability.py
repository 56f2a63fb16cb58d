"""Runs that survive people and machines: no lost run, no silent wrong result, one-line errors.

Each test asserts the exit status, the message, and that nothing the user had was changed
(the old run folder compared byte for byte). Everything runs the ``smoke`` preset (256 offline
images, 8 steps per epoch).
"""

import dataclasses
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.checkpoint import DamagedCheckpointError
from jaxcnn.experiments import cifar10, filters, finetune
from jaxcnn.experiments.configs import get_config
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import Steps, TrainingDiverged, make_eval_step, make_train_step

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--no_progress"]


def run_with_steps(run, **steps):
    """``cifar10.run`` with its config's steps, some replaced (``train=``, ``eval=``)."""
    def hooked(config, *a, **k):
        return run(config, *a, **{**k, "steps": dataclasses.replace(Steps.build(config.fit), **steps)})

    return hooked


def no_report_warning(err: str) -> str:
    """``err`` without the end-of-run report's warning that a smoke run answers one class (true of
    these one- to three-epoch runs on random-looking data, and not what these tests are about)."""
    return "".join(ln for ln in err.splitlines(True) if not ln.startswith("warning: test split: "))


def snapshot(folder: pathlib.Path, skip=(".lock",)) -> dict:
    """Every file under ``folder`` and its bytes, but those named in ``skip`` or in a folder named there."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip and not set(p.relative_to(folder).parts[:-1]) & set(skip)}


def cli(capsys, argv, main=cifar10.main):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(path):
    def refuse(token):
        raise ValueError(f"{path} holds the non-JSON token {token}")
    return json.loads(pathlib.Path(path).read_text(), parse_constant=refuse)


def latest_leaves(workdir, epoch) -> dict:
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        tree, _ = c.restore("latest", epoch)
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_run(a, b, epoch):
    """Two run folders trained the same epochs to bitwise the same state and history."""
    strip = lambda h: [{k: v for k, v in r.items() if k not in ("epoch_time_s", "images_per_s")} for r in h]  # noqa: E731
    assert strip(RunFolder(a).read_history()) == strip(RunFolder(b).read_history())
    la, lb = latest_leaves(a, epoch), latest_leaves(b, epoch)
    assert la.keys() == lb.keys()
    for k in la:
        assert la[k].tobytes() == lb[k].tobytes(), k


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch smoke run, and the same run resumed to 3 epochs (the reference)."""
    root = tmp_path_factory.mktemp("runs")
    assert cifar10.main(SMOKE + ["--workdir", str(root / "run")]) == 0
    shutil.copytree(root / "run", root / "three")
    assert cifar10.main(SMOKE + ["--workdir", str(root / "three"), "--resume", "--epochs", "3"]) == 0
    return root / "run", root / "three"


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to do things to."""
    shutil.copytree(finished[0], tmp_path / "run")
    return tmp_path / "run"


def step_that(kind: str, from_step: int):
    """The smoke preset's train step (augmentation on), whose reported loss goes bad from ``from_step``."""
    from jaxcnn.data import AugmentConfig

    inner = make_train_step(augment_fn=AugmentConfig().fn())
    bad = {"nan": jnp.nan, "blow_up": 1e9}[kind]

    def step(state, batch):
        new, m = inner(state, batch)
        loss = m["loss"] * bad if kind == "blow_up" else m["loss"] + bad
        return new, {**m, "loss": jnp.where(state.step >= from_step, loss, m["loss"])}

    return step


# --------------------------------------------------------------------------- a run is never lost


def test_overwrite_with_a_bad_setting_leaves_the_old_run_untouched(run, capsys):
    before = snapshot(run)
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(run), "--overwrite", "--batch_size", "300"])
    assert code == 2 and err == "error: batch_size=300 is larger than the training set (256 examples)\n"
    assert snapshot(run) == before


def test_overwrite_that_fails_before_its_first_checkpoint_gives_the_old_run_back(run):
    before = snapshot(run)
    with pytest.raises(TrainingDiverged, match="The run it was to overwrite in .* is back, unchanged"):
        config = get_config("smoke", seed=1)
        cifar10.run(config, run, overwrite=True, progress=False,
                    steps=dataclasses.replace(Steps.build(config.fit), train=step_that("nan", 0)))
    assert snapshot(run) == before and not (run / ".previous").exists()


def test_overwrite_replaces_the_run_once_the_new_one_has_a_checkpoint(run, capsys):
    code, _, _ = cli(capsys, SMOKE + ["--workdir", str(run), "--overwrite", "--epochs", "1", "--seed", "1"])
    assert code == 0 and not (run / ".previous").exists()
    assert RunFolder(run).read_config()["fit"]["seed"] == 1 and len(RunFolder(run).read_history()) == 1


def test_an_overwrite_killed_before_its_first_checkpoint_is_undone_at_the_next_start(run, capsys):
    """What a SIGKILL leaves between setting the old run aside and the new run's first checkpoint."""
    before = snapshot(run)
    folder = RunFolder(run)
    folder.prepare(folder.read_config(), resume=False, overwrite=True)
    folder.write_config({"the": "new run's config"})
    assert not folder.has_checkpoints() and (run / ".previous" / "checkpoints").is_dir()
    # (no --preset: a resume takes the settings of the run that comes back, not the new run's config.json)
    code, out, err = cli(capsys, ["--no_progress", "--workdir", str(run), "--resume", "--epochs", "2"])
    assert code == 0 and "brought back the run that an interrupted --overwrite had set aside; what the " \
                         f"interrupted run had written in its place (config.json) is kept in " \
                         f"{run / '.unfinished-overwrite'}" in err
    assert out.startswith("nothing to do:")
    # nothing deleted that this call did not write: the new run's config is kept aside
    assert (run / ".unfinished-overwrite" / "config.json").read_text() == '{\n "format_version": 3,\n "the": "new run\'s config"\n}\n'
    assert snapshot(run, skip=(".lock", ".unfinished-overwrite")) == before


def test_a_second_run_is_refused_while_another_process_holds_the_folder(run, capsys):
    before = snapshot(run)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from jaxcnn.runfolder import RunFolder
        with RunFolder({str(run)!r}).lock():
            print("locked", flush=True)
            time.sleep(600)
    """)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        code, _, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "3"])
        assert code == 2 and f"is in use by another run (pid {holder.pid} on " in err and len(err.splitlines()) == 1
        assert snapshot(run) == before
    finally:
        holder.kill()  # SIGKILL: its lock file stays behind, stale
        holder.wait()
    assert (run / ".lock").is_file()
    code, _, _ = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "3"])
    assert code == 0 and len(RunFolder(run).read_history()) == 3 and not (run / ".lock").exists()


def test_resume_needs_a_run(tmp_path, capsys):
    for workdir in (tmp_path / "missing", tmp_path):
        code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume"])
        assert code == 2 and err == (f"error: --resume: {workdir} holds no run to resume (no config.json, no "
                                     f"checkpoints); start one without --resume\n")
    assert not (tmp_path / "missing").exists() and not any(tmp_path.iterdir())


def test_resume_of_a_run_stopped_before_its_first_checkpoint_starts_over(finished, tmp_path, capsys):
    workdir = tmp_path / "run"
    workdir.mkdir()
    shutil.copy(finished[0] / "config.json", workdir / "config.json")
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume"])
    assert code == 0 and "the run was stopped before its first checkpoint; starting it over" in err
    assert_same_run(workdir, finished[0], 2)


def test_resume_with_fewer_epochs_than_done_is_nothing_to_do(run, capsys):
    before = snapshot(run)
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "1"])
    assert code == 0 and err == ""
    assert out == f"nothing to do: {run} already has 2 epochs, and 1 were asked for; ask for more epochs to train on\n"
    assert snapshot(run) == before  # config.json included


def test_finetune_resumes_phase_by_phase_and_overwrites(tmp_path, capsys):
    ft = ["--preset", "smoke", "--no_progress"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert finetune.main(ft + ["--workdir", str(whole)]) == 0
    # a run killed in phase 2 right after its epoch-1 checkpoint: what that leaves on disk
    shutil.copytree(whole, cut)
    p2 = cut / "phase2"
    for path in [p2 / "summary.json", p2 / "freeze_summary.txt", p2 / "checkpoints" / "latest" / "2",
                 p2 / "checkpoints" / "best" / "2", cut / "summary.json"]:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    phase1 = snapshot(cut / "phase1")
    capsys.readouterr()
    code, out, _ = cli(capsys, ft + ["--workdir", str(cut), "--resume"], main=finetune.main)
    assert code == 0 and "phase 1: already complete" in out and "phase 2: already complete" not in out
    assert snapshot(cut / "phase1") == phase1  # not repeated
    assert_same_run(cut / "phase2", whole / "phase2", 2)
    code, out, _ = cli(capsys, ft + ["--workdir", str(cut), "--resume"], main=finetune.main)
    assert code == 0 and "phase 2: already complete" in out
    code, _, err = cli(capsys, ft + ["--workdir", str(cut)], main=finetune.main)
    assert code == 2 and "already hold checkpoints" in err and "--resume" in err
    code, _, _ = cli(capsys, ft + ["--workdir", str(cut), "--overwrite", "--seed", "1", "--phase1_epochs", "1",
                                   "--phase2_epochs", "1"], main=finetune.main)
    assert code == 0 and RunFolder(cut / "phase2").read_config()["fit"]["seed"] == 1
    assert not (cut / "phase1" / ".previous").exists() and not (cut / "phase2" / ".previous").exists()


def test_finetune_bad_setting_leaves_nothing_behind(tmp_path, capsys):
    workdir = tmp_path / "ft"
    code, _, err = cli(capsys, ["--preset", "smoke", "--no_progress", "--workdir", str(workdir),
                                "--batch_size", "500"], main=finetune.main)
    assert code == 2 and err.endswith("error: batch_size=500 is larger than the training set (64 examples)\n")
    assert not workdir.exists()  # no freeze_summary.txt, no empty phase folder
    code, _, err = cli(capsys, ["--preset", "smoke", "--workdir", str(workdir), "--resume"], main=finetune.main)
    assert code == 2 and "holds no fine-tuning run to resume" in err and not workdir.exists()


# --------------------------------------------------------------------------- a damaged checkpoint is survived


def _array_file(step_dir: pathlib.Path) -> pathlib.Path:
    return max((step_dir / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _array_file(step_dir)
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _bit_rot(step_dir):
    f = _array_file(step_dir)
    data = bytearray(f.read_bytes())
    data[len(data) // 3] ^= 0x10
    f.write_bytes(bytes(data))


DAMAGE = {
    "truncated array file": _truncate,
    "bit rot in an array file": _bit_rot,
    "missing array metadata": lambda d: (d / "state" / "_METADATA").unlink(),
    "missing meta": lambda d: (d / "meta" / "metadata").unlink(),
    "garbage meta": lambda d: (d / "meta" / "metadata").write_text("{garbage"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_resume_falls_back_past_a_damaged_latest_checkpoint(run, finished, capsys, damage):
    DAMAGE[damage](run / "checkpoints" / "latest" / "2")
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "3"])
    assert code == 0, err
    err = no_report_warning(err)
    assert err.startswith(f"checkpoint {run.absolute()}/checkpoints/latest/2 is damaged: ")
    assert err.rstrip().endswith("falling back to latest 1") and len(err.splitlines()) == 1
    assert (run / "checkpoints" / "damaged" / "latest-2").is_dir()  # kept, out of the way
    assert_same_run(run, finished[1], 3)  # epoch 2 recomputed bitwise, then epoch 3


def test_a_damaged_checkpoint_costs_one_line_of_output_in_a_fresh_process(run):
    """Orbax's failed reads leave asyncio tasks whose errors Python prints when it collects them
    (hundreds of lines); outside pytest's own hooks, the command prints one line for the damage."""
    _truncate(run / "checkpoints" / "latest" / "2")
    done = subprocess.run([sys.executable, "-m", "jaxcnn.experiments.cifar10"] + SMOKE +
                          ["--workdir", str(run), "--resume", "--epochs", "3"], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = no_report_warning(done.stderr).splitlines()
    assert len(lines) == 1 and "/checkpoints/latest/2 is damaged: " in lines[0]


def test_restore_and_filters_name_a_damaged_checkpoint_and_what_is_wrong(run, capsys):
    _truncate(run / "checkpoints" / "best" / "1")
    with pytest.raises(DamagedCheckpointError, match=r"checkpoint .*/checkpoints/best/1 is damaged: \w+"):
        inference.restore(run)
    code, _, err = cli(capsys, ["--run", str(run), "--resnet_weights", "none", "--out", str(run.parent / "f")],
                       main=filters.main)
    assert code == 2 and len(err.splitlines()) == 1 and "/checkpoints/best/1 is damaged" in err
    assert not (run.parent / "f").exists()


def test_leftover_temporary_checkpoint_folders_are_cleaned_up(run, capsys):
    tmp = run / "checkpoints" / "latest" / "3.orbax-checkpoint-tmp-1764000000000000"
    tmp.mkdir()
    (tmp / "half_written").write_bytes(b"\0" * 100)
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "3"])
    assert code == 0, err
    assert not tmp.exists() and (run / "checkpoints" / "latest" / "3").is_dir()


# --------------------------------------------------------------------------- training that goes wrong says so


@pytest.mark.parametrize("kind, step, words", [
    ("nan", 19, "the training loss diverged in epoch 3 at step 4 of 8: nan is not finite"),
    ("blow_up", 3, "the training loss diverged in epoch 1 at step 4 of 8: {loss:.4g} is above max_loss 1000"),
])
def test_a_diverging_training_loss_stops_the_run_and_keeps_the_good_checkpoints(tmp_path, capsys, monkeypatch,
                                                                               kind, step, words):
    real = cifar10.run
    monkeypatch.setattr(cifar10, "run", run_with_steps(real, train=step_that(kind, step)))
    workdir = tmp_path / "run"
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--epochs", "3"])
    summary = strict_json(workdir / "summary.json")
    words = words.format(loss=summary["diverged"]["loss"] or 0.0)
    assert code == 1 and err.startswith(f"error: {words}; try a lower learning rate than 0.001.")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert summary["diverged"]["where"] == "training"
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        latest = c.all_epochs("latest")
    if kind == "nan":  # epochs 1 and 2 were good: kept as they were, and the test set scored with the best
        assert latest == [1, 2] and "Kept: checkpoints up to epoch 2 (latest)" in err
        assert summary["test_accuracy"] is not None and [r["epoch"] for r in RunFolder(workdir).read_history()] == [1, 2]
    else:
        assert latest == [] and "No checkpoint was written" in err and summary["test_accuracy"] is None


def test_an_infinite_validation_loss_stops_the_run_with_strict_records(tmp_path):
    real = make_eval_step()

    def infinite(state, batch):
        return {**real(state, batch), "loss_sum": jnp.float32(jnp.inf)}

    with pytest.raises(TrainingDiverged, match=r"the validation loss diverged in epoch 1: inf is not finite"):
        config = get_config("smoke")
        cifar10.run(config, tmp_path / "run", progress=False,
                    steps=dataclasses.replace(Steps.build(config.fit), eval=infinite))
    summary = strict_json(tmp_path / "run" / "summary.json")
    assert summary["diverged"] == {"epoch": 1, "where": "validation", "loss": None}  # inf is written as null
    assert summary["test_loss"] is None and summary["best_epoch"] == 0


class SignalsItself:
    """The smoke train step, which sends a signal to this very process before global step ``at``
    (the real signal, through the real handler)."""

    def __init__(self, at: int, signum: int):
        from jaxcnn.data import AugmentConfig

        self.inner = jax.jit(make_train_step(augment_fn=AugmentConfig().fn()), donate_argnums=0)
        self.lower, self.at, self.signum = self.inner.lower, at, signum

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), self.signum)
        return self.inner(state, batch)


@pytest.mark.parametrize("name, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_at_the_next_step_saves_it_and_resume_continues_bitwise(tmp_path, finished, capsys,
                                                                               monkeypatch, name, code):
    workdir = tmp_path / "run"
    real = cifar10.run
    monkeypatch.setattr(cifar10, "run",
                        run_with_steps(real, train=SignalsItself(11, getattr(signal, name))))
    got, _, err = cli(capsys, SMOKE + ["--epochs", "3", "--workdir", str(workdir)])
    monkeypatch.undo()
    assert got == code
    assert err == (f"stopped by {name} in epoch 2 at step 4 of 8; saved a checkpoint of that step. Continue "
                   f"it with --resume (--workdir {workdir}): it picks up exactly there\n")
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        assert c.all_epochs("latest") == [1] and c.all_epochs("interrupted") == [12]
    assert cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume", "--epochs", "3"])[0] == 0
    assert_same_run(workdir, finished[1], 3)
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        assert c.all_epochs("interrupted") == []  # gone once its epoch was saved


def test_a_run_killed_by_sigkill_resumes_bitwise(tmp_path, finished, capsys):
    workdir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jaxcnn.experiments.cifar10"] + SMOKE +
                            ["--epochs", "3", "--workdir", str(workdir)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (workdir / "checkpoints" / "latest" / "1" / "commit_success.txt").exists():
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)  # in epoch 2 (an epoch takes seconds here)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (workdir / "summary.json").exists()
    assert cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume", "--epochs", "3"])[0] == 0
    assert_same_run(workdir, finished[1], 3)


# --------------------------------------------------------------------------- every bad input: one line, exit 2


def _read_only_dir(tmp_path) -> pathlib.Path:
    if os.geteuid() == 0:  # root writes through permission bits: use a filesystem that takes no files
        return pathlib.Path("/sys/jaxcnn-test")
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    return ro


@pytest.mark.parametrize("args, message", [
    (["--dataset", "cifar10", "--val_size", "0"], "error: val_size=0; must be an int >= 1"),
    (["--seed", "-1"], "error: FitConfig: seed=-1; must be an int >= 0"),
    (["--learning_rate", "inf"], "error: learning_rate=inf; must be a finite number > 0"),
    (["--epochs", "0"], "error: FitConfig: epochs=0; must be an int >= 1"),
    (["--val_size", "100"], "error: --val_size applies to --dataset cifar10, not to the embedded offline data"),
    (["--data_dir", "somewhere"], "error: --data_dir applies to --dataset cifar10, not to the embedded offline data"),
    (["--resume", "--overwrite"], "error: --resume and --overwrite exclude each other"),
    (["--bn_momentum", "1"], "error: --bn_momentum 1: must be a number in [0, 1)"),
    (["--bn_momentum", "-0.1"], "error: --bn_momentum -0.1: must be a number in [0, 1)"),
    (["--warmup_epochs", "-1"], "error: --warmup_epochs -1: must be an int >= 0"),
    (["--precise_bn", "-2"], "error: --precise_bn -2: must be an int >= 0 (0: off)"),
])
def test_a_bad_setting_is_one_line_and_nothing_is_created(tmp_path, capsys, args, message):
    workdir = tmp_path / "run"
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(workdir)] + args)
    assert code == 2 and err.startswith(message) and len(err.splitlines()) == 1 and out == ""
    assert not workdir.exists()


def test_a_workdir_that_cannot_be_written_is_refused_before_the_data_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cifar10, "load_data", lambda config: pytest.fail("the data was loaded"))
    a_file = tmp_path / "a_file"
    a_file.write_text("mine")
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(a_file)])
    assert code == 2 and err == f"error: workdir={str(a_file)!r} is a file, not a folder\n"
    assert a_file.read_text() == "mine"
    workdir = _read_only_dir(tmp_path) / "run"
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir)])
    assert code == 2 and err.startswith(f"error: workdir={str(workdir)!r} cannot be written: ")
    assert not workdir.exists()


def test_a_corrupt_manually_placed_cifar10_file_is_named(tmp_path, capsys, tfds):
    manual = tmp_path / "tfds" / "downloads" / "manual"
    manual.mkdir(parents=True)
    (manual / "cifar-10-binary.tar.gz").write_bytes(os.urandom(5000))
    workdir = tmp_path / "run"
    code, _, err = cli(capsys, SMOKE + ["--dataset", "cifar10", "--data_dir", str(tmp_path / "tfds"),
                                        "--workdir", str(workdir)])
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == (
        f"error: the manually placed {manual / 'cifar-10-binary.tar.gz'} is corrupt or incomplete (its checksum "
        f"is not CIFAR-10's): delete it and place a complete copy of "
        f"https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz there, or run with `--dataset offline`.")
    assert not workdir.exists()


def test_filters_on_what_is_not_a_usable_run_is_one_line(run, tmp_path, capsys):
    out = tmp_path / "figs"
    shutil.rmtree(run / "checkpoints" / "best")
    cases = {tmp_path / "missing": "missing/config.json not found: ",
             tmp_path: "config.json not found: ",
             run: "restore: no 'best' checkpoint under "}
    for folder, words in cases.items():
        code, _, err = cli(capsys, ["--run", str(folder), "--resnet_weights", "none", "--out", str(out)],
                           main=filters.main)
        assert code == 2 and err.startswith("error: ") and words in err and len(err.splitlines()) == 1
    assert not out.exists()
