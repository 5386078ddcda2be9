"""Never lose a run: exact resume, interruption, atomic files, guards."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import die_after_state, signal_at_step, small_run_args
from safetensors import safe_open

from convnext_cifar import cli, engine, files
from convnext_cifar.checkpoints import WorkDirLock, find_states, load_state, load_weights
from convnext_cifar.engine import Guard
from convnext_cifar.resume import Position, StopSignals, TrainingState

EXACT = ("--sched.epochs", "3", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
         "--data.limit-val", "100", "--model.drop-path-rate", "0.1", "--keep-last", "10",
         "--log-interval", "3")  # 4 steps an epoch: log points fall mid-epoch too


def run(root, work, *extra):
    return cli.main(small_run_args(root, work, *EXACT, *extra))


def weights(path):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta.pop("config"))
    config.pop("work_dir")
    return tensors, meta, config


def records(work):
    return [{k: v for k, v in json.loads(line).items() if k != "img_per_s"}
            for line in (work / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b):
    names = sorted(p.name for p in a.glob("*.safetensors"))
    assert names == sorted(p.name for p in b.glob("*.safetensors"))
    for name in names:
        ta, ma, ca = weights(a / name)
        tb, mb, cb = weights(b / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        assert ma == mb and ca == cb, name
    assert records(a) == records(b)
    sa, sb = (load_state(find_states(w)[-1])["components"] for w in (a, b))
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"])


@pytest.fixture(scope="module")
def reference(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("uninterrupted")
    assert run(cifar_root, work) == 0
    return work


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
    real_evaluate = engine.evaluate

    def best_at_first_epoch(*args, **kwargs):  # make epoch 1 the best one
        res = real_evaluate(*args, **kwargs)
        res.top1 = 90.0 if not best_at_first_epoch.calls else 10.0
        best_at_first_epoch.calls += 1
        return res

    best_at_first_epoch.calls = 0
    monkeypatch.setattr(engine, "evaluate", best_at_first_epoch)
    assert cli.main(small_run_args(cifar_root, tmp_path, *EXACT[:-6], "--sched.epochs", "5",
                                   "--keep-last", "2")) == 0
    assert [p.name for p in find_states(tmp_path)] == [
        "state_00000004.pt", "state_00000016.pt", "state_00000020.pt"]
    assert load_weights(tmp_path / "best.safetensors").epoch == 1


def test_best_checkpoint_across_resume(cifar_root, tmp_path, monkeypatch):
    restore = die_after_state(monkeypatch)
    with pytest.raises(SystemExit):
        run(cifar_root, tmp_path)
    restore()
    best = tmp_path / "best.safetensors"
    ckpt = load_weights(best)
    # An old best that no resumed epoch can beat: it must stay byte for byte.
    from safetensors.torch import save

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
        "import sys, time; from convnext_cifar.checkpoints import WorkDirLock\n"
        f"l = WorkDirLock({str(tmp_path)!r}).__enter__(); print('locked', flush=True); "
        "time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    with WorkDirLock(tmp_path):  # a killed holder leaves nothing behind
        pass


def test_guard_counts_fp16_skips_only_in_a_row():
    guard = Guard(torch.device("cpu"), patience=3)
    nan, ok = torch.tensor(float("nan")), torch.tensor(1.0)
    for loss in (nan, nan, ok, nan, nan):
        guard.update(ok, loss)
    assert guard.tripped_at.item() == -1
    guard.update(ok, nan)
    assert guard.tripped_at.item() == 6


def test_non_finite_loss_stops_naming_epoch_and_step(cifar_root, tmp_path, monkeypatch, capsys):
    real_call, calls = engine.TrainStep.__call__, []

    def nan_at_step_6(self, x, y, n=None):
        loss, norm = real_call(self, x, y, n)
        calls.append(1)
        return (loss * float("nan"), norm) if len(calls) == 6 else (loss, norm)

    monkeypatch.setattr(engine.TrainStep, "__call__", nan_at_step_6)
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
    steps = [r["step"] for r in records(tmp_path) if "step" in r]
    assert steps == sorted(set(steps)) and steps[-1] == int(EPOCHS) * 2  # each step logged once
    assert load_state(find_states(tmp_path)[-1])["components"]["run"]["epoch"] == int(EPOCHS)
    shutil.rmtree(tmp_path)


def as_format_v1(state):
    """The layout states had before components (format v1): one key per piece of run state."""
    c = state["components"]
    (rng,) = c["rng"]["per_rank"]
    return {"format": "convnext-cifar/state-v1", "config": state["config"], "run": c["run"],
            "model": c["model"], "optimizer": c["optimizer"], "scaler": c["scaler"] or None,
            "rng": {**rng, "data": c["loader"]["generator"]}, "window": c["window"],
            "metrics_bytes": c["log"]["bytes"]}


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


def test_a_state_of_an_unknown_format_is_refused_naming_it(tmp_path, capsys):
    path = tmp_path / "state_00000004.pt"
    torch.save({"format": "convnext-cifar/state-v9", "config": "{}"}, path)
    assert cli.main(["train", "--resume", str(path), "--work-dir", str(tmp_path / "w"),
                     "--preset", "smoke", "--data.root", str(tmp_path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "format 'convnext-cifar/state-v9'" in err and "convnext-cifar/state-v2" in err


def test_training_state_saves_and_restores_every_component_by_name(tmp_path):
    from convnext_cifar.config import TrainConfig
    from convnext_cifar.distributed import Dist

    class Counter:
        def __init__(self, value):
            self.value = value

        def state_dict(self):
            return {"value": torch.tensor(self.value)}

        def load_state_dict(self, state):
            self.value = int(state["value"])

    cfg = TrainConfig(work_dir=tmp_path, keep_last=1)
    model, position = torch.nn.Linear(2, 2), Position(step=3)
    saved = TrainingState(cfg, Dist(), 1, {"run": position, "model": model, "extra": Counter(7)})
    path = saved.save()
    state = load_state(path)
    assert path.name == "state_00000003.pt"
    assert set(state["components"]) == {"run", "model", "extra"}
    fresh, target = Counter(0), torch.nn.Linear(2, 2)
    TrainingState(cfg, Dist(), 1, {"run": Position(), "model": target, "extra": fresh}).restore(
        state, path)
    assert fresh.value == 7 and torch.equal(target.weight, model.weight)
    more = TrainingState(cfg, Dist(), 1, {"run": Position(), "model": target, "ema": Counter(0)})
    with pytest.raises(engine.UserError, match="holds no ema"):
        more.restore(state, path)
    # a component declared optional may be missing from older states: it stays as it is
    newer = Counter(5)
    TrainingState(cfg, Dist(), 1, {"run": Position(), "model": target, "ema": newer},
                  optional=("ema",)).restore(state, path)
    assert newer.value == 5
    position.step = 5
    saved.save()
    assert [p.name for p in find_states(tmp_path)] == ["state_00000005.pt"]  # keep_last 1
