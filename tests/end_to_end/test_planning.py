"""End to end: runs that plan themselves. --sched.early-stop ends a run whose best metric has
stopped improving, with its state on disk and status "stopped early", resumable, and every rank
of a torchrun run stopping at the same validation."""

import json
import re
import subprocess
import sys

import pytest
from support import small_run_args

from convnext_cifar import cli
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.training.state import load_state

# a learning rate so small that nothing changes: every validation gives the same top-1
FLAT = ("--sched.epochs", "6", "--sched.warmup-epochs", "0", "--data.limit-train", "100",
        "--data.limit-val", "100", "--optim.lr", "1e-12", "--optim.weight-decay", "0",
        "--log-interval", "2")


def records(work):
    return [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]


def validations(work):
    return [r["epoch"] for r in records(work) if "top1" in r]


def test_a_run_that_plateaus_stops_early_and_says_so(cifar_root, tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *FLAT, "--sched.early-stop", "2")) == 0
    out = capsys.readouterr().out
    assert "stopped early after epoch 3 of 6: top1 has not improved in 2 validations " \
           "(--sched.early-stop 2); best" in out
    assert validations(work) == [1, 2, 3]
    status = json.loads((work / "status.json").read_text())
    assert status["status"] == "stopped early" and status["epoch"] == 3
    position = load_state(find_states(work)[-1])["components"]["run"]
    assert position["epoch"] == 3 and position["stopped_early"] and position["plateau"] == 2
    assert (work / "epoch_3.safetensors").is_file() and (work / "best.safetensors").is_file()
    # resumed: nothing to train, said in one line
    assert cli.main(small_run_args(cifar_root, work, *FLAT, "--sched.early-stop", "2",
                                   "--resume", "auto")) == 0
    assert "is already finished: stopped early at epoch 3 of 6" in capsys.readouterr().out
    # a larger patience on resume trains on, from the plateau counted so far
    assert cli.main(small_run_args(cifar_root, work, *FLAT, "--sched.early-stop", "3",
                                   "--resume", "auto")) == 0
    assert validations(work) == [1, 2, 3, 4]
    assert json.loads((work / "status.json").read_text())["status"] == "stopped early"


def test_the_delta_counts_small_gains_as_no_gain(cifar_root, tmp_path, capsys):
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, "--sched.epochs", "4", "--sched.warmup-epochs", "0",
                          "--data.limit-train", "100", "--data.limit-val", "100",
                          "--sched.early-stop", "1", "--sched.early-stop-delta", "100")
    assert cli.main(args) == 0  # no gain can exceed 100 points: stops at the 2nd validation
    assert validations(work) == [1, 2]
    assert "has not improved by more than 100 in 1 validations" in capsys.readouterr().out


def test_without_early_stop_the_plateau_is_only_counted(cifar_root, tmp_path):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *FLAT[:1], "3", *FLAT[2:])) == 0
    assert validations(work) == [1, 2, 3]
    assert json.loads((work / "status.json").read_text())["status"] == "finished"
    assert load_state(find_states(work)[-1])["components"]["run"]["plateau"] == 2


@pytest.mark.parametrize("option, value, says", [
    ("--sched.early-stop", "-1", "invalid --sched.early-stop -1: must be >= 0"),
    ("--sched.early-stop-delta", "-0.5", "invalid --sched.early-stop-delta -0.5: must be in"),
])
def test_bad_early_stop_values_are_one_line(cifar_root, tmp_path, capsys, option, value, says):
    assert cli.main(small_run_args(cifar_root, tmp_path / "w", option, value)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


@pytest.mark.slow
def test_two_processes_stop_early_at_the_same_validation(cifar_root, tmp_path):
    work = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "convnext_cifar",
                           *small_run_args(cifar_root, work, *FLAT, "--sched.early-stop", "2")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]  # a rank that went on would hang
    assert validations(work) == [1, 2, 3]
    assert json.loads((work / "status.json").read_text())["status"] == "stopped early"
    assert "stopped early after epoch 3 of 6" in proc.stdout


