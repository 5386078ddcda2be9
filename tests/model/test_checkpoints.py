"""model/checkpoints.py: weights files carry everything needed to rebuild the model, and
anything else is one clear line."""

import json

import pytest
import torch
from safetensors.torch import save_file

from convnext_cifar.config import TrainConfig, to_dict
from convnext_cifar.errors import UserError
from convnext_cifar.model.checkpoints import load_weights, save_weights
from convnext_cifar.outputs.workdir import weights_epoch
from convnext_cifar.presets import CIFAR10Smoke


def test_weights_and_everything_to_rebuild_them_round_trip(tmp_path):
    path = tmp_path / "best.safetensors"
    tensors = {"head.fc.weight": torch.arange(6.0).view(3, 2).t(),  # not contiguous
               "head.fc.bias": torch.ones(2)}
    identity = {"classes": ["a", "b"], "train": "1234", "val": "5678"}
    save_weights(path, tensors, CIFAR10Smoke(), ["a", "b"], 7, {"top1": 91.5}, {"device": "cpu"},
                 weights="ema", identity=identity)
    ckpt = load_weights(path)
    assert torch.equal(ckpt.state_dict["head.fc.weight"], tensors["head.fc.weight"])
    assert to_dict(ckpt.config) == to_dict(CIFAR10Smoke())
    assert (ckpt.classes, ckpt.epoch, ckpt.metrics, ckpt.weights, ckpt.identity) == (
        ["a", "b"], 7, {"top1": 91.5}, "ema", identity)
    assert weights_epoch(path) == 7 and weights_epoch(tmp_path / "none") == -1


def test_files_of_others_and_damaged_ones_are_one_line(tmp_path):
    plain = tmp_path / "timm.safetensors"
    save_file({"w": torch.ones(1)}, str(plain))
    with pytest.raises(UserError, match="was not written by convnext-cifar.*--model.pretrained"):
        load_weights(plain)
    cut = tmp_path / "cut.safetensors"
    save_weights(cut, {"w": torch.ones(100)}, TrainConfig(), ["a"], 1, {}, {})
    cut.write_bytes(cut.read_bytes()[:-50])
    with pytest.raises(UserError, match="is not a readable safetensors checkpoint"):
        load_weights(cut)


@pytest.mark.parametrize("field, value, problem", [
    ("classes", "[]", "field classes is \\[\\], not a list of at most 100,000 distinct"),
    ("classes", '["a", "b"]', "field classes names 2 classes but the weights' head has 1"),
    ("metrics", '{"top1": "high"}', "not an object of numbers"),
    ("weights", "average", "not raw or ema"),
    ("epoch", "-1", "epoch is -1"),
    ("config", '{"optim": {"lr": -1}}', "invalid --optim.lr -1"),
])
def test_edited_metadata_is_named_and_refused(tmp_path, field, value, problem):
    good = tmp_path / "good.safetensors"
    head = {"head.fc.weight": torch.ones(1, 2)}
    save_weights(good, head, TrainConfig(), ["a"], 1, {"top1": 1.0}, {})
    from safetensors import safe_open

    with safe_open(str(good), "pt") as f:
        metadata = dict(f.metadata())
    metadata[field] = value
    edited = tmp_path / "edited.safetensors"
    save_file(head, str(edited), metadata=metadata)
    with pytest.raises(UserError, match=f"damaged metadata .*{problem}"):
        load_weights(edited)
    assert json.loads(metadata["classes"]) or field == "classes"
