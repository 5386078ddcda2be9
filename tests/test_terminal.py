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


def test_console_log_keeps_lines_until_it_has_a_file_then_appends_plain_text(tmp_path, capsys):
    from convnext_cifar.terminal import ConsoleLog, log_line, pause_log

    with ConsoleLog() as log:
        print("before the work dir")
        warn("a warning")
        log.to(tmp_path / "train.log")
        print("\x1b[1mbold\x1b[0m and", end="")
        print(" the rest")
        print("50%\r100%")
        pause_log(True)  # a live bar: its frames stay out, its lines come as log_line
        print("a frame of the bar")
        log_line("epoch 1/2 [1/1] step 1")
        warn("under the bar")
        pause_log(False)
    assert capsys.readouterr().out.count("a frame of the bar") == 1  # the console has it all
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert lines[0].startswith("---- ") and lines[1:] == [
        "before the work dir", "warning: a warning", "bold and the rest", "100%",
        "epoch 1/2 [1/1] step 1", "warning: under the bar"]


def test_console_log_appends_across_runs_and_ends_with_what_stopped_it(tmp_path):
    from convnext_cifar.terminal import ConsoleLog

    with ConsoleLog() as log:
        log.to(tmp_path / "train.log")
        print("first")
    try:
        with ConsoleLog() as log:
            log.to(tmp_path / "train.log")
            raise KeyboardInterrupt("SIGTERM: stopped at epoch 2. Resume with: x")
    except KeyboardInterrupt:
        pass
    lines = (tmp_path / "train.log").read_text().splitlines()
    assert [x for x in lines if not x.startswith("----")] == [
        "first", "ended: SIGTERM: stopped at epoch 2. Resume with: x"]
    assert sum(x.startswith("----") for x in lines) == 2
