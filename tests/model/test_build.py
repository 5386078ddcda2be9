"""model/build.py: the timm model with a fresh head, pretrained weights from a file or the hub,
loaded with one verified rule and reported in one line."""

import os
import pickle

import pytest
import timm
import torch
from layouts import to_mmpretrain, to_official
from safetensors.torch import save_file

from convnext_cifar.config import ModelConfig
from convnext_cifar.errors import UserError
from convnext_cifar.model import build as model_build
from convnext_cifar.model.build import build_model, load_backbone
from convnext_cifar.model.formats import read_file


def _source(name="convnextv2_atto", num_classes=1000, seed=1):
    torch.manual_seed(seed)
    return timm.create_model(name, num_classes=num_classes).state_dict()


def _backbone_equal(model, sd):
    own = model.state_dict()
    return all(torch.equal(own[k], sd[k].reshape(own[k].shape))
               for k in own if not k.startswith("head."))


@pytest.fixture
def hub_reachable(monkeypatch):

    monkeypatch.setattr(model_build, "reachable", lambda address, timeout: True)


@pytest.mark.parametrize("layout", ["mmpretrain", "official", "timm"])
def test_train_accepts_every_layout(layout, tmp_path, capsys):
    from convnext_cifar.config import ModelConfig
    from convnext_cifar.model.build import build_model

    torch.manual_seed(0)
    original = timm.create_model("convnextv2_atto", num_classes=100).state_dict()
    writer = {"mmpretrain": to_mmpretrain, "official": to_official, "timm": dict}[layout]
    path = tmp_path / "w.safetensors" if layout == "timm" else tmp_path / "w.pth"
    if layout == "timm":
        save_file(original, path)
    else:
        torch.save({"model": writer(original)}, path)
    cfg = ModelConfig(name="convnextv2_atto", pretrained=str(path), pretrained_format=layout)
    model = build_model(cfg, 10)
    assert torch.equal(model.stages[2].blocks[3].mlp.grn.weight,
                       original["stages.2.blocks.3.mlp.grn.weight"])
    line = capsys.readouterr().out
    assert f"({layout} layout)" in line and "fresh: head.fc.weight, head.fc.bias;" in line


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


def test_head_init_scale_scales_only_a_fresh_head():
    torch.manual_seed(3)
    plain = build_model(ModelConfig(name="convnextv2_atto"), 10)
    torch.manual_seed(3)
    scaled = build_model(ModelConfig(name="convnextv2_atto", head_init_scale=0.001), 10)
    torch.testing.assert_close(scaled.head.fc.weight, plain.head.fc.weight * 0.001)
    torch.testing.assert_close(scaled.stem[0].weight, plain.stem[0].weight)


@pytest.mark.parametrize(("options", "message"), [
    ({"pretrained": "/no/such/weights.pth"}, "weights file /no/such/weights.pth does not exist"),
    ({"pretrained": "nosuch"}, "neither an existing file nor a timm pretrained tag"),
    ({"name": "convnextv2_atto", "pretrained": "convnextv2_tiny.fcmae_ft_in1k"},
     "is for convnextv2_tiny, but --model.name is convnextv2_atto"),
    ({"pretrained": "convnextv2_tiny.fcmae", "pretrained_weights": "ema"},
     "--model.pretrained-weights ema needs a training checkpoint"),
])
def test_check_pretrained_refuses_what_can_be_told_without_weights(options, message):
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        model_build.check_pretrained(ModelConfig(**options))


def test_check_pretrained_accepts_a_file_a_tag_of_the_model_and_none(tmp_path):
    (tmp_path / "w.pth").write_bytes(b"x")  # only its presence is checked here
    for spec in ("none", str(tmp_path / "w.pth"), "convnextv2_tiny.fcmae"):
        model_build.check_pretrained(ModelConfig(pretrained=spec))


def test_match_head_moves_each_row_to_its_class_and_keeps_fresh_rows_for_new_classes():
    torch.manual_seed(0)
    model = timm.create_model("convnextv2_atto", num_classes=3)
    fresh = model.state_dict()
    source = {"head.fc.weight": torch.randn(4, 320), "head.fc.bias": torch.randn(4),
              "stem.0.weight": torch.zeros(1)}
    moved, said = model_build.match_head(model, source, ["a", "b", "c", "d"], ["c", "x", "a"])
    assert torch.equal(moved["head.fc.weight"][0], source["head.fc.weight"][2])
    assert torch.equal(moved["head.fc.weight"][1], fresh["head.fc.weight"][1])  # x: fresh
    assert torch.equal(moved["head.fc.bias"][2], source["head.fc.bias"][0])
    assert moved["stem.0.weight"] is source["stem.0.weight"]
    assert said == "head.fc rows taken by class name for 2 of the run's 3 classes; fresh for x"
    same = {"head.fc.weight": torch.randn(3, 320), "head.fc.bias": torch.randn(3)}
    assert model_build.match_head(model, same, ["a", "b", "c"], ["a", "b", "c"]) == (same, "")
    reordered, said = model_build.match_head(model, same, ["a", "b", "c"], ["c", "a", "b"])
    assert torch.equal(reordered["head.fc.weight"], same["head.fc.weight"][[2, 0, 1]])
    assert said.startswith("head.fc re-ordered")
    other, said = model_build.match_head(model, same, ["a", "b", "c"], ["x", "y", "z"])
    assert "head.fc.weight" not in other and said.startswith("head.fc fresh: none of")


def test_convert_keeps_the_class_names_of_its_source(tmp_path):
    from safetensors import safe_open

    from convnext_cifar.model.formats import class_names, load_source

    torch.manual_seed(0)
    weights = to_mmpretrain(timm.create_model("convnextv2_atto", num_classes=3).state_dict())
    torch.save({"meta": {"dataset_meta": {"classes": ("b", "a", "c")}}, "state_dict": weights},
               tmp_path / "mm.pth")
    model_build.convert_to_timm(str(tmp_path / "mm.pth"), tmp_path / "t.safetensors")
    with safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert f.metadata()["classes"] == '["b", "a", "c"]'
    assert load_source(str(tmp_path / "t.safetensors")).classes == ["b", "a", "c"]
    torch.save({"meta": {"dataset_meta": {"classes": ("a", "b")}}, "state_dict": weights},
               tmp_path / "two.pth")  # two names for a three-class head: no names
    assert load_source(str(tmp_path / "two.pth")).classes is None
    assert class_names(["a", "a"]) is None and class_names("abc") is None
    assert class_names([1, 2]) is None and class_names(["x"]) == ["x"]
