"""tyro's command-line errors as one line: the message of its error box, without the frame,
colours and help text, with the options it (or, failing that, this module) suggests for a
misspelt one ("did you mean --optim.lr?"), and the command's --help to see."""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import sys
from collections.abc import Callable

import tyro

from convnext_cifar.config import RENAMED, options
from convnext_cifar.errors import UserError


def parse(commands: dict[str, Callable], args: list[str]) -> Callable[[], int] | int:
    """The command to run, or an exit code after --help; tyro's error boxes become one line."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            return tyro.extras.subcommand_cli_from_dict(commands, prog="convnext-cifar", args=args)
    except SystemExit as e:
        if e.code in (0, None):
            sys.stderr.write(captured.getvalue())
            return 0
        raise UserError(one_line(captured.getvalue(), args, list(commands))) from None


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
FRAME = " │╭╮╰╯┃━┏┓┗┛"


def one_line(box: str, args: list[str], commands: list[str]) -> str:
    """The message of a tyro error box, without its frame, colours and help text, with the
    options tyro suggests for a misspelt one ("did you mean --optim.lr?")."""
    lines = [raw.strip(FRAME).strip() for raw in ANSI.sub("", box).splitlines()]
    blocks: list[list[str]] = [[]]  # the text between the box's separators
    for line in lines:
        if _separator(line):
            blocks.append([])
        elif line:
            blocks[-1].append(line)
    blocks = [b for b in blocks if b] or [[]]
    # a box drawn in ASCII (no UTF-8 output) has its title on a line of its own
    message = blocks[0] if "╭" in box or len(blocks) == 1 else blocks[1]
    command = args[0] if args and args[0] in commands else ""
    text = re.sub(r" \(applied to [^)]*\)", "", " ".join(message)) or "invalid command line"
    if "nrecognized" in text and (close := _suggested(lines, text, command)):
        text += "; did you mean " + " or ".join(close) + "?"
    return f"{text} (see convnext-cifar{' ' + command if command else ''} --help)"


def _separator(line: str) -> bool:
    """A frame title (─ Title ───) or a rule (───, or --- when drawn in ASCII)."""
    return line.startswith("─") or (len(line) >= 3 and set(line) <= set("-─━="))


def _suggested(lines: list[str], message: str, command: str) -> list[str]:
    """Options to suggest for misspelt ones: a renamed option's new name, then those tyro lists
    under "Perhaps you meant" for this command (up to 3); should its box ever change shape,
    the closest `train` options by name, found here."""
    unknown = re.findall(r"--[\w.-]+", message)
    renamed = [f"--{RENAMED[key]}".replace("_", "-") for u in unknown
               if (key := u.lstrip("-").replace("-", "_")) in RENAMED]
    offered: list[tuple[str, str]] = []  # (option, the command whose --help lists it)
    if any("Perhaps you meant" in line for line in lines):
        after = lines[next(i for i, x in enumerate(lines) if "Perhaps you meant" in x) + 1:]
        for line in after:
            if line.startswith("--") and not _separator(line):
                offered.append((line.split()[0].rstrip(","), ""))
            elif offered and line.startswith("in ") and line.endswith("--help"):
                offered[-1] = (offered[-1][0], line.split()[-2])
        if offered:  # tyro lists an option once, under any command that takes it
            shared = set(train_options()) if command in ("train", "tune", "lr-find") else set()
            return list(dict.fromkeys(renamed + [o for o, where in offered
                                                 if where in ("", command) or o in shared]))[:3]
    close = list(renamed)
    if command == "train":
        known = train_options()
        for option in unknown:
            last = option.lstrip("-").replace("_", "-").rsplit(".", 1)[-1]
            close += [o for o in known if o.rsplit(".", 1)[-1] == last]
            close += difflib.get_close_matches(option.replace("_", "-"), known, n=2, cutoff=0.7)
    return list(dict.fromkeys(close))[:3]


def train_options() -> list[str]:
    """Every option `train` takes for a config field, e.g. --optim.lr, --data.batch-size."""
    return ["--" + key.replace("_", "-") for key in options()]
