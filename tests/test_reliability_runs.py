"""Run folders that survive a lost best checkpoint, ill-formed checkpoint metadata and a crash in
the middle of ``--overwrite`` (issue 17, section 2).

Each test does the damage or the crash to a real smoke run (256 offline images, 8 steps per
epoch) and checks what the user meets: the exit status and message, a summary that describes
the weights it reports, and the old run byte for byte where it must be kept.
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

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxcnn import inference
from jaxcnn.checkpoint import Checkpoints
from jaxcnn.data import AugmentConfig
from jaxcnn.experiments import cifar10, finetune
from jaxcnn.experiments.configs import get_config
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import RunInterrupted, Steps, make_eval_step, make_train_step
from test_reliability import cli, no_report_warning, snapshot

ROOT = pathlib.Path(__file__).resolve().parents[1]
SMOKE = ["--preset", "smoke", "--no_progress"]
STEPS = 8  # optimizer steps per smoke epoch
OFFSET = 0.1  # what worse_each_step adds to the loss per optimizer step the weights have taken


def worse_each_step():
    """The real eval step, whose loss grows by ``OFFSET`` per optimizer step: every epoch's
    validation loss is worse than the last (epoch 1 is the best), whatever the CPU's rounding."""
    real = make_eval_step()

    def step(state, batch):
        sums = real(state, batch)
        return {**sums, "loss_sum": sums["loss_sum"] + sums["count"] * OFFSET * state.step.astype(jnp.float32)}

    return step


def evaluating_worse_each_step(run):
    """``cifar10.run`` with its config's steps, evaluating with ``worse_each_step``."""
    def hooked_run(config, *a, **k):
        return run(config, *a, **{**k, "steps": dataclasses.replace(Steps.build(config.fit), eval=worse_each_step())})

    return hooked_run


