"""training/lr_find.py on its own: the ramp, the smoothing, both suggestion rules on synthetic
loss curves whose answer is known, and a range test on a tiny run that leaves it untouched."""

import math

import pytest
import torch

from convnext_cifar.config import LrFindConfig
from convnext_cifar.errors import UserError
from convnext_cifar.training.lr_find import (
    ramp,
    range_test,
    smooth,
    steepest,
    suggest,
    suggestion,
    valley,
)


def test_the_ramp_is_exponential_from_start_to_end():
    lrs = ramp(LrFindConfig(start_lr=1e-6, end_lr=1.0, steps=7), 7)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1.0)
    assert all(b / a == pytest.approx(10.0) for a, b in zip(lrs, lrs[1:]))


def test_the_smoothing_is_a_bias_corrected_running_average():
    assert smooth([2.0, 2.0, 2.0], 0.9) == pytest.approx([2.0, 2.0, 2.0])  # no pull to 0
    out = smooth([1.0, 3.0], 0.5)
    assert out == pytest.approx([1.0, (0.5 * 0.5 * 1.0 + 0.5 * 3.0) / (1 - 0.25)])


def synthetic(n=200):
    """A loss flat at 2.3 up to 1e-5, then falling as a logistic in log(LR) centred at 1e-3
    (steepest there) to 0.5, then blowing up past 1e-1: the shape of a real range test."""
    lrs = [10 ** (-7 + 8 * i / (n - 1)) for i in range(n)]
    losses = [2.3 if lr < 1e-5 else  # flat, as a real curve's noise makes it: no descent
              0.5 + 1.8 / (1 + math.exp(3 * (math.log10(lr) + 3)))
              + (50 * (math.log10(lr) + 1) ** 2 if lr > 1e-1 else 0.0) for lr in lrs]
    return lrs, losses


def test_steepest_finds_where_the_loss_falls_fastest():
    lrs, losses = synthetic()
    assert lrs[steepest(lrs, losses)] == pytest.approx(1e-3, rel=0.1)


def test_valley_lies_inside_the_descent_before_the_bottom():
    lrs, losses = synthetic()
    lr = lrs[valley(losses)]
    bottom = lrs[min(range(len(losses)), key=losses.__getitem__)]
    assert 1e-4 < lr < bottom  # past the start of the fall, short of where the loss turns
    assert suggest(lrs, losses, "valley") == lr
    assert suggest(lrs, losses, "steepest") == lrs[steepest(lrs, losses)]


@pytest.fixture
def tiny_run_built():
    from support import random_images, tiny_run

    from convnext_cifar.config import DataConfig, TrainConfig
    from convnext_cifar.runtime import Runtime

    cfg = TrainConfig(data=DataConfig(batch_size=16))
    rt = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)
    images, labels = random_images(64 * 16)
    return tiny_run(rt, images, labels, cfg)


def test_a_range_test_stops_on_divergence_and_leaves_the_run_as_it_was(tiny_run_built):
    run = tiny_run_built
    before = {k: v.clone() for k, v in run.model.state_dict().items()}
    first = next(run.loader.epoch(0))[0].clone()  # each epoch's draws start from the seed
    result = range_test(run, LrFindConfig(start_lr=1e-5, end_lr=1e4, steps=40, smoothing=0.5))
    assert result.stopped == "diverged" and len(result.lrs) < 40
    assert result.lrs[0] == pytest.approx(1e-5) and 1e-6 <= result.suggestion <= result.lrs[-1]
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert not run.step_fn.optimizer.state  # the moments were never kept
    assert torch.equal(next(run.loader.epoch(0))[0], first)


@pytest.mark.parametrize("kwargs, says", [
    ({"start_lr": 1.0, "end_lr": 0.1}, "invalid --lr-find.start-lr 1.0: must be > 0 and below"),
    ({"steps": 2}, "invalid --lr-find.steps 2"),
    ({"smoothing": 1.0}, "invalid --lr-find.smoothing 1.0"),
    ({"diverge": 1.0}, "invalid --lr-find.diverge 1.0"),
])
def test_bad_values_are_one_line(kwargs, says):
    with pytest.raises(UserError, match=says):
        LrFindConfig(**kwargs)


def test_a_curve_that_never_descends_gets_a_tenth_of_where_it_rises():
    """A model from scratch on a short ramp: flat, then up. Neither rule has a descent to
    read (valley would pick noise in the flat part); a tenth of the rise's LR instead."""
    lrs = [10 ** (-7 + 8 * i / 99) for i in range(100)]
    losses = [2.3 + (0.0 if lr < 1e-2 else 5 * (math.log10(lr) + 2.05)) for lr in lrs]
    value, rule = suggestion(lrs, losses, smooth(losses, 0.9), "valley")
    first_rise = next(lr for lr, loss in zip(lrs, losses) if loss > 1.1 * 2.3)
    assert rule == "rise/10 (no descent)" and value == pytest.approx(first_rise / 10)
    lrs, losses = synthetic()  # a curve that does descend keeps the chosen rule
    assert suggestion(lrs, losses, losses, "valley") == (suggest(lrs, losses, "valley"),
                                                          "valley")
