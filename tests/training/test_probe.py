"""training/probe.py on its own: steps taken inside `restored` leave the weights, the optimizer
(its moments and step counts), the random streams and the EMA as they were, even on an error."""

import random

import pytest
import torch
from support import random_images, tiny_run

from convnext_cifar.config import DataConfig, TrainConfig
from convnext_cifar.model.ema import ModelEma
from convnext_cifar.runtime import Runtime
from convnext_cifar.training.probe import restored, touched

CPU = Runtime(torch.device("cpu"), "fp32", compile=False, channels_last=True)


def a_run():
    run = tiny_run(CPU, *random_images(64), TrainConfig(data=DataConfig(batch_size=16)))
    run.ema = ModelEma(run.model, 0.9)
    return run


def steps(run, count=2):
    for i, (x, y, n) in enumerate(run.loader.epoch(0)):
        run.step_fn(x, y, n)
        run.ema.update(run.model, i + 1)
        if i + 1 == count:
            break


def test_what_a_step_touches_is_named():
    assert set(touched(a_run())) == {"model", "optimizer", "scaler", "rng", "loader", "ema"}


def test_steps_inside_leave_no_trace():
    run = a_run()
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    ema = {k: v.clone() for k, v in run.ema.state_dict().items()}
    torch_rng, python_rng = torch.get_rng_state(), random.getstate()
    with restored(touched(run)) as cost:
        steps(run)
        torch.rand(3), random.random()
        assert not all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())
    assert cost[0] >= 0
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())
    assert all(torch.equal(ema[k], v) for k, v in run.ema.state_dict().items())
    assert not run.step_fn.optimizer.state
    assert torch.equal(torch.get_rng_state(), torch_rng) and random.getstate() == python_rng


def test_an_error_inside_still_restores():
    run = a_run()
    weights = {k: v.clone() for k, v in run.model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"), restored(touched(run)):
        steps(run, 1)
        raise RuntimeError("boom")
    assert all(torch.equal(weights[k], v) for k, v in run.model.state_dict().items())


def test_the_run_afterwards_equals_one_that_never_probed():
    probed, plain = a_run(), a_run()
    with restored(touched(probed)):
        steps(probed, 3)
    steps(probed)
    steps(plain)
    assert all(torch.equal(a, b) for a, b in zip(probed.model.state_dict().values(),
                                                  plain.model.state_dict().values()))
