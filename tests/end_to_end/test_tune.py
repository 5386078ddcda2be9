"""End to end: `tune` checks its space, runs trials as runs, prunes, shares a study between
processes and survives a kill -9 mid-trial."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

from convnext_cifar import cli

optuna = pytest.importorskip("optuna")


def tune_args(root, work, *extra):
    """A tiny study: atto, 100 images, 2 epochs a trial."""
    return ["tune", "--preset", "smoke", "--data.root", str(root), "--data.no-download",
            "--device", "cpu", "--compile", "off", "--data.limit-train", "100",
            "--data.limit-val", "60", "--data.batch-size", "50", "--sched.epochs", "2",
            "--sched.warmup-epochs", "0", "--log-interval", "1", "--work-dir", str(work), *extra]


def study_of(work):
    return optuna.load_study(study_name="convnextv2-atto_cifar10-smoke",
                             storage=f"sqlite:///{work / 'study.db'}")


def _tune_process(root, work, trials, log):
    return subprocess.Popen([sys.executable, "-m", "convnext_cifar", *tune_args(
        root, work, "--tune.trials", str(trials), "--tune.space", "optim.lr=log(1e-4,1e-2)",
        "--tune.sampler", "random", "--tune.pruner", "none", "--sched.epochs", "3")],
        stdout=log, stderr=subprocess.STDOUT)


def _wait_for(work, pattern, seconds=600):
    """Until a file matching `pattern` is in `work` (a trial has written a state)."""
    start = time.monotonic()
    while not list(work.glob(pattern)) and time.monotonic() - start < seconds:
        time.sleep(0.05)


@pytest.mark.parametrize(("space", "message"), [
    ("optim.lrr=log(1e-4,1e-2)", "optim.lrr is not a train option"),
    ("optim.lr", "write KEY=SPEC"),
    ("optim.lr=between(1,2)", "is not log(a,b), uniform(a,b), int(a,b) or choice"),
    ("optim.lr=log(0,1)", "log() needs low > 0"),
    ("optim.lr=uniform(0.1,0.01)", "the range needs low < high"),
    ("optim.lr=log(1e-4)", "takes two numbers"),
    ("sched.epochs=uniform(1,3)", "sched.epochs is a int, not a float"),
    ("aug.randaugment=int(1,3)", "not an int"),
    ("eval.tta=choice(none,sideways)", "'sideways' is not a valid"),
    ("data.flip-prob=uniform(0.5,2)", "data.flip_prob"),
    ("seed=int(0,3)", "cannot be searched"),
    # every value the study may draw is checked as the run would (these passed, then failed
    # in a trial): an int range inside its ends, a weights file that is not there
    ("optim.accum-steps=int(2,4)", "optim.accum_steps: 3: invalid --optim.accum-steps 3: must "
                                   "divide --data.batch-size 50"),
    ("model.pretrained=choice(none,/no/such.pth)", "model.pretrained: '/no/such.pth': weights "
                                                  "file /no/such.pth does not exist"),
])
def test_a_bad_space_is_one_line_before_anything_runs(space, message, cifar_root, tmp_path,
                                                      capsys):
    work = tmp_path / "study"
    assert cli.main(tune_args(cifar_root, work, "--tune.trials", "2", "--tune.space",
                              space)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (work / "study.db").exists()


@pytest.mark.slow  # three trials and a training, ~16 s
def test_a_study_runs_its_trials_as_runs_and_writes_a_best_config_that_trains(
        cifar_root, tmp_path, capsys):
    work = tmp_path / "study"
    base = tune_args(cifar_root, work, "--tune.sampler", "random")
    assert cli.main(base + ["--tune.trials", "3", "--tune.space", "optim.lr=log(5e-4,5e-3)",
                            "--tune.space", "model.drop-path-rate=choice(0.0,0.1)"]) == 0
    out = capsys.readouterr().out
    trials = study_of(work).get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["optim.lr"] for t in trials}) == 3
    for t in trials:  # each an ordinary run, its config the trial's values
        config = json.loads((work / f"trial-{t.number}" / "config.json").read_text())
        assert config["optim"]["lr"] == t.params["optim.lr"]
        assert config["model"]["drop_path_rate"] == t.params["model.drop_path_rate"]
        records = [json.loads(x) for x in (work / f"trial-{t.number}" / "metrics.jsonl")
                   .read_text().splitlines()]
        assert t.value == max(r["top1"] for r in records if "top1" in r)
        assert t.intermediate_values == {r["epoch"]: r["top1"] for r in records if "top1" in r}
        assert len(list((work / f"trial-{t.number}").glob("state_*.pt"))) == 1  # the last
    best = max(trials, key=lambda t: t.value)
    assert f"best: trial {best.number}, top1 {best.value:.2f}" in out
    saved = json.loads((work / "best_config.json").read_text())
    assert saved["optim"]["lr"] == best.params["optim.lr"] and saved["work_dir"] is None
    # the table again, without running anything; runs and the best config work on it
    assert cli.main(base + ["--tune.trials", "0"]) == 0
    listed = capsys.readouterr().out
    assert "3 trials: 3 complete, 0 pruned, 0 failed" in listed
    assert listed.index(f"trial {best.number:3d}") < min(
        listed.index(f"trial {t.number:3d}") for t in trials if t is not best)
    assert cli.main(["runs", str(work), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["runs"]) == 3
    assert cli.main(["train", "--config", str(work / "best_config.json"), "--work-dir",
                     str(tmp_path / "best"), "--sched.epochs", "1"]) == 0


@pytest.mark.slow  # ~20 s: five trainings
def test_the_median_pruner_stops_a_trial_with_an_absurd_learning_rate(cifar_root, tmp_path,
                                                                       capsys):
    work = tmp_path / "study"
    base = tune_args(cifar_root, work, "--sched.epochs", "3")
    assert cli.main(base + ["--tune.trials", "2", "--tune.space", "optim.lr=log(2e-3,3e-3)"]) == 0
    assert cli.main(base + ["--tune.trials", "3", "--tune.space", "optim.lr=log(0.8,0.9)"]) == 0
    trials = study_of(work).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    assert len(trials[2].intermediate_values) < 3  # stopped before its last epoch
    status = json.loads((work / "trial-2" / "status.json").read_text())
    assert status["status"] == "pruned" and "trial 2: pruned" in capsys.readouterr().out


@pytest.mark.slow
def test_two_processes_share_one_study_and_make_n_trials_in_all(cifar_root, tmp_path):
    work = tmp_path / "study"
    with open(tmp_path / "a.log", "w") as a, open(tmp_path / "b.log", "w") as b:
        procs = [_tune_process(cifar_root, work, 5, a), _tune_process(cifar_root, work, 5, b)]
        assert [p.wait(timeout=900) for p in procs] == [0, 0]
    trials = study_of(work).get_trials()
    assert len(trials) == 5 and all(t.state.name == "COMPLETE" for t in trials)
    assert len({t.params["optim.lr"] for t in trials}) == 5
    ran = [len(re.findall(r"^trial \d+: top1 ", (tmp_path / n).read_text(), re.M))
           for n in ("a.log", "b.log")]
    assert sum(ran) == 5 and min(ran) >= 1  # both worked, no trial twice


@pytest.mark.slow
def test_kill_9_mid_trial_and_rerun_completes_the_study_with_n_trials(cifar_root, tmp_path):
    work = tmp_path / "study"
    with open(tmp_path / "first.log", "w") as log:
        proc = _tune_process(cifar_root, work, 3, log)
        _wait_for(work, "trial-1/state_*.pt")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert study_of(work).get_trials()[1].state.name == "RUNNING"
    with open(tmp_path / "second.log", "w") as log:
        assert _tune_process(cifar_root, work, 3, log).wait(timeout=900) == 0
    out = (tmp_path / "second.log").read_text()
    assert "trial 1: its process died; resuming it from its own training state" in out
    assert "resumed from" in out and f"{work}/trial-1/state_" in out
    trials = study_of(work).get_trials()
    assert len(trials) == 3 and all(t.state.name == "COMPLETE" for t in trials)
    assert list(trials[1].intermediate_values) == [1, 2, 3]  # every epoch reported once


def _study_with(work, *trials):
    """The study `tune_args` would open, made here with `trials`: (state, value, host); a
    trial's folder is not made (as if deleted by hand)."""
    from optuna.distributions import FloatDistribution
    from optuna.trial import TrialState

    work.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(study_name="convnextv2-atto_cifar10-smoke", direction="maximize",
                                storage=f"sqlite:///{work / 'study.db'}")
    for state, value, host in trials:
        trial = study.ask({"optim.lr": FloatDistribution(1e-4, 1e-2, log=True)})
        trial.set_user_attr("host", host)
        if state != TrialState.RUNNING:
            study.tell(trial, value, state=state)
    return study


