"""Imbalanced classes and photos (issue 22, the parts built so far): the balanced sampler,
class weights, balanced accuracy and macro F1 in eval and validation, the best checkpoint by
either, EXIF orientation."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import small_run_args
from PIL import Image

from convnext_cifar import cli
from convnext_cifar.checkpoints import load_weights
from convnext_cifar.evaluate import EvalResult
from convnext_cifar.images import decode_rgb


def test_balanced_accuracy_and_macro_f1_against_a_hand_computation():
    # rows: true class; class 2 never occurs in the labels (it is left out of both means)
    res = EvalResult(13, 0.0, 0.0, 0.0, [[8, 2, 0], [1, 1, 1], [0, 0, 0]])
    assert res.balanced_accuracy == pytest.approx(100 * (8 / 10 + 1 / 3) / 2)
    f1_0 = 2 * 8 / (10 + 9)  # precision 8/9, recall 8/10
    f1_1 = 2 * 1 / (3 + 3)  # precision 1/3, recall 1/3
    assert res.macro_f1 == pytest.approx(100 * (f1_0 + f1_1) / 2)
    assert EvalResult(2, 0, 0, 0, [[0, 1], [1, 0]]).macro_f1 == 0.0  # nothing right


def test_validation_and_eval_report_them_and_best_follows_the_chosen_metric(
        cifar_root, tmp_path, capsys):
    work = tmp_path / "run"
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "2", "--data.limit-train",
                                   "100", "--data.limit-val", "90", "--optim.lr", "5e-4",
                                   "--eval.best-metric", "macro_f1")) == 0
    val = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()
           if '"top1"' in x]
    assert all({"balanced_accuracy", "macro_f1"} <= set(r) for r in val)
    best = max(val, key=lambda r: r["macro_f1"])  # the first of equals
    ckpt = load_weights(work / "best.safetensors")
    assert ckpt.epoch == best["epoch"] and ckpt.metrics["macro_f1"] == best["macro_f1"]
    out = capsys.readouterr().out
    assert "done: best macro_f1" in out
    lines = [x for x in out.splitlines() if " val  loss" in x]  # each names the metric it keeps
    assert len(lines) == 2 and all(f"  macro_f1 {r['macro_f1']:.2f}  " in x and x.endswith(
        f"(best macro_f1 {max(v['macro_f1'] for v in val[:i + 1]):.2f})")
        for i, (x, r) in enumerate(zip(lines, val)))
    assert cli.main(["eval", str(work / "best.safetensors"), "--json", "--compile", "off"]) == 0
    result = json.loads(capsys.readouterr().out)
    confusion = result["confusion"]
    again = EvalResult(90, 0, 0, 0, confusion)
    assert result["balanced_accuracy"] == pytest.approx(again.balanced_accuracy)
    assert result["macro_f1"] == pytest.approx(best["macro_f1"])
    assert cli.main(["eval", str(work / "best.safetensors"), "--compile", "off"]) == 0
    assert "balanced acc. %" in capsys.readouterr().out


def _sideways(path: Path, upright: np.ndarray, **save) -> None:
    """`upright` stored rotated a quarter turn with EXIF orientation 6 (display: turn it 90
    degrees clockwise), as phones store portrait photos."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.rot90(upright, k=1).copy()).save(path, exif=exif, **save)


@pytest.mark.parametrize("suffix", [".png", ".webp"])
def test_exif_orientation_is_applied(tmp_path, suffix):
    rng = np.random.default_rng(0)
    upright = rng.integers(0, 256, (24, 40, 3), dtype=np.uint8)
    Image.fromarray(upright).save(tmp_path / "plain.png")
    extra = {"lossless": True} if suffix == ".webp" else {}
    _sideways(tmp_path / f"turned{suffix}", upright, **extra)
    plain, turned = decode_rgb(tmp_path / "plain.png"), decode_rgb(tmp_path / f"turned{suffix}")
    assert turned.shape == plain.shape == (3, 24, 40)
    assert (turned == plain).all()


def test_training_eval_and_predict_read_a_photo_upright(tmp_path, capsys):
    from cifar_files import write_image_folder

    root = write_image_folder(tmp_path / "photos", {"train": {"a": 20, "b": 20},
                                                    "val": {"a": 5, "b": 5}})
    upright = np.asarray(Image.open(root / "val" / "a" / "0000.png").convert("RGB"))
    (root / "val" / "a" / "0000.png").unlink()
    _sideways(root / "val" / "a" / "0000.png", upright)  # the same picture, stored sideways
    Image.fromarray(upright).save(tmp_path / "upright.png")
    from convnext_cifar.config import DataConfig
    from convnext_cifar.datasets import load_dataset

    data = load_dataset(DataConfig(dataset="folder", root=root, decode_processes=1))
    index = data.val.labels.tolist().index(0)  # the first image of class a
    assert (data.val.images[index] == decode_rgb(tmp_path / "upright.png")).all()
    work = tmp_path / "run"
    assert cli.main(small_run_args(root, work, "--data.dataset", "folder", "--sched.epochs", "1",
                                   "--sched.warmup-epochs", "0", "--data.batch-size", "10",
                                   "--data.decode-processes", "1")) == 0
    capsys.readouterr()
    assert cli.main(["predict", str(work / "best.safetensors"), str(root / "val" / "a" /
                                                                   "0000.png"),
                     str(tmp_path / "upright.png"), "--json"]) == 0
    first, second = (json.loads(x) for x in capsys.readouterr().out.splitlines())
    assert first["top_k"] == second["top_k"]
    assert len(first["top_k"]) == 2  # the default top-5 of a 2-class model: both classes