@pytest.fixture
def hooked(monkeypatch):
    """The cifar10 command, evaluating with ``worse_each_step``."""
    real = cifar10.run
    monkeypatch.setattr(cifar10, "run", evaluating_worse_each_step(real))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 2-epoch smoke run whose best epoch is 1 (``worse_each_step``)."""
    workdir = tmp_path_factory.mktemp("runs") / "run"
    with pytest.MonkeyPatch.context() as mp:
        real = cifar10.run
        mp.setattr(cifar10, "run", evaluating_worse_each_step(real))
        assert cifar10.main(SMOKE + ["--workdir", str(workdir)]) == 0
    assert RunFolder(workdir).read_summary()["best_epoch"] == 1
    return workdir


@pytest.fixture
def run(finished, tmp_path):
    """A copy of the finished run to do things to."""
    shutil.copytree(finished, tmp_path / "run")
    return tmp_path / "run"


def leaves(workdir, which, epoch) -> dict:
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        tree, meta = c.restore(which, epoch)
    return {jax.tree_util.keystr(p): np.asarray(a) for p, a in jax.tree_util.tree_leaves_with_path(tree["params"])}


def assert_same_arrays(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def lose(step_dir: pathlib.Path):
    """What the issue did to a checkpoint: its array store deleted."""
    shutil.rmtree(step_dir / "state" / "ocdbt.process_0")


# --------------------------------------------------------------------------- a lost best checkpoint


def test_a_lost_best_is_replaced_by_the_best_readable_epoch_and_the_summary_describes_it(run, capsys, hooked):
    """Best epoch 1 lost, and latest/1 too: epoch 2 is the best epoch whose weights are left. The
    resumed run says so in one line, keeps epoch 2 as its best (epoch 3 is worse), tests those
    weights, and the run can be used for prediction afterwards."""
    lose(run / "checkpoints" / "best" / "1")
    lose(run / "checkpoints" / "latest" / "1")
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "3"])
    assert code == 0, err
    history = RunFolder(run).read_history()
    replaced = [line for line in err.splitlines() if "best epoch's checkpoint" in line]
    assert replaced == [f"the best epoch's checkpoint (epoch 1) is lost; epoch 2 (val loss {history[1]['val_loss']:.4f}),"
                        f" the best epoch whose checkpoint reads back, is the run's best in its place"]
    summary = RunFolder(run).read_summary()
    assert summary["best_epoch"] == 2 and summary["stop_epoch"] == 3
    assert summary["best_val_loss"] == history[1]["val_loss"] < history[2]["val_loss"]
    with RunFolder(run).checkpoints(read_only=True) as c:
        assert c.all_epochs("best") == [2]
    assert_same_arrays(leaves(run, "best", 2), leaves(run, "latest", 2))
    # the summary's test loss is that of the best checkpoint's weights (float64 from their logits; the test
    # split is scored by the model itself, not by the hooked eval step of the validation loss)
    restored = inference.restore(run)
    assert restored.epoch == 2
    test = cifar10.load_data(get_config("smoke")).test
    logits = np.asarray(restored.predict(test.read(np.arange(len(test))), return_logits=True), np.float64)
    top = logits.max(-1)
    log_probs = logits - (top + np.log(np.exp(logits - top[:, None]).sum(-1)))[:, None]
    loss = -np.mean(log_probs[np.arange(len(test)), test.labels])
    assert abs(summary["test_loss"] - loss) < 1e-4


def test_a_finished_run_whose_best_is_lost_is_reported_again_not_nothing_to_do(run, capsys, hooked):
    lose(run / "checkpoints" / "best" / "1")
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "2"])
    assert code == 0, err
    assert not out.startswith("nothing to do") and "epoch 1 (val loss" in err
    assert_same_arrays(leaves(run, "best", 1), leaves(run, "latest", 1))  # latest/1 took its place
    assert inference.restore(run).epoch == 1 and RunFolder(run).read_summary()["best_epoch"] == 1
    assert len(RunFolder(run).read_history()) == 2  # nothing trained


class SignalsItself:
    """The smoke train step, which sends SIGINT to this very process before global step ``at``."""

    def __init__(self, at: int):
        self.inner = jax.jit(make_train_step(augment_fn=AugmentConfig().fn()), donate_argnums=0)
        self.lower, self.at = self.inner.lower, at

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(state, batch)


def test_a_run_stopped_in_its_first_epoch_has_no_best_to_lose(tmp_path, caplog):
    """(Not a lost best: a run interrupted before its first epoch ended never had one.)"""
    config = get_config("smoke", epochs=1)
    with pytest.raises(RunInterrupted):
        cifar10.run(config, tmp_path / "run", progress=False,
                    steps=dataclasses.replace(Steps.build(config.fit), train=SignalsItself(3)))
    caplog.clear()
    _, _, summary = cifar10.run(config, tmp_path / "run", progress=False, resume=True)
    # (the one warning: a one-epoch smoke run answers one class, and its report says so)
    assert not [r for r in caplog.records if r.levelname == "WARNING" and "test split" not in r.getMessage()]
    assert summary["best_epoch"] == 1
    assert inference.restore(tmp_path / "run").epoch == 1


# --------------------------------------------------------------------------- ill-formed checkpoint metadata


def _empty_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{}")


def _meta_without_history(step_dir):
    meta = json.loads((step_dir / "meta" / "metadata").read_text())
    del meta["history"]  # the checksum of the arrays still matches
    (step_dir / "meta" / "metadata").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage, reason", [(_empty_meta, "its meta has no checksum"),
                                            (_meta_without_history, "its meta is ill-formed (KeyError: 'history')")])
def test_ill_formed_checkpoint_metadata_is_damage_and_resume_falls_back(run, finished, capsys, hooked, damage, reason):
    damage(run / "checkpoints" / "latest" / "2")
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "2"])
    assert code == 0, err
    err = no_report_warning(err)
    assert err.startswith(f"checkpoint {run.absolute()}/checkpoints/latest/2 is damaged: {reason}")
    assert err.rstrip().endswith("falling back to latest 1") and len(err.splitlines()) == 1
    assert (run / "checkpoints" / "damaged" / "latest-2").is_dir()
    assert_same_arrays(leaves(run, "latest", 2), leaves(finished, "latest", 2))  # epoch 2 again, bitwise


# --------------------------------------------------------------------------- checkpoints/interrupted/


def test_the_interrupted_folder_exists_only_while_it_holds_a_checkpoint(finished, tmp_path):
    assert not (finished / "checkpoints" / "interrupted").exists()  # a run that was never stopped
    tree = {"w": np.arange(6, dtype=np.float32)}
    with Checkpoints(tmp_path / "c") as c:
        c.save(1, tree, {"epoch": 1})
        assert not (tmp_path / "c" / "interrupted").exists()
        c.save_interrupted(11, tree, {"epoch": 1})
        assert c.all_epochs("interrupted") == [11] and (tmp_path / "c" / "interrupted" / "11").is_dir()
        c.save(2, tree, {"epoch": 2})
        assert not (tmp_path / "c" / "interrupted").exists() and c.all_epochs("interrupted") == []
        c.save_interrupted(19, tree, {"epoch": 2})  # and again, in the same store
        assert c.all_epochs("interrupted") == [19]


# --------------------------------------------------------------------------- a crash inside --overwrite


class Crash(OSError):
    pass


def _crash_after(monkeypatch, k: int):
    """Every rename after the first ``k`` raises, as if the process died there."""
    done = [0]
    for name in ("rename", "replace"):
        real = getattr(os, name)

        def renamed(src, dst, *a, real=real, **kw):
            if done[0] >= k:
                raise Crash(f"simulated crash after {k} renames")
            done[0] += 1
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(os, name, renamed)
    return done


@pytest.mark.parametrize("k", range(9))  # 7 entries of the run and the folder that holds them: 8 renames
def test_a_crash_at_any_step_of_setting_the_old_run_aside_loses_nothing(run, monkeypatch, k):
    before = snapshot(run)
    folder = RunFolder(run)
    config = folder.read_config()
    with monkeypatch.context() as mp:
        _crash_after(mp, k)
        try:
            folder.prepare(config, resume=False, overwrite=True)
        except Crash:
            pass
    folder.prepare(config, resume=True)  # the next start, whatever it is, puts the old run back first
    assert snapshot(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["checkpoints", "tensorboard", "plots", "config.json", "history.json", "history.csv", "summary.json"])


@pytest.mark.parametrize("k", range(9))
def test_a_crash_at_any_step_of_putting_the_old_run_back_loses_nothing(run, monkeypatch, k):
    before = snapshot(run)
    folder = RunFolder(run)
    config = folder.read_config()
    folder.prepare(config, resume=False, overwrite=True)
    folder.write_config({"the": "new run's config"})  # what the new run writes before its first checkpoint
    (run / "tensorboard").mkdir()
    (run / "tensorboard" / "events").write_text("new")
    with monkeypatch.context() as mp:
        _crash_after(mp, k)
        try:
            folder.restore()
        except Crash:
            pass
    folder.prepare(config, resume=True)
    assert snapshot(run) == before


def test_resume_after_a_crash_half_way_through_the_set_aside_keeps_the_old_records(run, capsys, monkeypatch):
    """The issue's case: checkpoints/ and tensorboard/ moved, the records not yet."""
    before = snapshot(run)
    with monkeypatch.context() as mp:
        _crash_after(mp, 2)
        with pytest.raises(Crash):
            RunFolder(run).prepare(RunFolder(run).read_config(), resume=False, overwrite=True)
    real = cifar10.run
    monkeypatch.setattr(cifar10, "run", evaluating_worse_each_step(real))
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "2"])
    assert code == 0 and out.startswith("nothing to do:"), err
    assert err == f"{run}: put back the run that an interrupted --overwrite was setting aside\n"
    assert snapshot(run) == before


