"""The training recipe's flags (``jaxcnn.experiments.flags.RECIPE_FLAGS``) on the training commands,
run the way a user runs them: recorded in ``config.json``, reaching the step (the history's rates
against the schedule's formula), resumed bitwise, refused in one line where they are wrong."""

import json
import math

import pytest

from jaxcnn.experiments import cifar10, finetune
from jaxcnn.experiments.flags import RECIPE_FLAGS

#: smoke preset: 256 training images, batch 32.
SMOKE_STEPS = 256 // 32
RECIPE = ["--label_smoothing", "0.1", "--mixup", "0.4", "--cutmix", "1.0", "--weight_decay", "0.05", "--ema", "0.9",
          "--tta", "--grad_accum_steps", "2"]


def _config(workdir):
    return json.loads((workdir / "config.json").read_text())


def test_cifar10_records_each_flag_and_resumes_bitwise(tmp_path, capsys):
    """A run with the recipe's flags stopped after epoch 1 and resumed with the README's command is
    the uninterrupted run, bitwise; what ran is in config.json; a changed flag is one line."""
    from test_reliability import assert_same_run, snapshot

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    base = ["--preset", "smoke", "--no_progress", *RECIPE]
    assert cifar10.main([*base, "--workdir", str(whole)]) == 0
    assert cifar10.main([*base, "--workdir", str(cut), "--epochs", "1"]) == 0
    record = _config(cut)
    assert {k: record["fit"][k] for k in ("label_smoothing", "mixup_alpha", "cutmix_alpha", "lr_schedule")} == \
        {"label_smoothing": 0.1, "mixup_alpha": 0.4, "cutmix_alpha": 1.0, "lr_schedule": "plateau"}
    assert record["optimizer"]["weight_decay"] == 0.05 and record["experiment"]["weight_decay"] == 0.05
    assert record["fit"]["flip_tta"] is True and record["fit"]["grad_accum_steps"] == 2
    assert record["fit"]["ema_decay"] == 0.9 and json.loads((cut / "summary.json").read_text())["weights"] == "ema"
    # the report says the recipe (summary.json; the curves' title): every ingredient on, in the flags' values
    assert json.loads((cut / "summary.json").read_text())["recipe"] == [
        "label smoothing 0.1", "mixup 0.4", "cutmix 1", "AdamW weight decay 0.05", "EMA 0.9", "flip TTA",
        "2 batches an update"]
    assert cifar10.main(["--workdir", str(cut), "--epochs", "2", "--resume", "--no_progress"]) == 0
    assert_same_run(cut, whole, 2)
    capsys.readouterr()
    before = snapshot(cut)
    assert cifar10.main(["--workdir", str(cut), "--epochs", "3", "--resume", "--no_progress", "--mixup", "0.2",
                         "--weight_decay", "0.05", "--no-tta", "--grad_accum_steps", "2"]) == 2
    assert capsys.readouterr().err == (
        "error: --resume: --mixup 0.2 (the run's: 0.4), --no-tta (the run's: on): a run continues with its own "
        "settings and these cannot change (what can: --data_dir, --epochs, --max_loss, --stream); leave them out, or "
        "start a new run with another --workdir (nothing was changed)\n")
    assert snapshot(cut) == before


def test_cifar10_cosine_flag_gives_the_formulas_rates(tmp_path):
    """``--lr_schedule cosine --warmup_epochs 1``: each history row's rate is the one of its epoch's
    last step, ``1e-3 * t / w`` in the warm-up, then ``1e-3 * (1 + cos(pi (t - w) / (T - w))) / 2``
    (t counted from 0; w, T: the warm-up's and the run's steps), computed here by hand."""
    workdir = tmp_path / "run"
    assert cifar10.main(["--preset", "smoke", "--no_progress", "--workdir", str(workdir), "--epochs", "3",
                         "--lr_schedule", "cosine", "--warmup_epochs", "1"]) == 0
    total, warm = 3 * SMOKE_STEPS, SMOKE_STEPS

    def rate(t):
        return 1e-3 * t / warm if t < warm else 1e-3 * (1 + math.cos(math.pi * (t - warm) / (total - warm))) / 2

    history = json.loads((workdir / "history.json").read_text())
    got = [r["lr"] for r in history]
    want = [rate(e * SMOKE_STEPS - 1) for e in (1, 2, 3)]
    # float32 computes the factor in [0, 1]: a few roundings of 2^-24 each, times the peak rate 1e-3
    assert got == pytest.approx(want, rel=0, abs=1e-3 * 8 * 2.0 ** -24), (got, want)
    assert _config(workdir)["fit"]["lr_schedule"] == "cosine"


def test_finetune_records_the_flags_in_both_phases(tmp_path):
    workdir = tmp_path / "ft"
    assert finetune.main(["--preset", "smoke", "--no_progress", "--workdir", str(workdir), "--phase1_epochs", "1",
                          "--phase2_epochs", "1", "--label_smoothing", "0.2", "--weight_decay", "0.01"]) == 0
    for phase in (1, 2):
        record = _config(workdir / f"phase{phase}")
        assert record["fit"]["label_smoothing"] == 0.2 and record["optimizer"]["weight_decay"] == 0.01, phase


@pytest.mark.parametrize("main", [cifar10.main, finetune.main], ids=["cifar10", "finetune"])
@pytest.mark.parametrize("flag, value, allowed", [
    ("--label_smoothing", "1", "a number in [0, 1) (0: off)"), ("--label_smoothing", "-0.1", "a number in [0, 1)"),
    ("--mixup", "-1", "a finite number >= 0"), ("--cutmix", "nan", "a finite number >= 0"),
    ("--weight_decay", "inf", "a finite number >= 0 (0: Adam)"), ("--mixup", "x", "a finite number >= 0"),
    ("--ema", "1", "0 (off) or a number in (0, 1)"), ("--ema", "-0.5", "0 (off) or a number in (0, 1)"),
    ("--grad_accum_steps", "0", "an int >= 1 (1: off)"), ("--grad_accum_steps", "1.5", "an int >= 1")])
def test_a_bad_recipe_value_is_one_line_naming_the_flag(tmp_path, capsys, main, flag, value, allowed):
    with pytest.raises(SystemExit) as exc:
        main(["--workdir", str(tmp_path / "run"), flag, value])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: argument {flag}: {value!r}: must be {allowed}"), err
    assert not (tmp_path / "run").exists()


def test_every_recipe_flag_names_a_setting_of_both_commands():
    from jaxcnn.experiments.configs import ExperimentConfig
    from jaxcnn.train import FitConfig

    fields = {f for cls in (ExperimentConfig, finetune.FinetuneConfig, FitConfig)
              for f in cls.__dataclass_fields__}
    assert {setting for _, setting, _ in RECIPE_FLAGS} <= fields