def test_tune_trials_stop_early_and_count_as_complete(cifar_root, tmp_path):
    optuna = pytest.importorskip("optuna")
    work = tmp_path / "study"
    assert cli.main(["tune", "--preset", "smoke", "--data.root", str(cifar_root),
                     "--data.no-download", "--device", "cpu", "--compile", "off",
                     "--data.limit-train", "100", "--data.limit-val", "60", "--data.batch-size",
                     "50", "--sched.epochs", "5", "--sched.warmup-epochs", "0",
                     "--work-dir", str(work), "--tune.trials", "2", "--tune.sampler", "random",
                     "--tune.pruner", "none", "--tune.space", "optim.lr=log(1e-13,1e-12)",
                     "--sched.early-stop", "1"]) == 0
    study = optuna.load_study(study_name="convnextv2-atto_cifar10-smoke",
                              storage=f"sqlite:///{work / 'study.db'}")
    trials = study.get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]
    for t in trials:
        assert sorted(t.intermediate_values) == [1, 2]  # stopped at the 2nd validation
        status = json.loads((work / f"trial-{t.number}" / "status.json").read_text())
        assert status["status"] == "stopped early"


# ---- --sched.budget -------------------------------------------------------------------------

BUDGET = ("--sched.budget", "10m", "--sched.epochs", "6", "--sched.warmup-epochs", "2",
          "--data.limit-train", "100", "--data.limit-val", "100", "--log-interval", "2")


def test_the_planned_epochs_follow_the_measured_costs_of_a_fake_clock(cifar_root, tmp_path,
                                                                      monkeypatch, capsys):
    import itertools

    from convnext_cifar.training import budget

    ticks = itertools.count()
    monkeypatch.setattr(budget, "CLOCK", lambda: next(ticks) * 0.25)  # 0.25 s per reading
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, *BUDGET, "--data.batch-size", "25",
                                   "--sched.budget", "15s", "--sched.epochs", "2",
                                   "--sched.warmup-epochs", "1")) == 0
    plan = load_state(find_states(work)[-1])["components"]["run"]["plan"]
    steps = 4  # 100 images, batch 25
    # two back-to-back readings around the timed steps (2 of them: 4 steps, 2 untimed)
    assert plan["step_s"] == pytest.approx(0.25 / 2)
    assert plan["state_s"] == pytest.approx(0.25)
    assert plan["val_s"] == pytest.approx(0.25)  # one batch holds the 100 held-out images
    from convnext_cifar.config import load_config_file

    cfg = load_config_file(work / "config.json")
    costs = budget.Costs(plan["step_s"], plan["val_s"], plan["state_s"])
    # each epoch costs 4 x 0.125 + 0.25 + 2 x 0.25 s in the fake clock's time
    assert plan["epochs"] == budget.epochs_within(15.0, plan["setup_s"], steps, costs, cfg)
    assert plan["epochs"] > 2  # the budget, not --sched.epochs, sets the length
    status = json.loads((work / "status.json").read_text())
    assert status["epochs"] == status["epoch"] == plan["epochs"] and status["budget_s"] == 15
    assert validations(work)[-1] == plan["epochs"]
    out = capsys.readouterr().out
    assert f"budget 15s: {plan['epochs']} epochs planned (warmup " in out


