"""Runs that stop the way the user asked, or say in one line why they could not go on: divergence
judged on the training loss, signals handled for the whole run (however many, whenever they
come), a resume that completes a missing end-of-run report, and a full disk.

Everything runs the ``smoke`` preset (256 offline images, 8 steps per epoch); the helpers are
``tests/test_reliability.py``'s.
"""

import dataclasses
import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import pytest

from jaxcnn.checkpoint import Checkpoints
from jaxcnn.experiments import cifar10, dropout_study, finetune
from jaxcnn.cli import disk_error
from jaxcnn.experiments.configs import get_config
from jaxcnn.runfolder import RunFolder
from jaxcnn.train import Steps, make_eval_step
from test_reliability import (ROOT, SMOKE, SignalsItself, cli, no_report_warning, run_with_steps, step_that,
                              strict_json)

# --------------------------------------------------------------------------- divergence


def test_a_finite_validation_spike_is_not_divergence(tmp_path):
    # lr 0.1 on the smoke preset: the validation loss of epoch 1 was 69,590 (BatchNorm statistics
    # still settling) while the training loss was 2.97, and the run was stopped as diverged
    real = make_eval_step()

    def spike(state, batch):
        m = real(state, batch)
        return {**m, "loss_sum": jnp.where(state.step <= 8, m["loss_sum"] * 1e5, m["loss_sum"])}

    config = get_config("smoke")
    _, history, summary = cifar10.run(config, tmp_path / "run", progress=False,
                                      steps=dataclasses.replace(Steps.build(config.fit), eval=spike))
    assert [r["epoch"] for r in history] == [1, 2] and history[0]["val_loss"] > 1e4 > history[1]["val_loss"]
    assert "diverged" not in summary and summary["best_epoch"] == 2 and summary["test_accuracy"] is not None


def test_max_loss_is_a_flag_and_the_message_says_which_loss_crossed_what(tmp_path, capsys):
    # the first step's training loss is above ln 10 = 2.3 (a uniform guess): a limit of 2 stops the run at step 1
    workdir = tmp_path / "run"
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--max_loss", "2"])
    assert code == 1 and len(err.splitlines()) == 1, err
    loss = strict_json(workdir / "summary.json")["diverged"]["loss"]
    assert 2.0 < loss < 10.0
    assert err.startswith(f"error: the training loss diverged in epoch 1 at step 1 of 8: {loss:.4g} is above "
                          f"max_loss 2; try a lower learning rate than 0.001.")
    assert RunFolder(workdir).read_config()["fit"]["max_loss"] == 2.0
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume", "--epochs", "1", "--max_loss", "none"])
    assert code == 0 and "starting it over" in err  # the limit may change on resume
    assert RunFolder(workdir).read_config()["fit"]["max_loss"] is None


def test_max_loss_none_turns_the_limit_off(tmp_path, capsys, monkeypatch):
    real = cifar10.run
    monkeypatch.setattr(cifar10, "run", run_with_steps(real, train=step_that("blow_up", 3)))
    workdir = tmp_path / "run"
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--epochs", "1", "--max_loss", "none"])
    assert code == 0, err
    assert RunFolder(workdir).read_history()[0]["train_loss"] > 1e8  # reported, not stopped
    assert RunFolder(workdir).read_config()["fit"]["max_loss"] is None


@pytest.mark.parametrize("main, value", [(cifar10.main, "-1"), (cifar10.main, "0"), (cifar10.main, "nan"),
                                         (finetune.main, "inf-ish"), (dropout_study.main, "1e400")])
def test_a_bad_max_loss_is_one_line(tmp_path, capsys, main, value):
    workdir = tmp_path / "run"
    code, out, err = cli(capsys, ["--preset", "smoke", "--no_progress", "--workdir", str(workdir),
                                  "--max_loss", value], main=main)
    assert code == 2 and out == ""
    assert err == f"error: --max_loss {value}: must be a number > 0, or none (no limit)\n"
    assert not workdir.exists()


# --------------------------------------------------------------------------- signals


class SignalsTwice(SignalsItself):
    """The smoke step that sends SIGINT to this process twice, one right after the other, before step ``at``."""

    def __call__(self, state, batch):
        if int(state.step) == self.at:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return self.inner(state, batch)


