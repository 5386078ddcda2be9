"""The terminal: whether a stream is one (a live progress bar) or a pipe or file (plain lines),
the one progress-bar factory every long wait uses, and the warning line."""

from __future__ import annotations

import sys
from typing import Any, TextIO


def is_terminal(stream: TextIO) -> bool:
    """Whether `stream` is a terminal: live bars and tables there, plain lines elsewhere (a log
    file, a pipe, `eval --json`)."""
    return stream.isatty()


def progress_bar(*columns: Any, stderr: bool = False, transient: bool = True) -> Any:
    """A started rich progress bar on stdout (or stderr), with `columns` (default: rich's own);
    `transient`: it disappears when stopped."""
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(*columns, console=Console(stderr=stderr), transient=transient)
    bar.start()
    return bar


def warn(text: str) -> None:
    """One `warning: ...` line on stderr."""
    print(f"warning: {text}", file=sys.stderr, flush=True)
