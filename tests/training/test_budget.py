"""training/budget.py on its own: the epochs a measured cost fits in a budget (a fake clock),
the warmup scaled with them, the plan read back from a state, durations parsed."""

import pytest

from convnext_cifar.config import SchedConfig, TrainConfig, parse_duration
from convnext_cifar.errors import UserError
from convnext_cifar.presets import CIFAR10Smoke
from convnext_cifar.training import budget
from convnext_cifar.training.budget import Costs, epochs_cost, epochs_within, planned, with_plan


def smoke(**kw) -> TrainConfig:
    import dataclasses

    cfg = CIFAR10Smoke()
    return dataclasses.replace(cfg, **kw)


def test_the_planned_epochs_fit_the_budget_left_after_the_setup():
    cfg = smoke(val_interval=1, ckpt_interval=10, state_interval=1)
    costs = Costs(step_s=0.5, val_s=4.0, state_s=1.0)
    # an epoch of 20 steps: 10 s + a validation 4 s (and the best weights it may write, 1 s)
    # + a state 1 s; a weights file every 10th epoch and after the last, 1 s each
    assert epochs_cost(1, 20, costs, cfg) == 10 + 4 + 1 + 1 + 1
    assert epochs_cost(10, 20, costs, cfg) == 100 + 50 + 10 + 1
    assert epochs_cost(11, 20, costs, cfg) == 110 + 55 + 11 + 2
    assert epochs_within(600.0, 30.0, 20, costs, cfg) == 35  # 35 cost 564, 36 cost 580 > 570
    assert epochs_cost(35, 20, costs, cfg) <= 570 < epochs_cost(36, 20, costs, cfg)
    assert epochs_within(5.0, 30.0, 20, costs, cfg) == 1  # never less than one epoch


def test_validations_every_n_epochs_and_the_last_are_counted():
    cfg = smoke(val_interval=5, ckpt_interval=1000, state_interval=1000)
    costs = Costs(step_s=1.0, val_s=10.0, state_s=0.0)
    assert epochs_cost(7, 1, costs, cfg) == 7 + 2 * 10  # after epoch 5 and the last
    assert epochs_cost(10, 1, costs, cfg) == 10 + 2 * 10


def test_the_warmup_keeps_its_share_and_stays_shorter_than_the_run():
    cfg = smoke(sched=SchedConfig(epochs=100, warmup_epochs=10, budget="1h"))
    assert (planned(cfg, 37).sched.epochs, planned(cfg, 37).sched.warmup_epochs) == (37, 4)
    assert planned(cfg, 1).sched.warmup_epochs == 0
    assert with_plan(cfg, {"epochs": 12}).sched.epochs == 12
    assert with_plan(cfg, None) is cfg
    no_budget = smoke()
    assert with_plan(no_budget, {"epochs": 12}) is no_budget


@pytest.mark.parametrize("text, seconds", [("30m", 1800), ("2h", 7200), ("1h30m", 5400),
                                           ("90s", 90), ("1.5h", 5400), ("45", 2700)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text, says", [("soon", "write a duration such as 30m"),
                                        ("0s", "must be between 1s and a year"),
                                        ("2d", "write a duration")])
def test_a_bad_budget_is_one_line_naming_the_option(text, says):
    with pytest.raises(UserError, match=f"invalid --sched.budget '{text}': {says}"):
        SchedConfig(budget=text)


def test_the_plan_line_says_epochs_end_and_what_is_left():
    plan = {"budget_s": 600.0, "epochs": 37, "step_s": 0.5, "val_s": 4.0, "state_s": 1.0,
            "setup_s": 30.0, "planned_s": 592.0, "started": 0.0}
    cfg = planned(smoke(sched=SchedConfig(epochs=3, warmup_epochs=1, budget="10m")), 37)
    line = budget.plan_line(plan, cfg)
    assert line.startswith("budget 10m00s: 37 epochs planned (warmup 12), expected to end at ")
    assert "500 ms a step, 4.0 s a validation, after 2 untimed warm-up steps (compile excluded)" \
        in line
    assert budget.plan_line(plan, cfg, elapsed_s=270.0) == (
        "resumed within budget 10m00s: the plan of 37 epochs stays; 5m00s of it left")


def test_a_run_behind_its_plan_is_shortened_never_lengthened():
    plan = {"budget_s": 100.0}
    # 4 of 10 epochs done, 60 s used, 10 s an epoch: 6 more would end at 120 s; 4 fit
    assert budget.shortened(plan, 4, 60.0, 10.0, 10) == 8
    assert budget.shortened(plan, 4, 40.0, 10.0, 10) == 10  # on time: the plan stands
    assert budget.shortened(plan, 4, 41.5, 10.0, 10) == 10  # 1.5 % late: within the slack
    assert budget.shortened(plan, 4, 45.0, 10.0, 10) == 9  # 5 % late: one epoch less
    assert budget.shortened(plan, 4, 120.0, 10.0, 10) == 5  # over: one more epoch, the last
    assert budget.shortened(plan, 4, 99.0, 0.0, 10) == 10  # no pace measured
    line = budget.shortened_line(4, 10, 8, 60.0, 100.0)
    assert line == ("behind the budget's plan after epoch 4 (1m00s of 1m40s used): 8 epochs "
                    "instead of 10; the cosine now ends at epoch 8")
