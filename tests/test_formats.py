"""Every checkpoint layout against the real upstream files and outputs in tests/fixtures."""

import hashlib
import pickle
import re
from pathlib import Path

import pytest
import timm
import torch
from layouts import to_mmpretrain, to_official, to_official_fcmae_raw
from safetensors.torch import load_file, save_file

from convnext_cifar import cli
from convnext_cifar.errors import UserError
from convnext_cifar.files import load_pth
from convnext_cifar.formats import infer_variant, load_source, to_timm
from convnext_cifar.model import load_backbone

FIXTURES = Path(__file__).parent / "fixtures" / "convnextv2_atto"
HEAD = ["head.norm.weight", "head.norm.bias", "head.fc.weight", "head.fc.bias"]


def test_fixtures_are_the_upstream_files():
    table = re.findall(r"\| `(\w+\.\w+)` \| [\d,]+ \| `([0-9a-f]{64})` \|",
                       (FIXTURES / "README.md").read_text())
    assert len(table) == 6
    for name, sha in table:
        assert hashlib.sha256((FIXTURES / name).read_bytes()).hexdigest() == sha, name


def fixture_model():
    io = torch.load(FIXTURES / "io.pt", weights_only=True)
    dims = tuple(io["dims"].tolist())
    return timm.create_model("convnextv2_atto", num_classes=10, dims=dims).eval(), io


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


def test_truncated_and_wrong_architecture_files(tmp_path):
    torch.manual_seed(0)
    femto = timm.create_model("convnextv2_femto", num_classes=10).state_dict()
    path = tmp_path / "femto.pth"
    torch.save({"state_dict": to_mmpretrain(femto)}, path)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(UserError, match="not a readable PyTorch checkpoint"):
        load_source(str(cut))
    atto = timm.create_model("convnextv2_atto", num_classes=10)
    with pytest.raises(UserError, match=r"shape stem.0.weight \(48, 3, 4, 4\) vs \(40, 3, 4, 4\)"):
        load_backbone(atto, load_source(str(path)).state_dict)
    assert cli.main(["train", "--model.name", "convnextv2_atto", "--model.pretrained",
                     str(path), "--work-dir", str(tmp_path / "w"), "--device", "cpu"]) == 2


def test_convert_cli_writes_a_file_plain_timm_loads(tmp_path, capsys):
    torch.manual_seed(0)
    original = timm.create_model("convnextv2_atto", num_classes=10).state_dict()
    src = tmp_path / "mm.pth"
    torch.save({"meta": {}, "state_dict": to_mmpretrain(original), "optimizer": {}}, src)
    dst = tmp_path / "out" / "atto.safetensors"
    assert cli.main(["convert", str(src), str(dst)]) == 0
    out = capsys.readouterr().out
    assert "(convnextv2_atto)" in out and "fresh: nothing" in out and "optimizer" in out
    plain = timm.create_model("convnextv2_atto", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(dst), num_classes=10))
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in original.items())
    new_head = timm.create_model("convnextv2_atto", pretrained=True, num_classes=7,
                                 pretrained_cfg_overlay=dict(file=str(dst)))
    assert all(torch.equal(new_head.state_dict()[k], v) for k, v in original.items()
               if not k.startswith("head.fc."))
    strict = timm.create_model("convnextv2_atto", num_classes=10)
    strict.load_state_dict(load_file(dst))  # exact timm shapes, every key
    from safetensors import safe_open

    with safe_open(str(dst), "pt") as f:
        meta = f.metadata()
    assert meta["source_layout"] == "mmpretrain" and meta["source_file"] == src.name

    raw = tmp_path / "fcmae.pt"
    torch.save({"model": to_official_fcmae_raw(original)}, raw)
    dst2 = tmp_path / "fcmae.safetensors"
    assert cli.main(["convert", str(raw), str(dst2), "--model.name", "convnextv2_atto"]) == 0
    backbone = timm.create_model("convnextv2_atto", pretrained=True, num_classes=3,
                                 pretrained_cfg_overlay=dict(file=str(dst2)),
                                 pretrained_strict=False)
    assert torch.equal(backbone.stem[0].weight, original["stem.0.weight"])
    assert cli.main(["convert", str(raw), str(dst2), "--model.name", "convnextv2_tiny"]) == 2
    assert "holds convnextv2_atto weights, not convnextv2_tiny" in capsys.readouterr().err
    assert cli.main(["convert", str(raw), str(tmp_path / "x.pth")]) == 2


@pytest.mark.parametrize("layout", ["mmpretrain", "official", "timm"])
def test_train_accepts_every_layout(layout, tmp_path, capsys):
    from convnext_cifar.config import ModelConfig
    from convnext_cifar.model import build_model

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


def test_explicit_wrong_format_is_reported(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "w.pth"
    torch.save({"model": to_official(timm.create_model("convnextv2_atto").state_dict())}, path)
    with pytest.raises(UserError, match="do not fit|no ConvNeXt-V2 tensors"):
        from convnext_cifar.config import ModelConfig
        from convnext_cifar.model import build_model

        build_model(ModelConfig(name="convnextv2_atto", pretrained=str(path),
                                pretrained_format="mmpretrain"), 10)


def test_train_cli_from_an_mmengine_checkpoint_with_prefix(cifar_root, tmp_path, capsys):
    from conftest import small_run_args

    torch.manual_seed(0)
    original = timm.create_model("convnextv2_atto", num_classes=10).state_dict()
    src = tmp_path / "epoch_100.pth"
    torch.save({"meta": {"epoch": 100}, "state_dict": to_mmpretrain(original),
                "optimizer": {"state": {}}}, src)
    args = small_run_args(cifar_root, tmp_path / "run", "--sched.epochs", "1",
                          "--sched.warmup-epochs", "0", "--data.limit-train", "100",
                          "--model.pretrained", str(src), "--model.pretrained-prefix", "backbone")
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "(mmpretrain layout): loaded 138 tensors; fresh: head.fc.weight, head.fc.bias;" in out
    assert "ignored: meta, optimizer, head.fc.weight, head.fc.bias" in out


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


def test_convert_takes_the_ema_weights(tmp_path, capsys):
    from safetensors import safe_open

    torch.manual_seed(0)
    raw = timm.create_model("convnextv2_atto", num_classes=10).state_dict()
    ema = {k: v * 0.5 for k, v in raw.items()}
    mm_raw, mm_ema = to_mmpretrain(raw), to_mmpretrain(ema)
    torch.save({"meta": {}, "state_dict": mm_ema,  # as MMEngine's EMAHook saves it: swapped
                "ema_state_dict": {"module." + k: v for k, v in mm_raw.items()}},
               tmp_path / "epoch_3.pth")
    for weights, want in (("ema", ema), ("raw", raw)):
        out = tmp_path / f"{weights}.safetensors"
        assert cli.main(["convert", str(tmp_path / "epoch_3.pth"), str(out),
                         "--weights", weights]) == 0
        got = load_file(out)
        assert all(torch.equal(got[k], want[k]) for k in want), weights
        with safe_open(str(out), "pt") as f:
            assert f.metadata()["source_weights"] == weights
    assert cli.main(["convert", str(FIXTURES / "official_fb.pth"), str(tmp_path / "x.safetensors"),
                     "--weights", "ema"]) == 2
    assert "holds no EMA weights" in capsys.readouterr().err
