"""The command line: every option of every subcommand says what it does."""

from __future__ import annotations

import argparse

from segserve.cli import build_parser


def walk(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))
        elif not isinstance(action, argparse._HelpAction):
            yield path, action


def test_every_option_of_every_command_has_help_text():
    actions = list(walk(build_parser()))
    commands = {path for path, _ in actions}
    assert {("train",), ("serve",), ("data", "synth"), ("data", "sbd"), ("import",)} <= commands
    missing = [
        f"{' '.join(path)} {'/'.join(a.option_strings) or a.dest}"
        for path, a in actions
        if not (a.help or "").strip()
    ]
    assert not missing, missing


def test_help_renders_for_every_command(capsys):
    parser = build_parser()
    for path in {path for path, _ in walk(parser) if path}:
        try:
            parser.parse_args([*path, "--help"])
        except SystemExit as exit_:
            assert exit_.code == 0
        assert "usage: segserve " + " ".join(path) in capsys.readouterr().out