def test_resume_of_a_run_an_earlier_jaxcnn_half_set_aside_keeps_its_records_byte_for_byte(run, capsys, hooked):
    """Issue 26: an earlier jaxcnn moved a run's entries one by one straight into .previous/; a crash
    after checkpoints/ and tensorboard/ left the records in the folder. Bringing the run back
    must not take them for the new run's and delete them: nothing is lost, the run resumes."""
    before = snapshot(run)
    (run / ".previous").mkdir()
    for name in ("checkpoints", "tensorboard"):
        os.rename(run / name, run / ".previous" / name)
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "2"])
    assert code == 0 and out.startswith("nothing to do:"), err
    assert err == f"{run}: brought back the run that an interrupted --overwrite had set aside\n"
    assert snapshot(run) == before
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(run), "--resume", "--epochs", "3"])  # and it goes on
    assert code == 0, err
    assert len(RunFolder(run).read_history()) == 3


def test_a_new_run_in_a_folder_with_a_half_set_aside_run_is_refused_and_changes_nothing(run, capsys, monkeypatch):
    with monkeypatch.context() as mp:
        _crash_after(mp, 2)
        with pytest.raises(Crash):
            RunFolder(run).prepare(RunFolder(run).read_config(), resume=False, overwrite=True)
    before = snapshot(run)
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(run)])
    assert code == 2 and err.startswith(f"error: {run} already holds checkpoints of a run (set aside in .previous/ by "
                                        f"an interrupted --overwrite). Continue it with --resume")
    assert snapshot(run) == before