def test_a_budgeted_run_trains_as_the_hand_set_run_of_its_planned_epochs(cifar_root, tmp_path,
                                                                          monkeypatch):
    """The probe's steps leave no trace: weights, records and states equal the run with the
    planned epochs (and the warmup scaled with them) set by hand."""
    from support import timeless_records

    from convnext_cifar.training import budget

    monkeypatch.setattr(budget, "epochs_within", lambda *a: 3)
    planned, by_hand = tmp_path / "planned", tmp_path / "by_hand"
    assert cli.main(small_run_args(cifar_root, planned, *BUDGET, "--aug.randaugment",
                                   "rand-m9-n2", "--model.drop-path-rate", "0.1")) == 0
    assert cli.main(small_run_args(cifar_root, by_hand, *BUDGET[2:], "--sched.epochs", "3",
                                   "--sched.warmup-epochs", "1", "--aug.randaugment",
                                   "rand-m9-n2", "--model.drop-path-rate", "0.1")) == 0
    assert timeless_records(planned) == timeless_records(by_hand)
    a, b = (load_state(find_states(w)[-1])["components"] for w in (planned, by_hand))
    assert all((a["model"][k] == b["model"][k]).all() for k in a["model"])
    assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()


def test_a_budgeted_run_resumed_after_sigterm_keeps_its_plan(cifar_root, tmp_path, monkeypatch,
                                                             capsys):
    from support import signal_at_step

    from convnext_cifar.training import budget

    monkeypatch.setattr(budget, "epochs_within", lambda *a: 4)
    work = tmp_path / "run"
    restore = signal_at_step(monkeypatch, 2 + 3)  # the probe's 2 steps, then 3 of the run
    assert cli.main(small_run_args(cifar_root, work, *BUDGET)) == 143  # 128 + SIGTERM
    restore()
    assert json.loads((work / "status.json").read_text())["status"] == "interrupted"

    def must_not_plan(*a):
        raise AssertionError("a resumed run plans again")

    monkeypatch.setattr(budget, "epochs_within", must_not_plan)
    assert cli.main(small_run_args(cifar_root, work, *BUDGET, "--resume", "auto")) == 0
    out = capsys.readouterr().out
    assert "resumed within budget 10m00s: the plan of 4 epochs stays; " in out
    assert validations(work) == [1, 2, 3, 4]
    status = json.loads((work / "status.json").read_text())
    assert status["status"] == "finished" and status["epochs"] == 4
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert row["budget_s"] == 600 and 0 < row["budget_used_s"] < 600 and row["epochs"] == 4


# ---- lr-find and --optim.lr auto ----------------------------------------------------------------