def _interrupted_save_signalled_again(real):
    def save(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # a second Ctrl-C while the checkpoint is being written
        return real(self, *args, **kwargs)
    return save


@pytest.mark.parametrize("when", ["at once", "during the save"])
def test_a_second_ctrl_c_does_not_break_the_stop(tmp_path, capsys, monkeypatch, when):
    workdir = tmp_path / "run"
    real = cifar10.run
    step = SignalsTwice(11, signal.SIGINT) if when == "at once" else SignalsItself(11, signal.SIGINT)
    monkeypatch.setattr(cifar10, "run", run_with_steps(real, train=step))
    if when == "during the save":
        monkeypatch.setattr(Checkpoints, "save_interrupted", _interrupted_save_signalled_again(
            Checkpoints.save_interrupted))
    got, _, err = cli(capsys, SMOKE + ["--epochs", "2", "--workdir", str(workdir)])
    monkeypatch.undo()
    assert got == 130
    assert err == (f"stopped by SIGINT in epoch 2 at step 4 of 8; saved a checkpoint of that step. Continue "
                   f"it with --resume (--workdir {workdir}): it picks up exactly there\n")
    with RunFolder(workdir).checkpoints(read_only=True) as c:
        assert c.all_epochs("interrupted") == [12]
    assert cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume", "--epochs", "2"])[0] == 0
    assert [r["epoch"] for r in RunFolder(workdir).read_history()] == [1, 2]


def test_a_signal_while_the_data_loads_stops_at_once_and_says_so(tmp_path, capsys, monkeypatch):
    def load_data(config):
        os.kill(os.getpid(), signal.SIGINT)
        pytest.fail("went on loading after the signal")

    monkeypatch.setattr(cifar10, "load_data", load_data)
    workdir = tmp_path / "run"
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(workdir)])
    assert code == 130 and out == ""
    assert err == "stopped by SIGINT (outside training: there was nothing to save)\n"
    assert not workdir.exists()


def _spawn(args, **kw):
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_two_sigints_to_a_real_process_exit_130_every_time(tmp_path):
    # the processes as a user runs them, two at once: 0.3 s apart, the second SIGINT lands in the
    # checkpoint save or in the shutdown (that ended in SIGSEGV in 5 of 6 tries; here, in a
    # KeyboardInterrupt traceback from JAX's atexit clean-up). Resume after it: the in-process test above.
    workdirs = [tmp_path / f"run{k}" for k in range(2)]
    procs = [_spawn(["-m", "jaxcnn.experiments.cifar10"] + SMOKE + ["--epochs", "50", "--workdir", str(w)])
             for w in workdirs]
    try:
        waiting = dict(zip(workdirs, procs))
        while waiting:
            for w, proc in list(waiting.items()):
                assert proc.poll() is None, proc.communicate()
                if (w / "checkpoints" / "latest" / "1" / "commit_success.txt").exists():
                    proc.send_signal(signal.SIGINT)
                    time.sleep(0.3)
                    proc.send_signal(signal.SIGINT)
                    del waiting[w]
            time.sleep(0.02)
        errs = [proc.communicate(timeout=120)[1] for proc in procs]
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
    for proc, err in zip(procs, errs):
        assert proc.returncode == 130 and err.startswith("stopped by SIGINT ") and len(err.splitlines()) == 1, err


