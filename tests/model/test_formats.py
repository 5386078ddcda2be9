"""model/formats.py: MMPretrain, official ConvNeXt-V2 and timm checkpoints read safely into
timm's layout, checked against the upstream files and their outputs (tests/fixtures/)."""

import hashlib
import pickle
import re

import pytest
import timm
import torch
from layouts import to_mmpretrain, to_official, to_official_fcmae_raw
from safetensors.torch import load_file
from support import FIXTURES

from convnext_cifar.errors import UserError
from convnext_cifar.files import load_pth
from convnext_cifar.model.build import load_backbone
from convnext_cifar.model.formats import infer_variant, load_source, to_timm

HEAD = ["head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"]


def fixture_model():
    io = torch.load(FIXTURES / "io.pt", weights_only=True)
    dims = tuple(io["dims"].tolist())
    return timm.create_model("convnextv2_atto", num_classes=10, dims=dims).eval(), io


def test_fixtures_are_the_upstream_files():
    table = re.findall(r"\| `(\w+\.\w+)` \| [\d,]+ \| `([0-9a-f]{64})` \|",
                       (FIXTURES / "README.md").read_text())
    assert len(table) == 6
    for name, sha in table:
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == sha, name


@pytest.mark.parametrize("name, layout, logits", [
    ("mmpretrain_full.pth", "mmpretrain", "logits_mmpretrain"),
    ("official_fb.pth", "official", "logits_official"),
    ("timm_reference.safetensors", "timm", "logits_timm"),
])
def test_full_checkpoints_give_the_upstream_logits(name, layout, logits):
    model, io = fixture_model()
    source = load_source(str(FIXTURES / name))
    assert source.layout == layout
    report = load_backbone(model, source.state_dict, source.ignored)
    assert report.fresh == [] and len(report.tensors) == len(model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(io["x"]), io[logits], atol=1e-5, rtol=0)
        torch.testing.assert_close(model(io["x"]), io["logits_mmpretrain"], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["mmpretrain_backbone.pth", "official_fcmae_backbone.pth"])
def test_backbone_files_give_the_upstream_features_and_leave_norm_and_head_fresh(name):
    model, io = fixture_model()
    source = load_source(str(FIXTURES / name))
    report = load_backbone(model, source.state_dict, source.ignored)
    assert sorted(report.fresh) == sorted(HEAD)
    with torch.no_grad():
        pooled = model.forward_features(io["x"]).mean((2, 3))
    torch.testing.assert_close(pooled, io["pooled_prenorm"], atol=1e-5, rtol=0)


def test_mmengine_training_checkpoint_is_read_without_running_anything():
    path = FIXTURES / "mmpretrain_full.pth"
    with pytest.raises(pickle.UnpicklingError, match="HistoryBuffer"):
        torch.load(path, weights_only=True)
    obj = load_pth(path)
    assert set(obj) == {"meta", "state_dict", "message_hub", "optimizer", "param_schedulers"}
    hub = obj["message_hub"]["log_scalars"]["train/loss"]
    assert type(hub).__name__ == "HistoryBuffer"
    assert type(hub).__mro__[1].__module__ == "convnext_cifar.files"  # an inert placeholder
    source = load_source(str(path))
    assert {"meta", "message_hub", "optimizer", "param_schedulers"} <= set(source.ignored)


def test_prefix_selects_the_backbone_like_mmpretrain_init_cfg():
    model, io = fixture_model()
    source = load_source(str(FIXTURES / "mmpretrain_full.pth"), prefix="backbone")
    report = load_backbone(model, source.state_dict, source.ignored)
    assert sorted(report.fresh) == ["head.fc.bias", "head.fc.weight"]  # norm3 is in the backbone
    with torch.no_grad():
        post = model.forward_head(model.forward_features(io["x"]), pre_logits=True)
    torch.testing.assert_close(post, io["pooled_postnorm"], atol=1e-5, rtol=0)
    with pytest.raises(UserError, match="prefix 'neck.'"):
        load_source(str(FIXTURES / "mmpretrain_full.pth"), prefix="neck")


