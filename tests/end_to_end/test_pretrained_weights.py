"""End to end: `train` and `convert` from other toolboxes' checkpoints, damaged files, and an
offline hub."""

import os

import pytest
import timm
import torch
from cifar_files import CLASSES, write_image_folder
from layouts import to_mmpretrain, to_official_fcmae_raw
from safetensors.torch import load_file
from support import FIXTURES, small_run_args

from convnext_cifar import cli
from convnext_cifar.errors import UserError
from convnext_cifar.model.build import load_backbone
from convnext_cifar.model.formats import load_source

HUB_RUN = ("import sys, time; from convnext_cifar.config import ModelConfig\n"
           "from convnext_cifar.model.build import build_model\nt = time.monotonic()\n"
           "try:\n    build_model(ModelConfig(name='convnextv2_atto', "
           "pretrained='convnextv2_atto.fcmae'), 10)\n"
           "except Exception as e:\n    print(type(e).__name__, e)\n"
           "print(f'seconds {time.monotonic() - t:.1f}')")


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


def test_train_cli_from_an_mmengine_checkpoint_with_prefix(cifar_root, tmp_path, capsys):

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


def test_fine_tuning_from_a_run_of_other_classes_follows_the_class_names(tmp_path, capsys):
    """A checkpoint of this project names its classes: a run of other names gets a fresh
    classifier, a run sharing some names takes those rows (before: the head was kept as it
    was, 'fresh: nothing', its outputs meaning the old classes)."""
    def folder(name, classes):
        return write_image_folder(tmp_path / name, {"train": dict.fromkeys(classes, 6),
                                                    "val": dict.fromkeys(classes, 2)})

    def train(root, work, *extra):
        return cli.main(small_run_args(root, tmp_path / work, "--data.dataset", "folder",
                                       "--sched.epochs", "1", "--sched.warmup-epochs", "0",
                                       *extra))

    assert train(folder("pets", ["cat", "dog", "eel"]), "pets") == 0
    best = str(tmp_path / "pets" / "best.safetensors")
    capsys.readouterr()
    assert train(folder("bugs", ["ant", "bee", "cow"]), "bugs", "--model.pretrained", best) == 0
    out = capsys.readouterr().out
    assert ("fresh: head.fc.weight, head.fc.bias" in out and "head.fc fresh: none of the "
            "weights' 3 classes (cat, dog, eel) is one of this run's (ant, bee, cow)" in out)
    assert train(folder("mixed", ["cat", "dog", "fox"]), "mixed", "--model.pretrained", best) == 0
    out = capsys.readouterr().out
    assert "head.fc rows taken by class name for 2 of the run's 3 classes; fresh for fox" in out
    assert train(folder("same", ["cat", "dog", "eel"]), "same", "--model.pretrained", best) == 0
    assert "head.fc" not in capsys.readouterr().out.split("fresh: ")[1].split(";")[0]


def test_an_mmpretrain_checkpoint_of_the_same_classes_in_another_order_is_re_ordered(
        cifar_root, tmp_path, capsys):
    torch.manual_seed(0)
    weights = timm.create_model("convnextv2_atto", num_classes=10).state_dict()
    src = tmp_path / "epoch_100.pth"
    torch.save({"meta": {"dataset_meta": {"classes": tuple(reversed(CLASSES))}},
                "state_dict": to_mmpretrain(weights)}, src)
    args = small_run_args(cifar_root, tmp_path / "run", "--sched.epochs", "1",
                          "--sched.warmup-epochs", "0", "--data.limit-train", "100",
                          "--model.pretrained", str(src))
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "head.fc re-ordered: the weights hold the run's classes in another order" in out
    assert "fresh: nothing" in out
    unnamed = tmp_path / "unnamed.pth"
    torch.save({"state_dict": to_mmpretrain(weights)}, unnamed)
    assert cli.main(args[:-2] + ["--model.pretrained", str(unnamed), "--work-dir",
                                 str(tmp_path / "run2")]) == 0
    assert ("its 10-class head is kept: the weights name no classes, so they are taken to be "
            "this run's, in its order") in capsys.readouterr().out
