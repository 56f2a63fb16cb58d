"""What a newcomer meets first: the commands' flags taken as typed, the README's snippets and
commands running as written and telling the truth, and one-line errors that name the way out."""

import argparse
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- no abbreviated flags


def _entry_points() -> list[str]:
    """Every ``python -m`` module of jaxcnn/ and benchmarks/ that builds an ArgumentParser."""
    found = []
    for top in ("jaxcnn", "benchmarks"):
        for path in sorted((ROOT / top).rglob("*.py")):
            text = path.read_text()
            if "__main__" in text and "ArgumentParser(" in text:
                found.append(".".join(path.relative_to(ROOT).with_suffix("").parts))
    return found


class _Built(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(module_name: str, monkeypatch) -> argparse.ArgumentParser:
    """The parser ``module.main`` builds, caught at its first parse (nothing of the command runs)."""
    module = importlib.import_module(module_name)

    def catch(self, *args, **kwargs):
        raise _Built(self)

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", catch)
        m.setattr(argparse.ArgumentParser, "parse_known_args", catch)
        with pytest.raises(_Built) as built:
            module.main([])
    return built.value.parser


def test_the_entry_points_are_found():
    assert {"jaxcnn.experiments.cifar10", "jaxcnn.experiments.finetune", "jaxcnn.experiments.filters",
            "jaxcnn.experiments.dropout_study", "jaxcnn.predict", "benchmarks.suite"} <= set(_entry_points())


@pytest.mark.parametrize("module_name", _entry_points())
def test_no_command_takes_an_abbreviated_flag(module_name, monkeypatch, capsys):
    """``--epoch 3`` must not pass for ``--epochs 3``: each long option cut by one letter (where that is
    no option of its own) is refused as unrecognised."""
    parser = _parser_of(module_name, monkeypatch)
    for action in parser._actions:  # leave only the abbreviation to complain about
        action.required = False
        if not action.option_strings and action.nargs in ("+", None):
            action.nargs = "*"
    options = {s for a in parser._actions for s in a.option_strings}
    cut = sorted({s[:-1] for s in options if s.startswith("--") and len(s) > 4} - options)
    assert cut, module_name
    for abbrev in cut:
        with pytest.raises(SystemExit) as e:
            parser.parse_args([abbrev, "1"])
        assert e.value.code == 2, (module_name, abbrev)
        assert f"unrecognized arguments: {abbrev}" in capsys.readouterr().err, (module_name, abbrev)
