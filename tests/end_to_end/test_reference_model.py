"""End to end: the real ConvNeXt-V2-Tiny trains a short epoch (slow)."""

import json

import pytest
from support import small_run_args

from convnext_cifar import cli

pytestmark = pytest.mark.slow  # the real ConvNeXt-V2-Tiny


def test_reference_tiny_trains_one_short_epoch(cifar_root, tmp_path):
    args = small_run_args(cifar_root, tmp_path, "--sched.epochs", "1", "--sched.warmup-epochs",
                          "0", "--data.limit-train", "100", "--data.limit-val", "50")
    args[args.index("smoke")] = "cifar10"
    assert cli.main(args + ["--model.pretrained", "none"]) == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["model"]["name"] == "convnextv2_tiny" and cfg["model"]["drop_path_rate"] == 0.2
    assert (tmp_path / "best.safetensors").exists()
