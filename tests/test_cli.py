"""The `khe-vol` command's help: what a coordinator reads before anything else."""

from __future__ import annotations

import argparse
import subprocess
import sys

from khe_vol.cli import build_parser


def khe_vol(*args):
    return subprocess.run([sys.executable, "-m", "khe_vol.cli", *args], capture_output=True, text=True, timeout=120)


def _parsers(parser, path=()):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


def test_every_option_of_every_command_has_help():
    missing = [(" ".join(path), action.option_strings or action.dest)
               for path, parser in _parsers(build_parser()) for action in parser._actions
               if not isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction))
               and not action.help]
    assert missing == []


def test_help_is_plain_text_with_defaults_shown():
    top = khe_vol("--help")
    assert top.returncode == 0 and "``" not in top.stdout and "khe-vol run CONFIG" in " ".join(top.stdout.split())
    demo = khe_vol("demo", "--help").stdout
    assert "(default: 6)" in demo and "(default: 0)" in demo and "(default: demo)" in demo
    assert "(default: 8765)" in khe_vol("qa", "serve", "--help").stdout
    assert "(default: None)" not in demo


def test_check_without_a_config_shows_its_own_usage():
    proc = khe_vol("check")
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: khe-vol check") and "a config file is needed" in proc.stderr
