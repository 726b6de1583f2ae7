"""The command-line convention: every subcommand is a module of pnnh.cli with register(); bad
input exits 2 with one line on stderr naming the bad value."""
from __future__ import annotations

import importlib

import pytest

from pnnh.cli import COMMAND_MODULES, build_parser, main


def test_every_subcommand_is_a_cli_module_with_register():
    parser = build_parser()
    for name in COMMAND_MODULES:
        assert callable(importlib.import_module(f"pnnh.cli.{name}").register)
    commands = parser._subparsers._group_actions[0].choices
    assert set(COMMAND_MODULES) <= set(commands)


def test_models_lists_and_refuses_a_pattern_matching_nothing(capsys):
    assert main(["models", "pnnh8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["model", "params", "shortcuts"] and out[2].split()[0] == "pnnh8"
    assert out[2].split()[2] == "0"  # a PNNH net has no shortcut
    assert main(["models", "nosuchnet*"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pnnh models: error:") and "'nosuchnet*'" in err[0]


@pytest.mark.parametrize("argv", [["train", "--epochs", "many"], ["theory", "--width", "x"], ["nosuchcommand"]])
def test_an_unparsable_argument_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and "error:" in capsys.readouterr().err
