"""outputs/workdir.py: which work dir a run uses, the lock that keeps one run in it (and tune's
count-and-ask), status.json, and what a rollback sets aside."""

import contextlib
import json
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from convnext_cifar.config import TrainConfig
from convnext_cifar.errors import UserError
from convnext_cifar.model.checkpoints import save_weights
from convnext_cifar.outputs.workdir import (
    FileLock,
    WorkDirLock,
    choose_work_dir,
    claim_work_dir,
    earlier_results,
    find_states,
    lock_is_held,
    prune_set_aside,
    read_status,
    set_aside_after,
    set_aside_bytes,
    set_aside_lines,
    state_path,
    state_step,
    write_status,
)


def test_a_fresh_run_takes_the_next_free_version_and_resume_auto_the_newest(tmp_path,
                                                                            monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(name="run")
    first, note = choose_work_dir(cfg, None)
    assert first.work_dir == Path("work_dirs/run") and note == ""
    (tmp_path / "work_dirs" / "run").mkdir(parents=True)  # empty: still free
    assert choose_work_dir(cfg, None)[0].work_dir == Path("work_dirs/run")
    (tmp_path / "work_dirs" / "run" / "config.json").write_text("{}")
    second, note = choose_work_dir(cfg, None)
    assert second.work_dir == Path("work_dirs/run-2") and second.name == "run-2"
    assert note == "work_dirs/run holds another run; this one goes to work_dirs/run-2"
    (tmp_path / "work_dirs" / "run-3").mkdir()
    newest = choose_work_dir(cfg, "auto")[0]
    assert newest.work_dir == Path("work_dirs/run-3") and newest.name == "run-3"
    given = TrainConfig(work_dir=tmp_path / "mine")
    assert choose_work_dir(given, None) == (given, "")
    state = tmp_path / "w" / "state_00000008.pt"
    assert choose_work_dir(cfg, str(state))[0].work_dir == tmp_path / "w"


def test_a_second_holder_of_the_lock_is_refused_naming_the_first(tmp_path):
    with WorkDirLock(tmp_path):
        assert lock_is_held(tmp_path)
        with pytest.raises(UserError, match=r"is in use by a running training \(pid \d+\)"):
            WorkDirLock(tmp_path).__enter__()
    assert not lock_is_held(tmp_path)
    with pytest.raises(UserError, match="cannot use work dir"):
        WorkDirLock(tmp_path / "missing").__enter__()


def test_a_waiting_lock_waits_until_the_holder_lets_go(tmp_path):
    order = []
    held = FileLock(tmp_path / ".ask-lock").__enter__()

    def second():
        with FileLock(tmp_path / ".ask-lock", wait=True):
            order.append("second")

    thread = threading.Thread(target=second)
    thread.start()
    time.sleep(0.3)
    order.append("first lets go")
    held.__exit__()
    thread.join(5)
    assert order == ["first lets go", "second"]
    with FileLock(tmp_path / ".ask-lock"), pytest.raises(BlockingIOError):
        FileLock(tmp_path / ".ask-lock").__enter__()


def test_status_says_interrupted_when_no_process_holds_a_running_run(tmp_path):
    assert read_status(tmp_path) == {"status": "not started"}
    write_status(tmp_path, {"status": "running", "epoch": 3})
    assert read_status(tmp_path) == {"status": "interrupted", "epoch": 3}
    with WorkDirLock(tmp_path):
        assert read_status(tmp_path)["status"] == "running"
    (tmp_path / "status.json").write_text("{broken")
    state_path(tmp_path, 5).write_bytes(b"x")
    assert read_status(tmp_path) == {"status": "interrupted"}


def test_a_rollback_sets_aside_everything_after_the_state_resumed(tmp_path):
    for step in (10, 20, 30):
        state_path(tmp_path, step).write_bytes(b"state")
    for epoch in (1, 2, 3):
        save_weights(tmp_path / f"epoch_{epoch}.safetensors", {"w": torch.ones(1)},
                     TrainConfig(), ["a"], epoch, {}, {})
    save_weights(tmp_path / "best.safetensors", {"w": torch.ones(1)}, TrainConfig(), ["a"], 3,
                 {}, {})
    lines = [json.dumps({"epoch": e}) + "\n" for e in (1, 2, 3)]
    (tmp_path / "metrics.jsonl").write_text("".join(lines))
    found = (state_path(tmp_path, 10), {"components": {"run": {"step": 10, "epoch": 1},
                                                       "log": {"bytes": len(lines[0])}}})
    note = set_aside_after(found, tmp_path)
    assert "resuming from state_00000010.pt (step 10), not the newest state" in note
    assert [state_step(p) for p in find_states(tmp_path)] == [10]
    assert sorted(p.name for p in tmp_path.glob("*.safetensors")) == ["epoch_1.safetensors"]
    aside = next((tmp_path / "set-aside").iterdir())
    assert (aside / "metrics.jsonl").read_text() == "".join(lines[1:])
    assert {p.name for p in aside.iterdir()} >= {"state_00000020.pt", "best.safetensors"}
    assert set_aside_after(found, tmp_path) == ""  # the newest state now: nothing to set aside


def test_claiming_refuses_a_fresh_start_over_results_and_writes_the_config(tmp_path):
    cfg = TrainConfig(work_dir=tmp_path / "w")
    with contextlib.ExitStack() as stack:
        claim_work_dir(cfg, ["val/a/1.png"], None, stack)
        assert lock_is_held(cfg.run_dir)
        assert json.loads((cfg.run_dir / "config.json").read_text())["work_dir"] == str(
            cfg.run_dir)
        assert (cfg.run_dir / "val_files.txt").read_text() == "val/a/1.png\n"
    (cfg.run_dir / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert earlier_results(cfg.run_dir) == ["metrics.jsonl"]
    with contextlib.ExitStack() as stack, pytest.raises(
            UserError, match="holds the results of an earlier run .*metrics.jsonl.*no training "
                             "state left to continue; start a new run with another --work-dir"):
        claim_work_dir(cfg, [], None, stack)


def test_a_runs_files_are_never_an_output_and_other_files_only_by_kind_or_force(tmp_path):
    from convnext_cifar.outputs.workdir import check_output, is_run_file

    (tmp_path / "config.json").write_text("{}")
    for name in ("best.safetensors", "epoch_3.safetensors", "state_00000012.pt", "metrics.jsonl",
                 "status.json", "val_files.txt", "config.json"):
        assert is_run_file(tmp_path / name), name
        with pytest.raises(UserError, match="never overwritten"):
            check_output(tmp_path / name, "--out", (".html",), force=True)
    assert not is_run_file(tmp_path / "report.html")
    elsewhere = tmp_path / "sub" / "best.safetensors"  # no config.json beside it: not a run's
    assert not is_run_file(elsewhere)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="exists and is no .csv file"):
        check_output(tmp_path / "notes.txt", "--csv", (".csv",))
    check_output(tmp_path / "notes.txt", "--csv", (".csv",), force=True)
    check_output(tmp_path / "new.txt", "--csv", (".csv",))  # nothing there: nothing to lose


def test_set_aside_lines_are_pruned_oldest_first_and_counted(tmp_path):
    for i in range(4):
        line = tmp_path / "set-aside" / f"20260101-000000-after-step-{i}"
        line.mkdir(parents=True)
        (line / "state.pt").write_bytes(b"x" * (i + 1))
        os.utime(line, ns=(10**18 + i, 10**18 + i))
    assert [p.name[-1] for p in set_aside_lines(tmp_path)] == ["0", "1", "2", "3"]
    assert set_aside_bytes(tmp_path) == 1 + 2 + 3 + 4
    assert prune_set_aside(tmp_path, 3) == ["20260101-000000-after-step-0"]
    assert set_aside_bytes(tmp_path) == 2 + 3 + 4
    assert prune_set_aside(tmp_path, 3) == []
    assert len(prune_set_aside(tmp_path, 0)) == 3 and set_aside_lines(tmp_path) == []


def test_two_rollbacks_in_one_second_get_two_lines(tmp_path):
    for step in (10, 20):
        state_path(tmp_path, step).write_bytes(b"state")
    found = (state_path(tmp_path, 10), {"components": {"run": {"step": 10, "epoch": 1},
                                                       "log": {"bytes": 0}}})
    set_aside_after(found, tmp_path)
    state_path(tmp_path, 20).write_bytes(b"again")
    set_aside_after(found, tmp_path)
    kept = {(line / "state_00000020.pt").read_bytes() for line in set_aside_lines(tmp_path)}
    assert kept == {b"state", b"again"}  # the second did not land in (or replace) the first
