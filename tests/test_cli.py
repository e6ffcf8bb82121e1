"""The command line as a user meets it: help on every option, one message per error."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from hrnet_triton.cli import COMMANDS, build_parser, main

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtest" / "hrnet.py"


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_wired_and_every_option_has_help():
    subs = _subparsers(build_parser())
    assert set(subs) == set(COMMANDS)
    missing = [
        f"{name} {'/'.join(a.option_strings) or a.dest}"
        for name, sub in subs.items()
        for a in sub._actions
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert not missing, f"options without help text: {missing}"


def test_the_top_level_help_reads_as_prose(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    description = capsys.readouterr().out.split("\n\n")[1]
    assert description.startswith("serve the PaddleClas HRNet classifiers on NVIDIA Triton") and "`" not in description


def test_every_locustfile_option_has_help():
    tree = ast.parse(LOCUSTFILE.read_text())
    options = next(
        n.value for n in tree.body if isinstance(n, ast.AnnAssign) and getattr(n.target, "id", "") == "OPTIONS"
    )
    flags = {ast.literal_eval(k): {kw.arg for kw in v.keywords} for k, v in zip(options.keys, options.values)}
    assert len(flags) >= 13 and all("help" in kws for kws in flags.values()), flags


@pytest.mark.parametrize(
    "argv,message",
    [
        (["classify", "--top-k", "0", "x.jpg"], "argument --top-k: must be at least 1, got 0"),
        (["bench", "--batch-sizes", "1,x"], "takes positive integers separated by commas"),
        (["classify", "x.jpg"], "give either --url (a Triton server) with --model, or --onnx (in-process)"),
    ],
)
def test_bad_arguments_are_one_message_and_a_non_zero_exit(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors
        code = exit_.code
    assert code in (1, 2) and message in capsys.readouterr().err
