"""`ferflow --help` and every subcommand's options are described (#29 item 9)."""

from __future__ import annotations

import argparse

from ferflow import cli


def test_every_option_of_every_command_has_help():
    parser = cli.build_parser()
    (commands,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    missing = [
        f"{name} {'/'.join(action.option_strings) or action.dest}"
        for name, sub in commands.choices.items()
        for action in sub._actions
        if not isinstance(action, argparse._HelpAction) and not action.help
    ]
    assert not missing, missing
