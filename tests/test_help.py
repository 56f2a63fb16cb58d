"""Every command's ``--help`` and flag errors, as a newcomer meets them: they answer before JAX,
Flax, Optax, Orbax, TensorFlow or Keras is imported (seconds), every option says what it does,
each description is a whole sentence, and a mistyped flag is one line naming the nearest one."""

import argparse
import importlib
import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "tensorflow", "keras")


def _commands() -> list[str]:
    """Every ``python -m`` module of the package that builds an ArgumentParser."""
    found = []
    for path in sorted((ROOT / "jaxcnn").rglob("*.py")):
        text = path.read_text()
        if "__main__" in text and "ArgumentParser(" in text:
            found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


COMMANDS = _commands()


def test_the_commands_are_found():
    assert {"jaxcnn.predict", "jaxcnn.export", "jaxcnn.experiments.cifar10", "jaxcnn.experiments.finetune",
            "jaxcnn.experiments.dropout_study", "jaxcnn.experiments.filters"} <= set(COMMANDS)


#: Runs ``python -m MODULE ARGS...`` in this process (runpy, as ``-m`` does) and prints on its last
#: line the exit status and the heavy modules imported by then.
_RUN = """
import json, runpy, sys
module, args, heavy = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
sys.argv = [module, *args]
try:
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    code = 0
except SystemExit as e:
    code = e.code
sys.stdout.flush()
print(json.dumps({"code": code, "loaded": sorted(m for m in heavy if m in sys.modules)}))
"""


def _run(module: str, *args: str) -> tuple[dict, str, str]:
    proc = subprocess.run([sys.executable, "-c", _RUN, module, json.dumps(args), json.dumps(HEAVY)],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    lines = proc.stdout.splitlines()
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1]), "\n".join(lines[:-1]), proc.stderr


@pytest.mark.parametrize("module", COMMANDS)
def test_help_answers_before_anything_heavy_is_imported(module):
    result, out, err = _run(module, "--help")
    assert result == {"code": 0, "loaded": []}, (result, err[-2000:])
    assert out.startswith(f"usage: python -m {module} "), out[:300]
    assert "options:" in out and "--help" in out


def test_a_mistyped_flag_answers_in_one_line_before_anything_is_imported():
    result, out, err = _run("jaxcnn.experiments.dropout_study", "--epoch", "3")
    assert result == {"code": 2, "loaded": []}, (result, err[-2000:])
    assert out == ""
    assert err == ("error: unrecognized argument --epoch; did you mean --epochs? "
                   "(see python -m jaxcnn.experiments.dropout_study --help)\n")


def _main(module: str, argv: list, capsys) -> str:
    """The one thing ``module.main(argv)`` writes on stderr before it exits 2 (nothing on stdout)."""
    with pytest.raises(SystemExit) as e:
        importlib.import_module(module).main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    return captured.err


@pytest.mark.parametrize("module, argv, line", [
    ("jaxcnn.experiments.cifar10", ["--epoch", "3"],
     "error: unrecognized argument --epoch; did you mean --epochs?"),
    ("jaxcnn.experiments.cifar10", ["--learnig_rate", "0.01", "--preset", "smoke"],
     "error: unrecognized argument --learnig_rate; did you mean --learning_rate?"),
    ("jaxcnn.experiments.cifar10", ["--batch-size=32"],
     "error: unrecognized argument --batch-size; did you mean --batch_size?"),
    ("jaxcnn.experiments.cifar10", ["--epoch", "3", "--sed", "1"],
     "error: unrecognized arguments --epoch (did you mean --epochs?), --sed (did you mean --seed?)"),
    ("jaxcnn.experiments.cifar10", ["--preset", "tiny"],
     "error: argument --preset: invalid choice: 'tiny' (choose from 'default', 'demo', 'smoke')"),
    ("jaxcnn.experiments.cifar10", ["--epochs"], "error: argument --epochs: expected one argument"),
    ("jaxcnn.experiments.cifar10", ["--epochs", "three"], "error: argument --epochs: invalid int value: 'three'"),
    ("jaxcnn.experiments.finetune", ["--phase1_epoch", "2"],
     "error: unrecognized argument --phase1_epoch; did you mean --phase1_epochs?"),
    ("jaxcnn.experiments.finetune", ["extra"], "error: unrecognized argument extra"),
    ("jaxcnn.predict", ["photo.jpg"], "error: the following arguments are required: --run"),
])
def test_flag_errors_are_one_line_with_the_way_to_the_help(module, argv, line, capsys):
    assert _main(module, argv, capsys) == f"{line} (see python -m {module} --help)\n"


def _parser_of(module: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, caught at its first parse (nothing of the command runs)."""
    class Built(Exception):
        pass

    def catch(self, *args, **kwargs):
        raise Built(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(Built) as built:
            importlib.import_module(module).main([])
    return built.value.args[0]


@pytest.mark.parametrize("module", COMMANDS)
def test_every_option_says_what_it_does(module, monkeypatch):
    parser = _parser_of(module, monkeypatch)
    bare = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()
            or a.help == argparse.SUPPRESS]
    assert not bare, f"{module}: options without a help text: {bare}"
    # the settings a preset chooses say where their default comes from
    for action in parser._actions:
        if set(action.option_strings) & {"--preset", "--epochs", "--batch_size", "--learning_rate", "--seed"}:
            assert "default" in action.help, (module, action.option_strings, action.help)


@pytest.mark.parametrize("module", COMMANDS)
def test_each_description_is_a_whole_sentence(module, monkeypatch):
    parser = _parser_of(module, monkeypatch)
    doc = importlib.import_module(module).__doc__
    first_paragraph = " ".join(doc.strip().split("\n\n")[0].split())
    assert parser.description == first_paragraph
    assert parser.description.endswith(".") and "\n" not in parser.description, parser.description


def test_what_the_light_parsers_repeat_matches_its_home():
    """The parsers are built without importing the modules that own these values; they must agree."""
    from jaxcnn import viz
    from jaxcnn.experiments import configs, filters, flags
    from jaxcnn.train import FitConfig

    assert flags.DEFAULT_MAX_LOSS_TEXT == f"{FitConfig().max_loss:g}"
    assert filters.NORMALIZE == viz.NORMALIZE
    assert tuple(configs.PRECISIONS) == flags.PRECISION_NAMES
    from jaxcnn.train.config import LR_SCHEDULES
    assert flags.LR_SCHEDULE_NAMES == LR_SCHEDULES
