"""The command lines read their options one way: both spellings of every multi-word flag, no
option guessed from a prefix, every option explained in --help with its default, and the
whole description shown."""
import argparse
import importlib
import re
import subprocess
import sys

import pytest

from fastpixel.io.checkpoint import bundled_models

TOOLS = ["sample", "train", "eval", "convert", "compress"]


def parsers(tool: str):
    """The tool's parser and, for `compress`, its subcommands' parsers."""
    top = importlib.import_module(f"fastpixel.{tool}").parser()
    found = [top]
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            found += list(action.choices.values())
    return found


def options(tool: str):
    return [a for p in parsers(tool) for a in p._actions
            if a.option_strings and not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("tool", TOOLS)
def test_every_option_is_explained_and_takes_both_spellings(tool):
    for action in options(tool):
        assert action.help and action.help.strip(), f"{tool}: {action.option_strings} has no help"
        for name in action.option_strings:
            if name.startswith("--"):
                assert "--" + name[2:].replace("_", "-") in action.option_strings, (tool, name)
                assert "--" + name[2:].replace("-", "_") in action.option_strings, (tool, name)


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_the_whole_description_and_every_default(tool):
    module = importlib.import_module(f"fastpixel.{tool}")
    for parser in parsers(tool):
        text = " ".join(parser.format_help().split())
        if parser.description:
            assert " ".join(module.__doc__.split()) in text  # not cut after its first line
        for action in parser._actions:
            default = action.default
            if action.option_strings and default not in (None, argparse.SUPPRESS) and default is not False:
                invocation = parser._get_formatter()._format_action_invocation(action)
                shown = text[text.rindex(invocation):]  # the options list, after the usage line
                assert re.search(r"\(default[: ]", shown[:600]), f"{tool}: {action.option_strings} hides its default"


def test_train_help_names_its_defaults():
    text = subprocess.run([sys.executable, "-m", "fastpixel.train", "--help"], capture_output=True, text=True).stdout
    assert "the data set to train on (default: cifar10)" in text
    assert "features of every layer (default: 160)" in " ".join(text.split())


def test_eval_help_lists_the_bundled_models():
    text = " ".join(importlib.import_module("fastpixel.eval").parser().format_help().split())
    assert all(name in text for name in bundled_models()) and len(bundled_models()) >= 4


@pytest.mark.parametrize("argv, dest, value", [
    (["--batch-size", "3"], "batch_size", 3), (["--batch_size", "3"], "batch_size", 3),
    (["--learning_rate", "0.01"], "lr", 0.01), (["--learning-rate", "0.01"], "lr", 0.01),
    (["-r"], "resume", True), (["--load_params"], "resume", True), (["--max-norm", "2"], "grad_clip", 2.0),
    (["--save-every-steps", "5"], "save_every_steps", 5), (["--epochs", "3"], "max_epochs", 3),
])
def test_train_takes_both_spellings_and_the_originals_names(argv, dest, value):
    from fastpixel import train
    assert getattr(train.parse_args(argv), dest) == value


def test_sample_and_eval_take_both_spellings():
    from fastpixel import eval as eval_cli
    from fastpixel.sample import parse_args as sample_args
    args = sample_args(["--num_samples", "3", "--batch-size", "2", "--keep-rows", "4", "--data-dir", "d"])
    assert (args.num_samples, args.batch_size, args.keep_rows, args.data_dir, args.fast) == (3, 2, 4, "d", True)
    assert sample_args(["-n", "5"]).num_samples == 5 and sample_args(["-n5"]).num_samples == 5
    assert sample_args(["--naive"]).fast is False and sample_args(["--fast"]).fast is True
    required = ["--checkpoint", "mnist", "--data_set", "mnist", "--data_dir", "d"]
    assert eval_cli.parse_args(required + ["--batch-size", "7"]).batch_size == 7
    assert eval_cli.parse_args(required + ["--max-images", "7"]).max_images == 7


@pytest.mark.parametrize("tool, argv, refused", [
    ("train", ["-n", "32"], "unrecognized arguments: -n 32"),  # not -nl, the non-local block
    ("train", ["--nr_fil", "3"], "unrecognized arguments: --nr_fil 3"),
    ("sample", ["--check", "mnist"], "unrecognized arguments: --check mnist"),
    ("sample", ["--naive", "--fast"], "not allowed with argument"),
])
def test_no_option_is_guessed_from_a_prefix(tool, argv, refused, capsys):
    module = importlib.import_module(f"fastpixel.{tool}")
    with pytest.raises(SystemExit) as stop:
        module.parse_args(argv)
    assert stop.value.code == 2 and refused in capsys.readouterr().err


def test_eval_refuses_a_heatmap_name_that_is_not_png(tmp_path, capsys):
    from fastpixel import eval as eval_cli
    code = eval_cli.main(["--checkpoint", "mnist", "--data_set", "mnist", "--data_dir", str(tmp_path), "--heatmap",
                          str(tmp_path / "heat.jpg"), "--no_download"])
    assert code == 2 and "give it a .png name" in capsys.readouterr().err
