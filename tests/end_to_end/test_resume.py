"""End to end: a run stopped at any moment (signal, crash, kill -9) resumes bit-exactly; changed
options, other data and older states are handled as the README says."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cifar_files import write_image_folder
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save
from support import (
    EXACT,
    ROOT,
    assert_same_run,
    die_after_state,
    folder_args,
    quick_train,
    read_weights,
    signal_at_step,
    small_run_args,
    timeless_records,
)

from convnext_cifar import cli, files
from convnext_cifar.config import (
    load_config_file,
)
from convnext_cifar.model.checkpoints import load_weights
from convnext_cifar.outputs.workdir import WorkDirLock, find_states
from convnext_cifar.training import loop as training_loop
from convnext_cifar.training import step as training_step
from convnext_cifar.training.signals import StopSignals
from convnext_cifar.training.state import load_state

SHORT = ("--sched.epochs", "4", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
         "--data.limit-val", "100", "--keep-last", "10", "--log-interval", "2")  # 4 steps/epoch


def metric_records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def run(root, work, *extra):
    return cli.main(small_run_args(root, work, *EXACT, *extra))


@pytest.fixture(scope="module")
def reference(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    assert run(cifar_root, work) == 0
    return work


def _final_files_load(work):
    for path in work.iterdir():
        if path.name == "config.json":
            json.loads(path.read_text())
        elif path.name == "metrics.jsonl":
            [json.loads(line) for line in path.read_text().splitlines()]
        elif path.suffix == ".safetensors":
            load_weights(path)
        elif path.name.startswith("state_"):
            load_state(path)


def _logged_bytes(work):
    path = work / "metrics.jsonl"
    return path.stat().st_size if path.exists() else 0


EPOCHS = "80"  # 2 steps each: room for 12 kills of a few epochs' progress each


KILLS = 12


def as_0_1_0(work):
    """The work dir in the layout 0.1.0 (6e50893) wrote: the run's best value named best_top1
    (whatever the metric), no best_metric, in every state and in status.json."""
    def old_run(run):
        run = {k: v for k, v in run.items() if k != "best_metric"}
        return {("best_top1" if k == "best" else k): v for k, v in run.items()}

    for path in find_states(work):
        state = load_state(path)
        state["components"]["run"] = old_run(state["components"]["run"])
        torch.save(state, path)
    status = json.loads((work / "status.json").read_text())
    (work / "status.json").write_text(json.dumps(old_run(status)))


def as_format_v1(state):
    """The layout states had before components (format v1): one key per piece of run state."""
    c = state["components"]
    (rng,) = c["rng"]["per_rank"]
    run = {("best_top1" if k == "best" else k): v for k, v in c["run"].items()
           if k != "best_metric"}
    return {"format": "convnext-cifar/state-v1", "config": state["config"], "run": run,
            "model": c["model"], "optimizer": c["optimizer"], "scaler": c["scaler"] or None,
            "rng": {**rng, "data": c["loader"]["generator"]}, "window": c["window"],
            "metrics_bytes": c["log"]["bytes"]}


def test_an_interrupted_run_resumes_from_its_folder_with_its_own_config(cifar_root, tmp_path,
                                                                        monkeypatch, capsys):
    work = tmp_path / "run"
    restore = signal_at_step(monkeypatch, 3)
    custom = ("--optim.lr", "2e-3", "--aug.randaugment", "rand-m5-n1", "--optim.weight-decay",
              "0.01")
    assert cli.main(quick_train(cifar_root, "--work-dir", str(work), *custom)) == 143
    err = capsys.readouterr().err
    assert f"Resume with: convnext-cifar train --resume {work}" in err
    restore()
    # the state's own config: nothing but the folder on the command line
    assert cli.main(["train", "--resume", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"resumed from {work}/state_00000003.pt" in out
    cfg = load_config_file(work / "config.json")
    assert (cfg.optim.lr, cfg.aug.randaugment, cfg.optim.weight_decay) == (2e-3, "rand-m5-n1",
                                                                           0.01)
    assert cfg.sched.epochs == 1 and cfg.data.limit_train == 100
    # a state file works the same way, without --config; what is not resumable is refused
    state = sorted(work.glob("state_*.pt"))[-1]
    assert cli.main(["train", "--resume", str(state), "--optim.lr", "5e-3"]) == 2
    assert "config differs in optim.lr (0.002 -> 0.005)" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(state), "--log-interval", "3"]) == 0
    # an empty folder or a wrong path: one line, exit 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["train", "--resume", str(tmp_path / "empty")]) == 2
    assert "holds no readable training state" in capsys.readouterr().err
    assert cli.main(["train", "--resume", str(tmp_path / "nope")]) == 2
    assert "no such work dir or training state" in capsys.readouterr().err


def test_a_state_from_another_kind_of_device_is_refused_in_one_line(cifar_root, tmp_path, capsys):
    args = small_run_args(cifar_root, tmp_path, "--sched.epochs", "2", "--data.limit-train",
                          "100", "--data.limit-val", "50", "--deterministic")
    assert cli.main(args + ["--sched.warmup-epochs", "0"]) == 0
    assert json.loads((tmp_path / "config.json").read_text())["deterministic"] is True
    state_file = find_states(tmp_path)[0]  # the state after epoch 1
    state = torch.load(state_file, weights_only=True)
    state["components"]["loader"]["generator"] = torch.zeros(16, dtype=torch.uint8)  # a GPU's
    gpu_state = tmp_path / "gpu" / state_file.name
    gpu_state.parent.mkdir()
    torch.save(state, gpu_state)
    capsys.readouterr()
    resume = args + ["--sched.warmup-epochs", "0", "--work-dir", str(tmp_path / "gpu"),
                     "--resume", str(gpu_state)]
    assert cli.main(resume) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "another kind of device" in err and err.count("\n") <= 2
    assert cli.main(resume + ["--resume-allow-changes", "--no-deterministic"]) == 0
    assert "they start afresh here" in capsys.readouterr().err


def test_resuming_an_older_state_sets_the_newer_line_aside(cifar_root, tmp_path, monkeypatch,
                                                           capsys):
    args = small_run_args(cifar_root, tmp_path, *SHORT, "--keep-states")  # older states stay
    assert cli.main(args) == 0
    abandoned = metric_records(tmp_path)
    assert [p.name for p in find_states(tmp_path)] == [
        "state_00000004.pt", "state_00000008.pt", "state_00000012.pt", "state_00000016.pt"]
    capsys.readouterr()
    # roll back to epoch 2 with another learning rate, and stop two steps later (SIGTERM)
    restore = signal_at_step(monkeypatch, 2)
    changed = ["--resume-allow-changes", "--optim.lr", "1e-3"]
    assert cli.main(args + ["--resume", str(tmp_path / "state_00000008.pt"), *changed]) == 143
    err = capsys.readouterr().err
    (aside,) = (tmp_path / "set-aside").iterdir()
    assert "not the newest state: set aside state_00000012.pt, state_00000016.pt" in err
    assert str(aside) in err
    moved = sorted(p.name for p in aside.iterdir())
    assert {"state_00000012.pt", "state_00000016.pt", "epoch_3.safetensors",
            "epoch_4.safetensors", "metrics.jsonl"} <= set(moved)
    assert [json.loads(line) for line in (aside / "metrics.jsonl").read_text().splitlines()] \
        == [r for r in abandoned if r["epoch"] > 2]
    named = err.split("state saved to ")[1].split(".")[0] + ".pt"
    assert Path(named).exists() and Path(named).name == "state_00000010.pt"  # the file it names
    # the resumed line is now the run: auto continues it, and its states are kept
    restore()
    capsys.readouterr()
    assert cli.main(args + ["--resume", "auto", *changed]) == 0
    assert "resumed from " + named in capsys.readouterr().out
    newest = load_state(find_states(tmp_path)[-1])
    assert newest["components"]["run"]["step"] == 16
    assert json.loads(newest["config"])["optim"]["lr"] == 1e-3
    steps = [r["step"] for r in metric_records(tmp_path) if "step" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 16
    late = [r for r in metric_records(tmp_path) if r["epoch"] > 2]
    assert late and late != [r for r in abandoned if r["epoch"] > 2]  # the new line's own
    assert (tmp_path / "best.safetensors").exists()


def test_resume_and_eval_refuse_other_data_but_not_a_moved_copy(tmp_path, capsys):
    data = write_image_folder(tmp_path / "pets", {"train": {"cat": 20, "dog": 20, "eel": 20}})
    work = tmp_path / "run"
    args = folder_args(data, work, "--data.val-fraction", "0.25", "--sched.epochs", "2")
    restore_args = args + ["--resume", "auto"]
    assert cli.main(args) == 0
    held = (work / "val_files.txt").read_text().splitlines()
    assert held and all(p.startswith("train/") for p in held)
    with safe_open(str(work / "best.safetensors"), "pt") as f:
        recorded = json.loads(f.metadata()["dataset"])
    assert recorded["classes"] == ["cat", "dog", "eel"] and recorded["val"]
    # a moved but identical folder resumes and evaluates
    moved = shutil.copytree(data, tmp_path / "moved")
    moved_args = [a if a != str(data) else str(moved) for a in restore_args]
    assert cli.main(moved_args) == 0  # resumes at its end: nothing left to train
    capsys.readouterr()
    assert cli.main(["eval", str(work / "best.safetensors"), "--data.root", str(moved),
                     "--json"]) == 0
    assert "other images" not in capsys.readouterr().err
    # a renamed class: resume refuses, naming the difference
    (data / "train" / "eel").rename(data / "train" / "fox")
    assert cli.main(restore_args) == 2
    err = capsys.readouterr().err
    assert "is not the data the run trained on (classes missing: eel; classes not in the " \
           "run: fox)" in err
    (data / "train" / "fox").rename(data / "train" / "eel")
    # added images: another file list; resume refuses, eval of the run's own root refuses
    for i in range(8):
        Image.new("RGB", (32, 32), (i * 9, 0, 0)).save(data / "train" / "dog" / f"new{i}.png")
    assert cli.main(restore_args) == 2
    assert "the train files (fingerprint" in capsys.readouterr().err
    before = sorted(p.name for p in work.iterdir())
    assert cli.main(["eval", str(work / "best.safetensors")]) == 2
    err = capsys.readouterr().err
    assert "no longer holds the held-out images" in err and "--data.root" in err
    assert sorted(p.name for p in work.iterdir()) == before
    # ... unless named: then it says the numbers are for these images
    assert cli.main(["eval", str(work / "best.safetensors"), "--data.root", str(data)]) in (0,)
    assert "holds other images than the run's held-out split" in capsys.readouterr().err
    # the new images moved only themselves between the splits
    other = tmp_path / "run2"
    assert cli.main([a if a != str(work) else str(other) for a in args]) == 0
    now = (other / "val_files.txt").read_text().splitlines()
    assert [p for p in now if "/new" not in p] == held


@pytest.mark.parametrize("crash_after_state", [1, 2])
def test_crash_after_any_checkpoint_then_resume_is_bit_exact(
        cifar_root, tmp_path, reference, monkeypatch, crash_after_state):
    restore = die_after_state(monkeypatch, crash_after_state)
    with pytest.raises(SystemExit):
        run(cifar_root, tmp_path)
    restore()
    assert len(find_states(tmp_path)) == crash_after_state
    assert run(cifar_root, tmp_path, "--resume", "auto") == 0
    assert_same_run(reference, tmp_path)


@pytest.mark.parametrize("signum, at_step, code", [
    (signal.SIGTERM, 6, 143),  # mid-epoch 2, between log points
    pytest.param(signal.SIGINT, 8, 130, marks=pytest.mark.slow),  # the last step of epoch 2
])
def test_signal_writes_a_state_and_resume_is_bit_exact(
        cifar_root, tmp_path, reference, monkeypatch, capsys, signum, at_step, code):
    restore = signal_at_step(monkeypatch, at_step, signum)
    assert run(cifar_root, tmp_path) == code
    err = capsys.readouterr().err
    assert f"(step {at_step}); state saved to" in err and f"--resume {tmp_path}" in err
    assert find_states(tmp_path)[-1].name == f"state_{at_step:08d}.pt"
    restore()
    assert run(cifar_root, tmp_path, "--resume", "auto") == 0
    assert_same_run(reference, tmp_path)


def test_second_ctrl_c_quits_at_once():
    stop = StopSignals()
    stop._handle(signal.SIGINT, None)
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):
        stop._handle(signal.SIGINT, None)


def test_states_are_pruned_but_the_best_epoch_state_is_kept(cifar_root, tmp_path, monkeypatch):
    real_evaluate = training_loop.evaluate

    def best_at_first_epoch(*args, **kwargs):  # make epoch 1 the best one
        res = real_evaluate(*args, **kwargs)
        res.top1 = 90.0 if not best_at_first_epoch.calls else 10.0
        best_at_first_epoch.calls += 1
        return res

    best_at_first_epoch.calls = 0
    monkeypatch.setattr(training_loop, "evaluate", best_at_first_epoch)
    assert cli.main(small_run_args(cifar_root, tmp_path, *EXACT[:-6], "--sched.epochs", "5",
                                   "--keep-last", "2", "--keep-states")) == 0
    assert [p.name for p in find_states(tmp_path)] == [
        "state_00000004.pt", "state_00000016.pt", "state_00000020.pt"]
    assert load_weights(tmp_path / "best.safetensors").epoch == 1


def test_a_finished_run_keeps_exactly_its_last_state_and_resumes_from_it(cifar_root, tmp_path,
                                                                         capsys):
    args = small_run_args(cifar_root, tmp_path, *SHORT)
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert [p.name for p in find_states(tmp_path)] == ["state_00000016.pt"]  # 2 stayed before
    assert "older training state(s)" in out and "--keep-states keeps them all" in out
    weights = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert "best.safetensors" in weights and len(weights) == 5  # eval's files all stay
    assert cli.main(["eval", str(tmp_path / "best.safetensors"), "--compile", "off"]) == 0
    assert cli.main(args + ["--resume", str(tmp_path), "--sched.epochs", "5",
                            "--resume-allow-changes"]) == 0  # continues from that last state
    assert "resumed from" in capsys.readouterr().out


def test_best_checkpoint_across_resume(cifar_root, tmp_path, monkeypatch):
    restore = die_after_state(monkeypatch)
    with pytest.raises(SystemExit):
        run(cifar_root, tmp_path)
    restore()
    best = tmp_path / "best.safetensors"
    ckpt = load_weights(best)
    # An old best that no resumed epoch can beat: it must stay byte for byte.

    unbeatable = save(ckpt.state_dict, metadata={
        **safe_open(str(best), "pt").metadata(), "metrics": json.dumps({"top1": 100.5})})
    best.write_bytes(unbeatable)
    assert run(cifar_root, tmp_path, "--resume", "auto") == 0
    assert best.read_bytes() == unbeatable


def test_resume_refuses_changed_run_options_unless_allowed(cifar_root, tmp_path, capsys):
    assert run(cifar_root, tmp_path, "--sched.epochs", "2") == 0
    capsys.readouterr()
    assert run(cifar_root, tmp_path, "--resume", "auto", "--optim.lr", "1e-3",
               "--data.batch-size", "20") == 2
    err = capsys.readouterr().err
    assert "optim.lr (0.004 -> 0.001)" in err and "data.batch_size (50 -> 20)" in err
    assert "--resume-allow-changes" in err and err.count("\n") == 1
    assert run(cifar_root, tmp_path, "--resume", "auto", "--log-interval", "2",
               "--sched.epochs", "2") == 0  # how often to log does not change the run
    assert run(cifar_root, tmp_path, "--resume", str(find_states(tmp_path)[-1]), "--optim.lr",
               "1e-3", "--resume-allow-changes") == 0


def test_fresh_start_in_a_used_work_dir_is_refused(cifar_root, tmp_path, capsys):
    assert run(cifar_root, tmp_path, "--sched.epochs", "2") == 0
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert run(cifar_root, tmp_path, "--sched.epochs", "2") == 2
    assert "holds the results of an earlier run" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # without its (large) training states the run's results are just as safe
    for state in find_states(tmp_path):
        state.unlink()
    kept = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    assert run(cifar_root, tmp_path, "--sched.epochs", "2", "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "best.safetensors" in err and "no training state left" in err
    assert run(cifar_root, tmp_path, "--sched.epochs", "2", "--resume", "auto") == 2
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == kept


@pytest.mark.slow  # a second process, ~12 s
def test_second_run_on_the_same_work_dir_is_refused_until_the_first_dies(tmp_path, cifar_root):
    with WorkDirLock(tmp_path):
        out = subprocess.run([sys.executable, "-m", "convnext_cifar",
                              *small_run_args(cifar_root, tmp_path)],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and "is in use by a running training (pid" in out.stderr
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from convnext_cifar.outputs.workdir import WorkDirLock\n"
        f"l = WorkDirLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with WorkDirLock(tmp_path):  # a killed holder leaves nothing behind
        pass


def test_non_finite_loss_stops_naming_epoch_and_step(cifar_root, tmp_path, monkeypatch, capsys):
    real_call, calls = training_step.TrainStep.__call__, []

    def nan_at_step_6(self, x, y, n=None):
        loss, norm = real_call(self, x, y, n)
        calls.append(1)
        return (loss * float("nan"), norm) if len(calls) == 6 else (loss, norm)

    monkeypatch.setattr(training_step.TrainStep, "__call__", nan_at_step_6)
    assert run(cifar_root, tmp_path) == 1
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("warning: ")]  # the generated data is not the official files
    assert len(err) == 1 and "non-finite loss or gradient norm at epoch 2, step 6" in err[0]
    assert "state_00000004.pt" in err[0]
    assert [p.name for p in find_states(tmp_path)] == ["state_00000004.pt"]


def test_failed_write_reports_path_and_keeps_earlier_files(cifar_root, tmp_path, monkeypatch,
                                                           capsys):
    real_write, writes = files.atomic_write_bytes, []

    def disk_full_on_second_state(path, data):
        if path.name.startswith("state_"):
            writes.append(path)
            if len(writes) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_write(path, data)

    monkeypatch.setattr(files, "atomic_write_bytes", disk_full_on_second_state)
    assert run(cifar_root, tmp_path) == 2
    err = capsys.readouterr().err
    assert f"could not write training state {tmp_path / 'state_00000008.pt'}" in err
    assert "No space left on device" in err and "Traceback" not in err
    assert [p.name for p in find_states(tmp_path)] == ["state_00000004.pt"]
    load_state(tmp_path / "state_00000004.pt")
    assert not list(tmp_path.glob(".*.tmp"))


@pytest.mark.slow
def test_kill_9_at_random_moments_never_loses_the_run(cifar_root, tmp_path):
    args = [sys.executable, "-m", "convnext_cifar", *small_run_args(
        cifar_root, tmp_path, "--sched.epochs", EPOCHS, "--sched.warmup-epochs", "1",
        "--data.limit-train", "100", "--data.limit-val", "50", "--ckpt-interval", "1",
        "--keep-last", "2", "--resume", "auto")]
    rng = __import__("random").Random(0)
    kills = during_save = 0
    newest = []  # the step of the newest state after each kill
    for attempt in range(KILLS):
        logged = _logged_bytes(tmp_path)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start = time.monotonic()
        target_save = attempt % 2 == 1  # every other kill aims at a checkpoint being written
        delay, saw_tmp, training = rng.uniform(0.5, 3.0), False, None
        while proc.poll() is None and time.monotonic() - start < 120:
            if training is None and _logged_bytes(tmp_path) > logged:
                training = time.monotonic()  # startup (imports, model) takes seconds: wait it out
            if target_save and list(tmp_path.glob(".*.tmp")) and training is not None:
                saw_tmp = True
                break
            if not target_save and training is not None and time.monotonic() - training > delay:
                break
            time.sleep(0.001)
        if proc.poll() is not None:  # ended by itself: finished early, or failed
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        during_save += saw_tmp
        _final_files_load(tmp_path)
        states = find_states(tmp_path)
        newest.append(int(states[-1].stem.split("_")[1]) if states else 0)
    assert kills == KILLS, f"the run ended after {kills} kills: {proc.stderr.read().decode()}"
    assert during_save >= 3, during_save
    assert newest == sorted(newest) and newest[-1] > newest[0]  # it advanced across the kills
    done = subprocess.run(args, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    _final_files_load(tmp_path)
    steps = [r["step"] for r in timeless_records(tmp_path) if "step" in r]
    assert steps == sorted(set(steps)) and steps[-1] == int(EPOCHS) * 2  # each step logged once
    assert load_state(find_states(tmp_path)[-1])["components"]["run"]["epoch"] == int(EPOCHS)
    shutil.rmtree(tmp_path)


@pytest.mark.slow
def test_a_state_of_the_previous_format_still_resumes_bit_exactly(cifar_root, tmp_path, reference,
                                                                  monkeypatch):
    restore = signal_at_step(monkeypatch, 6)  # mid-epoch: the data generator's state matters
    assert run(cifar_root, tmp_path) == 143
    restore()
    for path in find_states(tmp_path):
        torch.save(as_format_v1(load_state(path)), path)
    assert load_state(find_states(tmp_path)[-1])["format"] == "convnext-cifar/state-v1"
    assert run(cifar_root, tmp_path, "--resume", "auto") == 0
    assert_same_run(reference, tmp_path)


def test_a_work_dir_of_0_1_0_resumes_bit_exactly_evaluates_and_shows_in_runs(
        cifar_root, tmp_path, reference, monkeypatch, capsys):
    restore = signal_at_step(monkeypatch, 6)
    assert run(cifar_root, tmp_path) == 143
    restore()
    as_0_1_0(tmp_path)
    assert "best_top1" in load_state(find_states(tmp_path)[-1])["components"]["run"]
    capsys.readouterr()
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["status"] == "interrupted" and row["epochs_done"] == 1
    assert run(cifar_root, tmp_path, "--resume", "auto") == 0
    assert_same_run(reference, tmp_path)
    status = json.loads((tmp_path / "status.json").read_text())
    assert status["status"] == "finished" and status["best_metric"] == "top1"
    assert status["best"] == max(r["top1"] for r in timeless_records(tmp_path) if "top1" in r)
    capsys.readouterr()
    assert cli.main(["eval", str(tmp_path / "best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(result["recorded"]["top1"])


def test_a_state_of_an_unknown_format_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "state_00000004.pt"
    torch.save({"format": "convnext-cifar/state-v9", "config": "{}"}, path)
    assert cli.main(["train", "--resume", str(path), "--work-dir", str(tmp_path / "w"),
                     "--preset", "smoke", "--data.root", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "format 'convnext-cifar/state-v9'" in err and "convnext-cifar/state-v2" in err


RELEASED = "6e50893"  # the last commit of 0.1.0's flat layout (before issue 27's folders)


@pytest.mark.slow
def test_a_run_that_0_1_0_itself_wrote_resumes_bit_exactly_evaluates_and_shows_in_runs(
        cifar_root, tmp_path, capsys):
    """0.1.0's own code (this repository's history at RELEASED) trains 3 epochs; this version
    rolls back to its epoch-2 state and trains epoch 3 again: the same weights and records."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", RELEASED, "convnext_cifar"],
                             capture_output=True)
    if archive.returncode:
        pytest.skip(f"this checkout does not hold {RELEASED} (a shallow clone)")
    old_code = tmp_path / "v0.1.0"
    old_code.mkdir()
    subprocess.run(["tar", "-x", "-C", str(old_code)], input=archive.stdout, check=True)
    old = tmp_path / "old"
    env = {**os.environ, "PYTHONPATH": str(old_code)}
    trained = subprocess.run([sys.executable, "-m", "convnext_cifar",
                              *small_run_args(cifar_root, old, *EXACT)],
                             capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "best_top1" in json.loads((old / "status.json").read_text())  # 0.1.0's layout
    new = tmp_path / "new"
    shutil.copytree(old, new)
    (epoch_2,) = [p for p in find_states(new) if load_state(p)["components"]["run"]["epoch"] == 2]
    assert "best_top1" in load_state(epoch_2)["components"]["run"]
    # its own config, rolled back; in a fresh process as 0.1.0's run was (same torch threads)
    resumed = subprocess.run([sys.executable, "-m", "convnext_cifar", "train", "--resume",
                              str(epoch_2)], capture_output=True, text=True, cwd=tmp_path,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("epoch_3.safetensors", "best.safetensors"):
        (a, meta_a, config_a), (b, meta_b, config_b) = (read_weights(w / name) for w in (old, new))
        assert all(torch.equal(a[k], b[k]) for k in a) and meta_a == meta_b, name
    assert timeless_records(old) == timeless_records(new)
    capsys.readouterr()
    assert cli.main(["runs", str(old), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["status"] == "finished" and row["epochs_done"] == 3
    assert cli.main(["eval", str(old / "best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["top1"] == pytest.approx(result["recorded"]["top1"])


def test_a_resume_that_turns_channels_last_off_continues_as_a_state_in_that_layout(
        cifar_root, tmp_path, monkeypatch):
    """The AdamW moments take the parameters' new layout: the run goes on exactly as it goes on
    from the same state written in the contiguous layout (the fused kernel walks raw memory)."""
    first = tmp_path / "as_saved"
    restore = die_after_state(monkeypatch)
    with pytest.raises(SystemExit):
        run(cifar_root, first)
    restore()
    second = tmp_path / "contiguous"
    shutil.copytree(first, second)
    for path in find_states(second):
        state = load_state(path)
        for moments in state["components"]["optimizer"]["state"].values():
            for key in ("exp_avg", "exp_avg_sq"):
                moments[key] = moments[key].contiguous()
        torch.save(state, path)
    for work in (first, second):
        assert run(cifar_root, work, "--resume", "auto", "--no-channels-last") == 0
    states = [load_state(find_states(w)[-1])["components"]["optimizer"]["state"]
              for w in (first, second)]
    assert all(m[k].is_contiguous() for m in states[0].values() for k in ("exp_avg",
                                                                           "exp_avg_sq"))
    assert_same_run(first, second)


@pytest.mark.slow  # a run and four rollbacks: ~13 s
def test_only_the_newest_set_aside_lines_stay_and_runs_shows_their_size(cifar_root, tmp_path,
                                                                          capsys):
    args = small_run_args(cifar_root, tmp_path, *SHORT, "--keep-states")  # older states stay
    assert cli.main(args) == 0
    notes = []
    for _ in range(4):  # four rollbacks to epoch 3, each within seconds of the last
        capsys.readouterr()
        assert cli.main(args + ["--resume", str(tmp_path / "state_00000012.pt")]) == 0
        notes.append(capsys.readouterr().err)
    lines = sorted((tmp_path / "set-aside").iterdir())
    assert len(lines) == 3  # the default --keep-set-aside
    assert all("state_00000016.pt" in {p.name for p in line.iterdir()} for line in lines)
    assert "removed the oldest" not in "".join(notes[:3])
    assert "removed the oldest set-aside line(s)" in notes[3] and "--keep-set-aside 3" in notes[3]
    removed = notes[3].split("removed the oldest set-aside line(s) ")[1].split(" ")[0]
    assert not (tmp_path / "set-aside" / removed).exists()
    assert removed not in {p.name for p in lines}
    size = sum(f.stat().st_size for f in (tmp_path / "set-aside").rglob("*") if f.is_file())
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["runs"]
    assert row["set_aside_lines"] == 3 and row["set_aside_bytes"] == size > 0
    assert cli.main(["runs", str(tmp_path), "--table"]) == 0
    out = capsys.readouterr().out
    assert "set aside" in out and f"3 ({size / 1e6:.1f} MB)" in out
    # a smaller --keep-set-aside on the next rollback keeps fewer
    assert cli.main(args + ["--resume", str(tmp_path / "state_00000012.pt"),
                            "--keep-set-aside", "1"]) == 0
    assert len(list((tmp_path / "set-aside").iterdir())) == 1


def test_train_log_holds_the_consoles_lines_across_a_resume(cifar_root, tmp_path, monkeypatch,
                                                           capsys):
    args = small_run_args(cifar_root, tmp_path, *SHORT)
    restore = signal_at_step(monkeypatch, 6)
    assert cli.main(args) == 143
    restore()
    first = capsys.readouterr()
    assert cli.main(args + ["--resume", str(tmp_path)]) == 0
    second = capsys.readouterr()
    log = (tmp_path / "train.log").read_text().splitlines()
    assert sum(line.startswith("---- ") for line in log) == 2  # appended, once per start
    for shown in (first, second):  # every line the console showed, in the order shown
        for line in (shown.out + shown.err).splitlines():
            if line.strip() and not line.startswith("convnext-cifar: "):
                assert line in log, line
    assert any(line.startswith("ended: SIGTERM: stopped at") and
               f"Resume with: convnext-cifar train --resume {tmp_path}" in line for line in log)
    assert any(line.startswith("resumed from") for line in log)
    start = next(line for line in log if line.startswith("run "))
    assert "cifar10 200 train / 100 held-out images, 10 classes; convnextv2_atto (3.4 M " \
           "parameters); cpu, fp32, compile off" in start
    text = "\n".join(log)
    assert "options beside CIFAR10Smoke's: " in text and "sched.epochs=4" in text


def test_resuming_a_finished_run_says_so_and_trains_nothing(trained, tmp_path, capsys):
    work = tmp_path / "done"
    shutil.copytree(trained, work)
    records = (work / "metrics.jsonl").read_text()
    assert cli.main(["train", "--resume", str(work)]) == 0
    out = capsys.readouterr().out
    assert f"{work} is already finished: epoch 2 of 2" in out and "resumed from" not in out
    assert (work / "metrics.jsonl").read_text() == records