def test_a_running_trial_of_this_host_whose_folder_is_gone_is_marked_failed(cifar_root,
                                                                             tmp_path, capsys):
    import socket

    from optuna.trial import TrialState

    work = tmp_path / "study"
    _study_with(work, (TrialState.RUNNING, None, socket.gethostname()),
                (TrialState.RUNNING, None, "another-host"))
    assert cli.main(tune_args(cifar_root, work, "--tune.trials", "2", "--tune.space",
                              "optim.lr=log(1e-4,1e-2)")) == 0
    out = capsys.readouterr().out
    assert f"trial 0: failed (its folder {work / 'trial-0'} is gone)" in out
    trials = study_of(work).get_trials()
    assert [t.state.name for t in trials] == ["FAIL", "RUNNING"]  # the other host's: its own
    assert "is gone" in trials[0].user_attrs["error"]
    assert "2 trials: 0 complete, 0 pruned, 1 failed, 1 running" in out


def test_a_best_trial_whose_folder_is_gone_still_gives_a_best_config(cifar_root, tmp_path,
                                                                     capsys):
    from optuna.trial import TrialState

    work = tmp_path / "study"
    study = _study_with(work, (TrialState.COMPLETE, 71.5, "h"), (TrialState.COMPLETE, 60.0, "h"))
    lr = study.get_trials()[0].params["optim.lr"]
    assert cli.main(tune_args(cifar_root, work, "--tune.trials", "2", "--tune.space",
                              "optim.lr=log(1e-4,1e-2)")) == 0
    out = capsys.readouterr().out
    assert "trial 0's config.json is gone; best_config.json is built from the study's values" in out
    assert "best: trial 0, top1 71.50" in out
    saved = json.loads((work / "best_config.json").read_text())
    assert saved["optim"]["lr"] == lr and saved["work_dir"] is None
    assert saved["data"]["limit_train"] == 100  # this command's other options


@pytest.mark.slow  # ~15 s: two short trainings
def test_a_trial_folder_deleted_while_it_trains_fails_that_trial_and_the_study_goes_on(
        cifar_root, tmp_path):
    work = tmp_path / "study"
    with open(tmp_path / "log", "w") as log:
        proc = _tune_process(cifar_root, work, 2, log)
        _wait_for(work, "trial-0/state_*.pt")
        for _ in range(100):  # the trial writes into it meanwhile: remove until it is gone
            shutil.rmtree(work / "trial-0", ignore_errors=True)
            if not (work / "trial-0").exists():
                break
        assert proc.wait(timeout=900) == 0
    out = (tmp_path / "log").read_text()
    assert f"trial 0: failed (its folder {work / 'trial-0'} was removed while it ran)" in out
    assert "Traceback" not in out
    assert [t.state.name for t in study_of(work).get_trials()] == ["FAIL", "COMPLETE"]
    assert json.loads((work / "best_config.json").read_text())["name"]