class Watcher:
    """The smoke train step, noting before each optimizer step whether ``<run>/.previous`` exists."""

    def __init__(self, workdir: pathlib.Path):
        self.inner = jax.jit(make_train_step(augment_fn=AugmentConfig().fn()), donate_argnums=0)
        self.lower, self.workdir, self.seen = self.inner.lower, workdir, {}

    def __call__(self, state, batch):
        self.seen[int(state.step)] = (self.workdir / ".previous").is_dir()
        return self.inner(state, batch)


def test_overwrite_deletes_the_old_run_once_the_new_one_has_its_first_checkpoint(run):
    watcher = Watcher(run)
    config = get_config("smoke", epochs=2, seed=1)
    cifar10.run(config, run, overwrite=True, progress=False,
                steps=dataclasses.replace(Steps.build(config.fit), train=watcher))
    assert watcher.seen[0] and watcher.seen[STEPS - 1]  # kept through the new run's first epoch
    assert not watcher.seen[STEPS] and not (run / ".previous").exists()  # gone after its checkpoint
    assert RunFolder(run).read_config()["fit"]["seed"] == 1


# --------------------------------------------------------------------------- finetune --overwrite, killed

FT = ["--preset", "smoke", "--no_progress", "--phase1_epochs", "1", "--phase2_epochs", "1"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ft") / "ft"
    assert finetune.main(FT + ["--workdir", str(workdir)]) == 0
    return workdir


def killed_in_epoch(n: int, argv: list) -> subprocess.CompletedProcess:
    """``finetune.main(argv)`` in a process that SIGKILLs itself as its ``n``-th training epoch starts."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        from jaxcnn.experiments import finetune
        from jaxcnn.train import loop
        real, calls = loop.train_epoch, []
        def train_epoch(*a, **k):
            calls.append(1)
            if len(calls) == {n}:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        loop.train_epoch = train_epoch
        sys.exit(finetune.main({argv!r}))
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == -9, done.stderr[-2000:]
    return done


def test_finetune_overwrite_killed_in_phase_2_leaves_the_new_run_which_resumes(finetuned, tmp_path, capsys):
    workdir = tmp_path / "ft"
    shutil.copytree(finetuned, workdir)
    new = FT + ["--workdir", str(workdir), "--seed", "1"]
    killed_in_epoch(2, new + ["--overwrite"])  # phase 1 (1 epoch) done, phase 2 before its first checkpoint
    assert not (workdir / ".previous").exists()  # the old run is gone whole: phase 1 is the new one
    assert RunFolder(workdir / "phase1").read_config()["fit"]["seed"] == 1
    phase1 = snapshot(workdir / "phase1")
    code, out, err = cli(capsys, new + ["--resume"], main=finetune.main)
    assert code == 0, err
    assert "phase 1: already complete" in out and snapshot(workdir / "phase1") == phase1
    assert RunFolder(workdir / "phase2").read_config()["fit"]["seed"] == 1
    assert len(RunFolder(workdir / "phase2").read_history()) == 1


def test_finetune_overwrite_killed_in_phase_1_gives_the_old_run_back_and_says_so(finetuned, tmp_path, capsys):
    workdir = tmp_path / "ft"
    shutil.copytree(finetuned, workdir)
    before = snapshot(workdir)
    new = FT + ["--workdir", str(workdir), "--seed", "1"]
    killed_in_epoch(1, new + ["--overwrite"])  # phase 1 before its first checkpoint
    killed = snapshot(workdir)
    code, _, err = cli(capsys, new + ["--resume"], main=finetune.main)  # the new settings: refused, nothing changed
    assert code == 2 and err.splitlines()[-1] == (
        "error: --resume: --seed 1 (the run's: 0): a run continues with its own settings and this cannot change "
        "(what can: --data_dir, --max_loss, --phase2_epochs, --stream); leave it out, or start a new run with another "
        "--workdir (nothing was changed)")  # (of the run that comes back: seed 0, its phase 2 done)
    assert snapshot(workdir) == killed
    code, out, err = cli(capsys, FT + ["--workdir", str(workdir), "--resume"], main=finetune.main)  # its own settings
    assert code == 0, err
    assert f"{workdir}: brought back the run that an interrupted --overwrite had set aside; what the interrupted " \
           f"run had written in its place (phase1) is kept in {workdir / '.unfinished-overwrite'}" in err
    assert "phase 1: already complete" in out and "phase 2: already complete" in out
    for phase in ("phase1", "phase2"):  # (summary.json is written again: the run's wall time)
        assert snapshot(workdir / phase) == {k[len(phase) + 1:]: v for k, v in before.items() if k.startswith(phase)}
