"""End to end: `train` learns, writes its config, metrics and checkpoints, repeats itself with
the same seed, and tells the user what to expect."""

import json
import re

import pytest
import torch
from safetensors import safe_open
from support import quick_train, small_run_args, without_timings

from convnext_cifar import cli
from convnext_cifar.config import (
    load_config_file,
)


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(cifar_root, tmp_path_factory):
    """A 3-epoch atto run on the learnable generated data, through the real CLI entry."""
    work = tmp_path_factory.mktemp("run")
    assert cli.main(small_run_args(cifar_root, work, "--sched.epochs", "3")) == 0
    return work


def test_short_run_learns_far_above_chance(trained):
    val = [r for r in read_jsonl(trained / "metrics.jsonl") if "top1" in r]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    assert max(r["top1"] for r in val) > 60.0  # chance is 10 %
    train = [r for r in read_jsonl(trained / "metrics.jsonl") if "loss" in r]
    assert train[-1]["loss"] < train[0]["loss"]


def test_run_writes_config_metrics_and_checkpoints(trained):
    cfg = json.loads((trained / "config.json").read_text())
    assert cfg["model"]["name"] == "convnextv2_atto" and cfg["work_dir"] == str(trained)
    records = read_jsonl(trained / "metrics.jsonl")
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "top1" in r]
    assert set(train[0]) == {"epoch", "step", "loss", "lr", "grad_norm", "img_per_s"}
    assert set(val[0]) == {"epoch", "val_loss", "top1", "top5", "balanced_accuracy", "macro_f1",
                           "train_s", "validate_s", "state_s"}
    assert all(r["train_s"] > 0 and r["validate_s"] > 0 for r in val)
    # the state written after epoch 1 held the loop before epoch 2's validation, none before 1
    assert val[0]["state_s"] == 0 and all(r["state_s"] > 0 for r in val[1:])
    # 1000 images / batch 50 = 20 steps an epoch, logged every 5 steps
    assert [r["step"] for r in train if r["epoch"] == 1] == [5, 10, 15, 20]
    assert train[-1]["step"] == 60 and train[-1]["lr"] < 1e-4
    assert sorted(p.name for p in trained.glob("*.safetensors")) == [
        "best.safetensors", "epoch_1.safetensors", "epoch_2.safetensors", "epoch_3.safetensors"]
    best = max(val, key=lambda r: r["top1"])
    with safe_open(str(trained / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["metrics"])["top1"] == best["top1"]
    assert int(meta["epoch"]) == best["epoch"]
    assert json.loads(meta["classes"])[0] == "airplane"
    assert json.loads(meta["config"]) == cfg


def test_eval_of_best_reproduces_recorded_top1(trained, cifar_root, capsys):
    capsys.readouterr()
    assert cli.main(["eval", str(trained / "best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    recorded = max((r for r in read_jsonl(trained / "metrics.jsonl") if "top1" in r),
                   key=lambda r: r["top1"])
    assert result["top1"] == recorded["top1"] and result["top5"] == recorded["top5"]
    assert result["num_images"] == 300 and len(result["per_class"]) == 10
    assert sum(map(sum, result["confusion"])) == 300
    assert cli.main(["eval", str(trained / "best.safetensors"), "--data.root",
                     str(cifar_root)]) == 0
    assert "per-class accuracy" in capsys.readouterr().out


def test_same_seed_same_run(cifar_root, tmp_path):
    args = ("--sched.epochs", "1", "--sched.warmup-epochs", "0", "--data.limit-train", "200")
    runs = []
    for name in ("a", "b"):
        assert cli.main(small_run_args(cifar_root, tmp_path / name) + list(args)) == 0
        with safe_open(str(tmp_path / name / "best.safetensors"), "pt") as f:
            runs.append({k: f.get_tensor(k) for k in f.keys()})
    assert all(torch.equal(runs[0][k], runs[1][k]) for k in runs[0])
    strip = [[without_timings(r)
              for r in read_jsonl(tmp_path / n / "metrics.jsonl")] for n in ("a", "b")]
    assert strip[0] == strip[1]


def test_the_run_projects_its_wall_time_after_the_first_log_window(cifar_root, tmp_path, capsys):
    assert cli.main(quick_train(cifar_root, "--work-dir", str(tmp_path / "w"), "--sched.epochs", "2"
                          )) == 0
    lines = capsys.readouterr().out.splitlines()
    first_log = next(i for i, line in enumerate(lines) if line.startswith("epoch 1/2 [2/4]"))
    projections = [i for i, line in enumerate(lines)
                   if line.startswith("projected wall time of the run: ")]
    assert projections[0] == first_log + 1
    assert "the 2 validation(s) are not measured yet" in lines[projections[0]]
    # refined once the first validation is timed
    assert len(projections) == 2 and "+ 1 validation(s) at" in lines[projections[1]]
    assert re.search(r"run eta \d+ (s|min)", lines[first_log])


def test_a_lagging_ema_is_warned_about_and_auto_keeps_up(cifar_root, tmp_path, capsys):
    assert cli.main(quick_train(cifar_root, "--work-dir", str(tmp_path / "a"), "--ema.decay",
                          "0.999")) == 0
    err = capsys.readouterr().err
    assert ("warning: --ema.decay 0.999 averages over about 1,000 optimizer steps, 25000% of "
            "this 4-step run") in err
    assert "75.37 top-1 against 82.32 raw" in err and "--ema.decay auto" in err
    assert cli.main(quick_train(cifar_root, "--work-dir", str(tmp_path / "b"), "--ema.decay",
                          "auto")) == 0
    assert "--ema.decay" not in capsys.readouterr().err
    assert load_config_file(tmp_path / "b" / "config.json").ema.decay == "auto"
    records = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().split("\n")
               if x]
    assert "ema_top1" in records[-1]
