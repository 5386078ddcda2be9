"""model/optim.py: the decay rule, AdamW groups and layer-wise scales, and the LR schedule
(per step, and per epoch exactly as MMEngine's table)."""

import copy
import json
import math

import pytest
import timm
import torch
from support import TESTS

from convnext_cifar.config import OptimConfig, SchedConfig
from convnext_cifar.model.optim import build_optimizer, decays, lr_at, param_groups, set_lr

# A copy of shared/fixtures/mmengine_reference_lr_by_epoch.json: MMEngine's own LR table.
FIXTURES = TESTS / "fixtures"


def official_layer_id_single(var_name, depths):
    """facebookresearch/ConvNeXt-V2 optim_factory.get_num_layer_for_convnext_single, on the
    official parameter names (typed from that file)."""
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split(".")[1])
        return sum(depths[:stage_id]) + 1
    if var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return sum(depths[:stage_id]) + block_id + 1
    return sum(depths) + 1


def official_layer_id_group(var_name):
    """The same file's get_num_layer_for_convnext (12 groups, Base and larger)."""
    if var_name.startswith("downsample_layers"):
        stage_id = int(var_name.split(".")[1])
        return {0: 0, 1: 2, 2: 3, 3: 12}[stage_id]
    if var_name.startswith("stages"):
        stage_id, block_id = int(var_name.split(".")[1]), int(var_name.split(".")[2])
        return {0: 1, 1: 2, 2: 3 + block_id // 3, 3: 12}[stage_id]
    return 13


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


@pytest.mark.parametrize("kind", ["single", "group"])
def test_layer_ids_and_lr_scales_of_every_tiny_parameter(kind):
    from layouts import to_official

    from convnext_cifar.model.optim import layer_id

    model = timm.create_model("convnextv2_tiny", num_classes=10)
    depths = [3, 3, 9, 3]
    names = list(dict(model.named_parameters()))
    official = list(to_official({n: torch.zeros(1, 1) for n in names}))  # same order
    assert len(official) == len(names)
    groups = param_groups(model, 0.05, layer_decay=0.9, layer_decay_type=kind)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    top = 18 if kind == "single" else 12
    for (name, p), theirs in zip(model.named_parameters(), official):
        want = (official_layer_id_single(theirs, depths) if kind == "single"
                else official_layer_id_group(theirs))
        assert layer_id(name, depths, kind) == want, (name, theirs)
        assert scale_of[id(p)] == pytest.approx(0.9 ** (top + 1 - want)), name
        assert decay_of[id(p)] == (0.05 if decays(name, p) else 0.0), name
    assert sorted(scale_of) == sorted(id(p) for p in model.parameters())  # each exactly once
    if kind == "single":  # pinned: stem 1, stage-2 block 4 = 3+3+4+1, head 19 (full LR)
        assert layer_id("stem.0.weight", depths) == 1
        assert layer_id("stages.2.blocks.4.mlp.fc1.weight", depths) == 11
        assert layer_id("head.fc.weight", depths) == 19
        assert scale_of[id(model.head.fc.weight)] == 1.0
        assert scale_of[id(model.stem[0].weight)] == pytest.approx(0.9 ** 18)


def test_schedule_lr_is_multiplied_by_each_groups_scale():
    from convnext_cifar.model.optim import set_lr

    model = timm.create_model("convnextv2_atto", num_classes=10)
    opt = build_optimizer(model, OptimConfig(layer_decay=0.5), torch.device("cpu"))
    set_lr(opt, 1e-3)
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    plain = build_optimizer(model, OptimConfig(), torch.device("cpu"))
    set_lr(plain, 1e-3)
    assert [g["lr"] for g in plain.param_groups] == [1e-3, 1e-3]  # the reference: 2 groups


def test_one_pass_adamw_is_torchs_adamw_over_every_group():
    from convnext_cifar.model.optim import OnePassAdamW

    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=10)
    cfg = OptimConfig(lr=4e-3, weight_decay=0.05, layer_decay=0.8)
    twin = copy.deepcopy(model)
    ours = build_optimizer(model, cfg, torch.device("cpu"), one_pass=True)
    theirs = build_optimizer(twin, cfg, torch.device("cpu"), one_pass=False)
    assert isinstance(ours, OnePassAdamW) and len(ours.param_groups) > 20
    for step in range(4):
        set_lr(ours, 1e-3 * (step + 1))
        set_lr(theirs, 1e-3 * (step + 1))
        for a, b in zip(model.parameters(), twin.parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        ours.step()
        theirs.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # the same state layout: a state of one continues in the other
    theirs.load_state_dict(ours.state_dict())
    for p in twin.parameters():
        p.grad = torch.ones_like(p)
    theirs.step()


def _conv_and_grads(memory_format):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4), torch.nn.Conv2d(8, 4, 1))
    model = model.to(memory_format=memory_format)
    x = torch.randn(2, 3, 8, 8).contiguous(memory_format=memory_format)
    return model, x


