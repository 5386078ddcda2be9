"""End to end: the full recipe (EMA, MixUp/CutMix, RandAugment, erasing, layer decay, TTA) trains,
records the EMA and the best of both, and resumes bit-exactly."""

import json

import pytest
import torch
from safetensors import safe_open
from support import (
    assert_same_run,
    die_after_state,
    signal_at_step,
    small_run_args,
    timeless_records,
)

from convnext_cifar import cli
from convnext_cifar.model.checkpoints import load_weights
from convnext_cifar.outputs.workdir import find_states
from convnext_cifar.training import loop as training_loop
from convnext_cifar.training.state import load_state

EVERYTHING = ("--ema.decay", "0.9", "--ema.warmup-steps", "3", "--aug.mixup-alpha", "0.8",
              "--aug.cutmix-alpha", "1.0", "--aug.mix-mode", "elem", "--aug.randaugment",
              "rand-m9-mstd0.5-inc1", "--aug.erasing-prob", "0.25", "--optim.layer-decay", "0.8",
              "--model.head-init-scale", "0.01", "--eval.tta", "flip")


SHORT = ("--sched.epochs", "3", "--sched.warmup-epochs", "1", "--data.limit-train", "200",
         "--data.limit-val", "100", "--model.drop-path-rate", "0.1", "--keep-last", "10",
         "--log-interval", "3")


def run(root, work, *extra):
    return cli.main(small_run_args(root, work, *SHORT, *EVERYTHING, *extra))


@pytest.fixture(scope="module")
def everything(cifar_root, tmp_path_factory):
    work = tmp_path_factory.mktemp("everything")
    assert run(cifar_root, work) == 0
    return work


def test_every_feature_on_records_ema_and_the_best_of_both(everything, capsys):
    val = [r for r in timeless_records(everything) if "top1" in r]
    assert [r["epoch"] for r in val] == [1, 2, 3]
    assert {"ema_top1", "ema_top5", "ema_val_loss"} <= set(val[0])
    with safe_open(str(everything / "best.safetensors"), "pt") as f:
        meta = f.metadata()
    weights, metrics = meta["weights"], json.loads(meta["metrics"])
    best = max(max(r["top1"], r["ema_top1"]) for r in val)
    assert metrics["top1"] == best and weights in ("raw", "ema")
    epoch = next(r for r in val if r["epoch"] == int(meta["epoch"]))
    assert metrics["top1"] == (epoch["ema_top1"] if weights == "ema" else epoch["top1"])
    capsys.readouterr()
    assert cli.main(["eval", str(everything / "best.safetensors"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] == "flip" and result["weights"] == weights
    assert result["top1"] == metrics["top1"] and result["top5"] == metrics["top5"]


def test_ema_weights_are_what_best_holds_when_ema_wins(cifar_root, tmp_path, monkeypatch):
    real = training_loop._validation_metrics

    def ema_always_wins(run, forward, *eager):
        metrics = real(run, forward, *eager)
        if forward is run.ema.forward:
            metrics["top1"] = 100.0
        return metrics

    monkeypatch.setattr(training_loop, "_validation_metrics", ema_always_wins)
    assert run(cifar_root, tmp_path, "--sched.epochs", "2", "--keep-states") == 0
    best = load_weights(tmp_path / "best.safetensors")
    assert best.weights == "ema" and best.epoch == 1  # 100 % first: later ties keep it
    state = load_state(tmp_path / "state_00000004.pt")["components"]  # after epoch 1
    assert all(torch.equal(best.state_dict[k], state["ema"][k].cpu()) for k in best.state_dict)
    assert not all(torch.equal(best.state_dict[k], state["model"][k].cpu())
                   for k in best.state_dict)


@pytest.mark.parametrize("how", ["sigterm", pytest.param("crash", marks=pytest.mark.slow)])
def test_every_feature_resumes_bit_exactly(cifar_root, tmp_path, everything, monkeypatch, how):
    if how == "sigterm":  # mid-epoch 2: the loader's device and host generators matter
        restore = signal_at_step(monkeypatch, 6)
        assert run(cifar_root, tmp_path) == 143
    else:  # a hard kill right after the first state is on disk
        restore = die_after_state(monkeypatch)
        with pytest.raises(SystemExit):
            run(cifar_root, tmp_path)
    restore()
    assert "ema" in load_state(find_states(tmp_path)[-1])["components"]
    assert run(cifar_root, tmp_path, "--resume", "auto") == 0
    assert_same_run(everything, tmp_path)
    a, b = (load_state(find_states(w)[-1])["components"]["ema"] for w in (everything, tmp_path))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 30 s: a learning check; every feature is pinned by the fast tests
def test_official_recipe_preset_learns_and_reports_ema(cifar_root, tmp_path):
    args = small_run_args(cifar_root, tmp_path, "--sched.epochs", "4", "--sched.warmup-epochs",
                          "1", "--model.pretrained", "none", "--model.name", "convnextv2_atto",
                          "--data.limit-train", "600", "--ema.decay", "0.95", "--optim.lr",
                          "4e-3")
    args[args.index("smoke")] = "cifar10-official-recipe"
    assert cli.main(args) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["aug"]["randaugment"] == "rand-m9-mstd0.5-inc1"
    assert cfg["optim"]["layer_decay"] == 0.9 and cfg["model"]["head_init_scale"] == 0.001
    val = [r for r in timeless_records(tmp_path) if "top1" in r]
    assert max(r["top1"] for r in val) > 30.0 and max(r["ema_top1"] for r in val) > 20.0
