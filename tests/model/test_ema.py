"""model/ema.py: the EMA follows timm's formula over the saved weights, and `auto` picks a decay
from the run's length."""


import pytest
import timm
import torch

from convnext_cifar.config import TrainConfig, from_dict
from convnext_cifar.model.ema import ema_lag_warning, ema_schedule


def test_ema_auto_picks_a_tenth_of_the_run_with_warmup():
    assert ema_schedule("auto", 0, 942) == (pytest.approx(1 - 10 / 942), 1)
    assert ema_schedule("auto", 5, 39_100) == (pytest.approx(1 - 10 / 39_100), 5)
    assert ema_schedule("auto", 0, 20) == (0.9, 1)  # clamped
    assert ema_schedule("auto", 0, 10**9) == (0.9999, 1)
    assert ema_schedule(0.999, 0, 942) == (0.999, 0)
    assert ema_lag_warning(0.999, 942) and not ema_lag_warning(0.9999, 39_100)
    assert not ema_lag_warning(0.0, 10)
    assert from_dict(TrainConfig, {"ema": {"decay": "auto"}}).ema.decay == "auto"
    with pytest.raises(Exception, match="ema.decay"):
        from_dict(TrainConfig, {"ema": {"decay": "often"}})


@pytest.mark.parametrize("warmup", [0, 4])
def test_ema_follows_the_formula_over_saved_weights_and_timm(warmup):
    """EMA against a hand-rolled loop over the weights saved after each step, and against
    timm's ModelEmaV3 with the same decay and warmup."""
    import copy

    from timm.utils import ModelEmaV3

    from convnext_cifar.model.ema import ModelEma

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=10)
    ours = ModelEma(model, 0.9, warmup)
    theirs = ModelEmaV3(model, decay=0.9, use_warmup=warmup > 0, warmup_gamma=max(warmup, 1))
    saved = []
    for step in range(1, 9):  # "training": every parameter moves
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
        saved.append({k: v.clone() for k, v in model.state_dict().items()})
        ours.update(model, step)
        theirs.update(model, step=step)
    expected = copy.deepcopy(saved[0])  # step 1: decay 0, a copy
    for t, weights in enumerate(saved[1:], start=1):
        d = 0.9 if not warmup else min(0.9, 1 - (1 + t / warmup) ** (-2 / 3))
        expected = {k: expected[k] * d + weights[k] * (1 - d) for k in expected}
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, expected[k], rtol=1e-5, atol=1e-6)
        assert torch.equal(v, theirs.module.state_dict()[k]), k
    assert ours.module.stem[0].weight.dtype == torch.float32
    assert not any(p.requires_grad for p in ours.module.parameters())
