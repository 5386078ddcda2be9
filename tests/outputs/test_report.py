"""outputs/report.py: the held-out figures are right, and the preview is the loader's first
batch."""

import io

import pytest
import torch

from convnext_cifar import cli
from convnext_cifar.config import load_config_file
from convnext_cifar.model.checkpoints import load_weights
from convnext_cifar.outputs import report as outputs_report
from convnext_cifar.use.evaluate import evaluate_checkpoint


def load_config_file_from_args(root, tmp_path, *preset):
    """The config `train` would run with these options (through --print-config)."""
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert cli.main(["train", *preset, "--data.root", str(root), "--data.no-download",
                         "--device", "cpu", "--compile", "off", "--model.name",
                         "convnextv2_atto", "--model.pretrained", "none", "--work-dir",
                         str(tmp_path / "w"), "--print-config"]) == 0
    path = tmp_path / "config.json"
    path.write_text(buf.getvalue())
    return load_config_file(path)


def test_the_held_out_figures_are_right(run_dir):
    run = outputs_report.read_run(run_dir)
    held, data = outputs_report.held_out(run, "cpu", None, None)
    counts = held.confusion()
    assert int(counts.sum()) == len(data.val.images) == 120
    recorded = evaluate_checkpoint(run_dir / "best.safetensors", compile=False)
    assert counts.tolist() == recorded["confusion"]
    assert 100.0 * int(counts.diag().sum()) / 120 == pytest.approx(recorded["top1"])
    ckpt = load_weights(run_dir / "best.safetensors")
    assert held.about == (f"best.safetensors: epoch {ckpt.epoch}, chosen by top1 "
                          f"{ckpt.metrics['top1']:.2f}")
    picked = held.mistakes()
    wrong = int((held.predicted != held.labels).sum())
    assert len(picked) == min(outputs_report.GALLERY, wrong) and wrong > 0
    confidence = [float(held.probs[i].max()) for i in picked]
    assert all(held.predicted[i] != held.labels[i] for i in picked)
    assert confidence == sorted(confidence, reverse=True)
    others = set(range(120)) - set(picked)  # nothing left out is a more confident mistake
    assert all(held.predicted[i] == held.labels[i] or float(held.probs[i].max())
               <= confidence[-1] for i in others)


def test_the_preview_is_the_loaders_first_batch(cifar_root, tmp_path):
    from convnext_cifar.data.kinds import load_dataset
    from convnext_cifar.runtime import resolve_runtime
    from convnext_cifar.training.build import build_run

    cfg = load_config_file_from_args(cifar_root, tmp_path, "--preset", "cifar10-official-recipe")
    data = load_dataset(cfg.data, "cpu")
    x, y = outputs_report.augmentation_preview(cfg, data)
    run = build_run(cfg, resolve_runtime(cfg), data=data, pretrained=False)
    real_x, real_y, _ = next(iter(run.loader.epoch(0)))
    assert torch.equal(x, real_x[:32])
    assert torch.equal(y, real_y[:32]) and y.ndim == 2  # MixUp/CutMix: soft targets
    assert cfg.aug.randaugment and cfg.aug.erasing_prob > 0  # the recipe's augmentation


def test_the_page_says_only_what_the_run_did_and_where_it_stands():
    from pathlib import Path

    from convnext_cifar.config import AugConfig, DataConfig, TrainConfig

    plain = TrainConfig(data=DataConfig(padding=0, flip_prob=0.0))
    assert outputs_report.augmentation_said(plain) == "no augmentation"
    mixed = TrainConfig(aug=AugConfig(mixup_alpha=0.8, erasing_prob=0.25))
    assert outputs_report.augmentation_said(mixed) == (
        "random crop after 4 px of zero padding, horizontal flip p 0.5, random erasing p 0.25, "
        "MixUp alpha 0.8")
    assert outputs_report.relative("/data/cifar", Path("/data/runs/a")) == "../../cifar"
    assert outputs_report.relative("none", Path("/data/runs/a")) == "none"
    held = outputs_report.HeldOut(["cat", "dog", "eel"], torch.zeros(4, 3, 2, 2),
                                  torch.tensor([0, 0, 0, 1]),
                                  torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [0, 1, 0]]))
    assert outputs_report.top_confusions(held) == ["cat → dog 33 % (1 of 3)",
                                                   "cat → eel 33 % (1 of 3)"]


def test_the_ema_lag_is_said_only_with_an_ema():
    from pathlib import Path

    run = outputs_report.RunData(Path("r"), {}, None, [
        {"epoch": 1, "top1": 50.0, "ema_top1": 40.0}, {"epoch": 2, "top1": 60.0,
                                                      "ema_top1": 59.0}])
    assert outputs_report.ema_lag(run).startswith(
        "EMA weights against the raw weights, top-1: -1.00 points at the last validation "
        "(epoch 2), -5.50 on average over 2 validation(s), -10.00 at its lowest (epoch 1)")
    run.records = [{"epoch": 1, "top1": 50.0}]
    assert outputs_report.ema_lag(run) == ""
