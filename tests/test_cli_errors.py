"""cli_errors.py: tyro's error boxes become one line with the options to try instead."""

from convnext_cifar import cli
from convnext_cifar.cli_errors import one_line


def test_suggestions_survive_a_box_without_tyros_list():
    commands = list(cli.commands(cli.PRESETS[cli.DEFAULT_PRESET]()))
    box = "╭─ Unrecognized options ─╮\n│ Unrecognized options: --lr, 1e-3 │\n╰────────╯\n"
    line = one_line(box, ["train", "--lr", "1e-3"], commands)
    assert line == ("Unrecognized options: --lr, 1e-3; did you mean --optim.lr? (see "
                    "convnext-cifar train --help)")
    ascii_box = ("Unrecognized options\n------\nUnrecognized options: --optim.lrr, 1\n------\n"
                 "Perhaps you meant:\n    --optim.lr FLOAT\n        Peak learning rate.\n"
                 "        in convnext-cifar train --help\n------\nFor full helptext, run x\n")
    assert one_line(ascii_box, ["train"], commands) == (
        "Unrecognized options: --optim.lrr, 1; did you mean --optim.lr? (see convnext-cifar "
        "train --help)")
