"""The rules of starting a run, as :class:`RunFolder` and :class:`FinetuneFolder` own them, on
folders laid out by hand (an epoch folder is what counts as a checkpoint; nothing is trained)."""

import pathlib

import pytest

from jaxcnn.runfolder import FinetuneFolder, RunFolder


def saved_epoch(run: pathlib.Path, epoch: int = 1) -> None:
    (run / "checkpoints" / "latest" / str(epoch)).mkdir(parents=True)


def listing(path: pathlib.Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_finetune_folder_knows_its_phases_and_which_holds_the_final_model(tmp_path):
    ft = FinetuneFolder(tmp_path / "ft")
    assert [p.path for p in ft.phases] == [tmp_path / "ft" / "phase1", tmp_path / "ft" / "phase2"]
    assert ft.final.path == tmp_path / "ft" / "phase2" and ft.phase(1).path == tmp_path / "ft" / "phase1"
    with pytest.raises(ValueError, match=r"phase=3; a fine-tuning run has phases 1 \.\. 2"):
        ft.phase(3)
    assert not ft.holds_phases()
    ft.final.write_config({"model": {}, "data": {}, "fit": {}})
    assert ft.holds_phases() and not RunFolder(ft.path).is_run()


def test_a_finetune_folder_refuses_a_start_in_words_and_changes_nothing(tmp_path):
    ft = FinetuneFolder(tmp_path / "ft")
    with pytest.raises(FileNotFoundError) as e:
        ft.check_start(resume=True, overwrite=False)
    assert str(e.value) == (f"--resume: {ft.path} holds no fine-tuning run to resume (no phase1/ or phase2/ run); "
                            f"start one without --resume")
    with pytest.raises(ValueError, match="^--resume and --overwrite exclude each other$"):
        ft.check_start(resume=True, overwrite=True)
    for phase in ft.phases:
        saved_epoch(phase.path)
    before = listing(ft.path)
    with pytest.raises(FileExistsError) as e:
        ft.check_start(resume=False, overwrite=False)
    assert str(e.value).startswith(f"{ft.path / 'phase1'} and {ft.path / 'phase2'} already hold checkpoints of a "
                                   f"run. Continue it with --resume, start afresh with --overwrite")
    ft.check_start(resume=True, overwrite=False)
    ft.check_start(resume=False, overwrite=True)
    assert listing(ft.path) == before


def test_a_refused_start_leaves_a_run_set_aside_by_an_interrupted_overwrite_where_it_is(tmp_path):
    run = RunFolder(tmp_path / "run")
    saved_epoch(run.path / ".previous")  # the old run, set aside; the new one never saved a checkpoint
    before = listing(run.path)
    for check in (lambda: run.check_start(resume=False, overwrite=False),
                  lambda: run.prepare({"model": {}}, resume=False, overwrite=False)):
        with pytest.raises(FileExistsError) as e:
            check()
        assert str(e.value).startswith(f"{run.path} already holds checkpoints of a run (set aside in .previous/ by "
                                       f"an interrupted --overwrite). Continue it with --resume")
        assert listing(run.path) == before