# ---- the balanced sampler and class weights ------------------------------------------------------

def test_the_balanced_sampler_draws_classes_equally_often_from_seeded_generators():
    import torch

    from convnext_cifar.config import DataConfig
    from convnext_cifar.data import DeviceLoader, Normalize

    labels = torch.tensor([0] * 90 + [1] * 8 + [2] * 2)
    images = torch.zeros(100, 3, 32, 32, dtype=torch.uint8)
    cfg = DataConfig(batch_size=25, sampler="balanced")
    normalize = Normalize((0, 0, 0), (1, 1, 1), 32, torch.device("cpu"), False)
    loader = DeviceLoader(images, labels, cfg, seed=0, normalize=normalize)
    counts = torch.zeros(3)
    for epoch in range(30):
        drawn = torch.cat([y for _, y, _ in loader.epoch(epoch)])
        assert len(drawn) == 100  # an epoch keeps its length: as many draws as images
        counts += torch.bincount(drawn, minlength=3)
    # 3,000 draws, each class 1/3 likely: 1,000 each, sd ~26
    assert (counts - 1000).abs().max() < 110, counts
    again = torch.cat([y for _, y, _ in loader.epoch(7)])
    assert torch.equal(again, torch.cat([y for _, y, _ in loader.epoch(7)]))  # seeded
    uniform = DeviceLoader(images, labels, DataConfig(batch_size=25), 0, normalize)
    assert torch.bincount(torch.cat([y for _, y, _ in uniform.epoch(0)])).tolist() == [90, 8, 2]


def test_class_weights_against_a_hand_computation():
    import torch
    import torch.nn.functional as F

    from convnext_cifar.config import LossConfig
    from convnext_cifar.engine import cross_entropy_sum

    labels = [0, 0, 0, 1]
    assert LossConfig("balanced").weights([3, 1, 0]) == pytest.approx([4 / 6, 2.0, 0.0])
    assert LossConfig("none").weights([3, 1]) is None
    assert LossConfig("1,2.5").weights([3, 1]) == [1.0, 2.5]
    w = torch.tensor([4 / 6, 2.0])
    logits = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    target = torch.tensor(labels)
    logp = F.log_softmax(logits, 1)
    eps = 0.2
    by_hand = sum((1 - eps) * w[y] * -logp[i, y] + eps / 2 * (w * -logp[i]).sum()
                  for i, y in enumerate(labels))
    assert cross_entropy_sum(eps, w)(logits, target) == pytest.approx(float(by_hand), rel=1e-5)
    soft = torch.tensor([[0.7, 0.3], [1.0, 0.0], [0.5, 0.5], [0.1, 0.9]])  # MixUp targets
    smoothed = soft * (1 - eps) + eps / 2
    by_hand = -(w * smoothed * logp).sum()
    assert cross_entropy_sum(eps, w)(logits, soft) == pytest.approx(float(by_hand), rel=1e-5)


@pytest.mark.parametrize(("args", "message"), [
    (["--loss.class-weights", "heavy"], "--loss.class-weights"),
    (["--loss.class-weights", "1,-2"], "--loss.class-weights"),
    (["--loss.class-weights", "1,2,3"], "gives 3 weights for 10 classes"),
])
def test_bad_class_weights_are_one_line(args, message, cifar_root, tmp_path, capsys):
    assert cli.main(small_run_args(cifar_root, tmp_path / "run", *args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


@pytest.mark.slow  # three short runs
def test_a_balanced_weighted_run_resumes_bit_exactly(cifar_root, tmp_path, monkeypatch):
    from conftest import signal_at_step
    from safetensors.torch import load_file

    args = ("--sched.epochs", "2", "--data.limit-train", "150", "--data.limit-val", "50",
            "--data.sampler", "balanced", "--loss.class-weights", "balanced",
            "--sched.warmup-epochs", "0")
    assert cli.main(small_run_args(cifar_root, tmp_path / "whole", *args)) == 0
    restore = signal_at_step(monkeypatch, 4)  # mid epoch 2 (3 steps an epoch)
    assert cli.main(small_run_args(cifar_root, tmp_path / "cut", *args)) == 143
    restore()
    assert cli.main(small_run_args(cifar_root, tmp_path / "cut", *args, "--resume",
                                   "auto")) == 0
    a = load_file(tmp_path / "whole" / "epoch_2.safetensors")
    b = load_file(tmp_path / "cut" / "epoch_2.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_the_validation_line_shows_the_chosen_metric_raw_and_ema(capsys):
    from convnext_cifar.report import Progress

    record = {"epoch": 3, "val_loss": 0.5, "top1": 84.0, "top5": 100.0,
              "balanced_accuracy": 66.67, "macro_f1": 60.0, "ema_top1": 96.0, "ema_top5": 100.0,
              "ema_balanced_accuracy": 97.78, "ema_macro_f1": 95.0}
    Progress(10, live=False).log_val(record, 97.78, "balanced_accuracy")
    Progress(10, live=False).log_val({k: v for k, v in record.items() if "ema" not in k}, 84.0)
    chosen, plain = capsys.readouterr().out.splitlines()
    assert chosen == ("epoch 3/10 val  loss 0.5000  top1 84.00  top5 100.00  balanced_accuracy "
                      "66.67  ema top1 96.00 top5 100.00 balanced_accuracy 97.78  "
                      "(best balanced_accuracy 97.78)")
    assert plain == "epoch 3/10 val  loss 0.5000  top1 84.00  top5 100.00  (best top1 84.00)"
