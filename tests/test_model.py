import os
import pickle

import pytest
import timm
import torch
from safetensors.torch import save_file

from convnext_cifar.config import ModelConfig
from convnext_cifar.errors import UserError
from convnext_cifar.formats import read_file
from convnext_cifar.model import build_model, load_backbone


def _source(name="convnextv2_atto", num_classes=1000, seed=1):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes).state_dict()


def _backbone_equal(model, sd):
    own = model.state_dict()
    return all(torch.equal(own[k], sd[k].reshape(own[k].shape))
               for k in own if not k.startswith("head."))


def test_build_fresh_model_with_class_count_and_drop_path():
    m = build_model(ModelConfig(name="convnextv2_atto", drop_path_rate=0.2), 10)
    assert m.head.fc.weight.shape == (10, 320)
    assert m.stages[3].blocks[1].drop_path.drop_prob == pytest.approx(0.2)
    assert build_model(ModelConfig(), 10).head.fc.in_features == 768  # Tiny's feature width


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_timm_file_loads_backbone_and_replaces_head(tmp_path, capsys, suffix):
    sd = _source()
    path = tmp_path / f"w{suffix}"
    if suffix == ".safetensors":
        save_file(sd, path)
    else:
        torch.save({"state_dict": sd, "epoch": 3}, path)  # timm train.py's container
    m = build_model(ModelConfig(name="convnextv2_atto", pretrained=str(path)), 10)
    assert _backbone_equal(m, sd)
    assert torch.equal(m.head.norm.weight, sd["head.norm.weight"])
    line = capsys.readouterr().out.strip()
    assert line.count("\n") == 0 and "fresh: head.fc.weight, head.fc.bias;" in line


@pytest.fixture
def hub_reachable(monkeypatch):
    from convnext_cifar import model

    monkeypatch.setattr(model, "reachable", lambda address, timeout: True)


def test_hub_tag_goes_through_timm_and_reports_fresh_norm_and_head(monkeypatch, capsys,
                                                                    hub_reachable):
    import timm.models._builder as builder

    sd = {k: v for k, v in _source().items() if not k.startswith("head.")}  # FCMAE: no head
    sd = {k: (v.flatten(1) if k.endswith(("fc1.weight", "fc2.weight")) else v)
          for k, v in sd.items()}  # Linear-shaped MLP, as larger variants and FB files have it
    calls = []
    monkeypatch.setattr(builder, "load_state_dict_from_hf",
                        lambda *a, **k: calls.append(a) or dict(sd))
    m = build_model(ModelConfig(name="convnextv2_atto", pretrained="convnextv2_atto.fcmae"), 10)
    assert calls and "convnextv2_atto.fcmae" in calls[0][0]
    assert _backbone_equal(m, sd)
    out = capsys.readouterr().out
    assert "fresh: head.norm.weight, head.norm.bias, head.fc.weight, head.fc.bias" in out


def test_hub_errors_are_user_errors(monkeypatch, hub_reachable):
    import timm.models._builder as builder

    def offline(*a, **k):
        raise OSError("no network")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    with pytest.raises(UserError, match="internet"):
        build_model(ModelConfig(name="convnextv2_atto", pretrained="convnextv2_atto.fcmae"), 10)
    with pytest.raises(UserError, match="neither an existing file nor a timm"):
        build_model(ModelConfig(name="convnextv2_atto", pretrained="convnextv2_atto.nope"), 10)
    with pytest.raises(UserError, match="is for convnextv2_tiny"):
        build_model(ModelConfig(name="convnextv2_atto", pretrained="convnextv2_tiny.fcmae"), 10)


def test_weights_of_another_architecture_are_an_error_naming_keys():
    m = timm.create_model("convnextv2_atto", num_classes=10)
    with pytest.raises(UserError, match="shape stem.0.weight"):
        load_backbone(m, _source("convnextv2_femto"))
    partial = {k: v for k, v in _source().items() if "stages.3" not in k}
    with pytest.raises(UserError, match="missing stages.3"):
        load_backbone(m, partial)


