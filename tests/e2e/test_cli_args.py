"""Command-line arguments: impossible numbers are refused with one line and status 2 before any
model is loaded; every command's --help shows its defaults and explains every option."""
import argparse

import pytest

from megarnn.cli import build_parser, main


@pytest.mark.parametrize("argv,match", [
    (["eval", "no_such_run", "--data", "no_such_dir", "--seq-len", "0"], "--seq-len 0: must be >= 1"),
    (["eval", "no_such_run", "--data", "no_such_dir", "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    (["generate", "no_such_run", "--max-new-tokens", "-5"], "max new tokens -5: must be >= 1"),
    (["generate", "no_such_run", "--temperature", "-1"], "temperature -1.0: must be >= 0"),
    (["generate", "no_such_run", "--temperature", "nan"], "temperature nan: must be >= 0"),
    (["generate", "no_such_run", "--top-k", "-1"], "top-k -1: must be >= 0"),
])
def test_bad_numbers_are_one_line_and_status_2(capsys, argv, match):
    """The model directory does not exist: the argument check comes first, so its error is the one shown."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"megarnn {argv[0]}: error: "), err
    assert match in err, err


def test_temperature_zero_is_greedy_not_an_error():
    from megarnn.generate import check_sampling
    check_sampling(1, 0.0, 0)


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


@pytest.mark.parametrize("command", ["train", "tokenizer", "preprocess", "generate", "export", "bench", "eval", "plot"])
def test_help_explains_every_option_in_sentences_and_shows_defaults(capsys, command):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    sub = _subparsers(build_parser())[command]
    assert sub.description and sub.description.rstrip().endswith("."), sub.description
    for action in sub._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        name = "/".join(action.option_strings) or action.dest
        assert action.help and action.help[0].isupper() and action.help.rstrip().endswith((".", ")")), \
            f"{command} {name}: {action.help!r}"
        default = action.default
        if action.option_strings and not action.required and default not in (None, False, "", []):
            assert f"(default: {default})" in " ".join(text.split()), f"{command} {name}: default not shown"


def test_generate_help_names_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--prompt", None), ("--max-new-tokens", 200), ("--temperature", 0.8), ("--top-k", 50),
                          ("--seed", 0)]:
        assert flag in text
        if default is not None:
            assert f"(default: {default})" in text


def test_bench_step_help_shows_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "step", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 10)" in text and "(default: 3)" in text