def _step(model, optimizer, x):
    optimizer.zero_grad()
    model(x).square().sum().backward()
    optimizer.step()


def test_a_state_saved_in_channels_last_loads_in_each_parameters_layout():
    """A resume that toggles --channels-last: the moments follow the parameters' layout, so the
    next (fused) step is the one a state of the matching layout gives."""
    cfg, cpu = OptimConfig(lr=0.1, weight_decay=0.0), torch.device("cpu")
    saved, x = _conv_and_grads(torch.channels_last)
    optimizer = build_optimizer(saved, cfg, cpu)
    _step(saved, optimizer, x)
    state = optimizer.state_dict()
    matching = copy.deepcopy(state)  # the same state, written in the contiguous layout
    for moments in matching["state"].values():
        for key in ("exp_avg", "exp_avg_sq"):
            moments[key] = moments[key].contiguous()
    results = []
    for loaded_state in (state, matching):
        model, _ = _conv_and_grads(torch.contiguous_format)
        model.load_state_dict(saved.state_dict())
        resumed = build_optimizer(model, cfg, cpu)
        resumed.load_state_dict(loaded_state)
        for p in model.parameters():
            assert all(resumed.state[p][k].stride() == p.stride() for k in ("exp_avg",
                                                                             "exp_avg_sq"))
        _step(model, resumed, x.contiguous())
        results.append([p.detach().clone() for p in model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("saved_one_pass", [False, True])
def test_a_state_of_the_other_kind_of_adamw_runs_as_this_optimizer_does(saved_one_pass):
    """fused -> OnePass and OnePass -> fused: each keeps its own run flags and `step` where it
    needs it (torch's load takes the saved flags), and continues as the writer would have."""
    cfg, cpu = OptimConfig(lr=0.1), torch.device("cpu")
    writer_model, x = _conv_and_grads(torch.contiguous_format)
    writer = build_optimizer(writer_model, cfg, cpu, one_pass=saved_one_pass)
    _step(writer_model, writer, x)
    model = copy.deepcopy(writer_model)
    reader = build_optimizer(model, cfg, cpu, one_pass=not saved_one_pass)
    reader.load_state_dict(copy.deepcopy(writer.state_dict()))  # as read from a file
    for group in reader.param_groups:
        assert bool(group.get("fused")) is saved_one_pass  # the reader's own kind
        assert bool(group.get("foreach")) is not saved_one_pass
        for p in group["params"]:
            step = reader.state[p]["step"]
            assert step.dtype == torch.float32 and step.device == p.device and step.item() == 1
    _step(writer_model, writer, x)
    _step(model, reader, x)
    for a, b in zip(writer_model.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.cuda
@needs_cuda
def test_cuda_step_lives_where_each_kind_of_adamw_keeps_it_across_a_load():
    """On a GPU the fused kernel needs `step` on the device, OnePass reads it on the host."""
    cfg, cuda = OptimConfig(lr=0.1), torch.device("cuda")
    for saved_one_pass in (False, True):
        writer_model, x = _conv_and_grads(torch.contiguous_format)
        writer_model, x = writer_model.to(cuda), x.to(cuda)
        writer = build_optimizer(writer_model, cfg, cuda, one_pass=saved_one_pass)
        _step(writer_model, writer, x)
        model = copy.deepcopy(writer_model)
        reader = build_optimizer(model, cfg, cuda, one_pass=not saved_one_pass)
        reader.load_state_dict(copy.deepcopy(writer.state_dict()))
        want = cuda if saved_one_pass else torch.device("cpu")  # the reader is fused or OnePass
        assert all(s["step"].device.type == want.type for s in reader.state.values())
        _step(writer_model, writer, x)
        _step(model, reader, x)
        for a, b in zip(writer_model.parameters(), model.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@needs_cuda
def test_cuda_one_pass_adamw_is_foreach_adamw_after_a_compiled_step():
    cuda = torch.device("cuda")
    results = []
    for one_pass in (True, False):
        torch.manual_seed(0)
        model = timm.create_model("convnextv2_atto", num_classes=10).to(cuda)
        optimizer = (build_optimizer(model, OptimConfig(lr=1e-3, layer_decay=0.9), cuda,
                                     one_pass=True) if one_pass else torch.optim.AdamW(
            param_groups(model, 0.05, 0.9), lr=1e-3, foreach=True))
        forward = torch.compile(model)
        x = torch.randn(8, 3, 32, 32, device=cuda)
        for _ in range(3):
            set_lr(optimizer, 1e-3)
            optimizer.zero_grad()
            forward(x).square().mean().backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_one_pass_only_on_a_gpu_with_layer_groups_and_never_under_fp16_scaling():
    from convnext_cifar.model.optim import use_one_pass

    assert use_one_pass("cuda", 38, scaled=False)
    assert not use_one_pass("cuda", 38, scaled=True)  # fused skips an inf step on the device
    assert not use_one_pass("cuda", 2, scaled=False) and not use_one_pass("cpu", 38, False)