def test_ignored_keys_are_reported():
    m = timm.create_model("convnextv2_atto", num_classes=10)
    report = load_backbone(m, {**_source(), "decoder.weight": torch.zeros(3)})
    assert report.ignored == ["decoder.weight"] and "ignored: decoder.weight" in str(report)


def test_bad_weight_files(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.pth"  # torch.save's zip format
    torch.save({"state_dict": _source(), "hook": Payload()}, evil)
    with pytest.raises(UserError, match=r"\(posix.system\); refused, nothing in it was run"):
        read_file(evil)
    legacy = tmp_path / "legacy.pth"  # a plain pickle
    with open(legacy, "wb") as f:
        pickle.dump({"state_dict": Payload()}, f)
    with pytest.raises(UserError, match="refused, nothing in it was run"):
        read_file(legacy)
    assert not marker.exists()
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(UserError, match="empty"):
        read_file(empty)
    save_file(_source(), tmp_path / "ok.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes((tmp_path / "ok.safetensors").read_bytes()[:5000])
    with pytest.raises(UserError, match="not a readable safetensors"):
        read_file(cut)
    with pytest.raises(UserError, match="does not exist"):
        read_file(tmp_path / "nope.pth")
    with pytest.raises(UserError, match="directory"):
        read_file(tmp_path)


HUB_RUN = ("import sys, time; from convnext_cifar.config import ModelConfig\n"
           "from convnext_cifar.model import build_model\nt = time.monotonic()\n"
           "try:\n    build_model(ModelConfig(name='convnextv2_atto', "
           "pretrained='convnextv2_atto.fcmae'), 10)\n"
           "except Exception as e:\n    print(type(e).__name__, e)\n"
           "print(f'seconds {time.monotonic() - t:.1f}')")


@pytest.mark.parametrize("env", [
    {"HF_HUB_OFFLINE": "1"},  # the user says so
    pytest.param({"HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing answers: treated as offline
                 marks=pytest.mark.slow),
])
def test_offline_hub_fails_fast_with_one_clear_error(tmp_path, env):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", HUB_RUN], capture_output=True, text=True,
                         env={**os.environ, "HF_HOME": str(tmp_path), **env}, timeout=120)
    assert "UserError could not fetch pretrained weights convnextv2_atto.fcmae" in out.stdout
    assert "needs internet access, or pass a local file" in out.stdout
    assert float(out.stdout.split("seconds ")[1]) < 5.0, out.stdout
    assert "Retrying" not in out.stderr


def test_an_unanswering_hub_is_given_up_on_within_the_probe_time(monkeypatch):
    import socket
    import threading
    import time

    from convnext_cifar import model

    released = threading.Event()

    def hangs(address, timeout=None):  # a black-holed network: no answer, no refusal
        released.wait(30)
        raise OSError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    start = time.monotonic()
    assert not model.reachable("https://huggingface.co", 0.5)
    assert time.monotonic() - start < 1.5
    released.set()


@pytest.mark.parametrize("warmup", [0, 4])
def test_ema_follows_the_formula_over_saved_weights_and_timm(warmup):
    """EMA against a hand-rolled loop over the weights saved after each step, and against
    timm's ModelEmaV3 with the same decay and warmup."""
    import copy

    from timm.utils import ModelEmaV3

    from convnext_cifar.model import ModelEma

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


def test_head_init_scale_scales_only_a_fresh_head():
    torch.manual_seed(3)
    plain = build_model(ModelConfig(name="convnextv2_atto"), 10)
    torch.manual_seed(3)
    scaled = build_model(ModelConfig(name="convnextv2_atto", head_init_scale=0.001), 10)
    torch.testing.assert_close(scaled.head.fc.weight, plain.head.fc.weight * 0.001)
    torch.testing.assert_close(scaled.stem[0].weight, plain.stem[0].weight)
