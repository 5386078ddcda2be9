import json
import math
from pathlib import Path

import pytest
import timm
import torch

from convnext_cifar.config import OptimConfig, SchedConfig
from convnext_cifar.optim import build_optimizer, decays, lr_at, param_groups

# A copy of shared/fixtures/mmengine_reference_lr_by_epoch.json: MMEngine's own LR table.
FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_tiny"])
def test_decay_rule_per_parameter(name):
    model = timm.create_model(name, num_classes=10)
    for pname, p in model.named_parameters():
        no_decay = pname.endswith(".bias") or ".norm" in pname or "grn" in pname \
            or pname.startswith("stem.1.") or ".downsample.0." in pname
        assert decays(pname, p) is (not no_decay), pname
    groups = param_groups(model, 0.05)
    assert [g["weight_decay"] for g in groups] == [0.05, 0.0]
    ids = [id(p) for g in groups for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters())  # each param exactly once


def test_optimizer_groups_and_settings():
    model = timm.create_model("convnextv2_atto", num_classes=10)
    opt = build_optimizer(model, OptimConfig(lr=4e-3, weight_decay=0.05), torch.device("cpu"))
    assert isinstance(opt, torch.optim.AdamW)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.05, 0.0]
    grn = model.stages[0].blocks[0].mlp.grn.weight
    assert any(p is grn for p in opt.param_groups[1]["params"])


def test_per_step_schedule_key_points():
    s, spe, lr = SchedConfig(epochs=100, warmup_epochs=10, start_factor=1e-3), 391, 4e-3
    total, warm = 100 * spe, 10 * spe
    assert lr_at(0, lr, s, spe) == pytest.approx(4e-6)
    assert lr_at(warm // 2, lr, s, spe) == pytest.approx(lr * (1e-3 + 0.999 * 0.5))
    assert lr_at(warm, lr, s, spe) == pytest.approx(lr)
    mid = warm + (total - 1 - warm) // 2
    assert lr_at(mid, lr, s, spe) == pytest.approx(lr / 2, rel=1e-3)
    assert lr_at(total - 1, lr, s, spe) == 0.0
    values = [lr_at(t, lr, s, spe) for t in range(total)]
    assert all(a <= b for a, b in zip(values[:warm], values[1:warm + 1]))
    assert all(a >= b for a, b in zip(values[warm:], values[warm + 1:]))
    s_min = SchedConfig(epochs=5, warmup_epochs=0, min_lr=1e-5)
    assert lr_at(0, lr, s_min, 10) == lr and lr_at(49, lr, s_min, 10) == pytest.approx(1e-5)


def test_per_epoch_schedule_reproduces_mmengine_table():
    table = json.loads((FIXTURES / "mmengine_reference_lr_by_epoch.json").read_text())
    expected = table["lr_by_epoch"]
    s, spe = SchedConfig(epochs=100, warmup_epochs=10, start_factor=1e-3, per_epoch=True), 7
    assert len(expected) == 100
    for epoch, want in enumerate(expected):
        for step in (epoch * spe, epoch * spe + spe - 1):  # constant within the epoch
            assert math.isclose(lr_at(step, 4e-3, s, spe), want, rel_tol=1e-12, abs_tol=1e-18)
    assert max(range(100), key=lambda e: expected[e]) == 9  # the peak is at epoch 9, not 10


def test_per_epoch_one_warmup_epoch_follows_mmengine():
    """MMEngine's LinearLR with end=1 gives start_factor x lr in epoch 0 and its cosine then
    continues from there (the table comes from MMEngine itself)."""
    table = json.loads((FIXTURES / "mmengine_lr_warmup1_by_epoch.json").read_text())
    s, spe = SchedConfig(epochs=20, warmup_epochs=1, start_factor=1e-3, per_epoch=True), 3
    got = [lr_at(epoch * spe + 1, 4e-3, s, spe) for epoch in range(20)]
    assert got[0] == pytest.approx(4e-6)
    for mine, want in zip(got, table["lr_by_epoch"], strict=True):
        assert math.isclose(mine, want, rel_tol=1e-9, abs_tol=1e-18)
