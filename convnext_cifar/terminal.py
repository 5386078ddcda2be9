"""The terminal: whether a stream is one (a live progress bar) or a pipe or file (plain lines),
the one progress-bar factory every long wait uses, the warning line, and `ConsoleLog`, which
copies what a command prints into a file (a run's train.log)."""

from __future__ import annotations

import re
import sys
import time
from pathlib import Path
from typing import Any, TextIO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # colour and cursor sequences: not for a log file


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
    if _LOG is not None and _LOG.paused:  # under a live bar the copy of stderr is paused
        _LOG.line(f"warning: {text}")


_LOG: ConsoleLog | None = None


class ConsoleLog:
    """While open, every line this process prints on stdout and stderr is also kept as plain
    text (colour and cursor sequences removed): in memory until `to(path)` names the file, then
    appended to it (a run's work dir exists only once claimed; what was printed before is
    written first). A live progress bar pauses the copy (`pause`); its lines are logged by
    `log_line` as a pipe would have received them."""

    def __init__(self) -> None:
        self.kept: list[str] = []
        self.file: Any = None
        self.paused = 0
        self.partial = {"out": "", "err": ""}

    def __enter__(self) -> ConsoleLog:
        global _LOG
        self.saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(sys.stdout, self, "out"), _Tee(sys.stderr, self, "err")
        _LOG = self
        return self

    def __exit__(self, kind: Any, error: Any, traceback: Any) -> None:
        global _LOG
        for key, rest in self.partial.items():
            if rest:
                self.line(rest)
            self.partial[key] = ""
        if error is not None and str(error):  # what the command line says of it next
            self.line(f"ended: {error}")
        sys.stdout, sys.stderr = self.saved
        _LOG = None
        if self.file is not None:
            self.file.close()

    def to(self, path: Path) -> None:
        """Append from now on to `path` (first a line with the time, then what was kept)."""
        self.file = open(path, "a", encoding="utf-8", errors="backslashreplace")  # noqa: SIM115
        self.file.write(f"---- {time.strftime('%Y-%m-%d %H:%M:%S')} ----\n")
        for text in self.kept:
            self.file.write(text + "\n")
        self.kept = []
        self.file.flush()

    def add(self, key: str, text: str) -> None:
        if self.paused:
            return
        *lines, self.partial[key] = (self.partial[key] + text).split("\n")
        for line in lines:
            self.line(line)

    def line(self, text: str) -> None:
        text = ANSI.sub("", text).rsplit("\r", 1)[-1]  # a line redrawn in place: its last form
        if self.file is None:
            self.kept.append(text)
        else:
            self.file.write(text + "\n")
            self.file.flush()


class _Tee:
    """A text stream that writes to `stream` and hands a copy to a ConsoleLog."""

    def __init__(self, stream: TextIO, log: ConsoleLog, key: str):
        self._stream, self._log, self._key = stream, log, key

    def write(self, text: str) -> int:
        self._log.add(self._key, text)
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:  # isatty, flush, fileno, encoding, ...
        return getattr(self._stream, name)


def log_line(text: str) -> None:
    """`text` into the open ConsoleLog only (what a live bar shows, as a plain line)."""
    if _LOG is not None:
        _LOG.line(text)


def pause_log(paused: bool) -> None:
    """Pause (a live bar starts drawing) or resume the open ConsoleLog's copy."""
    if _LOG is not None:
        _LOG.paused += 1 if paused else -1
