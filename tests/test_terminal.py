"""terminal.py: the one terminal check, the one progress-bar factory, the warning line."""

import os

from convnext_cifar.terminal import is_terminal, progress_bar, warn


def test_a_pty_is_a_terminal_and_a_pipe_or_file_is_not(tmp_path):
    leader, follower = os.openpty()
    try:
        with os.fdopen(follower, "w", closefd=False) as tty:
            assert is_terminal(tty)
    finally:
        os.close(leader)
        os.close(follower)
    read, write = os.pipe()
    with os.fdopen(write, "w") as pipe:
        assert not is_terminal(pipe)
    os.close(read)
    with open(tmp_path / "log", "w") as f:
        assert not is_terminal(f)


def test_progress_bar_is_started_with_the_columns_given():
    from rich.progress import TextColumn

    bar = progress_bar(TextColumn("epoch 1/3"), transient=False)
    try:
        assert bar.live.is_started and [c.text_format for c in bar.columns] == ["epoch 1/3"]
        assert not bar.live.transient and not bar.console.stderr
    finally:
        bar.stop()
    bar = progress_bar(stderr=True)
    try:
        assert bar.console.stderr and bar.live.transient and len(bar.columns) == 4  # rich's own
    finally:
        bar.stop()


def test_warn_is_one_line_on_stderr(capsys):
    warn("the cache is cold")
    captured = capsys.readouterr()
    assert captured.err == "warning: the cache is cold\n" and captured.out == ""