@pytest.mark.parametrize("name, make", [
    ("mmpretrain_full.pth", to_mmpretrain),
    ("official_fb.pth", to_official),
    ("official_fcmae_backbone.pth", lambda sd: to_official(sd, "1,C")),
])
def test_round_trip_reproduces_the_upstream_files_tensor_for_tensor(name, make):
    reference = load_file(FIXTURES / "timm_reference.safetensors")
    upstream = load_source(str(FIXTURES / name)).state_dict
    raw = load_pth(FIXTURES / name)
    raw = raw["state_dict"] if "state_dict" in raw else raw["model"]
    written = make(reference)
    if "fcmae" in name:  # released FCMAE backbones have no final norm and no head
        written = {k: v for k, v in written.items() if not k.startswith(("norm.", "head."))}
    assert written.keys() == raw.keys()
    for k in raw:  # our writer is the real layout, shape for shape and bit for bit
        assert written[k].shape == raw[k].shape and torch.equal(written[k], raw[k]), k
    back, _, _ = to_timm(written)
    for k, v in back.items():
        assert torch.equal(v.reshape(reference[k].shape), reference[k]), k
    assert set(upstream) == set(back)


@pytest.mark.parametrize("name", ["convnextv2_atto", "convnextv2_nano", "convnextv2_tiny"])
@pytest.mark.parametrize("layout", ["mmpretrain", "official", "official-fcmae-1C", "fcmae-raw",
                                    "timm"])
def test_every_layout_of_every_size_converts_exactly(name, layout, tmp_path):
    torch.manual_seed(0)
    original = timm.create_model(name, num_classes=10).state_dict()
    writers = {"mmpretrain": to_mmpretrain, "official": to_official, "timm": dict,
               "official-fcmae-1C": lambda sd: to_official(sd, "1,C"),
               "fcmae-raw": to_official_fcmae_raw}
    path = tmp_path / "w.pth"
    torch.save({"model": writers[layout](original)}, path)
    source = load_source(str(path))
    assert infer_variant(source.state_dict) == name
    model = timm.create_model(name, num_classes=10)
    report = load_backbone(model, source.state_dict, source.ignored)
    loaded = model.state_dict()
    headless = layout == "fcmae-raw"
    assert sorted(report.fresh) == (sorted(HEAD) if headless else [])
    for k, v in original.items():
        if not (headless and k.startswith("head.")):
            assert torch.equal(loaded[k], v), k
    if headless:
        assert {"mask_token", "proj.weight", "pred.weight"} <= set(report.ignored)


def test_explicit_wrong_format_is_reported(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    torch.save({"model": to_official(timm.create_model("convnextv2_atto").state_dict())}, path)
    with pytest.raises(UserError, match="do not fit|no ConvNeXt-V2 tensors"):
        from convnext_cifar.config import ModelConfig
        from convnext_cifar.model.build import build_model

        build_model(ModelConfig(name="convnextv2_atto", pretrained=str(path),
                                pretrained_format="mmpretrain"), 10)


def test_mmengine_ema_checkpoint_gives_raw_or_ema_weights():
    """MMEngine's EMAHook swaps on save: `state_dict` holds the EMA, `ema_state_dict` the raw."""
    import json

    path = FIXTURES.parent / "mmengine_ema.pth"
    expected = json.loads((FIXTURES.parent / "mmengine_ema.json").read_text())
    raw = load_source(str(path), weights="raw")
    ema = load_source(str(path), weights="ema")
    assert raw.layout == ema.layout == "mmpretrain"
    for which, source in (("raw", raw), ("ema", ema)):
        for key, values in expected[which].items():
            timm_key = {"backbone.downsample_layers.0.0.weight": "stem.0.weight",
                        "head.fc.bias": "head.fc.bias"}[key]
            got = source.state_dict[timm_key].flatten()[:4].tolist()
            assert got == pytest.approx(values, abs=0), (which, key)
    assert not torch.equal(raw.state_dict["stem.0.weight"], ema.state_dict["stem.0.weight"])
    model, io = fixture_model()
    load_backbone(model, ema.state_dict, ema.ignored)  # every tensor fits the model


def test_official_model_ema_and_missing_ema(tmp_path):
    raw = load_pth(FIXTURES / "official_fb.pth")["model"]
    ema = {k: v + 1 for k, v in raw.items()}
    torch.save({"model": raw, "model_ema": ema, "epoch": 3}, tmp_path / "ckpt.pth")
    got = load_source(str(tmp_path / "ckpt.pth"), weights="ema").state_dict
    assert torch.equal(got["stem.0.weight"], ema["downsample_layers.0.0.weight"])
    got = load_source(str(tmp_path / "ckpt.pth"), weights="raw").state_dict
    assert torch.equal(got["stem.0.weight"], raw["downsample_layers.0.0.weight"])
    with pytest.raises(UserError, match="holds no EMA weights"):
        load_source(str(FIXTURES / "official_fb.pth"), weights="ema")
    with pytest.raises(UserError, match="no EMA"):
        load_source(str(FIXTURES / "timm_reference.safetensors"), weights="ema")