def test_sigterm_during_the_end_of_run_report_stops_it_and_resume_completes_it(tmp_path, capsys):
    # the signal arrives after the last epoch, once fit has written the summary: while the plots are drawn
    workdir = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, sys
        from jaxcnn import viz
        from jaxcnn.experiments import cifar10
        real = viz.plot_curves
        def plot_curves(*a, **k):
            os.kill(os.getpid(), signal.SIGTERM)
            return real(*a, **k)
        viz.plot_curves = plot_curves
        sys.exit(cifar10.main({SMOKE + ["--epochs", "1", "--workdir", str(workdir)]!r}))
    """)
    proc = _spawn(["-c", script])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err
    assert no_report_warning(err) == (f"stopped by SIGTERM after the last epoch, while writing the end-of-run "
                                      f"report (test results, plots). Complete it with --resume (--workdir "
                                      f"{workdir})\n")
    assert "per_class_accuracy" not in RunFolder(workdir).read_summary()
    code, out, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume", "--epochs", "1"])
    assert code == 0 and "test accuracy" in out, err
    lines = err.splitlines()  # (a smoke run of one epoch answers one class: the report says so)
    assert lines[0] == f"{workdir}: the run has its epochs but not its end-of-run report; writing it"
    assert all(ln.startswith("warning: test split: ") for ln in lines[1:]), err
    summary = RunFolder(workdir).read_summary()
    assert sum(summary["per_class_accuracy"].values()) > 0
    assert sorted(p.name for p in (workdir / "plots").iterdir()) == ["confusion.png", "curves.png",
                                                                     "reliability.png", "wrong.png"]
    code, out, _ = cli(capsys, SMOKE + ["--workdir", str(workdir), "--resume", "--epochs", "1"])
    assert code == 0 and out.startswith("nothing to do:")  # now it is complete


def test_finetune_resume_completes_a_phase_whose_report_is_missing(tmp_path, capsys):
    ft = ["--preset", "smoke", "--no_progress", "--phase1_epochs", "1", "--phase2_epochs", "1",
          "--workdir", str(tmp_path)]
    assert finetune.main(ft) == 0
    # what a signal in phase 2's end-of-run report leaves: no plots, no per-class results, no top summary
    p2 = RunFolder(tmp_path / "phase2")
    shutil.rmtree(p2.plots_dir)
    p2.write_summary({k: v for k, v in p2.read_summary().items() if k not in ("per_class_accuracy",
                                                                                "confusion_matrix")})
    (tmp_path / "summary.json").unlink()
    capsys.readouterr()
    code, out, err = cli(capsys, ft + ["--resume"], main=finetune.main)
    assert code == 0 and "phase 1: already complete" in out and "phase 2: already complete" not in out
    assert f"{p2.path}: the run has its epochs but not its end-of-run report; writing it\n" in err
    assert sorted(p.name for p in p2.plots_dir.iterdir()) == ["confusion.png", "curves.png", "reliability.png",
                                                              "wrong.png"]
    assert "per_class_accuracy" in strict_json(tmp_path / "summary.json")["phase2"]


# --------------------------------------------------------------------------- a full disk


def test_a_full_disk_while_writing_records_is_one_line(tmp_path, capsys, monkeypatch):
    def full(self, history):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path / "history.json.tmp"))

    monkeypatch.setattr(RunFolder, "write_history", full)
    workdir = tmp_path / "run"
    code, _, err = cli(capsys, SMOKE + ["--workdir", str(workdir), "--epochs", "1"])
    assert code == 2
    assert err == (f"error: cannot write in {workdir}: No space left on device (ENOSPC). Free some space or "
                   f"choose another folder; a run stopped by this continues with --resume\n")


def test_a_full_disk_is_named_from_anywhere_in_the_error_chain(tmp_path):
    # Orbax: a Python write (no file name) failing while handling tensorstore's error (which names it)
    tensorstore = ValueError(f'RESOURCE_EXHAUSTED: Error writing local file "{tmp_path}/best/1.orbax-checkpoint-tmp/'
                             f'state.orbax-checkpoint-tmp/_sharding": Failed to write 27050 bytes to file 15: No space '
                             f"left on device [os_error_code='28']")
    python = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    python.__context__ = tensorstore
    assert disk_error(python) == (f"cannot write in {tmp_path / 'best'}: No space left on device (ENOSPC). Free "
                                  f"some space or choose another folder; a run stopped by this continues with --resume")
    assert disk_error(OSError(errno.EROFS, "x", "/a/b")).startswith("cannot write in /a: Read-only file system (EROFS)")
    assert disk_error(ValueError("os_error_code='13'")) is None and disk_error(OSError(errno.EACCES, "x")) is None


def test_a_full_disk_in_a_real_checkpoint_save_is_one_line(tmp_path):
    # a 300 kB tmpfs (mounted in a user and mount namespace of its own): Orbax's writer threads fail
    disk = tmp_path / "disk"
    disk.mkdir()
    workdir = disk / "run"
    command = (f"mount -t tmpfs -o size=300k tmpfs {disk} && exec {sys.executable} -m jaxcnn.experiments.cifar10 "
               + " ".join(SMOKE) + f" --workdir {workdir}")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"no user namespaces here to mount a small tmpfs in: {probe.stderr.decode().strip()}")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    err = done.stderr
    assert done.returncode == 2, err
    assert err.startswith(f"error: cannot write in {workdir / 'checkpoints'}") and len(err.splitlines()) == 1, err
    assert "No space left on device (ENOSPC)" in err