def test_lr_find_prints_plots_and_suggests_and_writes_no_work_dir(cifar_root, tmp_path,
                                                                    monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "curve.png"
    work = tmp_path / "would-be-run"
    args = small_run_args(cifar_root, work, "--data.limit-train", "300", "--data.batch-size",
                          "10")[1:]  # the train options, without `train`
    assert cli.main(["lr-find", *args, "--lr-find.steps", "30", "--lr-find.out", str(out)]) == 0
    said = capsys.readouterr().out
    assert re.search(r"suggested --optim.lr \S+ \((valley|rise/10 \(no descent\)) rule; "
                     r"steepest: ", said)
    assert "30 steps from 1e-07" in said or "(diverged at" in said
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not work.exists() and not (tmp_path / "work_dirs").exists()
    assert cli.main(["lr-find", *args, "--lr-find.steps", "3"]) == 2
    assert "invalid --lr-find.steps 3" in capsys.readouterr().err


def test_an_auto_lr_run_trains_as_the_run_with_the_found_lr_set_by_hand(cifar_root, tmp_path,
                                                                         capsys, monkeypatch):
    from support import timeless_records

    auto, by_hand = tmp_path / "auto", tmp_path / "by_hand"
    common = ("--sched.epochs", "2", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
              "--data.limit-val", "100", "--data.batch-size", "20", "--log-interval", "2")
    assert cli.main(small_run_args(cifar_root, auto, *common, "--optim.lr", "auto")) == 0
    said = capsys.readouterr().out
    status = json.loads((auto / "status.json").read_text())
    found = status["lr_found"]
    assert f"--optim.lr auto: {found['lr']:.2e} from a range test of 10 steps " \
           f"({found['rule']} rule" in said
    assert json.loads((auto / "config.json").read_text())["optim"]["lr"] == "auto"
    position = load_state(find_states(auto)[-1])["components"]["run"]
    assert position["lr_found"] == found
    assert cli.main(small_run_args(cifar_root, by_hand, *common, "--optim.lr",
                                   repr(found["lr"]))) == 0
    assert timeless_records(auto) == timeless_records(by_hand)
    # resumed: the found LR stays, no second range test
    from convnext_cifar.training import lr_find

    def no_second_test(*a):
        raise AssertionError("ran the range test again")

    monkeypatch.setattr(lr_find, "range_test", no_second_test)
    assert cli.main(small_run_args(cifar_root, auto, *common, "--optim.lr", "auto",
                                   "--sched.epochs", "3", "--resume", "auto",
                                   "--resume-allow-changes")) == 0
    assert validations(auto) == [1, 2, 3]
    assert "--optim.lr auto: " in capsys.readouterr().out


def test_the_report_and_runs_show_the_found_lr_and_the_budget(cifar_root, tmp_path, capsys,
                                                               monkeypatch):
    pytest.importorskip("matplotlib")
    from convnext_cifar.training import budget

    monkeypatch.setattr(budget, "epochs_within", lambda *a: 1)  # not 5 minutes of epochs
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "1",
                                   "--sched.warmup-epochs", "0", "--data.limit-train", "100",
                                   "--data.limit-val", "50", "--optim.lr", "auto",
                                   "--sched.budget", "5m")) == 0
    assert cli.main(["report", str(work), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    assert "Learning rate found by the range test" in page and "Time budget 0:05:00: used" in page
    capsys.readouterr()
    assert cli.main(["runs", str(tmp_path), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert row["lr_found"]["rule"] in ("valley", "rise/10 (no descent)")
    assert row["budget_s"] == 300


def test_a_budgeted_run_that_falls_behind_ends_on_time_with_fewer_epochs(cifar_root, tmp_path,
                                                                        monkeypatch, capsys):
    import time

    from convnext_cifar.training import budget
    from convnext_cifar.training import step as training_step

    monkeypatch.setattr(budget, "epochs_within", lambda *a: 6)  # a plan far too long for 1 s
    real = training_step.TrainStep.__call__

    def slow_step(self, *a):
        time.sleep(0.3)  # a machine slower than... anything: 2 steps an epoch, >= 0.6 s each
        return real(self, *a)

    monkeypatch.setattr(training_step.TrainStep, "__call__", slow_step)
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, *BUDGET[2:], "--sched.budget", "1s")
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    # the pace is known after the 2nd epoch (the 1st pays one-time costs): then over budget
    assert "behind the budget's plan after epoch 2 (" in out and "3 epochs instead of 6" in out
    assert validations(work) == [1, 2, 3]
    status = json.loads((work / "status.json").read_text())
    assert status["status"] == "finished" and status["epochs"] == 3
    plan = load_state(find_states(work)[-1])["components"]["run"]["plan"]
    assert plan["epochs"] == 3 and plan["shortened"] == [{"after_epoch": 2, "epochs": 3}]
    assert cli.main(args + ["--resume", "auto"]) == 0
    assert "is already finished: epoch 3 of 3" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_find_the_same_lr_as_one(cifar_root, tmp_path):
    args = ("--sched.epochs", "1", "--sched.warmup-epochs", "0", "--data.limit-train", "200",
            "--data.limit-val", "100", "--data.batch-size", "20", "--optim.lr", "auto",
            "--model.drop-path-rate", "0")
    one, two = tmp_path / "one", tmp_path / "two"
    assert cli.main(small_run_args(cifar_root, one, *args)) == 0
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node", "2", "-m", "convnext_cifar",
                           *small_run_args(cifar_root, two, *args)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = [json.loads((w / "status.json").read_text())["lr_found"] for w in (one, two)]
    assert found[0]["steps"] == found[1]["steps"] == 10
    assert found[0]["lr"] == pytest.approx(found[1]["lr"], rel=1e-6)


# ---- --data.micro-batch auto -------------------------------------------------------------------

MICRO = ("--sched.epochs", "2", "--sched.warmup-epochs", "1", "--data.limit-train", "100",
         "--data.limit-val", "50", "--data.batch-size", "50", "--data.eval-batch-size", "50",
         "--log-interval", "2", "--aug.randaugment", "rand-m9-n2", "--model.drop-path-rate",
         "0.1")


def out_of_memory_above(monkeypatch, train_rows: int, eval_rows: int):
    """A device that runs out of memory (as a GPU's allocator says it) for training forwards of
    more than `train_rows` images and evaluation forwards of more than `eval_rows`."""
    import torch

    real = torch.nn.Module.__call__  # Conv2d's own, whatever a test put on Conv2d before

    def call(self, x, *args, **kwargs):
        if len(x) > (train_rows if self.training else eval_rows):
            raise torch.OutOfMemoryError(f"CUDA out of memory (injected: {len(x)} images)")
        return real(self, x, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Conv2d, "__call__", call)



def final_weights(work):
    return load_state(find_states(work)[-1])["components"]["model"]


def test_auto_micro_batch_with_an_injected_oom_equals_the_hand_set_micro_batch(
        cifar_root, tmp_path, monkeypatch, capsys):
    """The trial steps leave no trace and evaluation backs off on its own: the auto run equals
    the run with the chosen micro-batch set by hand, bit for bit (records and weights)."""
    from support import timeless_records

    out_of_memory_above(monkeypatch, train_rows=10, eval_rows=20)
    auto, by_hand = tmp_path / "auto", tmp_path / "by_hand"
    assert cli.main(small_run_args(cifar_root, auto, *MICRO, "--data.micro-batch", "auto")) == 0
    out, err = capsys.readouterr()
    assert ("--data.micro-batch auto: 10 images a step, 5 accumulation step(s) per process for "
            "the batch of 50, on cpu ") in out
    assert "; 50, 25 did not fit (out of memory)" in out
    assert "batch 50 (1 process(es) x 10 x 5 steps)" in out
    assert ("evaluation ran out of memory on cpu at 50 images a batch; it goes on in batches "
            "of 25") in err
    status = json.loads((auto / "status.json").read_text())
    assert (status["micro_batch"], status["accum_steps"]) == (10, 5)
    assert json.loads((auto / "config.json").read_text())["data"]["micro_batch"] == "auto"
    choice = load_state(find_states(auto)[-1])["components"]["run"]["micro_batch"]
    assert [t["micro_batch"] for t in choice["tried"]] == [50, 25, 10]
    capsys.readouterr()
    assert cli.main(["runs", str(auto), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)["runs"][0]
    assert (row["micro_batch"], row["accum_steps"]) == (10, 5)
    assert cli.main(["report", str(auto), "--out", str(tmp_path / "r.html")]) == 0
    assert ("Micro-batch chosen (<code>--data.micro-batch auto</code>): 10 images a step, 5 "
            "accumulation step(s) per process.") in (tmp_path / "r.html").read_text()
    assert cli.main(small_run_args(cifar_root, by_hand, *MICRO, "--data.micro-batch", "10")) == 0
    assert timeless_records(auto) == timeless_records(by_hand)
    a, b = final_weights(auto), final_weights(by_hand)
    assert all(torch_equal(a[k], b[k]) for k in a)


def torch_equal(a, b):
    import torch

    return torch.equal(a, b)


@pytest.mark.slow
def test_an_auto_micro_batch_keeps_its_choice_on_resume_and_chooses_again_elsewhere(
        cifar_root, tmp_path, monkeypatch, capsys):
    from support import signal_at_step

    from convnext_cifar.training import micro_batch

    out_of_memory_above(monkeypatch, train_rows=10, eval_rows=100)
    work = tmp_path / "run"
    args = small_run_args(cifar_root, work, *MICRO, "--data.micro-batch", "auto")
    # the trials: a step of 50 (out of memory), of 25 (too), 2 of 10; then 3 of the run
    restore = signal_at_step(monkeypatch, 2 + 3)
    assert cli.main(args) == 143
    restore()
    capsys.readouterr()
    real_choose = micro_batch.choose
    monkeypatch.setattr(micro_batch, "choose", lambda run: pytest.fail("chose again"))
    straight = tmp_path / "straight"
    assert cli.main(args + ["--resume", "auto"]) == 0  # the same device: the choice stays
    assert "--data.micro-batch auto: 10 images a step" in capsys.readouterr().out
    monkeypatch.setattr(micro_batch, "choose", real_choose)
    assert cli.main(small_run_args(cifar_root, straight, *MICRO, "--data.micro-batch",
                                   "auto")) == 0
    from support import timeless_records

    assert timeless_records(work) == timeless_records(straight)  # the resume is bit-exact
    capsys.readouterr()
    # on another device (a bigger one: 25 images fit) the choice is made again, the batch stays
    monkeypatch.setattr(micro_batch, "device_name", lambda run: "another device")
    out_of_memory_above(monkeypatch, train_rows=25, eval_rows=100)
    assert cli.main(args + ["--sched.epochs", "3", "--resume", "auto",
                            "--resume-allow-changes"]) == 0
    out = capsys.readouterr().out
    assert ("--data.micro-batch auto: 25 images a step, 2 accumulation step(s) per process for "
            "the batch of 50, on another device; 50 did not fit (out of memory); chosen again: "
            "the run chose 10 on ") in out
    assert validations(work) == [1, 2, 3]
    position = load_state(find_states(work)[-1])["components"]["run"]
    assert position["micro_batch"]["micro_batch"] == 25
    assert json.loads((work / "status.json").read_text())["accum_steps"] == 2


@pytest.mark.parametrize("option, value, says", [
    ("--data.micro-batch", "7", "invalid --data.micro-batch 7: must divide --data.batch-size 50"),
    ("--data.micro-batch", "-1", "invalid --data.micro-batch -1: must be auto, 0 (off) or at most"),
    ("--data.micro-batch", "some", "--data.micro-batch"),
    ("--data.micro-batch-memory", "-2", "invalid --data.micro-batch-memory -2.0: must be in"),
])
def test_bad_micro_batch_values_are_one_line(cifar_root, tmp_path, capsys, option, value, says):
    assert cli.main(small_run_args(cifar_root, tmp_path / "w", option, value)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and says in err


def test_micro_batch_and_accum_steps_together_are_refused(cifar_root, tmp_path, capsys):
    assert cli.main(small_run_args(cifar_root, tmp_path / "w", "--data.micro-batch", "auto",
                                   "--optim.accum-steps", "2")) == 2
    assert "set it or --data.micro-batch, not both" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_choose_a_micro_batch_together_and_stop_together_when_none_fits(
        cifar_root, tmp_path):
    args = ("--sched.epochs", "1", "--sched.warmup-epochs", "0", "--data.limit-train", "200",
            "--data.limit-val", "100", "--data.batch-size", "20", "--data.micro-batch", "auto")

    def torchrun(work, *extra):
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                               "--nproc-per-node", "2", "-m", "convnext_cifar",
                               *small_run_args(cifar_root, work, *args, *extra)],
                              capture_output=True, text=True, timeout=300)

    proc = torchrun(tmp_path / "fits")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--data.micro-batch auto: 10 images a step, 1 accumulation step(s) per process for " \
           "the batch of 20, on cpu " in proc.stdout
    assert "x 2 process(es)" in proc.stdout
    proc = torchrun(tmp_path / "none", "--data.micro-batch-memory", "0.00001")  # 10 KiB
    assert proc.returncode != 0
    # every rank stops (no rank left waiting in a collective), the main one says why
    assert "--data.micro-batch auto: not even 1 image a step fits cpu (an estimated " \
           in proc.stderr
